"""
A real HTTP/1.1 origin on a loopback port that misbehaves on purpose.

It runs in a background thread of the test process and talks raw sockets,
so it can do what no well-behaved server library will: close before the
declared length, cut a chunked body, stall.  What it does is chosen by the
first segment of the request path (the rest only names the object):

``/1.jpg``                the seed document's example: 200, ``image/jpeg``
``/ok/...``               200 with Content-Length (keep-alive)
``/empty/...``            200, ``Content-Length: 0`` (F15)
``/gzip/...``             200, a gzip body with ``Content-Encoding: gzip`` (F7)
``/chunked/...``          200, a complete chunked body (keep-alive)
``/flaky/...``            500 to the first GET, 200 to every later one
``/overlong/...``         100 bytes more than the declared Content-Length (F7)
``/overlong-late/...``    a whole response, then an unasked-for second one
``/truncated/...``        half of the declared Content-Length, then close (F1)
``/chunked-cut/...``      chunked, two chunks, no final chunk, then close (F2)
``/unframed/...``         no length, no chunking, body ends at close (F3)
``/unframed-endless/...`` no length, no chunking, then body bytes at full speed until
                          the client closes or :data:`HOLD_LIMIT` (F19)
``/endless-headers/...``  a status line, then header lines without end (short lines,
                          or 8 KiB lines under ``/endless-headers/long/...``) (F17)
``/cut-headers/...``      half the headers, then close
``/garbage/...``          not HTTP at all
``/stall-headers/...``    half a status line, then silence (F4)
``/stall-after-headers/`` headers with Content-Length, then silence (F4)
``/stall-mid-body/...``   headers and half the body, then silence (F4)
``/status/<code>/...``    that status (404, 500, 302 → back to this origin, …) (F5, F6)
``/mut/...``              200 with an ETag; a new version after :meth:`change`; 304 to a
                          matching ``If-None-Match``
``/slow/...``             a large body: the first 64 KiB at once, then one byte
                          every 0.2 s until the test calls :meth:`release`, then
                          the rest at full speed — a fill held in flight on demand

Every stall and every slow body ends after at most :data:`HOLD_LIMIT` seconds
or when the origin stops, so no test can hang on it.  GET requests are counted
per request target, thread-safely.
"""

from __future__ import annotations

import gzip
import hashlib
import random
import socket
import socketserver
import threading
import time
from collections import Counter

__all__ = ["BIG_SIZE", "HOLD_LIMIT", "LAST_MODIFIED", "MisbehavingOrigin", "body_for", "content_type_for", "etag_for"]

#: The longest any stall or held body lasts, in seconds.
HOLD_LIMIT = 30.0
_MAX_HEAD = 64 * 1024
_SLOW_HEAD = 64 * 1024
_SLOW_SIZE = 1024 * 1024 + 12_345
#: Objects under ``big/``: past a multipart threshold of 5 MiB, in three parts of 5 MiB.
BIG_SIZE = 12 * 1024 * 1024 + 4321
_TRICKLE = 0.2


def body_for(path: str) -> bytes:
    """The exact bytes the origin serves for ``path`` (deterministic)."""
    first = path.lstrip("/").partition("/")[0]
    if first == "empty":
        return b""
    if first == "gzip":
        return gzip.compress(b"cosedge keeps the origin's exact bytes\n" * 500, mtime=0)
    seed = int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "big")
    size = {"slow": _SLOW_SIZE, "big": BIG_SIZE}.get(first, 20_000 + seed % 5000)
    return random.Random(seed).randbytes(size)


#: The Last-Modified date of every normal object.
LAST_MODIFIED = "Wed, 01 Nov 2017 08:00:00 GMT"


def etag_for(path: str) -> str:
    """The ETag the origin declares for ``path``."""
    return '"' + hashlib.md5(body_for(path)).hexdigest() + '"'


def content_type_for(path: str) -> str:
    """The Content-Type the origin declares for ``path``."""
    return "image/jpeg" if path.endswith(".jpg") else "application/x-cosedge-e2e"


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, origin: MisbehavingOrigin) -> None:
        super().__init__(("127.0.0.1", origin.wanted_port), _Handler)
        self.origin = origin


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        origin = self.server.origin
        sock: socket.socket = self.request
        sock.settimeout(0.5)
        buffer = b""
        while not origin.stopping.is_set():
            head, buffer, complete = _read_head(sock, buffer, origin.stopping)
            if not complete:
                return
            request_line, _, header_block = head.partition(b"\r\n")
            parts = request_line.split(b" ")
            if len(parts) != 3:
                return
            method, target = parts[0].decode("latin-1"), parts[1].decode("latin-1")
            origin.record(method, target)
            close = b"connection: close" in header_block.lower()
            try:
                keep = origin.respond(sock, method, target, header_block)
            except OSError:  # the client went away; that is its right
                return
            if not keep or close:
                return


def _read_head(sock: socket.socket, buffer: bytes, stopping: threading.Event) -> tuple[bytes, bytes, bool]:
    """Read one request head (bounded size and time); returns (head, rest, complete)."""
    deadline = time.monotonic() + HOLD_LIMIT
    while b"\r\n\r\n" not in buffer:
        if stopping.is_set() or time.monotonic() > deadline or len(buffer) > _MAX_HEAD:
            return b"", b"", False
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return b"", b"", False
        if not data:
            return b"", b"", False
        buffer += data
    head, _, rest = buffer.partition(b"\r\n\r\n")
    return head, rest, True


def _head(status: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status}"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class MisbehavingOrigin:
    """The origin server; :meth:`start` it, point a bucket at :attr:`netloc`."""

    def __init__(self, port: int = 0) -> None:
        #: The port to listen on (0: any free one); a test restarts an origin on its old port with it.
        self.wanted_port = port
        #: Bytes streamed by the endless modes, by request target, once the client closed.
        self.streamed: dict[str, int] = {}
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._gets: Counter[str] = Counter()
        #: The version of each ``/mut/...`` object (changed by :meth:`change`).
        self.versions: dict[str, int] = {}
        self._released: dict[str, threading.Event] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- control, from the tests --

    def start(self) -> None:
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="e2e-origin", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    @property
    def netloc(self) -> str:
        return f"127.0.0.1:{self.port}"

    def gets(self, path: str) -> int:
        """How many GET requests the origin has seen for ``path``."""
        with self._lock:
            return self._gets[path]

    def release(self, path: str) -> None:
        """Let the held ``/slow/...`` body of ``path`` finish at full speed."""
        self._gate(path).set()

    # -- serving, from the handler threads --

    def record(self, method: str, target: str) -> None:
        if method == "GET":
            with self._lock:
                self._gets[target] += 1

    def _gate(self, path: str) -> threading.Event:
        with self._lock:
            return self._released.setdefault(path, threading.Event())

    def _hold(self, seconds: float = HOLD_LIMIT) -> None:
        self.stopping.wait(seconds)

    def change(self, path: str) -> None:
        """A new version of a ``/mut/...`` object (its bytes and ETag change)."""
        with self._lock:
            self.versions[path] = self.versions.get(path, 0) + 1

    def respond(self, sock: socket.socket, method: str, path: str, request_headers: bytes = b"") -> bool:
        """Answer one request; returns whether the connection may be reused."""
        first = path.lstrip("/").partition("/")[0]
        if first == "mut":
            return self._mutable(sock, method, path, request_headers)
        body = body_for(path)
        ctype = content_type_for(path)
        framed = [("Content-Type", ctype), ("Content-Length", str(len(body)))]
        send = sock.sendall
        if path == "/1.jpg" or first in ("ok", "empty", "gzip", "big"):
            extra = [
                ("Cache-Control", "max-age=60"),
                ("ETag", etag_for(path)),
                ("Last-Modified", LAST_MODIFIED),
                ("x-cos-meta-origin", "e2e"),
            ]
            if first == "gzip":
                extra.append(("Content-Encoding", "gzip"))
            send(_head("200 OK", framed + extra) + (b"" if method == "HEAD" else body))
            return True
        if first == "chunked":
            send(_head("200 OK", [("Content-Type", ctype), ("Transfer-Encoding", "chunked")]))
            for start in range(0, len(body), 7000):
                piece = body[start : start + 7000]
                send(b"%x\r\n%s\r\n" % (len(piece), piece))
            send(b"0\r\n\r\n")
            return True
        if first == "flaky":
            if self.gets(path) == 1:
                send(_head("500 Internal Server Error", [("Content-Length", "0")]))
            else:
                send(_head("200 OK", framed) + body)
            return True
        if first == "overlong":  # F7: more bytes than declared, on a kept-alive connection
            send(_head("200 OK", framed) + body + b"X" * 100)
            return True
        if first == "overlong-late":  # the extra bytes arrive after the response is complete
            send(_head("200 OK", framed) + body)
            time.sleep(0.2)
            send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nSMUGG")
            return True
        if first == "truncated":
            send(_head("200 OK", framed + [("Connection", "close")]) + body[: len(body) // 2])
        elif first == "chunked-cut":
            send(_head("200 OK", [("Content-Type", ctype), ("Transfer-Encoding", "chunked")]))
            for piece in (body[:1000], body[1000:3000]):
                send(b"%x\r\n%s\r\n" % (len(piece), piece))
        elif first == "unframed":
            send(_head("200 OK", [("Content-Type", ctype), ("Connection", "close")]) + body)
        elif first == "unframed-endless":
            send(_head("200 OK", [("Content-Type", ctype), ("Connection", "close")]))
            self.streamed[path] = self._stream(sock, b"u" * 65536)
        elif first == "endless-headers":
            send(b"HTTP/1.1 200 OK\r\n")
            line = b"X-Long: " + b"h" * 8192 + b"\r\n" if "/long/" in path else b"X-Short: h\r\n"
            self.streamed[path] = self._stream(sock, line * max(1, 65536 // len(line)))
        elif first == "cut-headers":
            send(b"HTTP/1.1 200 OK\r\nContent-Ty")
        elif first == "garbage":
            send(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        elif first == "stall-headers":
            send(b"HTTP/1.1 200 O")
            self._hold()
        elif first == "stall-after-headers":
            send(_head("200 OK", framed))
            self._hold()
        elif first == "stall-mid-body":
            send(_head("200 OK", framed) + body[: len(body) // 2])
            self._hold()
        elif first == "status":
            code = path.split("/")[2]
            headers = [("Content-Type", "text/plain"), ("Content-Length", "11"), ("Connection", "close")]
            if code.startswith("3"):
                headers.append(("Location", f"http://{self.netloc}/ok/redirected"))
            send(_head(f"{code} Whatever", headers) + b"not for you")
        elif first == "slow":
            self._slow(sock, path, framed, body)
        else:
            send(_head("404 Not Found", [("Content-Length", "0"), ("Connection", "close")]))
        return False

    def _mutable(self, sock: socket.socket, method: str, path: str, request_headers: bytes) -> bool:
        """A ``/mut/...`` object: its version's bytes, an ETag, and 304 to a matching If-None-Match."""
        with self._lock:
            version = self.versions.get(path, 0)
        body = body_for(path) + b"version %d" % version
        etag = '"' + hashlib.md5(body).hexdigest() + '"'
        asked = [
            line.partition(b":")[2].strip().decode("latin-1")
            for line in request_headers.split(b"\r\n")
            if line.lower().startswith(b"if-none-match:")
        ]
        if etag in asked:
            sock.sendall(_head("304 Not Modified", [("ETag", etag), ("Content-Length", "0")]))
            return True
        head = [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(body))), ("ETag", etag)]
        sock.sendall(_head("200 OK", head) + (b"" if method == "HEAD" else body))
        return True

    def _stream(self, sock: socket.socket, piece: bytes) -> int:
        """Send ``piece`` again and again until the client closes (or HOLD_LIMIT); the bytes sent."""
        sent = 0
        deadline = time.monotonic() + HOLD_LIMIT
        while not self.stopping.is_set() and time.monotonic() < deadline:
            try:
                sock.sendall(piece)
            except OSError:
                break
            sent += len(piece)
        return sent

    def _slow(self, sock: socket.socket, path: str, framed: list[tuple[str, str]], body: bytes) -> None:
        gate = self._gate(path)
        sock.sendall(_head("200 OK", framed) + body[:_SLOW_HEAD])
        sent = _SLOW_HEAD
        deadline = time.monotonic() + HOLD_LIMIT
        while not gate.wait(_TRICKLE) and not self.stopping.is_set() and time.monotonic() < deadline:
            sock.sendall(body[sent : sent + 1])
            sent += 1
        if gate.is_set():
            sock.sendall(body[sent:])
