"""
``[server] workers``: shared listeners, the worker pool, the worker's channel,
cross-process claims, and counters summed over processes.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError, ProcessDone, ProcessTerminated
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from cosedge import workers as workers_module
from cosedge.config import Config, ConfigError, ServerConfig, parse_config, parse_origin
from cosedge.fill.claims import Claims
from cosedge.service import build_service
from cosedge.stats import Stats
from cosedge.storage.disk import DiskStore
from cosedge.testing import MemoryStore
from cosedge.worker import WorkerChannel
from cosedge.workers import (
    FIRST_LISTENER_FD,
    FROM_WORKER_FD,
    STOP_TIMEOUT,
    TO_WORKER_FD,
    SharedEndpoint,
    WorkerPool,
    frame,
    parse_tcp,
)

from .helpers import BUCKET, ORIGIN, Edge, StepCooperator, capture_logs, edge_config, result_of, source_for

# -- configuration ------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [(1, 1), (4, 4), (64, 64)])
def test_workers_setting_takes_a_count(value: int, expected: int) -> None:
    """``workers`` is a whole number of processes from 1 to 64."""
    assert ServerConfig(workers=value).workers == expected


def test_workers_auto_is_one_per_usable_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """``workers = "auto"`` runs one process per CPU this process may use (a cpuset, taskset)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5})
    assert parse_config({"server": {"workers": "auto"}}).server.workers == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(200)))
    assert parse_config({"server": {"workers": "auto"}}).server.workers == 64


@pytest.mark.parametrize("value", [0, 65, -1, True, "2", 1.5, "many"])
def test_a_bad_workers_value_names_the_setting(value: object) -> None:
    """Anything else is refused with a message naming the section and setting."""
    with pytest.raises(ConfigError, match=r"\[server\] workers must be"):
        parse_config({"server": {"workers": value}})


# -- listen descriptions --------------------------------------------------------


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("tcp:8080", (socket.AF_INET, "", 8080, 50)),
        ("tcp:8080:interface=127.0.0.1", (socket.AF_INET, "127.0.0.1", 8080, 50)),
        ("tcp:port=80:backlog=511:interface=10.0.0.1", (socket.AF_INET, "10.0.0.1", 80, 511)),
        ("tcp6:8080:interface=\\:\\:1", (socket.AF_INET6, "::1", 8080, 50)),
        ("tcp6:0", (socket.AF_INET6, "::", 0, 50)),
        ("tcp:8080:interface=\\:\\:1", (socket.AF_INET6, "::1", 8080, 50)),  # tcp: with an IPv6 literal
        ("unix:/run/cosedge.sock", None),
        ("systemd:domain=INET:index=0", None),
        ("tcp:8080:interface=127.0.0.1:reuse=1", None),
        ("tcp:99999", None),
        ("tcp:8080:backlog=x", None),
        ("ssl:443", None),
    ],
)
def test_tcp_listeners_are_recognised(description: str, expected: object) -> None:
    """Plain tcp/tcp6 listeners get one socket per process; anything else is shared as is."""
    assert parse_tcp(description) == expected


def _sock(fd: int) -> socket.socket:
    return socket.socket(fileno=os.dup(fd))


def test_a_tcp_listener_gets_one_socket_per_process_on_the_same_port() -> None:
    """
    The primary binds its own socket and one more per worker, all with
    SO_REUSEPORT on the same address, so the kernel spreads connections.
    """
    reactor = MemoryReactorClock()
    endpoint = SharedEndpoint(reactor, "tcp:0:interface=127.0.0.1", copies=3)
    port = result_of(endpoint.listen(object()))  # type: ignore[arg-type]
    try:
        assert port is not None and result_of(endpoint.ready) is None
        assert len(reactor.adoptedPorts) == 1 and reactor.adoptedPorts[0][1] == socket.AF_INET
        assert len(endpoint.shares) == 3 and len({fd for fd, _ in endpoint.shares}) == 3
        addresses = set()
        for fd, family in endpoint.shares:
            with _sock(fd) as s:
                assert family == socket.AF_INET
                assert s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
                assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
                addresses.add(s.getsockname())
        (address,) = addresses
        assert address[0] == "127.0.0.1" and address[1] != 0
    finally:
        endpoint.close_shares()
    assert endpoint.shares == []


def test_a_port_held_by_another_process_is_address_in_use() -> None:
    """
    SO_REUSEPORT must not let a second daemon share a port silently: a port
    already listening fails the start with "address in use", as with one process.
    """
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # even one that allows sharing
        other.bind(("127.0.0.1", 0))
        other.listen(1)
        port = other.getsockname()[1]
        endpoint = SharedEndpoint(MemoryReactorClock(), f"tcp:{port}:interface=127.0.0.1", copies=1)
        failure = result_of(endpoint.listen(object()))  # type: ignore[arg-type]
        assert isinstance(failure, Failure) and failure.check(CannotListenError)
        assert "in use" in str(failure.value)
        result_of(endpoint.ready).trap(CannotListenError)
        assert endpoint.shares == []


def test_other_listeners_share_their_one_socket() -> None:
    """A unix or systemd listener is opened once; every worker gets a copy of that socket."""

    @attrs.define
    class Port:
        socket: socket.socket

        def fileno(self) -> int:
            return self.socket.fileno()

    with socket.socket(socket.AF_UNIX) as unix:
        endpoint = SharedEndpoint(MemoryReactorClock(), "unix:/nonexistent/x.sock", copies=2)
        endpoint._share_port(Port(unix))
        (fd_a, fam_a), (fd_b, fam_b) = endpoint.shares
        assert fd_a == fd_b != unix.fileno() and fam_a == fam_b == socket.AF_UNIX
        endpoint.close_shares()
        with pytest.raises(OSError):
            os.fstat(fd_a)


def test_a_worker_leaves_a_shared_unix_socket_as_the_primary_made_it(tmp_path: Path) -> None:
    """
    A worker serving a unix: listener neither opens the socket's mode
    (Twisted would set 0666) nor removes its path nor shuts the socket down
    when it stops: they are the primary's, and the other processes still
    serve it.
    """
    from cosedge.adopted import AdoptedEndpoint

    path = tmp_path / "edge.sock"
    with socket.socket(socket.AF_UNIX) as primary:
        primary.bind(str(path))
        os.chmod(path, 0o600)
        primary.listen(8)
        primary.setblocking(False)
        reactor = MemoryReactorClock()
        port = result_of(AdoptedEndpoint(reactor, os.dup(primary.fileno()), socket.AF_UNIX).listen(Factory()))
        assert not isinstance(port, Failure), port
        assert (path.stat().st_mode & 0o777) == 0o600
        stopped = port.stopListening()
        reactor.advance(0)
        assert stopped.called
        assert path.exists()
        with socket.socket(socket.AF_UNIX) as client:  # still accepting: not shut down for everyone
            client.connect(str(path))


# -- the pool ------------------------------------------------------------------


@attrs.define(eq=False)
class FakeProcess:
    """What a ProcessProtocol sees of its process."""

    pid: int
    written: list[tuple[int, bytes]] = attrs.field(factory=list)
    closed: list[int] = attrs.field(factory=list)
    signals: list[str] = attrs.field(factory=list)

    def writeToChild(self, fd: int, data: bytes) -> None:
        if fd in self.closed:
            raise KeyError(fd)  # as Twisted's process transport does
        self.written.append((fd, data))

    def closeChildFD(self, fd: int) -> None:
        self.closed.append(fd)

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)

    def messages(self) -> list[dict[str, Any]]:
        data = b"".join(d for fd, d in self.written if fd == TO_WORKER_FD)
        out = []
        while data:
            (n,) = struct.unpack("!I", data[:4])
            out.append(pickle.loads(data[4 : 4 + n]))
            data = data[4 + n :]
        return out


@attrs.define(eq=False)
class Spawner:
    """A fake ``spawnProcess`` that starts nothing and records every call."""

    calls: list[dict[str, Any]] = attrs.field(factory=list)

    def __call__(self, protocol: Any, executable: str, args: list[str], env: dict[str, str], childFDs: Any) -> None:
        process = FakeProcess(pid=1000 + len(self.calls))
        self.calls.append({"protocol": protocol, "args": args, "env": env, "fds": childFDs, "process": process})
        protocol.makeConnection(process)

    def protocol(self, n: int) -> Any:
        return self.calls[n]["protocol"]

    def process(self, n: int) -> FakeProcess:
        process: FakeProcess = self.calls[n]["process"]
        return process


def _say(protocol: Any, **message: Any) -> None:
    protocol.childDataReceived(FROM_WORKER_FD, frame(json.dumps(message).encode()))


@pytest.fixture
def pool() -> Any:
    reactor = MemoryReactorClock()
    spawn = Spawner()
    endpoint = SharedEndpoint(reactor, "tcp:0:interface=127.0.0.1", copies=2)
    config = edge_config()
    pool = WorkerPool(reactor, 3, [endpoint], lambda: config, spawn)
    yield pool, reactor, spawn, endpoint
    endpoint.close_shares()


def test_workers_start_once_the_listeners_listen(pool: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    count − 1 workers start after the listeners are up, each with the
    configuration and its own listening socket, and without the variables
    that would let it talk to systemd.
    """
    pool, reactor, spawn, endpoint = pool
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    pool.startService()
    assert spawn.calls == []  # nothing to hand out yet
    result_of(endpoint.listen(object()))
    assert len(spawn.calls) == 2
    given = set()
    for n, call in enumerate(spawn.calls):
        assert call["args"][1:] == ["-m", "cosedge.worker"]
        assert "NOTIFY_SOCKET" not in call["env"]
        fds = call["fds"]
        assert fds[0] == 0 and fds[1] == 1 and fds[2] == 2
        assert fds[TO_WORKER_FD] == "w" and fds[FROM_WORKER_FD] == "r"
        given.add(fds[FIRST_LISTENER_FD])
        (init,) = spawn.process(n).messages()
        assert init["init"]["index"] == n + 1
        assert init["init"]["listeners"] == [(FIRST_LISTENER_FD, socket.AF_INET)]
        assert init["init"]["config"] == pool.config()
    assert given == {fd for fd, _ in endpoint.shares}
    assert pool.check() == "0 of 2 worker process(es) serving"
    _say(spawn.protocol(0), ready=True)
    assert not pool.started.called  # the daemon is not ready before every worker is
    _say(spawn.protocol(1), ready=True)
    assert pool.check() is None
    assert result_of(pool.started) is True


def test_a_worker_imports_the_same_cosedge_as_the_primary(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A source checkout that the interpreter would not find by itself goes
    first on the worker's PYTHONPATH; an installed package is left to the
    normal path (standard library first).
    """
    from cosedge.workers import _worker_environ

    here = str(Path(workers_module.__file__).parents[1])
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != here])
    assert _worker_environ()["PYTHONPATH"] == os.pathsep.join([here, "/elsewhere"])
    monkeypatch.setattr(sys, "path", [*sys.path, here])
    assert _worker_environ()["PYTHONPATH"] == "/elsewhere"


def test_counters_are_summed_over_processes_and_kept_when_a_worker_dies(pool: Any) -> None:
    """
    Totals are the primary's counters plus each worker's latest report; a
    worker that dies keeps its counts in the totals (counters never go back).
    """
    pool, reactor, spawn, endpoint = pool
    pool.startService()
    result_of(endpoint.listen(object()))
    own = Stats()
    own.inc("hits", 5)
    own.statuses[200] += 5
    theirs = Stats()
    theirs.inc("hits", 7)
    theirs.statuses[200] += 7
    theirs.fill_failed("timeout")
    theirs.observe_fill(0.2)
    _say(spawn.protocol(0), stats=theirs.to_json(), gauges={"running": 2, "queued": 1, "not_found": 3})
    _say(spawn.protocol(1), stats=theirs.to_json(), gauges={"running": 1, "queued": 0, "not_found": 0})
    totals = pool.totals(own, 1, 0, 0)
    assert totals.stats.events["hits"] == 19
    assert totals.stats.statuses[200] == 19
    assert totals.stats.fill_failures["timeout"] == 2
    assert totals.stats.fill_duration_count == 2 and totals.stats.fill_duration_counts[2] == 2
    assert (totals.fills_running, totals.fills_queued, totals.not_found_remembered) == (4, 1, 3)
    spawn.protocol(0).processEnded(Failure(ProcessTerminated(signal=9)))
    after = pool.totals(own, 0, 0, 0)
    assert after.stats.events["hits"] == 19
    assert after.fills_running == 1  # gauges of a dead worker are gone


def test_a_dead_workers_temporary_files_are_removed(pool: Any) -> None:
    """A worker that dies (a kill cannot clean up) has its temporary files swept by pid, once."""
    pool, reactor, spawn, endpoint = pool
    swept: list[int] = []
    pool._sweep = lambda pid: swept.append(pid) or succeed(2)
    pool.startService()
    result_of(endpoint.listen(object()))
    spawn.protocol(1).processEnded(Failure(ProcessTerminated(signal=9)))
    assert swept == [spawn.process(1).pid]


def test_the_primary_serves_a_dead_workers_sockets_until_it_is_back(pool: Any) -> None:
    """
    While a worker is dead, the primary accepts on that worker's own
    sockets (the kernel keeps giving them new connections), and lets go of
    them once the new worker serves, or when the daemon stops.
    """
    pool, reactor, spawn, endpoint = pool
    site = object()
    pool._site = site
    pool.startService()
    result_of(endpoint.listen(object()))

    @attrs.define
    class Port:
        fd: int
        stopped: bool = False

        def stopListening(self) -> None:
            self.stopped = True

    ports: list[Port] = []

    def adopt(fd: int, family: int, factory: object) -> Port:
        assert (family, factory) == (socket.AF_INET, site)
        ports.append(Port(fd))
        return ports[-1]

    reactor.adoptStreamPort = adopt  # type: ignore[method-assign]
    spawn.protocol(0).processEnded(Failure(ProcessTerminated(signal=9)))
    assert [p.fd for p in ports] == [endpoint.shares[0][0]]  # worker 1's own socket
    reactor.advance(1.0)
    assert not ports[0].stopped  # the new worker does not serve yet
    _say(spawn.protocol(-1), ready=True)
    assert ports[0].stopped and pool._covering == {}
    spawn.protocol(1).processEnded(Failure(ProcessTerminated(signal=9)))
    assert [p.fd for p in ports][1:] == [endpoint.shares[1][0]]
    pool.stopService()
    assert ports[1].stopped


def test_a_dead_worker_is_started_again_with_a_growing_delay(pool: Any) -> None:
    """
    A worker that dies is started again after 1 s, then 2 s, 4 s … while it
    keeps dying young, with the same listening socket as before.
    """
    pool, reactor, spawn, endpoint = pool
    pool.startService()
    result_of(endpoint.listen(object()))
    reactor.advance(5)
    _say(spawn.protocol(0), ready=True)
    assert pool.processes() == [
        {"process": 1, "pid": 1000, "serving": True, "uptime": 5.0, "restarts": 0},
        {"process": 2, "pid": 1001, "serving": False, "uptime": 5.0, "restarts": 0},
    ]
    first_fd = spawn.calls[0]["fds"][FIRST_LISTENER_FD]
    for n, delay in enumerate([1.0, 2.0, 4.0]):
        spawn.protocol(len(spawn.calls) - 2 if n == 0 else -1).processEnded(Failure(ProcessTerminated(exitCode=1)))
        calls = len(spawn.calls)
        reactor.advance(delay - 0.01)
        assert len(spawn.calls) == calls
        reactor.advance(0.01)
        assert len(spawn.calls) == calls + 1
        assert spawn.calls[-1]["fds"][FIRST_LISTENER_FD] == first_fd
        assert spawn.process(-1).messages()[0]["init"]["index"] == 1
        assert pool.processes()[0]["restarts"] == n + 1
    spawn.protocol(-1).processEnded(Failure(ProcessTerminated(exitCode=1)))
    assert pool.processes()[0] == {"process": 1, "pid": None, "serving": False, "uptime": None, "restarts": 4}


def test_stop_closes_every_pipe_waits_then_kills(pool: Any) -> None:
    """
    Stopping closes each worker's pipe (its signal to stop), fires only when
    every worker has exited, kills those still there after the bound, starts
    no replacement, and then closes the sockets kept for workers.
    """
    pool, reactor, spawn, endpoint = pool
    pool.startService()
    result_of(endpoint.listen(object()))
    stopped = pool.stopService()
    assert [spawn.process(n).closed for n in (0, 1)] == [[TO_WORKER_FD], [TO_WORKER_FD]]
    assert not stopped.called
    spawn.protocol(0).processEnded(Failure(ProcessDone(0)))
    reactor.advance(STOP_TIMEOUT)
    assert spawn.process(1).signals == ["KILL"]
    assert not stopped.called and endpoint.shares
    spawn.protocol(1).processEnded(Failure(ProcessTerminated(signal=9)))
    assert stopped.called
    reactor.advance(60)
    assert len(spawn.calls) == 2
    assert endpoint.shares == []


def test_a_worker_that_cannot_be_spawned_is_tried_again(pool: Any) -> None:
    """
    A spawn refused by the system (no descriptors, no memory) is logged and
    tried again after the back-off, and stopping meanwhile still works.
    """
    pool, reactor, spawn, endpoint = pool
    refusals = [OSError(24, "Too many open files")]

    def flaky(*args: Any, **kwargs: Any) -> None:
        if refusals:
            raise refusals.pop()
        spawn(*args, **kwargs)

    pool._spawn = flaky
    pool.startService()
    result_of(endpoint.listen(object()))
    assert len(spawn.calls) == 1  # the first worker slot failed, the second started
    assert pool.processes()[0] == {"process": 1, "pid": None, "serving": False, "uptime": None, "restarts": 1}
    reactor.advance(1.0)
    assert len(spawn.calls) == 2
    stopped = pool.stopService()
    for n in (0, 1):
        spawn.protocol(n).processEnded(Failure(ProcessDone(0)))
    assert stopped.called


def test_a_failed_listener_starts_no_worker(pool: Any, logged_failures: list[Any]) -> None:
    """If the listeners cannot listen, no worker is started (the start already failed)."""
    pool, reactor, spawn, endpoint = pool
    pool.startService()
    endpoint.ready.errback(CannotListenError("127.0.0.1", 1, OSError("in use")))
    assert spawn.calls == []
    assert result_of(pool.started) is False


def test_live_changes_and_purges_reach_every_worker(tmp_path: Path) -> None:
    """
    With workers = 3, a replaced configuration and a forgotten key are sent
    to each worker, so a live change applies in every process at once.
    """
    reactor = MemoryReactorClock()
    spawn = Spawner()
    base = edge_config(data_dir=str(tmp_path))
    config = attrs.evolve(base, server=attrs.evolve(base.server, workers=3, listen=("tcp:0:interface=127.0.0.1",)))
    service = build_service(config, reactor, _agent=object(), _store=MemoryStore(), _spawn=spawn)  # type: ignore[arg-type]
    service.startService()
    try:
        assert len(spawn.calls) == 2
        changed = config.without_bucket(BUCKET)
        service.replace_config(changed)
        service.forget(BUCKET, ("a", "b.txt"))
        for n in (0, 1):
            messages = spawn.process(n).messages()
            assert messages[1] == {"config": changed}
            assert messages[2] == {"forget": (BUCKET, ("a", "b.txt"))}
        # Every process's fills, numbered by process.
        fill = {"bucket": BUCKET, "key": "w.txt", "state": "running", "bytes": 5, "expected": 9, "age": 1.0}
        _say(spawn.protocol(1), stats=Stats().to_json(), gauges={}, fills=[fill])
        assert service.in_flight() == [{**fill, "process": 2}]
        # A worker whose pipe has closed (it is ending) does not fail a change.
        spawn.process(0).closed.append(TO_WORKER_FD)
        service.replace_config(config)
        assert spawn.process(1).messages()[-1] == {"config": config}
    finally:
        for n in (0, 1):
            spawn.protocol(n).processEnded(Failure(ProcessDone(0)))
        result_of(service.stopService())


# -- the worker's side ---------------------------------------------------------


@attrs.define(eq=False)
class FakeService:
    config: Any
    started: bool = False
    forgotten: list[tuple[str, tuple[str, ...]]] = attrs.field(factory=list)
    stats: Stats = attrs.field(factory=Stats)

    @property
    def filler(self) -> Any:
        return self

    running = queued = 0

    def remembered_not_found(self) -> int:
        return 0

    @property
    def health(self) -> Any:
        return self

    def down_hosts(self) -> list[str]:
        return []

    def in_flight(self) -> list[dict[str, object]]:
        return [{"bucket": BUCKET, "key": "k", "state": "running", "bytes": 1, "expected": 2, "age": 0.5}]

    def forget(self, bucket: str, segments: tuple[str, ...]) -> None:
        self.forgotten.append((bucket, segments))

    def replace_config(self, config: Any) -> None:
        self.config = config

    def startService(self) -> None:
        self.started = True

    def stopService(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        d.callback(None)
        return d


class OnceReactor(MemoryReactorClock):
    """A reactor that, like the real one, refuses a second stop."""

    def stop(self) -> None:
        from twisted.internet.error import ReactorNotRunning

        if self.hasStopped:
            raise ReactorNotRunning()
        super().stop()


def test_the_worker_builds_its_service_from_init_and_follows_changes() -> None:
    """
    The worker builds its service from the ``init`` frame, says it is ready,
    reports its counters every second, and applies later configurations and
    purges.
    """
    reactor = OnceReactor()
    built: list[tuple[Any, Any, Any]] = []

    def build(config: Config, r: Any, listeners: Any) -> FakeService:
        built.append((config, r, listeners))
        return FakeService(config)

    channel = WorkerChannel(reactor, build)
    transport = StringTransport()
    channel.makeConnection(transport)
    config = edge_config()
    channel.dataReceived(frame(pickle.dumps({"init": {"index": 1, "listeners": [(5, 2)], "config": config}})))
    assert built == [(config, reactor, [(5, 2)])]
    assert channel.service.started

    def sent() -> list[dict[str, Any]]:
        data, out = transport.value(), []
        while data:
            (n,) = struct.unpack("!I", data[:4])
            out.append(json.loads(data[4 : 4 + n]))
            data = data[4 + n :]
        return out

    assert sent() == [{"ready": True}]
    channel.service.stats.inc("hits", 3)
    reactor.advance(1.0)
    assert sent()[-1]["stats"]["events"] == {"hits": 3}
    assert sent()[-1]["fills"] == channel.service.in_flight()
    changed = config.without_bucket(BUCKET)
    channel.dataReceived(frame(pickle.dumps({"config": changed})))
    channel.dataReceived(frame(pickle.dumps({"forget": (BUCKET, ("k",))})))
    assert channel.service.config == changed
    assert channel.service.forgotten == [(BUCKET, ("k",))]


def test_the_worker_stops_once_however_it_is_asked() -> None:
    """The primary closing the pipe, then SIGTERM, stop the worker once, without an error."""
    reactor = OnceReactor()
    channel = WorkerChannel(reactor, lambda *a: FakeService(a[0]))
    channel.readConnectionLost()
    channel.quit()
    channel.connectionLost()
    assert reactor.hasStopped


# -- claims across processes --------------------------------------------------------

_HOLDER = """
import sys
from cosedge.fill.claims import Claims
claims = Claims(sys.argv[1])
print(claims.claim(sys.argv[2], tuple(sys.argv[3:])), flush=True)
sys.stdin.readline()
"""


def _holder(path: Path, bucket: str, *segments: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path), bucket, *segments],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "True"
    return proc


def _end(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(10)


def test_a_key_claimed_by_another_process_cannot_be_claimed(tmp_path: Path) -> None:
    """
    A claim excludes other processes until they release it or exit, and only
    for that key.
    """
    path = tmp_path / ".cosedge" / "claims"
    holder = _holder(path, BUCKET, "a", "b.txt")
    claims = Claims(str(path))
    try:
        assert claims.claim(BUCKET, ("a", "b.txt")) is False
        assert claims.claim(BUCKET, ("a", "c.txt")) is True
    finally:
        _end(holder)
    assert claims.claim(BUCKET, ("a", "b.txt")) is True
    claims.release(BUCKET, ("a", "b.txt"))
    _end(_holder(path, BUCKET, "a", "b.txt"))  # released: another process gets it
    claims.close()


def test_a_fill_claimed_elsewhere_does_not_ask_the_origin(tmp_path: Path) -> None:
    """
    A miss on a key another process is filling redirects as always but
    starts no fill here: the origin is asked once in all.
    """
    path = tmp_path / "claims"
    edge = Edge(StepCooperator())
    edge.filler.claims = Claims(str(path))
    edge.origin.add("busy.txt", b"x")
    holder = _holder(path, BUCKET, "busy.txt")
    try:
        response = edge.request("/busy.txt")
        assert response.status == 302
        edge.flush_origin()
        assert edge.origin.gets(b"/busy.txt") == 0
        assert edge.stats.events["fills_skipped_elsewhere"] == 1
    finally:
        _end(holder)


def test_a_fill_stored_by_another_process_meanwhile_is_not_repeated(tmp_path: Path) -> None:
    """
    A key that another process stored between this process's miss and its
    claim is not fetched again.
    """
    store = DiskStore(str(tmp_path))
    edge = Edge(StepCooperator(), store=store)
    edge.filler.claims = Claims(str(tmp_path / "claims"))
    edge.origin.add("late.txt", b"x")
    pending = store.begin(BUCKET, ("late.txt",))
    pending.write(b"stored elsewhere")
    pending.commit({}, None)
    assert edge.filler.start(BUCKET, ("late.txt",), source_for(parse_origin(ORIGIN), ("late.txt",))) is False
    assert edge.stats.events["fills_skipped_stored"] == 1
    assert edge.origin.gets(b"/late.txt") == 0


def test_a_finished_fill_releases_its_claim(tmp_path: Path) -> None:
    """Once a fill ends, another process may claim the key again."""
    path = tmp_path / "claims"
    edge = Edge(StepCooperator(), gated=True)  # the origin answers when told to
    edge.filler.claims = Claims(str(path))
    edge.origin.add("done.txt", b"body")
    assert edge.request("/done.txt").status == 302
    assert edge.filler.running == 1
    holder = subprocess.run(
        [sys.executable, "-c", _HOLDER, str(path), BUCKET, "done.txt"], input="", capture_output=True, text=True
    )
    assert holder.stdout.strip() == "False"  # held while the fill runs
    edge.flush_origin()
    assert edge.filler.running == 0 and edge.stats.events["fills_stored"] == 1
    _end(_holder(path, BUCKET, "done.txt"))


def test_stats_travel_between_processes_intact() -> None:
    """Counters sent as JSON by a worker add up exactly in the primary."""
    stats = Stats()
    stats.inc("hits", 2)
    stats.statuses[404] += 1
    stats.fill_failed("http-500")
    stats.observe_fill(3.0)
    total = Stats()
    total.add(json.loads(json.dumps(stats.to_json())))
    total.add(stats.to_json())
    assert total.snapshot() == {
        "hits": 4,
        "fills_failed": 2,
        "fills_failed_by_reason": {"http-500": 2},
        "responses_by_status": {404: 2},
    }
    assert total.fill_duration_sum == 6.0 and total.fill_duration_counts[-5] == 2


def test_worker_log_events_reach_the_primary_log_intact(logged_failures: list[Any]) -> None:
    """
    A worker's log events come out of the primary's log with the same text,
    level and fields, marked with the worker; a failure's traceback too.
    """
    from twisted.logger import LogLevel, formatEvent

    from cosedge.worker import _Forward

    reactor = OnceReactor()
    channel = WorkerChannel(reactor)
    transport = StringTransport()
    channel.makeConnection(transport)
    forward = _Forward(channel)
    forward(
        {
            "log_format": "fill {bucket}/{key} stored: {received} bytes",
            "log_level": LogLevel.warn,
            "log_namespace": "cosedge.fill",
            "log_time": 1.5,
            "log_logger": object(),
            "bucket": BUCKET,
            "key": "a.txt",
            "received": 12,
        }
    )
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        forward(
            {
                "log_format": "broke",
                "log_level": LogLevel.critical,
                "log_namespace": "x",
                "log_time": 2.0,
                "log_failure": Failure(),
            }
        )
    worker = Spawner()
    pool = WorkerPool(MemoryReactorClock(), 2, [], edge_config, worker)
    pool.startService()
    protocol = worker.protocol(0)
    with capture_logs() as events:
        protocol.childDataReceived(FROM_WORKER_FD, transport.value())
    fill, failure = events
    assert formatEvent(fill) == f"fill {BUCKET}/a.txt stored: 12 bytes"
    assert fill["log_level"] is LogLevel.warn
    assert fill["log_system"] == "worker-1:cosedge.fill#warn"
    assert failure["log_level"] is LogLevel.critical
    assert "ZeroDivisionError" in failure["log_failure"].getTraceback()
    logged_failures.clear()  # the forwarded critical event is expected


def test_a_prefetch_copies_again_with_workers_and_says_when_another_process_is_copying(tmp_path: Path) -> None:
    """
    A forced fill (edge.prefetch) copies a stored object again even with
    claims (workers > 1), as with one process; while another process holds
    the key, the result says so.
    """
    store = DiskStore(str(tmp_path))
    edge = Edge(StepCooperator(), store=store)
    edge.filler.claims = Claims(str(tmp_path / "claims"))
    origin = parse_origin(ORIGIN)
    edge.origin.add("again.txt", b"new bytes")
    pending = store.begin(BUCKET, ("again.txt",))
    pending.write(b"old bytes")
    pending.commit({}, None)
    result = result_of(edge.filler.fill(BUCKET, ("again.txt",), source_for(origin, ("again.txt",)), force=True))
    assert result.stored and edge.origin.gets(b"/again.txt") == 1
    obj = result_of(store.open(BUCKET, ("again.txt",)))
    assert obj is not None and result_of(obj.read(0, 100)) == b"new bytes"
    obj.close()
    holder = _holder(tmp_path / "claims", BUCKET, "again.txt")
    try:
        result = result_of(edge.filler.fill(BUCKET, ("again.txt",), source_for(origin, ("again.txt",)), force=True))
        assert (result.stored, result.reason) == (False, "elsewhere")
    finally:
        _end(holder)


def test_a_worker_that_cannot_start_reports_failure_in_its_exit_status() -> None:
    """A worker whose service fails to start marks itself failed (it then exits with status 1)."""
    reactor = OnceReactor()

    def broken(*args: Any) -> Any:
        raise CannotListenError("", 0, OSError("no"))

    channel = WorkerChannel(reactor, broken)
    channel.makeConnection(StringTransport())
    with pytest.raises(CannotListenError):
        channel.stringReceived(pickle.dumps({"init": {"index": 1, "listeners": [], "config": edge_config()}}))
    assert channel.failed
    ok = WorkerChannel(reactor, lambda *a: FakeService(a[0]))
    ok.makeConnection(StringTransport())
    ok.stringReceived(pickle.dumps({"init": {"index": 1, "listeners": [], "config": edge_config()}}))
    assert not ok.failed


def test_a_worker_takes_tls_settings_only_from_ssl_entries(tmp_path: Path) -> None:
    """
    A worker's ``ssl:`` socket gets the entry's TLS settings; no other entry
    is parsed there (a ``systemd:`` one cannot be: its descriptors are the
    primary's, and Twisted's parser fails without them).
    """
    from cosedge.adopted import adopted_endpoints

    from .tlsca import CA

    cert, key = CA.make().issue(["127.0.0.1"]).write(tmp_path, "edge")
    listen = ("systemd:domain=INET:index=0", "tcp:8080", f"ssl:8443:privateKey={key}:certKey={cert}")
    endpoints = adopted_endpoints(MemoryReactorClock(), listen, [(-1, socket.AF_INET)] * 3)
    assert [e.tls is None for e in endpoints] == [True, True, False]
