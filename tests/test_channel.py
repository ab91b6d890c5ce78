"""
The bucket listener's connection handling: the header deadline (S8).
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource

from cosedge.stats import Stats
from cosedge.web.channel import EdgeSite

HEADERS = b"GET /1.jpg HTTP/1.1\r\nHost: example-1250000000.file.myqcloud.com\r\n\r\n"


class _TCPLikeTransport(StringTransport):
    """
    A StringTransport whose ``unregisterProducer`` tolerates having no
    producer, as a real TCP transport does (HTTPChannel unregisters on close).
    """

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None


class _Hello(Resource):
    isLeaf = True

    def render(self, request: object) -> bytes:
        return b"hello"


def _connect(timeout: float = 10.0) -> tuple[Clock, StringTransport, object]:
    clock = Clock()
    site = EdgeSite(_Hello(), Stats(), "", clock, timeout)
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    assert channel is not None
    transport = _TCPLikeTransport()
    channel.makeConnection(transport)
    return clock, transport, channel


def test_trickled_headers_are_cut_off_at_the_deadline() -> None:
    """
    A client that sends its headers a byte at a time, each byte well within
    the idle timeout, is still disconnected once the request timeout has
    passed since it connected: slow clients cannot hold connections for ever.
    """
    clock, transport, channel = _connect(timeout=10)
    for byte in HEADERS[:-4]:
        channel.dataReceived(bytes([byte]))  # type: ignore[attr-defined]
        clock.advance(0.25)
        if transport.disconnecting:
            break
    assert clock.seconds() >= 10
    assert transport.disconnecting
    assert transport.value() == b""


def test_complete_headers_disarm_the_deadline_and_keep_alive_rearms_it() -> None:
    """
    A request whose headers arrive in time is answered, and the connection
    stays open for the next request; the next request's headers get a fresh
    deadline from the end of the previous response.
    """
    clock, transport, channel = _connect(timeout=10)
    clock.advance(9)
    channel.dataReceived(HEADERS)  # type: ignore[attr-defined]
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    assert b"hello" in transport.value()
    clock.advance(9)
    assert not transport.disconnecting
    transport.clear()
    channel.dataReceived(HEADERS)  # type: ignore[attr-defined]
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    clock.advance(9.5)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting
