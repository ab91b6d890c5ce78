"""
Fixtures for the end-to-end tier: the real ``twistd -n --pidfile= cosedge``
daemon in a subprocess, a real misbehaving origin on loopback, and a raw
socket HTTP client that reports exactly what came over the wire.

Every daemon started here is stopped by a finalizer (SIGTERM, then SIGKILL
after a bound), and a failing test shows the logs of the daemons it used.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from email.message import Message
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Protocol

import attrs
import pytest

from .origin import MisbehavingOrigin

BUCKET = "example-1250000000"
HOST = f"{BUCKET}.file.myqcloud.com"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0

#: The daemons started since the current test began (their logs are shown if it fails).
_daemons_in_test: list[Daemon] = []


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def refused_start(config: Path) -> str:
    """Run ``twistd cosedge`` with ``config``, expecting it to refuse to start; its output (stdout and stderr)."""
    proc = subprocess.run(
        [*_twistd(), "-n", "--pidfile=", "cosedge", "--config", str(config)],
        cwd=config.parent,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
    )
    output = (proc.stdout + proc.stderr).decode()
    assert proc.returncode != 0, output
    assert "Traceback" not in output
    return output


def _twistd() -> list[str]:
    sibling = Path(sys.executable).with_name("twistd")
    if sibling.exists():
        return [str(sibling)]
    return [sys.executable, "-m", "twisted"]


@attrs.define(eq=False)
class Daemon:
    """One ``twistd cosedge`` process with its own directory, port and logs."""

    root: Path
    origin: str
    fill: dict[str, float] = attrs.field(factory=dict)
    #: More buckets: name -> (origin, origin_pull).
    buckets: dict[str, tuple[str, bool]] = attrs.field(factory=dict)
    request_timeout: float = 10
    #: RLIMIT_FSIZE for the daemon (SIGXFSZ ignored): writes past it fail with EFBIG, like a full disk.
    file_size_limit: int | None = None
    #: ``[server] workers``: processes serving the listener.
    workers: int = 1
    #: More TOML appended to the configuration file.
    extra_config: str = ""
    #: More [server] listen endpoints beside the TCP port.
    more_listen: tuple[str, ...] = ()
    #: More lines of the [server] section.
    server_extra: str = ""
    port: int = attrs.field(factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def tmp_dir(self) -> Path:
        return self.data_dir / ".cosedge" / "tmp"

    @property
    def config_path(self) -> Path:
        return self.root / "cosedge.toml"

    @property
    def access_log(self) -> Path:
        return self.root / "access.log"

    @property
    def stdout_path(self) -> Path:
        return self.root / "twistd.out"

    @property
    def stderr_path(self) -> Path:
        return self.root / "twistd.err"

    def object_path(self, key: str) -> Path:
        return self.data_dir / BUCKET / key

    def write_config(self) -> None:
        fill = "\n".join(f"{k} = {v!r}" for k, v in self.fill.items())
        self.config_path.write_text(
            f"""\
[server]
listen = {json.dumps([f"tcp:{self.port}:interface=127.0.0.1", *self.more_listen])}
domains = ["file.myqcloud.com"]
data_dir = "{self.data_dir}"
access_log = "{self.access_log}"
request_timeout = {self.request_timeout}
workers = {self.workers}
{self.server_extra}

[fill]
{fill}

[buckets."{BUCKET}"]
origin = "{self.origin}"
origin_pull = true
"""
            + "".join(
                f'\n[buckets."{name}"]\norigin = "{origin}"\norigin_pull = {str(pull).lower()}\n'
                for name, (origin, pull) in self.buckets.items()
            )
            + self.extra_config
        )

    def start(self) -> None:
        """Start the daemon and wait (bounded) until its port accepts connections."""
        assert self.proc is None, "already running"
        self.write_config()
        self.starts += 1
        since = len(self.log())
        with self.stdout_path.open("ab") as out, self.stderr_path.open("ab") as err:
            self.proc = subprocess.Popen(
                [*self._limits(), *_twistd(), "-n", "--pidfile=", "cosedge", "--config", str(self.config_path)],
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        _daemons_in_test.append(self)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                if self.starts < 3 and self.log().count("Address already in use") >= self.starts:
                    # Another process took the free port in the meantime: take another.
                    self.port = free_port()
                    self.start()
                    return
                pytest.fail(f"twistd cosedge exited with {code} during start-up:\n{self.log()}")
            # Our own daemon's listener, not whatever else may hold the port; and
            # its start-up done (the listener is bound before the store's sweep).
            started = self.log()[since:]
            if f"starting on {self.port}" in started and "cosedge serving" in started:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                    return
                except OSError:
                    pass
            time.sleep(0.05)
        self.stop()
        pytest.fail(f"twistd cosedge did not listen on {self.port} within {START_TIMEOUT}s:\n{self.log()}")

    def _limits(self) -> list[str]:
        """A prefix that sets resource limits and then execs the rest of the command line."""
        if self.file_size_limit is None:
            return []
        return [
            sys.executable,
            "-c",
            "import os, resource, signal, sys;"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN);"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({self.file_size_limit}, {self.file_size_limit}));"
            "os.execv(sys.argv[1], sys.argv[1:])",
        ]

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``; returns the exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        return proc.wait(5)

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind."""
        proc, self.proc = self.proc, None
        assert proc is not None, "not running"
        proc.kill()
        proc.wait(5)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        """The daemon's standard output and error so far."""
        out = self.stdout_path.read_text("utf-8", "replace") if self.stdout_path.exists() else ""
        err = self.stderr_path.read_text("utf-8", "replace") if self.stderr_path.exists() else ""
        return out + ("\n--- stderr ---\n" + err if err else "")

    def problems(self, since: int = 0) -> list[str]:
        """Critical events and tracebacks in the daemon's log after offset ``since``."""
        return [
            line
            for line in self.log()[since:].splitlines()
            if "#critical]" in line or "#error]" in line or "Traceback (most recent call last)" in line
        ]

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Poll (bounded) the daemon's log until ``pattern`` matches a line."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log())
            if match is not None:
                return match
            if time.monotonic() > deadline:
                pytest.fail(f"no log line matching {pattern!r} within {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def fill_outcome(self, key: str, timeout: float = 10.0, bucket: str = BUCKET) -> str:
        """Wait for the log line that ends the fill of ``key``: "stored" or the failure reason."""
        match = self.wait_for_log(rf"fill {bucket}/{re.escape(key)} (stored|failed: (\S+))", timeout)
        return match.group(2) or match.group(1)

    def request(
        self,
        target: str | bytes,
        *,
        method: str = "GET",
        host: str | None = HOST,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        head = [f"{method} ".encode() + (target if isinstance(target, bytes) else target.encode()) + b" HTTP/1.1"]
        if host is not None:
            head.append(b"Host: " + host.encode())
        for name, value in (headers or {}).items():
            head.append(f"{name}: {value}".encode("latin-1"))
        head.append(b"Connection: close")
        return raw_request(self.port, b"\r\n".join(head) + b"\r\n\r\n", method=method)


@attrs.frozen
class Reply:
    """A response exactly as received: status, headers, and every body byte after the headers."""

    status: int
    headers: Message
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    @property
    def error_code(self) -> str | None:
        match = re.search(rb"<Code>([^<]*)</Code>", self.body)
        return match.group(1).decode() if match else None


def raw_request(port: int, data: bytes, *, method: str = "GET", timeout: float = 10.0) -> Reply:
    """
    Send ``data`` as is to 127.0.0.1:``port`` and read until the server
    closes (bounded in time and size): nothing is normalised on the way.
    """
    chunks = []
    total = 0
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and total < 64 * 1024 * 1024:
            piece = s.recv(65536)
            if not piece:
                break
            chunks.append(piece)
            total += len(piece)
        else:
            raise AssertionError(f"the response did not end within {timeout}s / 64 MiB")
    raw = b"".join(chunks)
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {raw[:200]!r}"
    status_line, _, header_block = head.partition(b"\r\n")
    version, status, _ = status_line.split(b" ", 2)
    assert version == b"HTTP/1.1", status_line
    headers = BytesHeaderParser().parsebytes(header_block + b"\r\n\r\n")
    assert "chunked" not in (headers.get("transfer-encoding") or ""), "expected a Content-Length response"
    if method == "HEAD":
        assert body == b"", "a HEAD response had a body"
    return Reply(int(status), headers, body)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        for daemon in _daemons_in_test:
            report.sections.append((f"cosedge daemon log ({daemon.root})", daemon.log()))
    return report


@pytest.fixture(autouse=True)
def _track_daemons() -> Iterator[None]:
    _daemons_in_test.clear()
    yield
    _daemons_in_test.clear()


@pytest.fixture(scope="session")
def origin() -> Iterator[MisbehavingOrigin]:
    """The misbehaving origin, shared by the whole tier (tests use distinct paths)."""
    server = MisbehavingOrigin()
    server.start()
    try:
        yield server
    finally:
        server.stop()


#: Short deadlines so that stalls and failures end within a couple of seconds;
#: long back-offs so that a failed key is not fetched again behind a test's back.
FAST_FILL = {
    "connect_timeout": 2,
    "header_timeout": 2,
    "idle_timeout": 1,
    "total_timeout": 30,
    "not_found_ttl": 60,
    "retry_backoff": 60,
}


class MakeDaemon(Protocol):
    def __call__(self, file_size_limit: int | None = None, **fill: float) -> Daemon: ...


@pytest.fixture
def make_daemon(tmp_path_factory: pytest.TempPathFactory, origin: MisbehavingOrigin) -> Iterator[MakeDaemon]:
    """Start a daemon of one's own, with [fill] settings overridden (stopped at the end of the test)."""
    daemons: list[Daemon] = []

    def make(file_size_limit: int | None = None, **fill: float) -> Daemon:
        daemon = Daemon(tmp_path_factory.mktemp("cosedge"), origin.netloc, {**FAST_FILL, **fill})
        daemon.file_size_limit = file_size_limit
        daemons.append(daemon)
        daemon.start()
        return daemon

    yield make
    for daemon in daemons:
        daemon.stop()
    for daemon in daemons:
        assert daemon.problems() == [], "the daemon logged an unexpected error"


#: Extra buckets of the shared daemon: one whose origin refuses connections
#: (its port is closed), one with origin-pull off.
DEAD_BUCKET = "dead-1250000000"
OFF_BUCKET = "off-1250000000"


@pytest.fixture(scope="module")
def _module_daemon(tmp_path_factory: pytest.TempPathFactory, origin: MisbehavingOrigin) -> Iterator[Daemon]:
    # Bound but not listening: connections to it are refused, and no other
    # process can take the port while the daemon points a bucket at it.
    with socket.socket() as refusing:
        refusing.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{refusing.getsockname()[1]}"
        buckets = {DEAD_BUCKET: (dead, True), OFF_BUCKET: (origin.netloc, False)}
        daemon = Daemon(tmp_path_factory.mktemp("cosedge"), origin.netloc, dict(FAST_FILL), buckets, request_timeout=2)
        try:
            daemon.start()
            yield daemon
        finally:
            daemon.stop()


@pytest.fixture
def edge(_module_daemon: Daemon) -> Iterator[Daemon]:
    """
    The daemon shared by a test module (tests use distinct keys); restarted
    if a test left it down.  The test fails if the daemon logged an
    unexpected error or traceback while it ran.
    """
    if _module_daemon.proc is None or _module_daemon.proc.poll() is not None:
        _module_daemon.proc = None
        _module_daemon.start()
    _daemons_in_test.append(_module_daemon)
    since = len(_module_daemon.log())
    yield _module_daemon
    assert _module_daemon.problems(since) == [], "the daemon logged an unexpected error"


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it holds, for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def at_once(daemon: Daemon, target: str, clients: int) -> list[Reply]:
    """``clients`` clients sending the same GET at the same moment (a barrier); their replies."""
    barrier = threading.Barrier(clients, timeout=20)

    def one(_: int) -> Reply:
        barrier.wait()
        return daemon.request(target)

    with ThreadPoolExecutor(max_workers=clients) as pool:
        return list(pool.map(one, range(clients), timeout=60))


def tmp_files(daemon: Daemon) -> list[str]:
    """The names in the daemon's temporary directory."""
    return sorted(os.listdir(daemon.tmp_dir)) if daemon.tmp_dir.exists() else []


class Stream:
    """One GET on a raw socket whose answer is read as it arrives (bounded by ``timeout`` each time)."""

    def __init__(self, daemon: Daemon, host: str, path: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        self.data = b""
        self.closed = False

    @property
    def head(self) -> bytes:
        return self.data.partition(b"\r\n\r\n")[0]

    @property
    def body(self) -> bytes:
        return self.data.partition(b"\r\n\r\n")[2] if b"\r\n\r\n" in self.data else b""

    def read(self, until: Callable[[], bool], timeout: float) -> bool:
        """Read until ``until()`` or the connection closes; whether ``until()`` came true in time."""
        deadline = time.monotonic() + timeout
        while not until() and not self.closed and time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                break
            self.data += chunk
            self.closed = not chunk
        return until()

    def whole(self, timeout: float = 30) -> bytes:
        """The body once the server has closed the connection."""
        self.read(lambda: False, timeout)
        self.sock.close()
        return self.body
