"""
Shared helpers for the unit tests, all without a reactor.

- :class:`Edge`: the bucket listener (``EdgeResource`` inside an ``EdgeSite``)
  with a filler whose agent is a ``RequestTraversalAgent`` around a
  ``FakeOrigin``, all on one ``Clock``.  Requests are fed to the site as raw
  bytes, so tests see exactly the bytes a client would (header counts,
  ``Content-Length`` against the body actually sent, absolute-form targets).
- :class:`GatedAgent`: holds origin requests until released, so fills stay
  in flight (``RequestTraversalAgent`` otherwise answers synchronously).
- :class:`StepCooperator`: drives Twisted's pull-producer adapter, which
  normally runs on the global reactor's cooperator, in bounded steps.
- :func:`capture_logs`: collects twisted.logger events.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import pytest
from attrs import define, field
from treq.testing import RequestTraversalAgent
from twisted.internet import _producer_helpers
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, Cooperator
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from cosedge.config import BucketConfig, Config, FillConfig, Origin, ServerConfig
from cosedge.fill.scheduler import Filler
from cosedge.interfaces import IObjectStore
from cosedge.origins import Source, origin_url
from cosedge.stats import Stats
from cosedge.testing import FakeOrigin, MemoryStore
from cosedge.web.channel import EdgeSite
from cosedge.web.resource import EdgeResource

BUCKET = "example-1250000000"
NOPULL = "nopull-1250000000"
DOMAIN = "file.myqcloud.com"
HOST = f"{BUCKET}.{DOMAIN}"
ORIGIN = "10.10.10.10:8080"


def edge_config(fill: FillConfig | None = None, data_dir: str = "var") -> Config:
    """Two buckets: one pulling from :data:`ORIGIN`, one without origin-pull."""
    return Config(
        server=ServerConfig(domains=(DOMAIN,), data_dir=data_dir, access_log=""),
        fill=fill or FillConfig(),
        buckets={
            BUCKET: BucketConfig(origin=ORIGIN, origin_pull=True),
            NOPULL: BucketConfig(),
        },
    )


class StepCooperator:
    """
    A cooperator that runs one work unit per task each time :meth:`run`
    steps its private clock, replacing the global one used by Twisted's
    pull-to-push producer adapter (install it with :meth:`install`).
    """

    def __init__(self) -> None:
        self.clock = Clock()
        self.cooperator = Cooperator(
            terminationPredicateFactory=lambda: lambda: True,  # one work unit per task per step
            scheduler=lambda f: self.clock.callLater(1, f),
        )

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(_producer_helpers, "cooperate", self.cooperator.cooperate)

    def step(self) -> None:
        """Run one work unit of every task."""
        self.clock.advance(1)

    def run(self, limit: int = 100_000) -> None:
        """Step until no cooperative task is left (at most ``limit`` steps)."""
        for _ in range(limit):
            if not self.clock.getDelayedCalls():
                return
            self.clock.advance(1)
        raise AssertionError(f"cooperative tasks still running after {limit} steps")


@implementer(IAgent)
class GatedAgent:
    """An agent that holds every request until :meth:`release`."""

    def __init__(self, agent: IAgent) -> None:
        self._agent = agent
        self.held: list[tuple[Deferred[IResponse], tuple[Any, ...]]] = []

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        d: Deferred[IResponse] = Deferred()
        self.held.append((d, (method, uri, headers, bodyProducer)))
        return d

    def release(self) -> int:
        """Send every held request on; return how many there were."""
        held, self.held = self.held, []
        for d, args in held:
            if not d.called:
                self._agent.request(*args).chainDeferred(d)
        return len(held)


@define
class RawResponse:
    """A response as parsed from the exact bytes the server wrote."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    raw: bytes

    def all(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def header(self, name: bytes) -> bytes | None:
        """The one value of header ``name`` (fails if it is repeated)."""
        values = self.all(name)
        assert len(values) <= 1, f"header {name!r} sent {len(values)} times: {values!r}"
        return values[0] if values else None

    @property
    def length(self) -> int:
        value = self.header(b"content-length")
        assert value is not None, "no Content-Length"
        return int(value)

    def error_code(self) -> str:
        """The ``<Code>`` of a COS XML error body."""
        assert self.header(b"content-type") == b"application/xml", self.headers
        assert self.body.startswith(b"<?xml"), self.body
        return self.body.split(b"<Code>", 1)[1].split(b"</Code>", 1)[0].decode()


def parse_response(data: bytes) -> RawResponse:
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, f"incomplete response head: {data[:200]!r}"
    lines = head.split(b"\r\n")
    version, status, _ = (lines[0].split(b" ", 2) + [b""])[:3]
    assert version == b"HTTP/1.1", lines[0]
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        assert colon, f"malformed header line {line!r}"
        headers.append((name.strip().lower(), value.strip()))
    response = RawResponse(int(status), headers, rest, data)
    if response.header(b"transfer-encoding") == b"chunked":
        response.body = _dechunk(rest)
    return response


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


class _Transport(StringTransportWithDisconnection):
    """
    Closes like a real TCP transport: marks itself disconnecting and stops
    its registered producer before telling the protocol.
    """

    def loseConnection(self) -> None:
        self.disconnecting = True
        if self.connected and self.producer is not None:
            producer, self.producer = self.producer, None
            producer.stopProducing()
        super().loseConnection()


@define(eq=False)
class Connection:
    """One client connection to the site, over a string transport."""

    edge: Edge
    transport: StringTransportWithDisconnection

    def send(self, data: bytes) -> None:
        self.transport.protocol.dataReceived(data)

    def response(self) -> RawResponse:
        """Let the server finish writing, then parse what it wrote."""
        self.edge.cooperator.run()
        return parse_response(self.transport.value())

    @property
    def closed(self) -> bool:
        return not self.transport.connected

    @property
    def aborted(self) -> bool:
        """The server dropped the connection (``abortConnection``)."""
        return bool(getattr(self.transport, "disconnected", False))


def raw_request(
    target: bytes | str,
    *,
    method: bytes = b"GET",
    host: bytes | str | None = HOST,
    headers: Iterable[tuple[bytes | str, bytes | str]] = (),
    body: bytes = b"",
) -> bytes:
    """An HTTP/1.1 request with ``Connection: close`` (and ``body``, if any)."""

    def b(v: bytes | str) -> bytes:
        return v if isinstance(v, bytes) else v.encode("utf-8")

    lines = [method + b" " + b(target) + b" HTTP/1.1"]
    if host is not None:
        lines.append(b"Host: " + b(host))
    lines += [b(k) + b": " + b(v) for k, v in headers]
    if body:
        lines.append(b"Content-Length: %d" % len(body))
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def origin_agents(origin: FakeOrigin, gated: bool) -> tuple[RequestTraversalAgent, Any]:
    """
    An in-memory agent to ``origin``, and the agent a filler uses: a
    :class:`GatedAgent` around it (requests held until released) or itself.
    """
    origin_agent = RequestTraversalAgent(origin)
    return origin_agent, GatedAgent(origin_agent) if gated else origin_agent


def flush_origin(agent: Any, origin_agent: RequestTraversalAgent, times: int = 5) -> None:
    """Let bytes flow between a filler and the fake origin (releasing a gated agent first)."""
    if isinstance(agent, GatedAgent):
        agent.release()
    for _ in range(times):
        origin_agent.flush()


@define(eq=False)
class Edge:
    """The bucket listener wired to a fake origin, in memory, on one clock."""

    cooperator: StepCooperator
    config: Config = field(factory=edge_config)
    store: IObjectStore = field(factory=MemoryStore)
    origin: FakeOrigin = field(factory=FakeOrigin)
    clock: Clock = field(factory=Clock)
    stats: Stats = field(factory=Stats)
    gated: bool = False
    agent: Any = field(init=False)
    origin_agent: RequestTraversalAgent = field(init=False)
    filler: Filler = field(init=False)
    resource: EdgeResource = field(init=False)
    site: EdgeSite = field(init=False)

    def __attrs_post_init__(self) -> None:
        self.origin_agent, self.agent = origin_agents(self.origin, self.gated)
        self.filler = Filler(self.store, self.agent, self.clock, lambda: self.config.fill, self.stats)
        self.resource = EdgeResource(lambda: self.config, self.store, self.filler, self.stats)
        self.site = EdgeSite(self.resource, self.stats, "", self.clock, 60)
        self.site.doStart()

    def connect(self) -> Connection:
        protocol = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert protocol is not None
        transport = _Transport()
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return Connection(self, transport)

    def send(self, data: bytes) -> RawResponse:
        """Send one raw request on a new connection; return the response."""
        conn = self.connect()
        conn.send(data)
        response = conn.response()
        assert conn.closed, "the server did not finish the response"
        return response

    def request(self, target: bytes | str, **kwargs: Any) -> RawResponse:
        return self.send(raw_request(target, **kwargs))

    def flush_origin(self, times: int = 5) -> None:
        """Let bytes flow between the filler and the fake origin."""
        flush_origin(self.agent, self.origin_agent, times)


@contextmanager
def capture_logs() -> Iterator[list[dict[str, Any]]]:
    """Collect every twisted.logger event emitted inside the block."""
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)


def fill_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events cosedge.fill logged about failed or stored fills."""
    return [e for e in events if e.get("log_namespace") == "cosedge.fill" and "bucket" in e]


def value_of(d: Deferred[Any]) -> Any:
    """The value a Deferred has already fired with; its failure raised."""
    result = result_of(d)
    if isinstance(result, Failure):
        result.raiseException()
    return result


def source_for(origin: Origin | None, segments: tuple[str, ...]) -> Source:
    """What the origin planner names for a fill of ``segments`` from ``origin``."""
    assert origin is not None
    return Source(origin_url(origin, segments))


def result_of(d: Deferred[Any]) -> Any:
    """The result a Deferred has already fired with (fails if it has not)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


class ProcessClaims:
    """Claims as two processes see them (POSIX locks never conflict within one process)."""

    def __init__(self, held: dict[tuple[str, tuple[str, ...]], int], me: int) -> None:
        self.held = held
        self.me = me

    def claim(self, bucket: str, segments: tuple[str, ...]) -> bool:
        return self.held.setdefault((bucket, segments), self.me) == self.me

    def release(self, bucket: str, segments: tuple[str, ...]) -> None:
        if self.held.get((bucket, segments)) == self.me:
            del self.held[(bucket, segments)]

    def holder(self, bucket: str, segments: tuple[str, ...]) -> int | None:
        pid = self.held.get((bucket, segments))
        return None if pid == self.me else pid
