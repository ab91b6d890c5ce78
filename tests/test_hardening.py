"""
Hardening found by a hostile review (issue 10): password guessing on the
telnet manhole is slowed, requests Twisted's parser rejects get a COS error,
many small ranges never make an answer longer than the object, an
interrupted download is logged, Vary is kept, a stop is a cancellation
however it surfaces, and a port in use is one line at start.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet.error import DNSLookupError
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from cosedge import tap
from cosedge.admin.throttle import REFUSED, LoginThrottle
from cosedge.config import FillConfig
from cosedge.web.errors import error_body

from .helpers import (
    BUCKET,
    Edge,
    StepCooperator,
    capture_logs,
    fill_events,
    parse_response,
    raw_request,
    result_of,
    source_for,
)
from .test_admin import telnet_login_connection


@pytest.fixture
def edge(cooperator: StepCooperator) -> Edge:
    return Edge(cooperator)


# -- S12: password guessing on the telnet manhole --


def test_each_failure_doubles_the_wait_and_ten_lock_the_peer_out() -> None:
    """1 s, 2 s, 4 s … up to a minute between attempts, then a refusal for 15 minutes; a success forgets."""
    clock = Clock()
    throttle = LoginThrottle(clock)
    assert throttle.delay("a") == 0.0
    waits = []
    for _ in range(9):
        throttle.failed("a")
        waits.append(throttle.delay("a"))
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    assert throttle.delay("b") == 0.0  # another peer is not slowed by a's failures (below the global limit)
    throttle.failed("a")
    assert throttle.delay("a") == REFUSED
    clock.advance(899)
    assert throttle.delay("a") == REFUSED
    clock.advance(1)
    assert throttle.delay("a") == 60.0  # out of the lockout, still slow
    throttle.succeeded("a")
    assert throttle.delay("a") == 0.0


def test_failures_from_many_peers_slow_everyone() -> None:
    """More than 30 failures a minute in all: every peer waits, growing with the excess; a quiet minute ends it."""
    clock = Clock()
    throttle = LoginThrottle(clock)
    for n in range(30):
        throttle.failed(f"10.0.0.{n}")
    assert throttle.delay("fresh") == 1.0
    throttle.failed("10.0.1.1")
    assert throttle.delay("fresh") == 2.0
    clock.advance(61)
    assert throttle.delay("fresh") == 0.0


def test_a_peer_with_no_failure_for_a_while_starts_afresh() -> None:
    """Failures older than 15 minutes are forgotten."""
    clock = Clock()
    throttle = LoginThrottle(clock)
    for _ in range(3):
        throttle.failed("a")
    clock.advance(901)
    assert throttle.delay("a") == 0.0


def test_a_second_telnet_guess_waits_and_a_locked_out_peer_is_refused() -> None:
    """After a wrong password the next check from the peer waits on the clock; after ten, the peer is refused."""
    checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"pw")
    reactor, transport, telnet, sessions = telnet_login_connection(checker)
    throttle = telnet.protocol.throttle
    telnet.dataReceived(b"alice\r\nwrong\r\n")
    reactor.advance(telnet.protocol.failure_delay)
    assert b"Authentication failed" in transport.value()
    # A new connection from the same peer shares the listener's throttle.
    reactor2, transport2, telnet2, sessions2 = telnet_login_connection(checker)
    telnet2.protocol.throttle = throttle
    throttle.clock = reactor2
    telnet2.dataReceived(b"alice\r\npw\r\n")
    assert sessions2 == []  # the check waits a second
    reactor2.advance(1)
    assert sessions2 == ["telnet:alice@192.168.1.1"]
    for _ in range(10):
        throttle.failed("192.168.1.1")
    reactor3, transport3, telnet3, sessions3 = telnet_login_connection(checker)
    telnet3.protocol.throttle = throttle
    with capture_logs() as events:
        telnet3.dataReceived(b"alice\r\npw\r\n")
    assert sessions3 == [] and transport3.disconnecting
    assert b"Too many failed logins" in transport3.value()
    assert any("too many failures" in e.get("log_format", "") for e in events)


# -- S10: requests Twisted's parser rejects --


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /1.jpg HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET /1.jpg HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"GET /1.jpg HTTP/9.9.9\r\nHost: h\r\n\r\n",
        b"GET /1.jpg HTTP/1.1\r\nHost: h\r\nX: " + b"a" * 17000 + b"\r\n\r\n",
        b"GET /1.jpg HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"a" * 100) for i in range(200)) + b"\r\n",
    ],
    ids=["cl-and-te", "two-lengths", "bad-version", "long-header-line", "headers-over-16k"],
)
def test_requests_the_parser_rejects_get_a_cos_error(edge: Edge, raw: bytes) -> None:
    """Every answer of the bucket listener is a COS error body with a request id, never a bare 400 or silence."""
    conn = edge.connect()
    conn.send(raw)
    response = parse_response(conn.transport.value())
    assert response.status == 400
    request_id = response.header(b"x-cos-request-id")
    assert request_id is not None
    assert response.body == error_body(
        response.error_code(), _message(response.body), request_id.decode(), _resource(response.body)
    )
    assert response.error_code() in ("InvalidRequest", "RequestHeaderSectionTooLarge")
    assert conn.transport.disconnecting


def test_a_request_body_is_refused_with_a_request_id(edge: Edge) -> None:
    """The 413 for a request body carries x-cos-request-id, like every other error."""
    conn = edge.connect()
    conn.send(raw_request("/1.jpg", body=b"x" * 70000))
    response = parse_response(conn.transport.value())
    assert response.status == 413 and response.error_code() == "EntityTooLarge"
    assert response.header(b"x-cos-request-id") is not None


def _resource(body: bytes) -> str:
    return body.split(b"<Resource>", 1)[1].split(b"</Resource>", 1)[0].decode()


def _message(body: bytes) -> str:
    return body.split(b"<Message>")[1].split(b"</Message>")[0].decode()


# -- S11: many small ranges --


def test_many_small_ranges_never_exceed_the_object(edge: Edge) -> None:
    """64 one-byte ranges of a 1,000-byte object: the whole object with 200, not 6,928 bytes of parts."""
    edge.store.put(BUCKET, ("k.bin",), bytes(range(256)) * 4)  # type: ignore[attr-defined]
    spec = ",".join(f"{i * 10}-{i * 10}" for i in range(64))
    response = edge.request("/k.bin", headers=[("Range", f"bytes={spec}")])
    assert response.status == 200 and len(response.body) == 1024
    few = edge.request("/k.bin", headers=[("Range", "bytes=0-99,500-599")])
    assert few.status == 206 and b"multipart/byteranges" in (few.header(b"content-type") or b"")
    assert len(few.body) <= 1024


# -- access log of interrupted downloads --


def test_a_download_the_client_interrupts_is_logged_with_the_bytes_sent(edge: Edge) -> None:
    """A client that hangs up mid-body leaves one access-log line with the status and the bytes handed over."""
    edge.store.put(BUCKET, ("big.bin",), b"x" * 500_000)  # type: ignore[attr-defined]
    logged: list[Any] = []
    edge.site.log = logged.append  # type: ignore[method-assign]
    conn = edge.connect()
    conn.send(raw_request("/big.bin"))
    edge.cooperator.step()
    conn.transport.loseConnection()  # the client hangs up: the channel's connectionLost
    assert len(logged) == 1
    assert logged[0].code == 200 and 0 < logged[0].sentLength < 500_000


# -- Vary --


def test_vary_is_kept_and_served(edge: Edge) -> None:
    """The origin's Vary is stored with the object and sent with every hit."""
    edge.origin.add("v.js", b"js", headers={"vary": "Accept-Encoding"})
    edge.filler.start(BUCKET, ("v.js",), source_for(edge_origin(edge), ("v.js",)))
    edge.flush_origin()
    response = edge.request("/v.js")
    assert response.status == 200 and response.header(b"vary") == b"Accept-Encoding"


def edge_origin(edge: Edge) -> Any:
    return edge.config.buckets[BUCKET].origin


# -- a stop is a cancellation --


def test_a_fill_stopped_while_its_name_is_looked_up_is_cancelled(cooperator: StepCooperator) -> None:
    """However the cancellation surfaces (a lookup cut short reads as a DNS failure), a stop logs 'cancelled'."""
    edge = Edge(cooperator, gated=True)
    edge.filler.start(BUCKET, ("k",), source_for(edge_origin(edge), ("k",)))
    held = edge.agent.held[0][0]
    with capture_logs() as events:
        edge.filler._stopping = True  # what stop() sets first
        held.errback(Failure(DNSLookupError("address 'example' not found: cancelled")))
    assert [e["reason"] for e in fill_events(events)] == ["cancelled"]


# -- a port in use --


def test_a_port_in_use_is_one_line_at_start(tmp_path: Any) -> None:
    """twistd cosedge on a busy port says so in one usage error, as a configuration mistake does."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        config = tmp_path / "c.toml"
        config.write_text(f'[server]\nlisten = ["tcp:{port}:interface=127.0.0.1"]\ndata_dir = "{tmp_path}"\n')
        options = tap.Options()
        with pytest.raises(usage.UsageError) as info:
            options.parseOptions(["--config", str(config)])
    assert str(info.value) == f"cannot listen on tcp:{port}:interface=127.0.0.1: Address already in use"


# -- F20: a dripping origin --


def test_a_dripping_origin_fails_too_slow_and_frees_its_slot(cooperator: StepCooperator) -> None:
    """Below min_rate bytes/s over a window the fill is a clean miss 'too-slow'; a steady origin is never cut."""
    from .test_fill import Fills, ScriptedAgent, ScriptedResponse

    fills = Fills()
    fills.config = FillConfig(min_rate=100, min_rate_window=10, idle_timeout=30, max_concurrent=1)
    agent = ScriptedAgent()
    drip = ScriptedResponse(length=100_000)
    steady = ScriptedResponse(length=3_000)
    agent.responses[b"/drip"] = drip
    agent.responses[b"/steady"] = steady
    filler = fills.filler_using(agent)
    with capture_logs() as events:
        d = filler.fill(BUCKET, ("drip",), source_for(edge_origin_of(fills), ("drip",)))
        queued = filler.fill(BUCKET, ("steady",), source_for(edge_origin_of(fills), ("steady",)))
        for _ in range(9):
            fills.clock.advance(1)
            drip.send(b"d" * 10)  # 10 bytes/s: below 100
        assert not d.called
        fills.clock.advance(1)
        result = result_of(d)
    assert result.reason == "too-slow" and fills.stored("drip") is None
    assert drip.transport.producerState == "stopped"
    assert [e["reason"] for e in fill_events(events)] == ["too-slow"]
    for _ in range(3):  # the freed slot runs the next fill: 1,000 bytes/s is fast enough
        fills.clock.advance(1)
        steady.send(b"s" * 1000)
    steady.finish(ResponseDone())
    assert result_of(queued).stored and fills.stored("steady") == b"s" * 3000


def edge_origin_of(fills: Any) -> Any:
    from .test_fill import ORIGIN

    return ORIGIN


# -- F17, F18, F19: the guard on origin connections --


class _Recorder:
    """What the HTTP client behind the guard would receive."""

    def __init__(self) -> None:
        self.data = b""
        self.lost: list[Failure] = []
        self.transport: Any = None

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)


def _guard(**limits: int) -> tuple[Any, _Recorder, Any]:
    from twisted.internet.protocol import Factory
    from twisted.internet.testing import StringTransport

    from cosedge.fill.client import _GuardingFactory

    recorder = _Recorder()
    factory = _GuardingFactory(Factory.forProtocol(lambda: recorder), FillConfig(**limits), "origin:80")  # type: ignore[arg-type]
    guard = factory.buildProtocol(None)
    transport = StringTransport()
    guard.makeConnection(transport)
    return guard, recorder, transport


def _lost_reason(guard: Any, transport: Any) -> Any:
    """The reason the client behind the guard is told, once the guard has ended the connection."""
    assert transport.disconnecting  # the guard ended the connection
    recorder = guard.wrappedProtocol
    guard.connectionLost(Failure(ConnectionError("aborted")))
    return recorder.lost[-1].value


def test_the_guard_passes_a_framed_response_whole_and_nothing_after_it() -> None:
    """A Content-Length body reaches the client exactly; bytes beyond it end the connection, never forwarded (F18)."""
    from cosedge.fill.client import OriginFault

    guard, recorder, transport = _guard()
    guard.write(b"GET /a HTTP/1.1\r\nHost: o\r\n\r\n")
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    guard.dataReceived(head + b"hel")
    guard.dataReceived(b"loEXTRA")
    assert recorder.data == head + b"hello"
    fault = _lost_reason(guard, transport)
    assert isinstance(fault, OriginFault) and "beyond a whole response" in str(fault)


def test_the_guard_closes_a_connection_that_speaks_while_idle() -> None:
    """Bytes on an idle pooled connection (no request asked) end it: the next request never reads them (F18)."""
    guard, recorder, transport = _guard()
    guard.write(b"GET /a HTTP/1.1\r\n\r\n")
    guard.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert not transport.disconnecting
    guard.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nSMUGG")
    assert recorder.data.endswith(b"ok") and b"SMUGG" not in recorder.data
    assert transport.disconnecting


@pytest.mark.parametrize(
    ("limits", "feed"),
    [
        ({"max_header_line": 100}, [b"HTTP/1.1 200 OK\r\nX: " + b"a" * 200]),
        ({"max_header_count": 5}, [b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 10]),
        ({"max_header_bytes": 1000}, [b"HTTP/1.1 200 OK\r\n"] + [b"X-%d: %s\r\n" % (i, b"z" * 90) for i in range(20)]),
    ],
    ids=["long-line", "many-fields", "big-block"],
)
def test_the_guard_bounds_response_headers(limits: dict[str, int], feed: list[bytes]) -> None:
    """Over a line, block or field-count limit: the connection ends with 'bad-headers' before the client parses more."""
    from cosedge.fill.client import BadHeaders

    guard, recorder, transport = _guard(**limits)
    guard.write(b"GET /a HTTP/1.1\r\n\r\n")
    for piece in feed:
        if not transport.disconnecting:
            guard.dataReceived(piece)
    assert isinstance(_lost_reason(guard, transport), BadHeaders)


def test_the_guard_refuses_an_unframed_200_at_its_headers() -> None:
    """Neither Content-Length nor chunked on a 200: refused when the headers end; the client never sees them (F19)."""
    from cosedge.fill.client import Unframed

    guard, recorder, transport = _guard()
    guard.write(b"GET /a HTTP/1.1\r\n\r\n")
    guard.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: x\r\n\r\nbody bytes")
    assert b"\r\n\r\n" not in recorder.data  # the header block never completed for the client
    assert isinstance(_lost_reason(guard, transport), Unframed)


def test_the_guard_lets_chunked_interim_and_head_answers_through() -> None:
    """A chunked body, a 100 Continue before the answer, and a HEAD's headers-only answer all pass unchanged."""
    guard, recorder, transport = _guard()
    guard.write(b"GET /a HTTP/1.1\r\n\r\n")
    chunked = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    guard.dataReceived(chunked)
    assert recorder.data == chunked and not transport.disconnecting
    guard2, recorder2, transport2 = _guard()
    guard2.write(b"HEAD /a HTTP/1.1\r\n\r\n")
    guard2.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
    guard2.write(b"GET /b HTTP/1.1\r\n\r\n")
    guard2.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nz")
    assert recorder2.data.endswith(b"z") and not transport2.disconnecting


def test_the_guard_checks_the_next_response_after_a_chunked_one() -> None:
    """A connection reused after a chunked answer has its next answer's headers bounded again."""
    from cosedge.fill.client import BadHeaders

    guard, recorder, transport = _guard(max_header_count=5)
    guard.write(b"GET /a HTTP/1.1\r\n\r\n")
    guard.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n")
    guard.write(b"GET /b HTTP/1.1\r\n\r\n")
    guard.dataReceived(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 10)
    assert isinstance(_lost_reason(guard, transport), BadHeaders)
