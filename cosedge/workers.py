"""
Several processes serving one daemon's bucket listeners (``[server] workers``).

One Python process runs one reactor thread; ``workers = N`` runs the daemon
as N processes so hits, redirects and fills use N cores.  The process twistd
starts (the *primary*) keeps everything that has one owner: the
configuration and its live changes, the manhole, the admin listener, systemd
notifications, temporary-file sweeps.  It serves requests too, and starts
N − 1 *workers* (``python -m cosedge.worker``) that serve requests and run
fills, nothing else.

Listeners.  For each ``[server] listen`` entry of the ``tcp:``/``tcp6:`` kind
the primary binds N sockets with ``SO_REUSEPORT`` (first checking that no
other process holds the address, so a second daemon on the same port still
fails with "address in use"), keeps one and hands one to each worker: the
kernel then spreads new connections evenly over the processes.  The other
kinds (``unix:``, ``systemd:``, ``ssl:``) are opened once and their one socket
is shared; a worker serves an ``ssl:`` one with TLS (:mod:`cosedge.adopted`).
The configuration refuses any kind that cannot be shared.

Channel.  Each worker talks to the primary over a pair of pipes (its
descriptors 3 and 4) in length-prefixed frames (``Int32StringReceiver``):
the primary sends ``init`` (the configuration and the worker's listeners),
then ``config`` after every live change and ``forget`` after a purge, as
pickles (parent to child only); the worker answers ``ready``, sends its
counters every second, and forwards its log events (INFO and above), which
the primary logs as its own (``[worker-1:cosedge.fill#warn]`` in text logs).

Lifetime.  A worker that dies is started again (after 1 s, doubling up to
30 s while it keeps dying young); meanwhile the primary accepts on the dead
worker's own sockets, and its temporary files are removed.  The primary's stop closes every worker's
pipe (each then stops like a one-process daemon: listeners closed, fills
cancelled), waits for all of them (killing any still there after 20 s, within
systemd's TimeoutStopSec), and
only then sweeps temporary files.  A worker whose primary dies sees its pipe
close the same way; SIGTERM and SIGINT stop a worker too.

Fills.  Each process runs each key once; across processes, a byte-range lock
per key (:mod:`cosedge.fill.claims`) keeps a key missed in several processes at
once to one origin GET.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.error import CannotListenError, ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import InvalidLogLevelError, Logger, LogLevel, eventFromJSON, globalLogPublisher
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from .adopted import bucket_endpoint
from .stats import Stats, Totals

__all__ = ["SharedEndpoint", "WorkerPool", "parse_tcp"]

_log = Logger()

#: Largest frame either side accepts (a configuration with many buckets).
MAX_FRAME = 64 * 1024 * 1024
#: Descriptors of a worker: 3 reads from the primary, 4 writes to it, 5… listeners.
TO_WORKER_FD, FROM_WORKER_FD, FIRST_LISTENER_FD = 3, 4, 5
#: Seconds before a dead worker is started again, at first and at most.
RESPAWN_DELAY, RESPAWN_MAX_DELAY = 1.0, 30.0
#: A worker that ran this long before dying is restarted after the first delay again.
STABLE_AFTER = 60.0
#: Seconds the primary waits for its workers to stop before killing them.
STOP_TIMEOUT = 20.0
#: Variables a worker must not inherit: it never talks to systemd itself.
_NOT_INHERITED = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")

_TCP = re.compile(r"(tcp6?):(?:port=)?(\d+)((?::(?:interface|backlog)=(?:[^:\\]|\\.)*)*)\Z")
_OPTION = re.compile(r":(interface|backlog)=((?:[^:\\]|\\.)*)")


def parse_tcp(description: str) -> tuple[int, str, int, int] | None:
    """
    ``(family, interface, port, backlog)`` of a ``tcp:``/``tcp6:`` endpoint
    string with at most ``interface`` and ``backlog`` options; None for any
    other endpoint (those are shared, not bound once per process).
    """
    match = _TCP.match(description)
    if match is None:
        return None
    kind, port, rest = match.groups()
    options = {name: re.sub(r"\\(.)", r"\1", value) for name, value in _OPTION.findall(rest)}
    interface = options.get("interface", "::" if kind == "tcp6" else "")
    # Like Twisted's tcp: endpoint, an IPv6 literal makes an IPv6 socket.
    family = socket.AF_INET6 if kind == "tcp6" or isIPv6Address(interface) else socket.AF_INET
    backlog = options.get("backlog", "50")
    if not backlog.isdigit() or int(port) > 65535:
        return None
    return family, interface, int(port), int(backlog)


def check_free(family: int, interface: str, port: int) -> None:
    """
    Bind a plain socket (no SO_REUSEPORT, which would share the port with
    another daemon) to the address and let it go.  :raises OSError: the
    kernel's reason (EADDRINUSE: in use; EACCES: a port below 1024 without
    the privilege; EADDRNOTAVAIL: not this machine's address).
    """
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((interface, port))


def listen_problem(description: str) -> str | None:
    """Why a ``tcp:``/``tcp6:`` listener could not be bound now (None: it can, or it is another kind)."""
    parsed = parse_tcp(description)
    if parsed is None or parsed[2] == 0:
        return None
    family, interface, port, _ = parsed
    try:
        check_free(family, interface, port)
    except OSError as e:
        return f"cannot listen on {description}: {e.strerror or e}"
    return None


@implementer(IStreamServerEndpoint)
class SharedEndpoint:
    """
    A ``[server] listen`` entry opened so that ``copies`` more processes can
    serve it: after :meth:`listen`, :attr:`shares` holds one
    ``(descriptor, address family)`` per worker (owned here until
    :meth:`close_shares`), and :attr:`ready` has fired.
    """

    def __init__(self, reactor: Any, description: str, copies: int) -> None:
        self.reactor = reactor
        self.description = description
        self.copies = copies
        self.shares: list[tuple[int, int]] = []
        self.ready: Deferred[None] = Deferred()
        self._tcp = parse_tcp(description)
        #: Each process has a socket of its own (else all share the primary's).
        self.per_process = self._tcp is not None
        # Checked now, like strports: a bad endpoint string fails at start.
        self._other = None if self._tcp is not None else bucket_endpoint(reactor, description)

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        d: Deferred[IListeningPort]
        if self._other is not None:
            d = self._other.listen(factory)
            d.addCallback(self._share_port)
        elif self._tcp is not None:
            try:
                d = succeed(self._listen_tcp(factory, *self._tcp))
            except OSError as e:
                family, interface, port, _ = self._tcp
                d = fail(CannotListenError(interface, port, e))
        d.addBoth(self._fire_ready)
        return d

    def _fire_ready(self, result: Any) -> Any:
        if isinstance(result, Failure):
            self.ready.errback(result)
            return result
        self.ready.callback(None)
        return result

    def _share_port(self, port: Any) -> Any:
        fd = os.dup(port.fileno())
        self.shares = [(fd, port.socket.family)] * self.copies
        return port

    def _listen_tcp(
        self, factory: IProtocolFactory, family: int, interface: str, port: int, backlog: int
    ) -> IListeningPort:
        if port:
            # SO_REUSEPORT would let this bind beside another daemon's
            # listener: check with a plain socket that the address is free.
            check_free(family, interface, port)
        sockets: list[socket.socket] = []
        try:
            for _ in range(1 + self.copies):
                sock = socket.socket(family, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind((interface, port))
                port = sock.getsockname()[1]  # port 0: every copy on the port the first got
                sock.listen(backlog)
                sock.setblocking(False)
            listening: IListeningPort = self.reactor.adoptStreamPort(sockets[0].fileno(), family, factory)
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        sockets[0].close()  # the port holds its own duplicate
        self.shares = [(sock.detach(), family) for sock in sockets[1:]]
        return listening

    def close_shares(self) -> None:
        """Close the descriptors kept for workers (once they have all stopped)."""
        for fd in {fd for fd, _ in self.shares}:
            os.close(fd)
        self.shares = []


def frame(payload: bytes) -> bytes:
    """``payload`` as one length-prefixed frame (Int32StringReceiver's format)."""
    return struct.pack("!I", len(payload)) + payload


class _Frames(Int32StringReceiver):
    """Splits a byte stream into frames and hands each to ``deliver``."""

    MAX_LENGTH = MAX_FRAME

    def __init__(self, deliver: Callable[[bytes], None], too_long: Callable[[], None]) -> None:
        self._deliver = deliver
        self._too_long = too_long

    def stringReceived(self, string: bytes) -> None:
        self._deliver(string)

    def lengthLimitExceeded(self, length: int) -> None:
        self._too_long()


class _Worker(ProcessProtocol):
    """The primary's side of one worker process."""

    def __init__(self, pool: WorkerPool, index: int, listeners: list[tuple[int, int]]) -> None:
        self.pool = pool
        self.index = index
        self.listeners = listeners
        self.pid: int | None = None
        self.ready = False
        self.started_at = pool.reactor.seconds()
        self.stats: dict[str, Any] | None = None
        self.gauges: dict[str, int] = {}
        self.fills: list[dict[str, Any]] = []
        self.ended: Deferred[None] = Deferred()
        self._frames = _Frames(self._received, self._kill)

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]
        self.send({"init": {"index": self.index, "listeners": self.listeners, "config": self.pool.config()}})

    def send(self, message: dict[str, Any]) -> None:
        try:
            self.transport.writeToChild(TO_WORKER_FD, frame(pickle.dumps(message)))  # type: ignore[union-attr]
        except KeyError:
            # Its pipe is closed: the worker is ending, and a new one gets
            # the configuration of the moment in its init.
            pass

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == FROM_WORKER_FD:
            self._frames.dataReceived(data)

    def _received(self, data: bytes) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            _log.warn("worker {index}: unreadable message; stopping it", index=self.index)
            self._kill()
            return
        if "log" in message or "event" in message:
            event = eventFromJSON(message["log"]) if "log" in message else _event(message["event"])
            # Shown as "[worker-1:cosedge.fill#warn]" by the text formats.
            system = f"worker-{self.index}"
            namespace = event.get("log_namespace", "log_legacy")
            if namespace != "log_legacy":
                system += f":{namespace}#{getattr(event.get('log_level'), 'name', 'info')}"
            event["log_system"] = system
            globalLogPublisher(event)
        if "stats" in message:
            self.stats = message["stats"]
            self.gauges = message.get("gauges", {})
            self.fills = message.get("fills", [])
        if message.get("ready"):
            self.ready = True
            _log.info("worker {index} (pid {pid}) serving", index=self.index, pid=self.pid)
            self.pool._serving(self.index)

    def _kill(self) -> None:
        if self.transport is None:
            return
        try:
            self.transport.signalProcess("KILL")  # type: ignore[attr-defined]
        except ProcessExitedAlready:
            pass

    def processEnded(self, reason: Failure) -> None:
        self.pool._ended(self, reason)
        self.ended.callback(None)


class WorkerPool(Service):
    """
    Starts ``count - 1`` workers once ``endpoints`` listen, keeps them
    running, tells them of configuration changes, sums their counters, and
    stops them.

    :param config: called for the current configuration.
    :param spawn: ``reactor.spawnProcess``'s signature (tests pass a fake).
    """

    name = "workers"

    def __init__(
        self,
        reactor: Any,
        count: int,
        endpoints: list[SharedEndpoint],
        config: Callable[[], Any],
        spawn: Callable[..., Any] | None = None,
        sweep: Callable[[int], Deferred[int]] | None = None,
        site: Any = None,
    ) -> None:
        self.reactor = reactor
        self.count = count
        self.endpoints = endpoints
        self.config = config
        self._spawn = spawn if spawn is not None else reactor.spawnProcess
        self._sweep = sweep
        #: Serves a dead worker's own sockets until it is back (see :meth:`_cover`).
        self._site = site
        self._covering: dict[int, list[IListeningPort]] = {}
        self.workers: dict[int, _Worker] = {}
        self._retired = Stats()
        self._delays: dict[int, float] = {}
        self._restarts: dict[int, int] = {}
        self._timers: dict[int, IDelayedCall] = {}
        self._stopping = False
        #: Fires with True once every worker has served (the daemon is ready:
        #: see :mod:`cosedge.ops`), or with False if the listeners failed.
        self.started: Deferred[bool] = Deferred()

    # -- start and stop --

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        if self.started.called:
            self.started = Deferred()
        listening = DeferredList([e.ready for e in self.endpoints], fireOnOneErrback=True, consumeErrors=True)
        listening.addCallbacks(lambda _: self._start_all(), lambda _: self._not_started())

    def _not_started(self) -> None:
        _log.error("workers not started: a listener failed to start")
        self.started.callback(False)

    def _serving(self, index: int) -> None:
        self._uncover(index)
        if not self.started.called and self.check() is None:
            self.started.callback(True)

    def _cover(self, index: int) -> None:
        """
        Accept on the sockets of dead worker ``index`` in this process until
        a new one serves: the kernel keeps giving them their share of new
        connections, which would otherwise wait for the restart.
        """
        if self._site is None or index in self._covering:
            return
        ports = []
        for endpoint in self.endpoints:
            if endpoint.per_process:
                fd, family = endpoint.shares[index - 1]
                try:
                    ports.append(self.reactor.adoptStreamPort(fd, family, self._site))
                except Exception:
                    _log.failure("cannot serve the sockets of worker {index} meanwhile", index=index)
        self._covering[index] = ports

    def _uncover(self, index: int) -> None:
        for port in self._covering.pop(index, []):
            port.stopListening()  # an adopted socket: this process's copy closes, the socket stays

    def _start_all(self) -> None:
        for index in range(1, self.count):
            self._start(index)

    def _start(self, index: int) -> None:
        self._timers.pop(index, None)
        if self._stopping or not self.running:
            return
        child_fds: dict[int, int | str] = {0: 0, 1: 1, 2: 2, TO_WORKER_FD: "w", FROM_WORKER_FD: "r"}
        listeners = []
        for n, endpoint in enumerate(self.endpoints):
            fd, family = endpoint.shares[index - 1]
            child_fds[FIRST_LISTENER_FD + n] = fd
            listeners.append((FIRST_LISTENER_FD + n, family))
        worker = _Worker(self, index, listeners)
        self.workers[index] = worker
        try:
            self._spawn(
                worker,
                sys.executable,
                [sys.executable, "-m", "cosedge.worker"],
                env=_worker_environ(),
                childFDs=child_fds,
            )
        except Exception as e:  # fork or pipe refused: out of descriptors, memory, processes
            del self.workers[index]
            self._cover(index)
            self._again(index, f"could not be started: {e}", lived=0.0)

    def _ended(self, worker: _Worker, reason: Failure) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if worker.stats is not None:  # keep its counts: counters never go back
            self._retired.add(worker.stats)
        if self._sweep is not None and worker.pid is not None:
            # A worker that was killed cannot have removed its temporary files.
            index = worker.index

            def swept(count: int) -> None:
                if count:
                    _log.info("worker {index}: removed {count} temporary file(s)", index=index, count=count)

            def not_swept(failure: Failure) -> None:
                failure.trap(OSError)
                _log.warn("worker {index}: its temporary files not removed: {error}", index=index, error=failure.value)

            self._sweep(worker.pid).addCallbacks(swept, not_swept)
        if self._stopping or not self.running:
            return
        self._cover(worker.index)
        lived = self.reactor.seconds() - worker.started_at
        self._again(worker.index, f"(pid {worker.pid}) exited: {reason.getErrorMessage()}", lived)

    def _again(self, index: int, what: str, lived: float) -> None:
        """Start worker ``index`` again after the back-off delay."""
        delay = RESPAWN_DELAY if lived >= STABLE_AFTER else self._delays.get(index, RESPAWN_DELAY / 2) * 2
        delay = min(delay, RESPAWN_MAX_DELAY)
        self._delays[index] = delay
        self._restarts[index] = self._restarts.get(index, 0) + 1
        _log.warn("worker {index} {what}; starting it again in {delay}s", index=index, what=what, delay=delay)
        self._timers[index] = self.reactor.callLater(delay, self._start, index)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopping = True
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        for index in list(self._covering):
            self._uncover(index)
        waits = []
        for worker in list(self.workers.values()):
            waits.append(worker.ended)
            if worker.transport is not None:
                worker.transport.closeChildFD(TO_WORKER_FD)  # type: ignore[attr-defined]  # "stop"
        killer = self.reactor.callLater(STOP_TIMEOUT, self._kill_all)

        def stopped(_: object) -> None:
            if killer.active():
                killer.cancel()
            for endpoint in self.endpoints:
                endpoint.close_shares()

        return DeferredList(waits, consumeErrors=True).addCallback(stopped)

    def _kill_all(self) -> None:
        for worker in list(self.workers.values()):
            _log.warn("worker {index} (pid {pid}) did not stop in time; killing it", index=worker.index, pid=worker.pid)
            worker._kill()

    # -- what the primary tells workers and asks of them --

    def tell(self, message: dict[str, Any]) -> None:
        """Send ``message`` to every worker (a new config, a key to forget)."""
        for worker in self.workers.values():
            worker.send(message)

    def totals(self, own: Stats, running: int, queued: int, not_found: int, hosts_down: int = 0) -> Totals:
        """The primary's own counters and gauges plus every worker's latest."""
        total = Stats()
        total.add(own.to_json())
        total.add(self._retired.to_json())
        totals = Totals(total, running, queued, not_found, hosts_down)
        for worker in self.workers.values():
            if worker.stats is not None:
                total.add(worker.stats)
            totals.fills_running += worker.gauges.get("running", 0)
            totals.fills_queued += worker.gauges.get("queued", 0)
            totals.not_found_remembered += worker.gauges.get("not_found", 0)
            totals.origin_hosts_down += worker.gauges.get("hosts_down", 0)
        return totals

    def processes(self) -> list[dict[str, Any]]:
        """One row per worker slot: pid (None while it is being started again), serving, uptime, restarts."""
        now = self.reactor.seconds()
        rows = []
        for index in range(1, self.count):
            worker = self.workers.get(index)
            rows.append(
                {
                    "process": index,
                    "pid": worker.pid if worker is not None else None,
                    "serving": worker is not None and worker.ready,
                    "uptime": round(now - worker.started_at, 1) if worker is not None else None,
                    "restarts": self._restarts.get(index, 0),
                }
            )
        return rows

    def in_flight(self) -> list[dict[str, Any]]:
        """The workers' fills as of their last reports, each with its ``process`` number."""
        return [{**f, "process": w.index} for w in self.workers.values() for f in w.fills]

    def check(self) -> str | None:
        """Readiness: None once every worker serves."""
        serving = sum(1 for w in self.workers.values() if w.ready)
        if serving < self.count - 1:
            return f"{serving} of {self.count - 1} worker process(es) serving"
        return None


def _event(plain: dict[str, Any]) -> dict[str, Any]:
    """A worker's plain event (see ``cosedge.worker._plain``) as a log event again."""
    level = plain.get("log_level")
    if isinstance(level, str):
        try:
            plain["log_level"] = LogLevel.levelWithName(level)
        except InvalidLogLevelError:
            plain["log_level"] = LogLevel.info
    return plain


def _worker_environ() -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
    # The package as the primary imported it: a source checkout that is not
    # on the path the interpreter starts with is added (an installed package
    # is found as it is, with the standard library first).
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if here not in sys.path:
        environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, environ.get("PYTHONPATH", "")) if p)
    return environ
