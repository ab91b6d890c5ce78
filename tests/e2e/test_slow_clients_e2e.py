"""
End-to-end: clients that stop reading and connection floods against the
real daemon (reliability row S9), with ``send_timeout = 2`` and
``max_connections = 20``, on 127.0.0.1 only.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator

import pytest

from .conftest import FAST_FILL, HOST, Daemon, MisbehavingOrigin, Reply, wait_for

pytestmark = pytest.mark.e2e

SEND_TIMEOUT = 2
MAX_CONNECTIONS = 20
#: Far more than loopback's socket buffers hold, so a client that reads nothing stalls the response.
BIG = 16 * 1024 * 1024
SMALL = b"small object for the hits\n"


class _SlowClientDaemon(Daemon):
    """The daemon with a short send timeout and a small connection cap in its [server] table."""

    def write_config(self) -> None:
        super().write_config()
        text = self.config_path.read_text()
        settings = f"[server]\nsend_timeout = {SEND_TIMEOUT}\nmax_connections = {MAX_CONNECTIONS}\n"
        self.config_path.write_text(text.replace("[server]\n", settings, 1))


@pytest.fixture
def daemon(tmp_path_factory: pytest.TempPathFactory, origin: MisbehavingOrigin) -> Iterator[Daemon]:
    # A long request timeout: idle connections must outlast the test, and
    # stalled ones must be closed by the send timeout, not by it.
    daemon = _SlowClientDaemon(tmp_path_factory.mktemp("cosedge"), origin.netloc, dict(FAST_FILL), request_timeout=60)
    daemon.start()
    for key, body in (("slow/big.bin", b"b" * BIG), ("slow/small.txt", SMALL)):
        path = daemon.object_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
    try:
        yield daemon
    finally:
        daemon.stop()
    assert daemon.problems() == [], "the daemon logged an unexpected error"
    statuses = re.findall(r'" (\d{3}) ', daemon.access_log.read_text() if daemon.access_log.exists() else "")
    assert statuses, "no request reached the access log"
    assert not [s for s in statuses if s.startswith("5")], statuses


def _connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: it sets the window
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    return s


def _closed_by_server(s: socket.socket, timeout: float) -> tuple[bool, int]:
    """Read (bounded) until the server closes or resets; whether it did, and the bytes read."""
    total = 0
    deadline = time.monotonic() + timeout
    s.settimeout(0.5)
    while time.monotonic() < deadline:
        try:
            piece = s.recv(1 << 20)
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return True, total
        if not piece:
            return True, total
        total += len(piece)
    return False, total


def _get_keep_alive(s: socket.socket, target: str) -> tuple[int, bytes]:
    """One keep-alive GET on an open connection; its status and body (read by Content-Length, bounded)."""
    s.settimeout(5)
    s.sendall(f"GET {target} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    data = b""
    for _ in range(1000):
        if b"\r\n\r\n" in data:
            break
        piece = s.recv(65536)
        assert piece, "the connection closed before the response head"
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    for _ in range(1000):
        if len(body) >= length:
            break
        piece = s.recv(65536)
        assert piece, "the connection closed mid-body"
        body += piece
    return int(head.split(b" ", 2)[1]), body


def test_clients_that_stop_reading_are_cut_off_after_send_timeout(daemon: Daemon) -> None:
    """
    Five clients ask for a 16 MB object with a tiny receive buffer and then
    read nothing: the daemon closes each of them about send_timeout (2 s)
    later, logs a warning naming each, and the access log shows their
    downloads as interrupted.  Meanwhile another client's hit is served.
    """
    clients = [_connect(daemon.port, rcvbuf=4096) for _ in range(5)]
    try:
        for s in clients:
            s.sendall(f"GET /slow/big.bin HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        started = time.monotonic()
        hit = daemon.request("/slow/small.txt")
        assert hit.status == 200 and hit.body == SMALL
        for s in clients:
            port = s.getsockname()[1]
            daemon.wait_for_log(rf"send timeout: 127\.0\.0\.1:{port} ", timeout=SEND_TIMEOUT * 1.25 + 5)
        elapsed = time.monotonic() - started
        assert SEND_TIMEOUT * 0.9 <= elapsed <= SEND_TIMEOUT * 1.25 + 3, elapsed
        for s in clients:
            closed, got = _closed_by_server(s, timeout=10)
            assert closed, "the daemon did not close a client that read nothing"
            assert got < BIG
    finally:
        for s in clients:
            s.close()
    wait_for(lambda: daemon.access_log.read_text().count('"GET /slow/big.bin HTTP/1.1" 200 ') == 5, 10, "log lines")
    for line in daemon.access_log.read_text().splitlines():
        if "/slow/big.bin" in line:
            assert int(line.split('" 200 ')[1].split()[0]) < BIG, line


def test_connections_over_max_connections_are_refused_and_hits_keep_working(daemon: Daemon) -> None:
    """
    With 20 connections open (the cap), a 21st is closed at once; the open
    ones, kept alive, are still served; once a few close, a new client's
    hit succeeds.  No request gets a 5xx.
    """
    idle = [_connect(daemon.port) for _ in range(MAX_CONNECTIONS)]
    try:
        # An answer on the last one: the daemon has accepted all twenty.
        status, body = _get_keep_alive(idle[-1], "/slow/small.txt")
        assert (status, body) == (200, SMALL)

        extra = _connect(daemon.port)
        try:
            started = time.monotonic()
            closed, got = _closed_by_server(extra, timeout=5)
            assert closed and got == 0, "the connection over the cap was not refused"
            assert time.monotonic() - started < 2
        finally:
            extra.close()
        daemon.wait_for_log(rf"max_connections \({MAX_CONNECTIONS}\) reached")

        status, body = _get_keep_alive(idle[0], "/slow/small.txt")
        assert (status, body) == (200, SMALL)

        for s in idle[:5]:
            s.close()
        del idle[:5]
        reply: Reply | None = None
        deadline = time.monotonic() + 10
        while reply is None and time.monotonic() < deadline:
            try:
                reply = daemon.request("/slow/small.txt")
            except (AssertionError, OSError):  # refused: the daemon has not seen the closes yet
                time.sleep(0.1)
        assert reply is not None, "no hit got through after connections closed"
        assert reply.status == 200 and reply.body == SMALL
    finally:
        for s in idle:
            s.close()
