"""
The fills' HTTP client to origins: a quiet persistent connection pool, one
endpoint per origin with the configured connect timeout, and a guard on
every origin connection that checks the framing of each response before
Twisted's HTTP client parses it.

The guard (reliability rows F17, F18, F19) sits between the TCP connection
and Twisted's ``HTTP11ClientProtocol``:

- **Bounded response headers.** One header line over ``max_header_line``
  bytes, a header block over ``max_header_bytes`` or more than
  ``max_header_count`` fields end the connection at once: a clean miss
  ``bad-headers``, with memory bounded by those limits whatever the origin
  streams.
- **Unframed bodies are not read.** A 200 whose body has neither a
  Content-Length nor chunked framing could never be stored (its end cannot be
  told from a cut): the connection ends at the headers, ``unframed``.
- **Bytes beyond Content-Length never reach another response.** Once a
  Content-Length body is whole, any further byte (in the same packet or
  while the connection is idle in the pool) ends the connection, so the next
  request on that origin never reads it.  The response itself is whole by its
  Content-Length and is stored as declared, as nginx does (it logs
  "upstream sent more data than specified"); the connection is not reused.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from attrs import field, frozen
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.client import URI, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from ..config import FillConfig

__all__ = ["BadHeaders", "OriginEndpoints", "OriginFault", "QuietPool", "Unframed"]

_log = Logger(namespace="cosedge.fill")

_END = re.compile(rb"\r?\n\r?\n")
_NO_BODY = frozenset({204, 304})


class OriginFault(Exception):
    """An origin's response the guard refused; ``reason`` is the fill's reason."""

    reason = "bad-response"


class BadHeaders(OriginFault):
    reason = "bad-headers"


class Unframed(OriginFault):
    reason = "unframed"


class _Overlong(OriginFault):
    reason = "overlong"


class _QuietClientFactory(_HTTP11ClientFactory):
    noisy = False


class QuietPool(HTTPConnectionPool):
    """A connection pool that does not log every origin connection."""

    _factory = _QuietClientFactory


class _Guard(ProtocolWrapper):
    """Checks each response's framing before the HTTP client sees it (see the module docstring)."""

    def __init__(self, factory: _GuardingFactory, wrapped: IProtocol, limits: FillConfig, origin: str) -> None:
        super().__init__(factory, wrapped)  # type: ignore[arg-type]
        self._limits = limits
        self._origin = origin
        self._state = "idle"  # idle, head, body (counted), pass (chunked or unframed non-200)
        self._head = bytearray()
        self._line = 0
        self._lines = 0
        self._remaining = 0
        self._head_only = False
        self._fault: OriginFault | None = None

    # -- outgoing: a request starts a response --

    def write(self, data: bytes) -> None:
        self._request_starts(data)
        super().write(data)

    def writeSequence(self, data: Any) -> None:
        parts = list(data)
        if parts:
            self._request_starts(parts[0])
        super().writeSequence(parts)

    def _request_starts(self, first: bytes) -> None:
        # The HTTP client sends a request only on a quiet connection: the
        # previous response (counted, or passed through: chunked) has ended.
        if self._state in ("idle", "pass"):
            self._state = "head"
            self._head = bytearray()
            self._line = self._lines = 0
            self._head_only = first.startswith(b"HEAD ")

    # -- incoming --

    def dataReceived(self, data: bytes) -> None:
        while data and self._fault is None:
            if self._state == "head":
                data = self._headers(data)
            elif self._state == "body":
                take = data[: self._remaining]
                self._remaining -= len(take)
                data = data[len(take) :]
                if self._remaining == 0:
                    self._state = "idle"
                if take:
                    super().dataReceived(take)
            elif self._state == "pass":
                super().dataReceived(data)
                return
            else:  # idle: nothing was asked for
                self._refuse(_Overlong(f"{len(data)} byte(s) beyond a whole response"))
                return

    def _headers(self, data: bytes) -> bytes:
        """Scan and forward header bytes; return what follows the header block (refused: nothing)."""
        limits = self._limits
        scanned = len(self._head)
        self._head += data
        end = _END.search(self._head, max(0, scanned - 3))
        stop = end.end() if end is not None else len(self._head)
        pieces = bytes(self._head[scanned:stop]).split(b"\n")
        longest = self._line + len(pieces[0])
        for piece in pieces[1:]:
            longest = max(longest, len(piece))
        self._lines += len(pieces) - 1
        self._line = len(pieces[-1]) if len(pieces) > 1 else self._line + len(pieces[-1])
        if longest > limits.max_header_line or stop > limits.max_header_bytes:
            self._refuse(
                BadHeaders(f"over {limits.max_header_line} bytes in a line or {limits.max_header_bytes} in all")
            )
            return b""
        if self._lines > limits.max_header_count + 2:  # the status line and the empty line end the count
            self._refuse(BadHeaders(f"more than {limits.max_header_count} header fields"))
            return b""
        if end is None:
            super().dataReceived(data)
            return b""
        head, rest = bytes(self._head[:stop]), bytes(self._head[stop:])
        status, fields = _parse(head)
        if 100 <= status < 200:  # an interim answer: the real one follows
            self._head = bytearray()
            self._line = self._lines = 0
        elif self._head_only or status in _NO_BODY:
            self._state = "idle"
        elif b"chunked" in fields.get(b"transfer-encoding", b"").lower():
            self._state = "pass"
        elif (length := fields.get(b"content-length", b"").strip()).isdigit():
            self._remaining = int(length)
            self._state = "body" if self._remaining else "idle"
        elif status == 200:
            self._refuse(Unframed("no Content-Length and not chunked"))
            return b""
        else:
            self._state = "pass"
        super().dataReceived(data[: len(data) - len(rest)])
        return rest

    def _refuse(self, fault: OriginFault) -> None:
        self._fault = fault
        if isinstance(fault, _Overlong):
            _log.warn(
                "origin {origin} sent {detail}: the connection is closed, not reused",
                origin=self._origin,
                detail=str(fault),
            )
        self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(Failure(self._fault) if self._fault is not None else reason)


def _parse(head: bytes) -> tuple[int, dict[bytes, bytes]]:
    """The status code and the (last) value of each header of a response's header block."""
    lines = head.replace(b"\r\n", b"\n").split(b"\n")
    parts = lines[0].split(None, 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    fields: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if colon:
            fields[name.strip().lower()] = value.strip()
    return status, fields


class _GuardingFactory(WrappingFactory):
    def __init__(self, wrapped: IProtocolFactory, limits: FillConfig, origin: str) -> None:
        super().__init__(wrapped)
        self._limits = limits
        self._origin = origin
        self.noisy = False

    def buildProtocol(self, addr: Any) -> _Guard:  # type: ignore[override]
        inner = self.wrappedFactory.buildProtocol(addr)
        assert inner is not None  # the HTTP client's factory always builds one
        return _Guard(self, inner, self._limits, self._origin)


@implementer(IStreamClientEndpoint)
@frozen
class _GuardedEndpoint:
    """An origin endpoint whose connections are guarded; ``connect`` gives the HTTP client's own protocol."""

    endpoint: HostnameEndpoint
    limits: Callable[[], FillConfig]
    origin: str

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        guarding = _GuardingFactory(factory, self.limits(), self.origin)
        connected: Deferred[Any] = self.endpoint.connect(guarding)
        return connected.addCallback(lambda guard: guard.wrappedProtocol)


@implementer(IAgentEndpointFactory)
@frozen
class OriginEndpoints:
    """Connects to origins with the connect timeout and header limits of the current configuration."""

    reactor: Any
    config: Callable[[], FillConfig]
    #: One endpoint per origin and timeout: the agent asks for one per request.
    _made: dict[tuple[bytes, int, float], _GuardedEndpoint] = field(factory=dict, alias="_made")

    def endpointForURI(self, uri: URI) -> _GuardedEndpoint:
        timeout = self.config().connect_timeout
        key = (uri.host, uri.port, timeout)
        endpoint = self._made.get(key)
        if endpoint is None:
            if len(self._made) >= 1024:  # origins come and go with live changes
                self._made.clear()
            origin = f"{uri.host.decode('ascii', 'replace')}:{uri.port}"
            plain = HostnameEndpoint(self.reactor, uri.host, uri.port, timeout=timeout)
            endpoint = self._made[key] = _GuardedEndpoint(plain, self.config, origin)
        return endpoint
