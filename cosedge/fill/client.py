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

**HTTPS origins.**  An ``https://`` connection is TLS over TCP with the
guard above TLS (it checks the plaintext HTTP).  The certificate is verified
against a name (a rule's ``host_header``, else the URL's host; an IP address
is checked against the certificate's IP addresses) and that name is sent as
SNI (not for an IP address, as RFC 6066 says), with a rule's ``ca_file`` as
the only trusted CAs, else the system's.  :class:`OriginAgents` is the fills'
agent: one agent per TLS setting (bounded; a CA file that changes on disk is
a new setting), all on one connection pool whose key includes the TLS
setting, so a connection verified for one name and CA never serves a request
for another.  A failed handshake or verification ends the connection and
the guard reports it as :class:`TLSRefused`: a clean miss ``tls``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Hashable
from typing import Any

from attrs import define, field, frozen
from OpenSSL import SSL, crypto
from service_identity import CertificateError, VerificationError
from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
from service_identity.pyopenssl import extract_patterns
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import connectionDone
from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust, trustRootFromCertificates
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from ..config import FillConfig

__all__ = [
    "BadHeaders",
    "OriginAgents",
    "OriginEndpoints",
    "OriginFault",
    "QuietPool",
    "TLSRefused",
    "Trust",
    "Unframed",
    "load_ca_file",
]

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


class TLSRefused(OriginFault):
    """The origin's certificate does not name the host, or the CA file cannot be used."""

    reason = "tls"


class _QuietClientFactory(_HTTP11ClientFactory):
    noisy = False


class QuietPool(HTTPConnectionPool):
    """
    A connection pool that does not log every origin connection, and keeps
    the connections of each TLS setting apart: the agent's key is only
    (scheme, host, port), so the setting an origin endpoint verifies is
    added to it.
    """

    _factory = _QuietClientFactory

    def getConnection(self, key: Hashable, endpoint: IStreamClientEndpoint) -> Deferred[Any]:
        if isinstance(endpoint, _GuardedEndpoint) and endpoint.tls is not None:
            key = (key, endpoint.tls)
        return super().getConnection(key, endpoint)


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
        if self._fault is None:
            self._fault = _tls_refusal(reason, self._origin)
        super().connectionLost(Failure(self._fault) if self._fault is not None else reason)


def _tls_refusal(reason: Failure, origin: str) -> TLSRefused | None:
    """
    A TLS failure under the guard as a :class:`TLSRefused` (reason ``tls``)
    with a readable detail.  Twisted ends a connection whose certificate
    does not name the host with service_identity's ``VerificationError``,
    not an ``SSL.Error``: without this it would look like a refused connection.
    """
    error: Any = reason.value
    if isinstance(error, VerificationError):
        ids = [m.mismatched_id for m in error.errors]
        names = [getattr(i, "hostname", None) or getattr(i, "ip", "?") for i in ids]
        shown = ", ".join(n.decode("ascii", "replace") if isinstance(n, bytes) else str(n) for n in names)
        return TLSRefused(f"{origin}: the certificate does not name {shown}")
    if isinstance(error, CertificateError):
        return TLSRefused(f"{origin}: unusable certificate: {error}")
    if isinstance(error, SSL.Error):
        # OpenSSL's errors: a list of (library, function, reason) tuples.
        errors = error.args[0] if error.args and isinstance(error.args[0], list) else []
        said = "; ".join(str(e[-1]) for e in errors if isinstance(e, tuple) and e)
        return TLSRefused(f"{origin}: TLS failed: {said or reason.getErrorMessage()}")
    return None


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

    #: TCP (a HostnameEndpoint), or TLS over it.
    endpoint: IStreamClientEndpoint
    limits: Callable[[], FillConfig]
    origin: str
    #: The TLS setting verified (:attr:`Trust.identity`); None: plain HTTP.
    tls: Hashable | None = None

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        guarding = _GuardingFactory(factory, self.limits(), self.origin)
        connected: Deferred[Any] = self.endpoint.connect(guarding)
        return connected.addCallback(lambda guard: guard.wrappedProtocol)


_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL)
_CA_FILE_LIMIT = 4 << 20  # a system bundle is about 200 KiB


def load_ca_file(path: str) -> Any:
    """
    The certificates of a PEM file (one or several) as the only trusted CAs
    (an ``IOpenSSLTrustRoot``, which Twisted does not export).

    :raises TLSRefused: the file cannot be read or holds no certificate.
    """
    try:
        with open(path, "rb") as f:
            pem = f.read(_CA_FILE_LIMIT)
        blocks = _PEM_CERTIFICATE.findall(pem)
        if not blocks:
            raise TLSRefused(f"ca_file {path}: no PEM certificate in it")
        return trustRootFromCertificates([Certificate.loadPEM(block) for block in blocks])
    except OSError as e:
        raise TLSRefused(f"ca_file {path}: cannot read: {e.strerror or e}") from None
    except crypto.Error as e:
        raise TLSRefused(f"ca_file {path}: not a valid certificate: {e}") from None


@frozen
class Trust:
    """How ``https://`` origins are verified: whose certificates are trusted, and which name they must carry."""

    #: The CA file whose certificates are the trusted CAs (None: the system's).
    ca_file: str | None = None
    #: The name the certificate must carry, sent as SNI (None: each URL's host).
    server_name: bytes | None = None
    #: The CA file's (inode, size, mtime) when it was read: a changed file is another setting.
    version: tuple[int, int, int] | None = None
    #: The trusted CAs (an ``IOpenSSLTrustRoot``).
    root: Any = field(factory=platformTrust, eq=False)

    @property
    def identity(self) -> Hashable:
        """What a pooled connection was verified with."""
        return (self.ca_file, self.version, self.server_name)

    def endpoint(self, tcp: IStreamClientEndpoint, host: bytes, clock: IReactorTime) -> _TLSEndpoint:
        """TLS over ``tcp``, verifying ``server_name`` or else ``host`` (an IP address: the certificate's IP SAN)."""
        name = (self.server_name or host).decode("ascii")
        return _TLSEndpoint(tcp, _NameChecking(optionsForClientTLS(name, trustRoot=self.root), name), clock)


@implementer(IOpenSSLClientConnectionCreator)
@frozen
class _NameChecking:
    """
    ``optionsForClientTLS``'s connections (trusted CAs, SNI), with the name
    checked here instead of by Twisted's callback: that one only logs
    service_identity's ``CertificateError``, so a certificate without any
    subjectAltName from a trusted CA would pass for every name.
    """

    options: Any
    name: str

    def clientConnectionForTLS(self, tls: Any) -> SSL.Connection:
        connection: SSL.Connection = self.options.clientConnectionForTLS(tls)
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _name_check(tls, self.name))
        return connection


def _name_check(tls: Any, name: str) -> Callable[[SSL.Connection, Any, int, int, int], bool]:
    """An OpenSSL verify callback: the chain as OpenSSL found it, and ``name`` in the server's certificate."""
    wanted = IPAddress_ID(name) if isIPAddress(name) or isIPv6Address(name) else DNS_ID(name)
    protocol = [tls]  # dropped once used: no cycle through the connection

    def verify(connection: SSL.Connection, cert: Any, error: int, depth: int, ok: int) -> bool:
        if depth != 0 or not ok or not protocol:
            return bool(ok)
        try:
            verify_service_identity(extract_patterns(cert), [wanted], [])
        except Exception:  # VerificationError, CertificateError: the guard tells them apart
            protocol.pop().failVerification(Failure())
            return False
        protocol.clear()
        return True

    return verify


@implementer(IStreamClientEndpoint)
@frozen
class _TLSEndpoint:
    """
    TLS over ``tcp``: what ``wrapClientTLS`` makes, with the daemon's reactor
    as the clock of the TLS layer's write aggregation (not the global one),
    and the plaintext of each read passed up in one piece (:class:`_Gather`):
    a fill then writes 64 KiB at a time, not 16 KiB (one TLS record), which
    makes an HTTPS fill about a fifth faster on loopback.
    """

    tcp: IStreamClientEndpoint
    #: The ``IOpenSSLClientConnectionCreator`` (name verified, SNI, trusted CAs).
    creator: Any
    clock: IReactorTime

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        tls = TLSMemoryBIOFactory(self.creator, True, _PassingFactory(factory, _Gather), self.clock)
        connected: Deferred[Any] = self.tcp.connect(_PassingFactory(tls, _Batch))
        # Below TLS, the batch; above it, the gatherer; above that, the caller's protocol.
        return connected.addCallback(lambda batch: batch.wrappedProtocol.wrappedProtocol.wrappedProtocol)


class _Gather(ProtocolWrapper):
    """
    Above TLS: the plaintext of the records decrypted from one read (at most
    16 KiB each) is passed up as one piece, not one call per record, once
    :class:`_Batch` below TLS says the read is done.  Twisted's TLS protocol
    decrypts only inside its ``dataReceived``, so nothing waits here for
    another read (``tests/test_origin_tls.py`` checks both).
    """

    def __init__(self, factory: Any, wrapped: IProtocol) -> None:
        super().__init__(factory, wrapped)
        self._pieces: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self._pieces.append(data)

    def flush(self) -> None:
        if self._pieces:
            pieces, self._pieces = self._pieces, []
            super().dataReceived(pieces[0] if len(pieces) == 1 else b"".join(pieces))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.flush()
        super().connectionLost(reason)


class _Batch(ProtocolWrapper):
    """Below TLS: after TLS has taken one read, the gatherer above it passes its plaintext up."""

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        gather = getattr(self.wrappedProtocol, "wrappedProtocol", None)
        if isinstance(gather, _Gather):
            gather.flush()


class _PassingFactory(WrappingFactory):
    """Wraps each protocol of ``wrapped`` in ``layer``, quietly."""

    noisy = False

    def __init__(self, wrapped: IProtocolFactory, layer: type[ProtocolWrapper]) -> None:
        super().__init__(wrapped)
        self.protocol = layer


@implementer(IAgentEndpointFactory)
@frozen
class OriginEndpoints:
    """Connects to origins with the connect timeout and header limits of the current configuration."""

    reactor: Any
    config: Callable[[], FillConfig]
    #: How ``https://`` origins are verified.
    trust: Trust = field(factory=Trust)
    #: One endpoint per origin and timeout: the agent asks for one per request.
    _made: dict[tuple[bytes, bytes, int, float], _GuardedEndpoint] = field(factory=dict, alias="_made")

    def endpointForURI(self, uri: URI) -> _GuardedEndpoint:
        timeout = self.config().connect_timeout
        key = (uri.scheme, uri.host, uri.port, timeout)
        endpoint = self._made.get(key)
        if endpoint is None:
            if len(self._made) >= 1024:  # origins come and go with live changes
                self._made.clear()
            origin = f"{uri.host.decode('ascii', 'replace')}:{uri.port}"
            tcp = HostnameEndpoint(self.reactor, uri.host, uri.port, timeout=timeout)
            if uri.scheme == b"https":
                tls = self.trust.endpoint(tcp, uri.host, self.reactor)
                label = f"{uri.scheme.decode('ascii')}://{origin}"  # the log names the scheme
                endpoint = _GuardedEndpoint(tls, self.config, label, self.trust.identity)
            else:
                endpoint = _GuardedEndpoint(tcp, self.config, origin)
            self._made[key] = endpoint
        return endpoint


@implementer(IAgent)
@frozen
class _Refusing:
    """An agent for a TLS setting that cannot be used (its CA file is gone): every request fails ``tls``."""

    fault: TLSRefused

    def request(self, method: bytes, uri: bytes, *rest: object) -> Deferred[IResponse]:
        return fail(self.fault)


_AGENTS = 64  # TLS settings kept at most (they come from the rules)


@implementer(IAgent)
@define(eq=False)
class OriginAgents:
    """
    The fills' HTTP client: :meth:`request` asks plain ``http://`` origins
    (and ``https://`` ones verified with the system's CAs against the URL's
    host), :meth:`tls` gives the agent of one TLS setting.  Every agent
    shares ``pool`` (a :class:`QuietPool`, whose key tells the settings apart).
    """

    reactor: Any
    config: Callable[[], FillConfig]
    pool: HTTPConnectionPool
    _plain: IAgent = field(init=False)
    #: The agents of TLS settings, least recently used first.
    _agents: dict[tuple[str | None, bytes | None, tuple[int, int, int] | None], IAgent] = field(
        factory=dict, init=False
    )

    def __attrs_post_init__(self) -> None:
        self._plain = self._agent(Trust())

    def _agent(self, trust: Trust) -> IAgent:
        endpoints = OriginEndpoints(self.reactor, self.config, trust)
        agent: IAgent = Agent.usingEndpointFactory(self.reactor, endpoints, pool=self.pool)
        return agent

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None, bodyProducer: IBodyProducer | None = None
    ) -> Deferred[IResponse]:
        return self._plain.request(method, uri, headers, bodyProducer)

    def tls(self, ca_file: str | None, server_name: bytes | None) -> IAgent:
        """The agent for ``https://`` URLs trusting ``ca_file`` (None: the system) and verifying ``server_name``."""
        if ca_file is None and server_name is None:
            return self._plain
        version = None
        if ca_file is not None:
            try:
                stat = os.stat(ca_file)
            except OSError as e:
                return _Refusing(TLSRefused(f"ca_file {ca_file}: cannot read: {e.strerror or e}"))
            version = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        key = (ca_file, server_name, version)
        agent = self._agents.pop(key, None)
        if agent is None:
            try:
                root = platformTrust() if ca_file is None else load_ca_file(ca_file)
            except TLSRefused as e:
                return _Refusing(e)
            agent = self._agent(Trust(ca_file, server_name, version, root))
            if len(self._agents) >= _AGENTS:
                del self._agents[next(iter(self._agents))]
        self._agents[key] = agent  # the most recently used last
        return agent
