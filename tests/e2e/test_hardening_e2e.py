"""
Issue 10's hardening against the real daemon, on 127.0.0.1: a dripping
origin, requests the parser rejects, many small ranges, an interrupted
download, a port already in use, and a telnet socket in a new data directory.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import HOST, Daemon, MakeDaemon, _twistd, free_port, refused_start, wait_for
from .origin import MisbehavingOrigin
from .test_core_e2e import assert_redirect

pytestmark = pytest.mark.e2e


def _exchange(port: int, raw: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes, read until the daemon closes (bounded by ``timeout``)."""
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(raw)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                piece = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not piece:
                break
            got += piece
    return got


def test_a_dripping_origin_is_a_clean_miss_too_slow(make_daemon: MakeDaemon, origin: MisbehavingOrigin) -> None:
    """An origin that drips (5 bytes/s after a first burst) fails the fill 'too-slow' and stores nothing (F20)."""
    daemon = make_daemon(min_rate=1000, min_rate_window=1, idle_timeout=5)
    key = "slow/drip.bin"
    assert_redirect(daemon.request(f"/{key}"), origin, key)
    assert daemon.fill_outcome(key) == "too-slow"
    assert not daemon.object_path(key).exists()
    origin.release(f"/{key}")


@pytest.mark.parametrize(
    "raw",
    [
        f"GET /a.jpg HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n".encode(),
        f"GET /a.jpg HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n".encode(),
        f"GET /a.jpg HTTP/7.0\r\nHost: {HOST}\r\n\r\n".encode(),
        f"GET /a.jpg HTTP/1.1\r\nHost: {HOST}\r\nX-Big: {'a' * 20000}\r\n\r\n".encode(),
    ],
    ids=["cl-and-te", "two-lengths", "bad-version", "huge-header"],
)
def test_a_request_the_parser_rejects_gets_a_cos_error(edge: Daemon, raw: bytes) -> None:
    """The real daemon answers 400 with a COS XML error and a request id, then closes (S10)."""
    answer = _exchange(edge.port, raw)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"\r\nx-cos-request-id: " in head
    assert body.startswith(b"<?xml") and b"<Code>" in body and b"<RequestId>" in body


def test_many_small_ranges_get_the_whole_object(edge: Daemon) -> None:
    """64 one-byte ranges of a 1,000-byte object: 200 with the 1,000 bytes, never more (S11)."""
    path = edge.object_path("ranges/k.bin")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(range(250)) * 4)
    spec = ",".join(f"{i * 10}-{i * 10}" for i in range(64))
    reply = edge.request("/ranges/k.bin", headers={"Range": f"bytes={spec}"})
    assert reply.status == 200 and len(reply.body) == 1000


def test_an_interrupted_download_is_in_the_access_log(edge: Daemon) -> None:
    """A client that hangs up mid-body leaves an access-log line with the status and the bytes it got so far."""
    path = edge.object_path("cut/big.bin")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * 50_000_000)
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(f"GET /cut/big.bin HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # reset on close
    wait_for(lambda: '"GET /cut/big.bin HTTP/1.1" 200 ' in edge.access_log.read_text(), 10, "the access-log line")
    line = next(x for x in edge.access_log.read_text().splitlines() if "/cut/big.bin" in x)
    sent = int(line.split('" 200 ')[1].split()[0])
    assert 0 < sent < 50_000_000


def test_a_port_in_use_stops_the_start_with_one_line(tmp_path: Path) -> None:
    """twistd cosedge on a busy port exits non-zero with one line naming the port, no traceback."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        config = tmp_path / "cosedge.toml"
        config.write_text(f'[server]\nlisten = ["tcp:{port}:interface=127.0.0.1"]\ndata_dir = "{tmp_path / "d"}"\n')
        output = refused_start(config)
    assert f"cannot listen on tcp:{port}:interface=127.0.0.1: Address already in use" in output


def test_a_telnet_socket_inside_a_new_data_directory_works_on_the_first_start(tmp_path: Path) -> None:
    """The manhole's unix: socket under a data directory that does not exist yet is listening after the first start."""
    data = tmp_path / "new-data"
    sock = data / "run" / "manhole.sock"
    port = free_port()
    config = tmp_path / "cosedge.toml"
    config.write_text(
        f'[server]\nlisten = ["tcp:{port}:interface=127.0.0.1"]\ndata_dir = "{data}"\n'
        f'[manhole]\ntelnet = "unix:{sock}"\n'
    )
    proc = subprocess.Popen(
        [*_twistd(), "-n", "--pidfile=", "cosedge", "--config", str(config)],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "the telnet socket did not appear"
            time.sleep(0.1)
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(10)
            client.connect(str(sock))
            assert client.recv(1024)  # the telnet negotiation begins
        assert (sock.stat().st_mode & 0o777) == 0o600
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        if proc.stdout:
            proc.stdout.close()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.mark.parametrize("kind", ["endless-headers/short", "endless-headers/long"])
def test_an_origin_that_streams_headers_without_end_is_cut_off(
    edge: Daemon, origin: MisbehavingOrigin, kind: str
) -> None:
    """Header lines without end: a clean miss 'bad-headers' at the limit, the daemon's memory stays flat (F17)."""
    assert edge.proc is not None
    before = _rss_kib(edge.proc.pid)
    key = f"{kind}/h.bin"
    assert_redirect(edge.request(f"/{key}"), origin, key)
    assert edge.fill_outcome(key) == "bad-headers"
    assert not edge.object_path(key).exists()
    wait_for(lambda: f"/{key}" in origin.streamed, 10, "the origin to see the connection closed")
    assert origin.streamed[f"/{key}"] < 8 * 1024 * 1024  # cut off near the 64 KiB limit, not after gigabytes
    assert _rss_kib(edge.proc.pid) - before < 64 * 1024


def test_an_unframed_body_is_not_read(edge: Daemon, origin: MisbehavingOrigin) -> None:
    """A 200 with neither Content-Length nor chunking fails 'unframed' at its headers; the body is not read (F19)."""
    key = "unframed-endless/u.bin"
    started = time.monotonic()
    assert_redirect(edge.request(f"/{key}"), origin, key)
    assert edge.fill_outcome(key) == "unframed"
    assert time.monotonic() - started < 5
    wait_for(lambda: f"/{key}" in origin.streamed, 10, "the origin to see the connection closed")
    assert origin.streamed[f"/{key}"] < 8 * 1024 * 1024  # what the sockets' buffers hold, not the body
    assert not edge.object_path(key).exists()
