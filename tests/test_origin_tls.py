"""
HTTPS origins (fill/client.py): certificate verification against the URL's
host or a rule's ``host_header``, SNI, ``ca_file``, the ``tls`` reason of a
refusal, the guard above TLS, and connection pools kept apart per TLS
setting.  No reactor: each origin connection is made in memory
(``MemoryReactorClock`` records it, ``iosim`` pumps real TLS bytes between
the client and a TLS server protocol).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.web.client import URI, HTTPConnectionPool, ResponseDone
from zope.interface import implementer

from cosedge.config import FillConfig
from cosedge.fill.client import OriginAgents, OriginEndpoints, QuietPool, TLSRefused
from cosedge.fill.fetch import reason_of
from cosedge.service import EdgeService
from cosedge.testing import MemoryStore

from .helpers import edge_config, result_of
from .tlsca import CA, Issued

_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


class _Responder(Protocol):
    """A tiny HTTP/1.1 origin: ``answer`` to each request (keep-alive)."""

    def __init__(self, origin: _Origin) -> None:
        self.origin = origin
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            self.origin.requests.append(head)
            self.transport.write(self.origin.answer)  # type: ignore[union-attr]


class _Body(Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.pieces = 0
        self.done = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self.pieces += 1

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done = reason.check(ResponseDone) is not None


@implementer(IOpenSSLServerConnectionCreator)
@attrs.define
class _Origin:
    """A TLS origin served in memory; records the SNI name of each connection and each request."""

    issued: Issued
    answer: bytes = _OK
    sni: list[bytes | None] = attrs.field(factory=list)
    requests: list[bytes] = attrs.field(factory=list)
    _context: SSL.Context | None = None

    def serverConnectionForTLS(self, protocol: object) -> SSL.Connection:
        if self._context is None:
            self._context = SSL.Context(SSL.TLS_SERVER_METHOD)
            self._context.use_certificate(x509.load_pem_x509_certificate(self.issued.cert_pem))
            self._context.use_privatekey(serialization.load_pem_private_key(self.issued.key_pem, None))
            self._context.set_tlsext_servername_callback(lambda conn: self.sni.append(conn.get_servername()))
        return SSL.Connection(self._context, None)

    def protocol(self, clock: MemoryReactorClock) -> Any:
        factory = TLSMemoryBIOFactory(self, False, Factory.forProtocol(lambda: _Responder(self)), clock)
        return factory.buildProtocol(None)


@attrs.define
class _World:
    """A memory reactor, the fills' agents on a QuietPool, and the CA files of the tests."""

    tmp: Path
    ca: CA = attrs.field(factory=CA.make)
    reactor: MemoryReactorClock = attrs.field(factory=MemoryReactorClock)
    pool: HTTPConnectionPool = attrs.field(init=False)
    agents: OriginAgents = attrs.field(init=False)
    pumps: list[iosim.IOPump] = attrs.field(factory=list)

    def __attrs_post_init__(self) -> None:
        self.pool = QuietPool(self.reactor, persistent=True)
        self.agents = OriginAgents(self.reactor, lambda: FillConfig(connect_timeout=3), self.pool)

    def ca_file(self, *cas: CA, name: str = "ca.pem") -> str:
        path = self.tmp / name
        path.write_bytes(b"".join(ca.pem for ca in cas or (self.ca,)))
        return str(path)

    def get(self, origin: _Origin, url: bytes, ca_file: str | None, name: bytes | None = None) -> Any:
        """GET ``url`` through the agent of (``ca_file``, ``name``); a new connection goes to ``origin``."""
        connecting = len(self.reactor.tcpClients)
        answer = self.agents.tls(ca_file, name).request(b"GET", url)
        for _, _, factory, _, _ in self.reactor.tcpClients[connecting:]:
            client, server = factory.buildProtocol(None), origin.protocol(self.reactor)
            pump = iosim.connect(
                server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client), clock=self.reactor
            )
            self.pumps.append(pump)
        for pump in self.pumps:
            pump.flush()
        return result_of(answer)

    def body(self, response: Any) -> bytes:
        return bytes(self.read(response).data)

    def read(self, response: Any) -> _Body:
        body = _Body()
        response.deliverBody(body)
        for pump in self.pumps:
            pump.flush()
        assert body.done
        return body

    @property
    def connections(self) -> int:
        return len(self.reactor.tcpClients)


@pytest.fixture
def world(tmp_path: Path) -> _World:
    return _World(tmp_path)


def _reason(outcome: Any) -> tuple[str, str]:
    assert isinstance(outcome, Failure), f"expected a failure, got {outcome!r}"
    return reason_of(outcome)


def test_an_ip_address_origin_is_verified_against_the_certificates_ip_address(world: _World) -> None:
    """``https://127.0.0.1`` with the rule's CA file: the IP SAN is checked, and no SNI is sent (RFC 6066)."""
    origin = _Origin(world.ca.issue(["127.0.0.1"]))
    response = world.get(origin, b"https://127.0.0.1:8443/a.txt", world.ca_file())
    assert response.code == 200
    assert world.body(response) == b"hello"
    assert origin.sni == [None]


def test_a_dns_name_is_verified_and_sent_as_sni(world: _World) -> None:
    origin = _Origin(world.ca.issue(["origin.test"]))
    response = world.get(origin, b"https://origin.test/a.txt", world.ca_file())
    assert response.code == 200
    assert origin.sni == [b"origin.test"]


def test_host_header_is_the_name_verified_and_sent_as_sni(world: _World) -> None:
    """A rule's ``host_header`` on an https origin at an IP address: the certificate must name it."""
    origin = _Origin(world.ca.issue(["origin.test"]))
    response = world.get(origin, b"https://127.0.0.1:8443/a.txt", world.ca_file(), b"origin.test")
    assert response.code == 200
    assert origin.sni == [b"origin.test"]


def test_a_certificate_from_another_ca_is_a_tls_failure(world: _World) -> None:
    """The handshake fails with an ``SSL.Error``; the guard makes it :class:`TLSRefused` with OpenSSL's words."""
    origin = _Origin(CA.make("someone else").issue(["127.0.0.1"]))
    outcome = world.get(origin, b"https://127.0.0.1:8443/a.txt", world.ca_file())
    assert _reason(outcome) == ("tls", "https://127.0.0.1:8443: TLS failed: certificate verify failed")
    assert origin.requests == []


@pytest.mark.parametrize(
    ("names", "url", "server_name", "wanted"),
    [
        (["elsewhere.test"], b"https://127.0.0.1:8443/a.txt", None, "127.0.0.1"),
        (["127.0.0.2"], b"https://127.0.0.1:8443/a.txt", None, "127.0.0.1"),
        (["elsewhere.test"], b"https://origin.test/a.txt", None, "origin.test"),
        (["127.0.0.1", "elsewhere.test"], b"https://127.0.0.1:8443/a.txt", b"origin.test", "origin.test"),
    ],
)
def test_a_certificate_without_the_name_is_a_tls_failure(
    world: _World, names: list[str], url: bytes, server_name: bytes | None, wanted: str
) -> None:
    """
    Twisted ends such a connection with service_identity's VerificationError
    (not an SSL.Error, so it would pass for a refused connection); the guard
    makes it :class:`TLSRefused`: reason ``tls``.
    """
    origin = _Origin(world.ca.issue(names))
    outcome = world.get(origin, url, world.ca_file(), server_name)
    reason, detail = _reason(outcome)
    assert reason == "tls"
    assert detail.endswith(f": the certificate does not name {wanted}")
    assert origin.requests == []


def test_a_certificate_without_subject_alt_names_is_refused_whatever_its_common_name(world: _World) -> None:
    """
    Twisted's own check only logs service_identity's CertificateError (no
    subjectAltName) and lets the handshake through; cosedge's refuses it,
    and logs no failure (the ``logged_failures`` fixture).
    """
    origin = _Origin(world.ca.issue(["127.0.0.1"], alt_names=False))
    outcome = world.get(origin, b"https://127.0.0.1:8443/a.txt", world.ca_file())
    reason, detail = _reason(outcome)
    assert reason == "tls"
    assert "unusable certificate" in detail and "subjectAltName" in detail
    assert origin.requests == []


def test_the_system_trust_does_not_accept_a_test_ca(world: _World) -> None:
    """No ``ca_file``: the system's CAs, which never signed the test CA."""
    origin = _Origin(world.ca.issue(["127.0.0.1"]))
    assert _reason(world.get(origin, b"https://127.0.0.1:8443/a.txt", None))[0] == "tls"


def test_a_ca_file_may_hold_several_certificates(world: _World) -> None:
    origin = _Origin(world.ca.issue(["127.0.0.1"]))
    bundle = world.ca_file(CA.make("first"), world.ca, CA.make("third"))
    assert world.get(origin, b"https://127.0.0.1:8443/a.txt", bundle).code == 200


@pytest.mark.parametrize(
    "content", [None, b"no certificate here\n", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"]
)
def test_a_ca_file_that_cannot_be_used_fails_tls_until_it_can(world: _World, content: bytes | None) -> None:
    """A CA file gone or spoiled since the configuration was loaded: ``tls``, no connection; fixed, it is used."""
    path = world.tmp / "ca.pem"
    if content is not None:
        path.write_bytes(content)
    origin = _Origin(world.ca.issue(["127.0.0.1"]))
    outcome = world.get(origin, b"https://127.0.0.1:8443/a.txt", str(path))
    assert isinstance(outcome.value, TLSRefused)
    assert _reason(outcome) == ("tls", str(outcome.value))
    assert str(path) in str(outcome.value)
    assert world.connections == 0
    world.ca_file()
    assert world.get(origin, b"https://127.0.0.1:8443/a.txt", str(path)).code == 200


def test_the_guard_sees_the_plaintext_above_tls(world: _World) -> None:
    """An unframed 200 from an https origin is refused by the guard, as over plain HTTP."""
    origin = _Origin(world.ca.issue(["127.0.0.1"]), answer=b"HTTP/1.1 200 OK\r\n\r\nendless")
    assert _reason(world.get(origin, b"https://127.0.0.1:8443/a.txt", world.ca_file()))[0] == "unframed"


def test_the_plaintext_of_one_read_reaches_the_client_in_one_piece(world: _World) -> None:
    """
    A 60 KiB body is four TLS records; read at once, it is passed up whole
    (one write to the store, not four), and none of it waits for another read.
    """
    body = bytes(range(256)) * 240
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    origin = _Origin(world.ca.issue(["127.0.0.1"]), answer=answer)
    response = world.get(origin, b"https://127.0.0.1:8443/a.txt", world.ca_file())
    read = world.read(response)
    assert (bytes(read.data), read.pieces) == (body, 1)


def test_connections_are_pooled_per_tls_setting(world: _World) -> None:
    """
    The same https origin asked with another name or CA gets a connection of
    its own; the same setting again reuses the pooled one.
    """
    origin = _Origin(world.ca.issue(["127.0.0.1", "origin.test"]))
    url = b"https://127.0.0.1:8443/a.txt"
    ca_file = world.ca_file()
    both = world.ca_file(CA.make("other"), world.ca, name="both.pem")
    for name, ca, connections in [
        (None, ca_file, 1),
        (None, ca_file, 1),
        (b"origin.test", ca_file, 2),
        (None, both, 3),
        (b"origin.test", ca_file, 3),
        (None, ca_file, 3),
    ]:
        response = world.get(origin, url, ca, name)
        assert world.body(response) == b"hello"
        assert world.connections == connections
    assert origin.sni == [None, b"origin.test", None]
    assert len(origin.requests) == 6


def test_plain_http_is_unchanged(world: _World) -> None:
    """``request`` is the plain agent: TCP with the connect timeout, guarded, no TLS setting in its pool key."""
    assert world.agents.tls(None, None) is world.agents._plain
    world.agents.request(b"GET", b"http://127.0.0.1:8443/a.txt")
    host, port, _, timeout, _ = world.reactor.tcpClients[0]
    assert (host, port, timeout) == ("127.0.0.1", 8443, 3)
    endpoints = OriginEndpoints(world.reactor, lambda: FillConfig(connect_timeout=3))
    plain = endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8443/a.txt"))
    secure = endpoints.endpointForURI(URI.fromBytes(b"https://127.0.0.1:8443/a.txt"))
    assert plain.tls is None and isinstance(plain.endpoint, HostnameEndpoint)
    assert secure is not plain and secure.tls is not None  # the same host and port, never the same connections


def test_agents_are_kept_per_setting_bounded_and_renewed_when_the_ca_file_changes(world: _World) -> None:
    ca_file = world.ca_file()
    first = world.agents.tls(ca_file, None)
    assert world.agents.tls(ca_file, None) is first
    assert world.agents.tls(ca_file, b"origin.test") is not first
    stat = os.stat(ca_file)
    world.ca_file(world.ca, CA.make("added"))
    os.utime(ca_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    renewed = world.agents.tls(ca_file, None)
    assert renewed is not first
    for i in range(100):
        world.agents.tls(ca_file, f"n{i}.test".encode())
        world.agents.tls(ca_file, None)  # the most recently used stays
    assert len(world.agents._agents) == 64
    assert world.agents.tls(ca_file, None) is renewed


def test_the_daemon_hands_the_tls_agents_to_the_filler(world: _World) -> None:
    service = EdgeService(edge_config(), world.reactor, MemoryStore(), world.agents, world.pool)
    assert service.filler.tls == world.agents.tls
    other = EdgeService(edge_config(), world.reactor, MemoryStore(), world.agents._plain, None)
    assert other.filler.tls is None
