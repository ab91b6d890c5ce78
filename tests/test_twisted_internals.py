"""
Private or undocumented Twisted behaviour cosedge relies on, where no other
test would notice it going away (see the README's developer notes, "Twisted
internals cosedge relies on").  Each test names the attribute it guards; none
runs a reactor.
"""

from __future__ import annotations

import errno
import inspect
import os
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
from twisted.application import app
from twisted.conch.ssh import userauth
from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.base import ReactorBase
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.web.client import _HTTP11ClientFactory
from twisted.web.http_headers import Headers
from zope.interface import implementer

from cosedge.config import BucketConfig, Config, ServerConfig
from cosedge.fill.client import QuietPool as _QuietPool
from cosedge.fill.scheduler import Filler
from cosedge.ops.service import _exit_zero_after_sigterm
from cosedge.service import EdgeService
from cosedge.stats import Stats
from cosedge.storage.disk import DiskStore
from cosedge.testing import MemoryStore
from cosedge.web.channel import EdgeSite
from cosedge.web.producers import SMALL_RESPONSE
from cosedge.web.resource import EdgeResource
from cosedge.web.sendfile import SENDFILE_MIN

from .helpers import BUCKET, HOST, Edge, StepCooperator, edge_config, raw_request, result_of


@implementer(IStreamServerEndpoint)
class _RecordingEndpoint:
    """An endpoint that records the factory each connection attempt is given, and never connects."""

    def __init__(self) -> None:
        self.factories: list[Any] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        self.factories.append(factory)
        return Deferred()


def test_origin_connections_are_not_logged_one_by_one() -> None:
    """
    Every fill's connection to an origin is made by a quiet client factory,
    so the log does not get a "Starting factory" line per origin connection
    (``HTTPConnectionPool._factory``, overridden by ``_QuietPool``).
    """
    pool = _QuietPool(MemoryReactorClock(), persistent=True)
    endpoint = _RecordingEndpoint()
    pool.getConnection(("http", b"origin.example", 80), endpoint)
    [factory] = endpoint.factories
    assert isinstance(factory, _HTTP11ClientFactory)
    assert factory.noisy is False


@implementer(IStreamServerEndpoint)
class _PortInUse:
    """An endpoint whose port is taken by another process."""

    def listen(self, factory: Any) -> Deferred[Any]:
        return fail(CannotListenError("127.0.0.1", 8080, OSError(errno.EADDRINUSE, "Address already in use")))


def test_a_listener_that_cannot_listen_fails_the_daemons_start() -> None:
    """
    A bucket listener that cannot bind makes the start fail with the reason,
    instead of a daemon that runs without listening
    (``StreamServerEndpointService._raiseSynchronously``).
    """
    service = EdgeService(
        edge_config(),
        MemoryReactorClock(),
        MemoryStore(),
        None,  # type: ignore[arg-type]
        None,
        endpoints=[_PortInUse()],
    )
    with pytest.raises(CannotListenError, match="in use"):
        service.privilegedStartService()


class _SignalledReactor(ReactorBase):
    """Twisted's reactor base, without its start-up (no waker, no threads): just its signal handling."""

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        pass


def test_a_sigterm_stop_can_be_made_a_clean_exit() -> None:
    """
    After SIGTERM the daemon exits 0: the reactor records the signal in
    ``_exitSignal``, twistd re-raises whatever is left there once the
    reactor stops, and the ops service clears it.
    """
    reactor: Any = _SignalledReactor.__new__(_SignalledReactor)  # no __init__: no waker, no thread pool
    reactor.sigTerm(signal.SIGTERM)
    assert reactor._exitSignal == signal.SIGTERM
    _exit_zero_after_sigterm(reactor)
    assert reactor._exitSignal is None
    # twistd reads it from the reactor when the reactor has stopped.
    assert "reactor._exitSignal" in inspect.getsource(app.ApplicationRunner.startReactor)


class _ChainedStore:
    """A memory store whose ``open`` answers with a Deferred that has fired but waits on another one."""

    def __init__(self, inner: MemoryStore) -> None:
        self.inner = inner
        self.gate: Deferred[Any] = Deferred()
        self.opened: list[Deferred[Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def open(self, bucket: str, segments: tuple[str, ...]) -> Deferred[Any]:
        d: Deferred[Any] = succeed(None)
        d.addCallback(lambda _: self.gate)
        self.opened.append(d)
        return d

    def release(self, bucket: str, segments: tuple[str, ...]) -> None:
        self.gate.callback(result_of(self.inner.open(bucket, segments)))


def test_a_hit_waits_for_a_store_answer_that_is_still_chained(cooperator: StepCooperator) -> None:
    """
    A store's Deferred that has fired but waits on another one is answered
    when that one fires, not taken as the object: the hit path reads
    ``Deferred.called``, ``.paused`` and ``.result`` (public, undocumented).
    """
    inner = MemoryStore()
    inner.put(BUCKET, ("s.txt",), b"hello")
    store = _ChainedStore(inner)
    edge = Edge(cooperator, store=store)  # type: ignore[arg-type]
    conn = edge.connect()
    conn.send(raw_request("/s.txt"))
    [opening] = store.opened
    assert opening.called and opening.paused and isinstance(opening.result, Deferred)
    assert conn.transport.value() == b""  # waiting on the store
    store.release(BUCKET, ("s.txt",))
    response = conn.response()
    assert response.status == 200
    assert response.body == b"hello"


def test_the_status_line_and_headers_go_through_write_headers(cooperator: StepCooperator) -> None:
    """
    Twisted's request hands the status line and the headers (a ``Headers``)
    to ``HTTPChannel.writeHeaders``, which cosedge overrides to write them
    in one piece: every response comes through it.
    """
    edge = Edge(cooperator)
    edge.store.put(BUCKET, ("s.txt",), b"hello")  # type: ignore[attr-defined]
    conn = edge.connect()
    channel: Any = conn.transport.protocol
    seen: list[tuple[bytes, bytes, bytes, type]] = []
    write_headers = channel.writeHeaders

    def spy(version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        seen.append((version, code, reason, type(headers)))
        write_headers(version, code, reason, headers)

    channel.writeHeaders = spy
    conn.send(raw_request("/s.txt"))
    response = conn.response()
    assert response.status == 200 and response.body == b"hello"
    assert seen == [(b"HTTP/1.1", b"200", b"OK", Headers)]


def test_an_unparsable_request_gets_a_cos_error(cooperator: StepCooperator) -> None:
    """
    A request Twisted cannot parse is answered with a COS error (code
    InvalidRequest, a request id) and closed, not Twisted's bare 400: cosedge
    overrides ``HTTPChannel._respondToBadRequestAndDisconnect``.
    """
    edge = Edge(cooperator)
    conn = edge.connect()
    conn.send(b"NOT A REQUEST LINE AT ALL\r\n\r\n")
    response = conn.response()
    assert response.status == 400
    assert response.error_code() == "InvalidRequest"
    assert response.header(b"x-cos-request-id")
    assert conn.closed


def test_a_response_cut_short_by_the_client_is_still_logged(cooperator: StepCooperator) -> None:
    """
    A client that leaves in the middle of a large response still gets its
    access-log line (and status count): cosedge overrides
    ``Request.connectionLost`` and reads ``startedWriting`` and ``finished``.
    """
    edge = Edge(cooperator)
    edge.store.put(BUCKET, ("big.bin",), os.urandom(SMALL_RESPONSE * 8))  # type: ignore[attr-defined]
    conn = edge.connect()
    conn.send(raw_request("/big.bin"))
    edge.cooperator.step()
    assert conn.transport.value().startswith(b"HTTP/1.1 200 ")  # the response has begun
    conn.transport.loseConnection()  # tells the channel: the connection is lost
    assert edge.stats.statuses[200] == 1


def test_bucket_connections_have_no_idle_timer_besides_the_header_deadline(cooperator: StepCooperator) -> None:
    """
    A bucket connection runs one timer, its header deadline: ``EdgeSite.buildProtocol``
    turns Twisted's idle timeout off by setting the channel's ``timeOut`` after
    ``HTTPFactory.buildProtocol`` has copied the site's into it.
    """
    edge = Edge(cooperator)
    before = len(edge.clock.getDelayedCalls())
    conn = edge.connect()
    channel: Any = conn.transport.protocol
    assert channel.timeOut is None
    assert len(edge.clock.getDelayedCalls()) == before + 1  # the header deadline only
    edge.clock.advance(channel.header_deadline - 1)
    assert not conn.closed


def _loopback_pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on 127.0.0.1: (the server's side, the client's side), both non-blocking."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname(), timeout=5)
        server, _ = listener.accept()
    server.setblocking(False)
    client.setblocking(False)
    return server, client


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def test_twisted_tcp_connections_qualify_for_sendfile_and_pause_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    On Twisted's own TCP transport a large hit goes out by sendfile, whole
    and in order: the transport has a ``fileno()`` and ``getHandle()``, the
    channel is its streaming ``producer`` (``streamingProducer``), and it
    pauses the response past ``bufferSize`` and resumes it once flushed
    (``twisted.internet.abstract.FileDescriptor`` internals).
    """
    data = tmp_path / "data"
    (data / BUCKET).mkdir(parents=True)
    body = os.urandom(SENDFILE_MIN * 2 + 4321)
    (data / BUCKET / "big.bin").write_bytes(body)
    config = Config(
        server=ServerConfig(domains=("file.myqcloud.com",), data_dir=str(data), access_log=""),
        buckets={BUCKET: BucketConfig()},
    )
    clock, stats = Clock(), Stats()
    store = DiskStore(str(data))
    filler = Filler(store, None, clock, lambda: config.fill, stats)  # type: ignore[arg-type]
    site = EdgeSite(EdgeResource(lambda: config, store, filler, stats), stats, "", clock, 60)
    by_sendfile: list[int] = []
    real_sendfile = os.sendfile

    def counted_sendfile(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        sent = real_sendfile(out_fd, in_fd, offset, count)
        by_sendfile.append(sent)
        return sent

    monkeypatch.setattr(os, "sendfile", counted_sendfile)
    server, client = _loopback_pair()
    try:
        channel: Any = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", client.getsockname()[1]))
        transport = tcp.Server(server, channel, client.getsockname(), None, 1, MemoryReactorClock())  # type: ignore[arg-type]
        channel.makeConnection(transport)
        assert transport.producer is channel and transport.streamingProducer
        assert isinstance(transport.bufferSize, int) and transport.bufferSize > 0
        assert transport.fileno() == server.fileno() and transport.getHandle() is server

        channel.dataReceived(b"GET /big.bin HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\n\r\n")
        assert transport.producerPaused  # the primer filled the buffer past bufferSize
        received = b""
        for _ in range(100_000):
            transport.doWrite()  # flushes, and resumes the producer once the buffer is empty
            received += _read_all(client)
            head, _, got = received.partition(b"\r\n\r\n")
            if len(got) >= len(body):
                break
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"\r\nContent-Length: %d\r\n" % len(body) in head + b"\r\n"
        assert got == body
        assert sum(by_sendfile) > len(body) // 2  # not the plain read-and-write path
        assert stats.events["bytes_served"] == len(body)
    finally:
        server.close()
        client.close()


def test_ssh_login_completion_is_signalled_by_set_service() -> None:
    """
    An SSH session that has logged in is not cut off by the login deadline:
    conch's user-auth service starts the connection service through
    ``transport.setService``, which cosedge's transport overrides to cancel
    the deadline.
    """
    source = inspect.getsource(userauth.SSHUserAuthServer._cbFinishedAuth)
    assert "self.transport.setService(" in source
