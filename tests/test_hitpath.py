"""
The bucket listener's per-request shortcuts keep what a client sees: one
Server header (ours) and a current Date on every answer, the ``*`` target
answered with a COS error, each header sent once, content types as
``mimetypes`` gives them, connection addresses looked up once, and
deadlines that still close slow or idle connections.
"""

from __future__ import annotations

import mimetypes
from typing import Any
from urllib.parse import quote

import pytest
from attrs import evolve
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from cosedge.stats import Stats
from cosedge.testing import MemoryStore
from cosedge.web.channel import EdgeSite

from .helpers import BUCKET, Edge, RawResponse, StepCooperator, parse_response, raw_request

MTIME = 1_500_000_000.0


@pytest.fixture
def edge(cooperator: StepCooperator) -> Edge:
    edge = Edge(cooperator)
    assert isinstance(edge.store, MemoryStore)
    edge.store.put(BUCKET, ("1.jpg",), b"x" * 1024, {"content-type": "image/jpeg"}, MTIME)
    edge.store.put(BUCKET, ("big.bin",), b"y" * 100_000, {}, MTIME)
    return edge


def _keep_alive(target: str, method: bytes = b"GET", headers: bytes = b"") -> bytes:
    host = b"Host: " + BUCKET.encode() + b".file.myqcloud.com\r\n"
    return method + b" " + target.encode() + b" HTTP/1.1\r\n" + host + headers + b"\r\n"


def _answers(edge: Edge) -> list[RawResponse]:
    """Requests of every kind on one connection each: hit, HEAD, range, 304, miss, errors."""
    requests = [
        raw_request("/1.jpg"),
        raw_request("/1.jpg", method=b"HEAD"),
        raw_request("/1.jpg", headers=[("Range", "bytes=0-9")]),
        raw_request("/1.jpg", headers=[("If-Modified-Since", "Fri, 01 Jan 2100 00:00:00 GMT")]),
        raw_request("/big.bin"),
        raw_request("/missing"),
        raw_request("/1.jpg", host="nobody.example"),
        raw_request("/1.jpg", method=b"DELETE"),
        raw_request("/%zz"),
    ]
    return [edge.send(r) for r in requests]


def test_every_answer_has_one_server_header_and_a_date(edge: Edge) -> None:
    """Hits, misses and errors all carry exactly one 'Server: cosedge' and one Date, first."""
    edge.clock.advance(1_700_000_000.25)
    for response in _answers(edge):
        assert response.all(b"server") == [b"cosedge"], response.raw[:300]
        assert response.all(b"date") == [b"Tue, 14 Nov 2023 22:13:20 GMT"]
        names = [name for name, _ in response.headers if name != b"connection"]
        assert names[:3] == [b"server", b"date", b"x-cos-request-id"]


def test_date_follows_the_reactor_clock_second_by_second(edge: Edge) -> None:
    """The Date header is the reactor's current second: the same within a second, the next one after it."""
    conn = edge.connect()
    dates = []
    for step in (0.0, 0.4, 0.5, 0.2, 59.0):
        edge.clock.advance(step)
        conn.send(_keep_alive("/1.jpg"))
        dates.append(parse_response(conn.transport.value()).header(b"date"))
        conn.transport.clear()
    assert dates == [
        b"Thu, 01 Jan 1970 00:00:00 GMT",
        b"Thu, 01 Jan 1970 00:00:00 GMT",
        b"Thu, 01 Jan 1970 00:00:00 GMT",
        b"Thu, 01 Jan 1970 00:00:01 GMT",
        b"Thu, 01 Jan 1970 00:01:00 GMT",
    ]


@pytest.mark.parametrize("method", [b"OPTIONS", b"GET", b"HEAD"])
def test_asterisk_target_gets_a_cos_error(edge: Edge, method: bytes) -> None:
    """'OPTIONS *' and 'GET *' are answered by cosedge (400 InvalidURI, COS XML), not by Twisted's own page."""
    response = edge.request("*", method=method)
    assert response.status == 400
    assert response.all(b"server") == [b"cosedge"]
    assert response.header(b"content-type") == b"application/xml"
    assert response.header(b"x-cos-request-id")
    if method == b"HEAD":
        assert response.body == b""
    else:
        assert response.error_code() == "InvalidURI"
        assert response.length == len(response.body)
    assert edge.stats.events["hits"] == edge.stats.events["misses"] == 0


class _Broken(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        raise RuntimeError("boom")


def test_an_exception_outside_the_edge_resource_is_still_a_500(logged_failures: list[Any]) -> None:
    """A resource that raises gets Twisted's 500 'Processing Failed' (logged), still with our Server header."""
    site = EdgeSite(_Broken(), Stats(), "", Clock(), 60)
    channel, transport = _connect(site)
    channel.dataReceived(raw_request("/x"))
    response = parse_response(transport.value())
    assert response.status == 500
    assert response.all(b"server") == [b"cosedge"]
    assert b"Processing Failed" in response.body
    assert len(logged_failures) == 1
    logged_failures.clear()


def test_the_site_refuses_a_resource_tree() -> None:
    """EdgeSite does no traversal, so it refuses a resource that is not a leaf rather than serve it wrongly."""
    with pytest.raises(TypeError):
        EdgeSite(Resource(), Stats(), "", Clock(), 60)


def _connect(site: EdgeSite) -> tuple[Any, StringTransport]:
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    assert channel is not None
    transport = _CountingTransport()
    channel.makeConnection(transport)
    return channel, transport


class _CountingTransport(StringTransport):
    """A transport that counts how often its addresses are asked for, and tolerates unregistering."""

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "192.0.2.7", 51000))
        self.asked = {"host": 0, "peer": 0}

    def getHost(self) -> Any:
        self.asked["host"] += 1
        return super().getHost()

    def getPeer(self) -> Any:
        self.asked["peer"] += 1
        return super().getPeer()

    def unregisterProducer(self) -> None:
        self.producer = None


def test_connection_addresses_are_asked_once_per_connection(edge: Edge, tmp_path: Any) -> None:
    """
    The local and client addresses are looked up once per connection, not
    once per request, and every request still sees (and logs) the client's.
    """
    log = tmp_path / "access.log"
    site = EdgeSite(edge.resource, edge.stats, str(log), edge.clock, 60)
    site.doStart()
    channel = site.buildProtocol(IPv4Address("TCP", "192.0.2.7", 51000))
    assert channel is not None
    transport = _CountingTransport()
    channel.makeConnection(transport)
    for _ in range(3):
        channel.dataReceived(_keep_alive("/1.jpg"))
        assert transport.value().startswith(b"HTTP/1.1 200 ")
        transport.clear()
    site.doStop()
    assert transport.asked == {"host": 1, "peer": 1}
    lines = log.read_text().splitlines()
    assert len(lines) == 3 and all(line.startswith('"192.0.2.7" ') for line in lines)


def test_a_keep_alive_connection_holds_one_timer(edge: Edge) -> None:
    """However many requests a connection serves, it holds one pending timer (its headers' deadline), not more."""
    conn = edge.connect()
    channel = conn.transport.protocol

    def timers() -> int:
        return sum(getattr(call.func, "__self__", None) is channel for call in edge.clock.getDelayedCalls())

    assert timers() == 1
    for _ in range(5):
        edge.clock.advance(1)
        conn.send(_keep_alive("/1.jpg"))
        assert timers() == 1
    conn.transport.loseConnection()
    assert timers() == 0


def test_idle_keep_alive_connection_closes_at_the_deadline(edge: Edge) -> None:
    """After a response, the next request's headers must come within the deadline (60 s), counted from that response."""
    conn = edge.connect()
    edge.clock.advance(50)
    conn.send(_keep_alive("/1.jpg"))
    edge.clock.advance(59)
    assert not conn.transport.disconnecting
    conn.send(_keep_alive("/1.jpg"))  # answered at t=109: the deadline moves to t=169
    edge.clock.advance(59.5)
    assert not conn.transport.disconnecting
    conn.send(b"GET /1.jpg HTTP/1.1\r\nHost: ")  # trickling does not help
    edge.clock.advance(1)
    assert conn.transport.disconnecting


def test_a_response_longer_than_the_deadline_is_not_cut(edge: Edge, cooperator: StepCooperator) -> None:
    """
    The deadline is for the headers only: a response still being sent when
    it passes is finished, and the connection then gets a fresh deadline.
    """
    conn = edge.connect()
    conn.send(_keep_alive("/big.bin"))
    edge.clock.advance(61)  # the response is under way (the cooperator has not finished it)
    assert not conn.transport.disconnecting
    cooperator.run()
    response = parse_response(conn.transport.value())
    assert response.status == 200 and response.body == b"y" * 100_000
    edge.clock.advance(59)
    assert not conn.transport.disconnecting
    conn.transport.clear()
    conn.send(_keep_alive("/1.jpg"))
    assert parse_response(conn.transport.value()).status == 200
    edge.clock.advance(60)
    assert conn.transport.disconnecting


def test_a_refused_client_that_lingers_is_aborted(edge: Edge) -> None:
    """A client refused with 413 that neither reads nor closes is closed at the deadline and aborted after that."""
    channel, transport = _connect(edge.site)
    channel.dataReceived(_keep_alive("/1.jpg", b"POST", b"Content-Length: 100000000\r\n"))
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert transport.disconnecting  # asked to close; a client that does not read keeps it open
    aborted: list[bool] = []
    transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
    edge.clock.advance(59)
    assert aborted == []
    edge.clock.advance(1)  # the deadline: closed again (still not read)
    assert aborted == []
    edge.clock.advance(15)  # Twisted's abortTimeout after that
    assert aborted == [True]


NAMES = [
    "1.jpg", "a.JPG", "photo.2017.jpg", "a.tar.gz", "a.tgz", "b.gz", "x.svgz", "a.b.c.d", "a..jpg", "..jpg",
    ".jpg", ".tar.gz", "..tar.gz", "...tar.gz", "a.", "a..", "...", "README", "Makefile.in",
    "data:,x.jpg", "data:image;x.jpg", "a:b.png", "c:.jpg", "report.final.PDF", "a.tar.GZ", "x.json",
    "é.html", "α.β.css", "page.htm.br", "a.txt.bz2", "a.unknownext", "a.jpg.unknownext", ". .jpg", " .png",
]  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_content_type_is_what_mimetypes_guesses(edge: Edge, name: str) -> None:
    """An object without a stored type is served with exactly mimetypes' guess for its name (cached or not)."""
    assert isinstance(edge.store, MemoryStore)
    expected = (mimetypes.guess_type(name, strict=False)[0] or "application/octet-stream").encode()
    edge.store.put(BUCKET, (name,), b"z", {}, MTIME)
    for _ in range(2):  # the first guess and the remembered one
        response = edge.request("/" + quote(name))
        assert response.status == 200, (name, response.raw[:200])
        assert response.header(b"content-type") == expected, name


def test_each_header_is_sent_once_and_lengths_match(edge: Edge) -> None:
    """No header appears twice in any kind of answer, and a GET's Content-Length is the length of its body."""
    for response in _answers(edge):
        names = [name for name, _ in response.headers]
        assert len(names) == len(set(names)), response.raw[:400]
        if response.status != 304 and response.header(b"content-length") is not None and response.body:
            assert response.length == len(response.body)


def test_conditional_headers_in_any_capitalisation_are_honoured(edge: Edge) -> None:
    """Range and the If-* headers count however the client capitalises them."""
    etag = edge.request("/1.jpg").header(b"etag")
    assert etag is not None
    assert edge.request("/1.jpg", headers=[("rAnGe", "bytes=0-9")]).status == 206
    assert edge.request("/1.jpg", headers=[("IF-NONE-MATCH", etag.decode())]).status == 304
    assert edge.request("/1.jpg", headers=[("if-match", '"other"')]).status == 412
    assert edge.request("/1.jpg", headers=[("if-modified-since", "Fri, 01 Jan 2100 00:00:00 GMT")]).status == 304
    assert edge.request("/1.jpg", headers=[("If-Unmodified-Since", "Thu, 01 Jan 1970 00:00:00 GMT")]).status == 412
    assert edge.request("/1.jpg", headers=[("X-Range", "bytes=0-9"), ("If-Nothing", "x")]).status == 200


def test_a_replaced_configuration_routes_the_next_request(edge: Edge) -> None:
    """Hosts are routed by the configuration in force: a domain added or removed applies to the very next request."""
    other = BUCKET + ".cos.example.com"
    assert edge.request("/1.jpg", host=other).status == 404
    edge.config = evolve(edge.config, server=evolve(edge.config.server, domains=("cos.example.com",)))
    assert edge.request("/1.jpg", host=other).status == 200
    assert edge.request("/1.jpg").status == 404  # the old domain is gone


def test_many_distinct_hosts_are_all_routed(edge: Edge) -> None:
    """Any number of distinct Host values (more than are remembered) are each answered correctly."""
    for i in range(1100):
        response = edge.request("/1.jpg", host=f"{BUCKET}.file.myqcloud.com:{i}")
        assert response.status == 200, i
    assert edge.request("/1.jpg", host="nobody.file.myqcloud.com").status == 404


def test_response_heads_are_the_bytes_twisted_writes() -> None:
    """The status line and headers go out byte for byte as Twisted's own channel writes them (repeated headers too)."""
    headers = Headers()
    headers.setRawHeaders(b"server", [b"cosedge"])
    headers.setRawHeaders(b"x-cos-meta-a", [b"1", b"two words"])
    headers.setRawHeaders(b"etag", [b'"e"'])
    written = []
    for channel in (HTTPChannel(), EdgeSite(_Broken(), Stats(), "", Clock(), 60).buildProtocol(None)):
        assert channel is not None
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.writeHeaders(b"HTTP/1.1", b"206", b"Partial Content", headers)  # type: ignore[attr-defined]
        written.append(transport.value())
        channel.connectionLost(None)  # type: ignore[arg-type]
    assert written[0] == written[1]
    assert written[1].startswith(b"HTTP/1.1 206 Partial Content\r\nServer: cosedge\r\nX-Cos-Meta-A: 1\r\n")
