"""
Large objects go out with sendfile(2), small ones on the plain path.

No reactor: the bucket listener runs over a string transport whose
``fileno()`` is one end of a real socket pair, so the bytes the producer
sends with ``sendfile`` arrive at the other end, while what goes through the
transport (headers, primers) is collected from the transport.  The transport
pauses its producer past ``bufferSize`` and resumes it when a test flushes
it, as Twisted's TCP transport does.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from attrs import define, field
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.python.failure import Failure
from twisted.web.server import Request

from cosedge.config import BucketConfig, Config, ServerConfig
from cosedge.fill.scheduler import Filler
from cosedge.stats import Stats
from cosedge.storage.disk import DiskStore
from cosedge.testing import MemoryStore
from cosedge.web.channel import EdgeSite
from cosedge.web.resource import EdgeResource
from cosedge.web.sendfile import SENDFILE_MIN, sendfile_producer

from .helpers import result_of

BUCKET = "example-1250000000"
HOST = b"example-1250000000.file.myqcloud.com"
BIG = SENDFILE_MIN * 3 + 12345


class SocketTransport(StringTransportWithDisconnection):
    """
    A string transport with a real socket behind ``fileno()``; pauses its
    streaming producer when more than ``bufferSize`` bytes are buffered and
    resumes it on :meth:`flush`, like ``twisted.internet.abstract.FileDescriptor``.
    """

    bufferSize = 4096

    def __init__(self) -> None:
        super().__init__()
        # A real TCP connection on loopback (so TCP_CORK applies), with small
        # buffers so that sendfile meets EAGAIN many times per response.
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            self.client_sock = socket.create_connection(listener.getsockname(), timeout=5)
            self.server_sock, _ = listener.accept()
        self.server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        self.client_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        self.server_sock.setblocking(False)
        self.client_sock.setblocking(False)
        self.producerPaused = False

    def getHandle(self) -> socket.socket:
        return self.server_sock

    @property
    def corked(self) -> bool:
        return bool(self.server_sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK))

    @property
    def streamingProducer(self) -> bool:
        return bool(self.streaming)

    def fileno(self) -> int:
        return self.server_sock.fileno()

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and self.streaming and len(self.value()) > self.bufferSize:
            self.producerPaused = True
            self.producer.pauseProducing()

    def flush(self) -> bytes:
        """Take what the transport holds, then resume its producer if it was paused."""
        data = self.value()
        self.clear()
        if self.producerPaused and self.producer is not None:
            self.producerPaused = False
            self.producer.resumeProducing()
        return data

    def read_socket(self) -> bytes:
        """Everything sendfile has put on the socket so far (loopback delivers at once)."""
        out = b""
        for _ in range(100_000):
            try:
                chunk = self.client_sock.recv(1 << 20)
            except BlockingIOError:
                # Corked data below a full segment waits in the sender:
                # what is readable now is all there is.
                return out
            if not chunk:
                return out
            out += chunk
        raise AssertionError("socket never drained")

    def close_sockets(self) -> None:
        self.server_sock.close()
        self.client_sock.close()


@define(eq=False)
class RecordingStore(DiskStore):
    """A disk store that remembers every object it opened (to check they get closed)."""

    opened: list[Any] = field(factory=list)

    def open(self, bucket: str, segments: tuple[str, ...]) -> Any:
        def record(obj: Any) -> Any:
            if obj is not None:
                self.opened.append(obj)
            return obj

        return super().open(bucket, segments).addCallback(record)


class Listener:
    """The bucket listener over a :class:`SocketTransport`, files on disk."""

    def __init__(self, tmp_path: Path) -> None:
        self.data = tmp_path / "data"
        (self.data / BUCKET).mkdir(parents=True)
        config = Config(
            server=ServerConfig(domains=("file.myqcloud.com",), data_dir=str(self.data), access_log=""),
            buckets={BUCKET: BucketConfig()},
        )
        self.stats = Stats()
        clock = Clock()
        self.store = RecordingStore(str(self.data))
        self.opened = self.store.opened
        filler = Filler(self.store, None, clock, lambda: config.fill, self.stats)  # type: ignore[arg-type]
        resource = EdgeResource(lambda: config, self.store, filler, self.stats)
        self.site = EdgeSite(resource, self.stats, "", clock, 60)
        self.transports: list[SocketTransport] = []

    def put(self, key: str, body: bytes) -> None:
        (self.data / BUCKET / key).write_bytes(body)

    def connect(self) -> tuple[SocketTransport, Any]:
        transport = SocketTransport()
        self.transports.append(transport)
        protocol = self.site.buildProtocol(None)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return transport, protocol

    def get(self, key: str, *headers: bytes, limit: int = 10_000) -> tuple[bytes, int]:
        """
        GET ``key``; flush the transport and read the socket, in the order a
        client would receive them, until nothing more comes.  Returns the
        raw response and how many bytes came by sendfile.
        """
        transport, protocol = self.connect()
        request = b"GET /" + key.encode() + b" HTTP/1.1\r\nHost: " + HOST + b"\r\n"
        for header in headers:
            request += header + b"\r\n"
        protocol.dataReceived(request + b"\r\n")
        received, by_sendfile = b"", 0
        for _ in range(limit):
            # What the transport holds was written before anything that
            # sendfile sends after this flush resumes the producer (the
            # sendfile guard checks that nothing overtakes it).
            received += transport.flush()
            direct = transport.read_socket()
            by_sendfile += len(direct)
            received += direct
            if not transport.value() and not transport.producerPaused:
                return received, by_sendfile
        raise AssertionError(f"response not done after {limit} flushes")


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    """The listener; every sendfile call checks that the transport's buffer is empty first."""
    listener = Listener(tmp_path)
    real_sendfile = os.sendfile

    def guarded_sendfile(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        for transport in listener.transports:
            if transport.fileno() == out_fd:
                assert not transport.value(), "sendfile would overtake bytes still in the transport's buffer"
        return real_sendfile(out_fd, in_fd, offset, count)

    monkeypatch.setattr(os, "sendfile", guarded_sendfile)
    yield listener
    for transport in listener.transports:
        transport.close_sockets()


def split(raw: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(b" ")[1]), headers, body


def test_large_object_is_sent_whole_and_in_order_by_sendfile(listener: Listener) -> None:
    """A multi-megabyte hit arrives byte-exact after its headers, most of it by sendfile, and the file is closed."""
    body = os.urandom(BIG)
    listener.put("big.bin", body)
    raw, by_sendfile = listener.get("big.bin")
    status, headers, got = split(raw)
    assert status == 200
    assert headers[b"content-length"] == str(BIG).encode()
    assert got == body
    assert by_sendfile > BIG // 2
    assert listener.stats.events["bytes_served"] == BIG
    assert [obj.fd for obj in listener.opened] == [-1]
    assert not listener.transports[0].corked  # the last partial segment is not held back


def test_socket_is_corked_while_the_body_is_sent(listener: Listener) -> None:
    """While a large body is on its way the socket is corked (full segments), and uncorked when it is done."""
    listener.put("big.bin", os.urandom(BIG))
    transport, protocol = listener.connect()
    protocol.dataReceived(b"GET /big.bin HTTP/1.1\r\nHost: " + HOST + b"\r\n\r\n")
    assert transport.corked
    for _ in range(10_000):
        transport.flush()
        transport.read_socket()
        if not transport.value() and not transport.producerPaused:
            break
    assert not transport.corked


def test_single_large_range_uses_sendfile(listener: Listener) -> None:
    """A single large Range is a 206 with exactly the requested bytes, sent by sendfile."""
    body = os.urandom(BIG)
    listener.put("big.bin", body)
    first, last = 1000, 1000 + SENDFILE_MIN + 4999
    raw, by_sendfile = listener.get("big.bin", b"Range: bytes=%d-%d" % (first, last))
    status, headers, got = split(raw)
    assert status == 206
    assert headers[b"content-range"] == b"bytes %d-%d/%d" % (first, last, BIG)
    assert got == body[first : last + 1]
    assert by_sendfile > 0


def test_two_large_responses_on_one_connection(listener: Listener) -> None:
    """Keep-alive: a second large response on the same connection follows the first, both whole."""
    body = os.urandom(BIG)
    listener.put("big.bin", body)
    transport, protocol = listener.connect()
    request = b"GET /big.bin HTTP/1.1\r\nHost: " + HOST + b"\r\n\r\n"
    protocol.dataReceived(request + request)
    received = b""
    for _ in range(10_000):
        received += transport.flush()
        received += transport.read_socket()
        if not transport.value() and not transport.producerPaused:
            break
    first_end = received.index(b"\r\n\r\n") + 4 + BIG
    assert split(received[:first_end])[2] == body
    assert split(received[first_end:])[2] == body
    assert [obj.fd for obj in listener.opened] == [-1, -1]


def _open_big(listener: Listener) -> tuple[Any, Request, Any]:
    """A big stored object, opened, and a request on a new connection to serve it on."""
    listener.put("big.bin", b"x" * BIG)
    transport, protocol = listener.connect()
    obj = result_of(listener.store.open(BUCKET, ("big.bin",)))
    assert obj is not None
    return transport, Request(protocol), obj


def test_small_objects_and_multipart_stay_on_the_plain_path(listener: Listener, tmp_path: Path) -> None:
    """Small bodies, several ranges, and objects without a descriptor are not sent by sendfile."""
    transport, request, obj = _open_big(listener)
    try:
        assert sendfile_producer(request, obj, [(b"", 0, BIG)], b"", listener.stats) is not None
        assert sendfile_producer(request, obj, [(b"", 0, SENDFILE_MIN - 1)], b"", listener.stats) is None
        two = [(b"--a\r\n", 0, SENDFILE_MIN), (b"--a\r\n", SENDFILE_MIN + 10, BIG)]
        assert sendfile_producer(request, obj, two, b"--a--\r\n", listener.stats) is None
    finally:
        obj.close()
    memory = MemoryStore()
    memory.put(BUCKET, ("big.bin",), b"x" * BIG)
    in_memory = result_of(memory.open(BUCKET, ("big.bin",)))
    assert in_memory is not None and in_memory.fileno() is None
    assert sendfile_producer(request, in_memory, [(b"", 0, BIG)], b"", listener.stats) is None


def test_tls_and_unpausable_transports_stay_on_the_plain_path(listener: Listener) -> None:
    """Over TLS, or when the transport has no streaming producer to pause, sendfile is not used."""
    transport, request, obj = _open_big(listener)
    try:
        transport.TLS = True  # type: ignore[attr-defined]
        assert sendfile_producer(request, obj, [(b"", 0, BIG)], b"", listener.stats) is None
        transport.TLS = False  # type: ignore[attr-defined]
        transport.streaming = False
        assert sendfile_producer(request, obj, [(b"", 0, BIG)], b"", listener.stats) is None
    finally:
        obj.close()


def test_client_gone_mid_send_aborts_and_closes(listener: Listener) -> None:
    """If the client's socket is gone when sendfile runs, the connection is dropped and the file closed."""
    listener.put("big.bin", os.urandom(BIG))
    transport, protocol = listener.connect()
    protocol.dataReceived(b"GET /big.bin HTTP/1.1\r\nHost: " + HOST + b"\r\n\r\n")
    assert transport.producerPaused  # headers and primer written, waiting for the flush
    transport.client_sock.close()
    transport.flush()
    assert transport.disconnected  # abortConnection
    assert [obj.fd for obj in listener.opened] == [-1]


def test_file_shrinking_mid_send_drops_the_connection(listener: Listener) -> None:
    """A file cut short while served never passes for a whole body: the connection is dropped."""
    path = listener.data / BUCKET / "big.bin"
    listener.put("big.bin", os.urandom(BIG))
    transport, protocol = listener.connect()
    protocol.dataReceived(b"GET /big.bin HTTP/1.1\r\nHost: " + HOST + b"\r\n\r\n")
    os.truncate(path, SENDFILE_MIN)
    received = b""
    for _ in range(10_000):
        received += transport.flush()
        received += transport.read_socket()
        if transport.disconnected or not transport.producerPaused:
            break
    assert transport.disconnected
    _, headers, body = split(received)
    assert int(headers[b"content-length"]) == BIG
    assert len(body) <= SENDFILE_MIN
    assert [obj.fd for obj in listener.opened] == [-1]


def test_connection_lost_mid_send_stops_the_producer(listener: Listener) -> None:
    """When the connection is lost mid-body the producer stops, closes the file and sends no more."""
    listener.put("big.bin", os.urandom(BIG))
    transport, protocol = listener.connect()
    protocol.dataReceived(b"GET /big.bin HTTP/1.1\r\nHost: " + HOST + b"\r\n\r\n")
    producer = protocol._requestProducer
    assert producer is not None
    transport.flush()
    sent_before = transport.read_socket()
    protocol.connectionLost(Failure(ConnectionResetError("gone")))
    assert [obj.fd for obj in listener.opened] == [-1]
    producer.resumeProducing()  # a late resume does nothing
    assert transport.read_socket() == b""
    assert len(sent_before) < BIG
