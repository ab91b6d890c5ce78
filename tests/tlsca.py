"""
A certificate authority made at run time for TLS tests (and the TLS bench):
a self-signed CA and the server certificates it issues, with the names
chosen by the test (DNS names and IP addresses as subjectAltNames); and
:class:`LoopbackOrigin`, a well-behaved HTTP/1.1 origin on 127.0.0.1 that
serves over TLS with such a certificate (or in plain HTTP) and records the
SNI name and Host of what it is asked.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import tempfile
import threading
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["CA", "Issued", "LoopbackOrigin"]

_ONE_DAY = datetime.timedelta(days=1)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _alt_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


@attrs.frozen
class Issued:
    """A server certificate and its private key, in PEM."""

    cert_pem: bytes
    key_pem: bytes

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """Write ``<stem>.crt`` and ``<stem>.key`` into ``directory``; their paths."""
        cert, key = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert.write_bytes(self.cert_pem)
        key.write_bytes(self.key_pem)
        return cert, key


def _builder(subject: str | x509.Name, issuer: x509.Name | None, key: ec.EllipticCurvePrivateKey) -> Any:
    """A certificate for ``key`` valid from yesterday to tomorrow (self-issued without ``issuer``)."""
    name = _name(subject) if isinstance(subject, str) else subject
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _ONE_DAY)
        .not_valid_after(now + _ONE_DAY)
    )


@attrs.frozen
class CA:
    """A self-signed certificate authority (EC P-256, valid from yesterday to tomorrow)."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def make(cls, common_name: str = "cosedge test CA") -> CA:
        key = ec.generate_private_key(ec.SECP256R1())
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)  # cert and CRL signing
        cert = (
            _builder(common_name, None, key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @property
    def pem(self) -> bytes:
        """The CA's certificate, as a ``ca_file`` holds it."""
        return _pem(self.cert)

    def issue(self, names: Sequence[str], *, alt_names: bool = True) -> Issued:
        """
        A server certificate for ``names`` (DNS names or IP addresses), signed
        by this CA; ``alt_names=False``: the first name as the common name
        only, without subjectAltName (which no client should accept any more).
        """
        key = ec.generate_private_key(ec.SECP256R1())
        builder = _builder(names[0], self.cert.subject, key)
        if alt_names:
            builder = builder.add_extension(x509.SubjectAlternativeName([_alt_name(n) for n in names]), critical=False)
        cert = (
            builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return Issued(_pem(cert), key_pem)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_GET(self) -> None:
        origin = self.server.origin
        origin.hosts.append(self.headers.get("host", ""))
        body = origin.body(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    origin: LoopbackOrigin


class LoopbackOrigin:
    """
    An origin on 127.0.0.1 in a background thread: a GET of a path answers
    ``body(path)`` with its Content-Length (None: 404).  With ``issued`` it
    speaks TLS with that certificate and records the SNI name each
    connection sent (None: none); ``hosts`` are the Host headers asked.
    """

    def __init__(self, body: Callable[[str], bytes | None], issued: Issued | None = None) -> None:
        self.body = body
        self.sni: list[str | None] = []
        self.hosts: list[str] = []
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.origin = self
        if issued is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            with tempfile.TemporaryDirectory() as directory:
                cert, key = issued.write(Path(directory), "origin")
                context.load_cert_chain(cert, key)
            context.sni_callback = lambda sock, name, ctx: self.sni.append(name)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def netloc(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> LoopbackOrigin:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
