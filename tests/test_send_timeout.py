"""
Slow readers and connection floods (reliability row S9): the send timeout
and the cap on client connections.

No real reactor: the client connection is Twisted's own buffering transport
(``FileDescriptor``: the same buffer, pause and resume as a TCP connection)
whose client takes only the bytes a test lets it, on a ``MemoryReactorClock``
that is also the site's clock.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from cosedge.stats import Stats
from cosedge.web.channel import EdgeSite

from .helpers import capture_logs

PEER = IPv4Address("TCP", "127.0.0.1", 40000)
HOST = b"example-1250000000.file.myqcloud.com"
#: Larger than the transport's buffer (64 KiB) many times over.
SIZE = 1024 * 1024
CHUNK = 16 * 1024


def get(path: bytes = b"/big", close: bool = False) -> bytes:
    """A GET for ``path``, keep-alive unless ``close``."""
    connection = b"Connection: close\r\n" if close else b""
    return b"GET " + path + b" HTTP/1.1\r\nHost: " + HOST + b"\r\n" + connection + b"\r\n"


@implementer(IPushProducer)
class _Body:
    """A response body written a chunk at a time while the connection takes it, like the plain hit path."""

    def __init__(self, request: Request, size: int) -> None:
        self.request: Request | None = request
        self.left = size
        self.paused = False

    def start(self) -> None:
        assert self.request is not None
        self.request.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        for _ in range(SIZE // CHUNK + 1):
            if self.paused or self.request is None or not self.left:
                break
            n = min(CHUNK, self.left)
            self.left -= n
            self.request.write(b"x" * n)
        if self.request is not None and not self.left:
            request, self.request = self.request, None
            request.unregisterProducer()
            request.finish()

    def stopProducing(self) -> None:
        self.request = None


class _Objects(Resource):
    """``/big``: a streamed body of :data:`SIZE` bytes; ``/whole``: the same written at once; else ``ok``."""

    isLeaf = True

    def render(self, request: Request) -> Any:
        if request.path == b"/big":
            request.setHeader(b"content-length", b"%d" % SIZE)
            _Body(request, SIZE).start()
            return NOT_DONE_YET
        if request.path == b"/whole":
            return b"x" * SIZE
        return b"ok"


class _Socket(FileDescriptor):
    """
    Twisted's buffering transport, whose client reads only what
    :meth:`read` lets it: the transport pauses the channel when its buffer
    is full and resumes it when the buffer is flushed, exactly as on TCP.
    """

    def __init__(self, reactor: MemoryReactorClock) -> None:
        super().__init__(reactor)
        self.connected = 1
        self.window = 0
        self.received = b""
        self.aborted = False
        self.lost = False
        self.protocol: Any = None

    def writeSomeData(self, data: bytes) -> int:
        n = min(len(data), self.window)
        self.received += bytes(data[:n])
        self.window -= n
        return n

    def read(self, n: int) -> None:
        """The client reads up to ``n`` bytes: what the transport holds and what the server writes meanwhile."""
        self.window += n
        for _ in range(n // 1024 + 10):
            if self.lost or not self.window or not (self.dataBuffer or self._tempDataLen or self.disconnecting):
                break
            why = self.doWrite()
            if why:
                self.connectionLost(Failure(why))

    def connectionLost(self, reason: Failure) -> None:
        if self.lost:
            return
        self.lost = True
        super().connectionLost(reason)
        self.protocol.connectionLost(reason)

    def abortConnection(self) -> None:
        self.aborted = True
        self.dataBuffer, self._tempDataBuffer, self._tempDataLen = b"", [], 0
        self.connectionLost(Failure(ConnectionAborted()))

    def getPeer(self) -> IPv4Address:
        return PEER

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 8080)

    @property
    def unsent(self) -> int:
        return len(self.dataBuffer) - self.offset + self._tempDataLen


def _site(reactor: Clock, send_timeout: float = 10.0, request_timeout: float = 60.0, **kw: Any) -> EdgeSite:
    site = EdgeSite(_Objects(), Stats(), "", reactor, request_timeout, send_timeout=send_timeout, **kw)
    site.doStart()
    return site


def _connect(site: EdgeSite, reactor: MemoryReactorClock) -> _Socket:
    channel = site.buildProtocol(PEER)
    assert channel is not None
    transport = _Socket(reactor)
    transport.protocol = channel
    channel.makeConnection(transport)
    return transport


def _pass(reactor: Clock, seconds: float) -> None:
    """Let ``seconds`` go by in steps of 1/8 s, so that timers set while it passes fire on time."""
    for _ in range(round(seconds * 8)):
        reactor.advance(0.125)


def _send_timeouts(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("log_namespace") == "cosedge.web" and "send timeout" in e["log_format"]]


def test_a_client_that_stops_reading_is_cut_off_after_send_timeout_and_not_before() -> None:
    """
    A client that takes the first 200 KB of a 1 MB download and then reads
    nothing more keeps its connection for ``send_timeout`` seconds and is
    then disconnected (within a quarter of send_timeout more), with one
    warning naming it (its request goes to the
    access log as an interrupted one, with the bytes it took).
    """
    reactor = MemoryReactorClock()
    site = _site(reactor, send_timeout=10)
    client = _connect(site, reactor)
    client.protocol.dataReceived(get())
    client.read(200 * 1024)
    assert client.received.startswith(b"HTTP/1.1 200 ")
    assert client.unsent > 0, "the server should be waiting for the client"
    with capture_logs() as events:
        _pass(reactor, 9.875)
        assert not client.lost
        _pass(reactor, 2.625)  # 1.25 times send_timeout at most
    assert client.aborted
    assert 200 * 1024 <= len(client.received) < SIZE
    [warning] = _send_timeouts(events)
    assert warning["log_level"].name == "warn"
    assert warning["peer"] == "127.0.0.1:40000"
    assert site.connections == 0


def test_a_client_that_never_reads_is_cut_off_at_send_timeout() -> None:
    """
    A client that asks for 1 MB and reads none of it (slowhttptest's slow
    read) is disconnected send_timeout seconds later, not before, even though
    the request timeout is far longer.
    """
    reactor = MemoryReactorClock()
    site = _site(reactor, send_timeout=10, request_timeout=600)
    client = _connect(site, reactor)
    client.protocol.dataReceived(get())
    _pass(reactor, 9.875)
    assert not client.lost
    _pass(reactor, 0.25)
    assert client.aborted
    assert client.received == b""


def test_reading_again_restarts_the_send_timeout() -> None:
    """
    A client that pauses for 8 s at a time (send_timeout is 10) and then
    reads on is never cut off, however long the download takes; once it
    stops for good it is cut off 10 s (to 12.5 s) after its last read.
    """
    reactor = MemoryReactorClock()
    site = _site(reactor, send_timeout=10)
    client = _connect(site, reactor)
    client.protocol.dataReceived(get())
    for _ in range(5):
        _pass(reactor, 8)
        client.read(100 * 1024)
        assert not client.lost
    _pass(reactor, 9.875)
    assert not client.lost
    _pass(reactor, 2.625)
    assert client.aborted


def test_a_slow_but_steady_reader_is_never_cut_off() -> None:
    """
    A client reading 4 KB every 2 s, so slowly that the server's 64 KB
    buffer takes half a minute to empty (three times send_timeout), still
    makes progress all along: it gets its whole 1 MB response and keeps
    its connection.
    """
    reactor = MemoryReactorClock()
    site = _site(reactor, send_timeout=10, request_timeout=10_000)
    client = _connect(site, reactor)
    client.protocol.dataReceived(get())
    for _ in range(SIZE // 4096 + 100):
        _pass(reactor, 2)
        client.read(4096)
        assert not client.lost, f"cut off after {reactor.seconds()}s with {len(client.received)} bytes"
        if client.received.endswith(b"x" * 100) and len(client.received.partition(b"\r\n\r\n")[2]) == SIZE:
            break
    assert len(client.received.partition(b"\r\n\r\n")[2]) == SIZE
    assert not client.lost


def test_a_slow_reader_that_stops_is_cut_off_soon_after_send_timeout() -> None:
    """
    A client that read a little (but not enough for the server's buffer to
    empty) and then stopped is cut off no sooner than send_timeout after
    its last read, and no later than 1.25 times that.
    """
    reactor = MemoryReactorClock()
    site = _site(reactor, send_timeout=10)
    client = _connect(site, reactor)
    client.protocol.dataReceived(get())
    _pass(reactor, 5)
    client.read(1024)
    last_read = reactor.seconds()
    for _ in range(200):
        if client.lost:
            break
        _pass(reactor, 0.5)
    assert client.aborted
    assert 10 <= reactor.seconds() - last_read <= 12.5


def test_a_finished_response_the_client_never_reads_is_cut_off() -> None:
    """
    A 1 MB response the server has finished writing but the client never
    reads (the bytes wait in the server's buffer) does not hold the
    connection either: closed after send_timeout, whether the client asked
    to keep the connection or to close it, long before the request timeout.
    """
    for close in (False, True):
        reactor = MemoryReactorClock()
        site = _site(reactor, send_timeout=10, request_timeout=60)
        client = _connect(site, reactor)
        client.protocol.dataReceived(get(b"/whole", close=close))
        assert client.unsent > SIZE
        _pass(reactor, 9.875)
        assert not client.lost, close
        _pass(reactor, 0.25)
        assert client.aborted, close


def test_once_the_response_is_read_the_next_request_gets_its_header_deadline() -> None:
    """
    A keep-alive client that reads a whole large response late (after 8 s)
    is not cut off, and then has the full request timeout for its next
    request's headers; one that sends nothing more is closed then, politely.
    """
    reactor = MemoryReactorClock()
    site = _site(reactor, send_timeout=10, request_timeout=30)
    client = _connect(site, reactor)
    client.protocol.dataReceived(get(b"/whole"))
    _pass(reactor, 8)
    client.read(SIZE + 4096)
    assert client.unsent == 0
    _pass(reactor, 29.875)
    assert not client.disconnecting
    client.protocol.dataReceived(get(b"/small"))
    client.read(4096)
    assert client.received.endswith(b"ok")
    _pass(reactor, 29.875)
    assert not client.disconnecting
    _pass(reactor, 0.25)
    assert client.disconnecting
    assert not client.aborted


class _TCPLikeTransport(StringTransport):
    """A StringTransport that tolerates ``unregisterProducer`` without a producer, as TCP does."""

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None


def _open(site: EdgeSite) -> Any:
    channel = site.buildProtocol(PEER)
    if channel is None:
        return None
    channel.makeConnection(_TCPLikeTransport())
    return channel


def test_connections_over_max_connections_are_refused_at_once() -> None:
    """
    With max_connections = 3 and three clients connected, a fourth
    connection is refused as it arrives; the three open ones are still
    served (keep-alive too); once one closes, a new client gets in.
    """
    clock = Clock()
    site = _site(clock, max_connections=3)
    open_ = [_open(site) for _ in range(3)]
    assert all(c is not None for c in open_)
    assert site.connections == 3
    assert _open(site) is None
    for channel in open_:
        channel.dataReceived(get(b"/small"))
        assert channel.transport.value().startswith(b"HTTP/1.1 200 ")
        assert not channel.transport.disconnecting
    open_[0].connectionLost(Failure(ConnectionAborted()))
    assert site.connections == 2
    newcomer = _open(site)
    assert newcomer is not None
    newcomer.dataReceived(get(b"/small"))
    assert newcomer.transport.value().startswith(b"HTTP/1.1 200 ")
    assert _open(site) is None


def test_refusals_are_logged_a_line_at_a_time() -> None:
    """
    A flood of 500 connections over the limit writes one warning at once
    and then one line every 5 s saying how many more were refused; when the
    flood stops, so do the lines.
    """
    clock = Clock()
    site = _site(clock, max_connections=1)
    assert _open(site) is not None
    with capture_logs() as events:
        for _ in range(100):
            assert _open(site) is None
        clock.advance(1)
        for _ in range(400):
            assert _open(site) is None
        clock.advance(4)
        clock.advance(20)
    lines = [e for e in events if e.get("log_namespace") == "cosedge.web" and "max_connections" in e["log_format"]]
    assert len(lines) == 2, lines
    assert lines[0]["limit"] == 1
    assert lines[1]["count"] == 499
    site.doStop()
    assert [c for c in clock.getDelayedCalls() if "refusals" in repr(c)] == []


def test_max_connections_0_means_no_limit() -> None:
    """With max_connections = 0 (the EdgeSite default) any number of clients connect."""
    site = _site(Clock(), max_connections=0)
    assert all(_open(site) is not None for _ in range(200))
    assert site.connections == 200
