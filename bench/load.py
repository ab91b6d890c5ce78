"""
Load generators and probes: wrk (closed loop, keep-alive), curl (one stream,
or a fixed list of requests in parallel), a raw-socket burst of simultaneous
requests, and a /proc RSS sampler.  Every run is bounded in time.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import attrs

from .servers import BUCKET_HOST, HOST

_WRK_LUA = """\
local distinct = os.getenv("BENCH_DISTINCT")
local delay_ms = tonumber(os.getenv("BENCH_DELAY_MS") or "0")
local counter = 0
local nthreads = 0
tid = 0

function setup(thread)
    nthreads = nthreads + 1
    thread:set("tid", nthreads)
end

function request()
    if distinct then
        counter = counter + 1
        return wrk.format(nil, distinct .. tid .. "-" .. counter .. ".bin")
    end
    return wrk.format(nil)
end

if delay_ms > 0 then
    function delay()
        return delay_ms
    end
end

function done(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        'BENCH {"requests": %d, "duration_us": %d, "bytes": %d, "p50_us": %d, "p99_us": %d, "max_us": %d,'
        .. ' "connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}\\n',
        summary.requests, summary.duration, summary.bytes, latency:percentile(50), latency:percentile(99),
        latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


@attrs.frozen
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors + non-2xx/3xx statuses

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def wrk(
    workdir: Path,
    port: int,
    path: str,
    seconds: float,
    connections: int = 32,
    threads: int = 2,
    distinct_prefix: str | None = None,
    delay_ms: int = 0,
) -> WrkResult:
    """Run wrk against ``http://127.0.0.1:port/path`` with the bucket's Host header."""
    script = workdir / "bench.lua"
    if not script.exists():
        script.write_text(_WRK_LUA)
    env = dict(os.environ)
    env.pop("BENCH_DISTINCT", None)
    if distinct_prefix is not None:
        env["BENCH_DISTINCT"] = distinct_prefix
    env["BENCH_DELAY_MS"] = str(delay_ms)
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-H",
        f"Host: {BUCKET_HOST}",
        "-s",
        str(script),
        f"http://{HOST}:{port}{path}",
    ]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=seconds + 30).stdout
    for line in out.splitlines():
        if line.startswith("BENCH "):
            d = json.loads(line[6:])
            errors = d["connect"] + d["read"] + d["write"] + d["status"] + d["timeout"]
            return WrkResult(d["requests"], d["duration_us"] / 1e6, d["p50_us"] / 1e3, d["p99_us"] / 1e3, errors)
    raise RuntimeError(f"wrk printed no result:\n{out}")


def stream(port: int, path: str, timeout: float = 60.0) -> tuple[int, float]:
    """Fetch one object over one connection with curl; (bytes, seconds)."""
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "--max-time",
            str(timeout),
            "-H",
            f"Host: {BUCKET_HOST}",
            "-w",
            "%{http_code} %{size_download} %{time_total}",
            f"http://{HOST}:{port}{path}",
        ],
        capture_output=True,
        text=True,
        timeout=timeout + 10,
    ).stdout.split()
    if out[0] != "200":
        raise RuntimeError(f"GET {path} on port {port} answered {out[0]}")
    return int(out[1]), float(out[2])


def download(port: int, path: str, timeout: float = 60.0) -> tuple[int, float]:
    """
    Fetch one object over one connection with a lean client (``recv_into`` a
    4 MiB buffer, nothing kept), faster than curl, so the server is what is
    measured; checks the status and that the body is exactly Content-Length
    bytes.  Returns (body bytes, seconds from request to last byte).
    """
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        buf = bytearray(4 << 20)
        view = memoryview(buf)
        started = time.perf_counter()
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {BUCKET_HOST}\r\nConnection: close\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            n = s.recv_into(view)
            if not n:
                raise RuntimeError(f"GET {path} on port {port}: connection closed in the headers")
            head += bytes(view[:n])
        head, _, first = head.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        if lines[0].split(b" ")[1] != b"200":
            raise RuntimeError(f"GET {path} on port {port} answered {lines[0]!r}")
        length = next(int(v) for k, _, v in (h.partition(b":") for h in lines[1:]) if k.lower() == b"content-length")
        total = len(first)
        while True:
            n = s.recv_into(view)
            if not n:
                break
            total += n
        seconds = time.perf_counter() - started
    if total != length:
        raise RuntimeError(f"GET {path} on port {port}: {total} bytes for Content-Length {length}")
    return total, seconds


def parallel_get(
    workdir: Path, port: int, paths: list[str], parallel: int = 32, timeout: float = 120.0
) -> dict[str, int]:
    """GET each path once, ``parallel`` at a time (curl, keep-alive); counts of status codes."""
    config = workdir / "curl-list.txt"
    with open(config, "w") as f:
        for path in paths:
            f.write(f'url = "http://{HOST}:{port}{path}"\noutput = "/dev/null"\n')
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--parallel",
            "--parallel-immediate",
            "--parallel-max",
            str(parallel),
            "--max-time",
            "60",
            "-H",
            f"Host: {BUCKET_HOST}",
            "-w",
            "%{http_code}\\n",
            "-K",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    ).stdout
    counts: dict[str, int] = {}
    for code in out.split():
        counts[code] = counts.get(code, 0) + 1
    return counts


def burst(port: int, path: str, n: int, timeout: float = 30.0) -> dict[str, int]:
    """
    Open ``n`` connections first, then send one GET on each back to back, so
    that all ``n`` requests are in flight at once; counts of status codes.
    """
    socks = [socket.create_connection((HOST, port), timeout=5) for _ in range(n)]
    request = f"GET {path} HTTP/1.1\r\nHost: {BUCKET_HOST}\r\nConnection: close\r\n\r\n".encode()
    for s in socks:
        s.sendall(request)
    sel = selectors.DefaultSelector()
    heads: dict[socket.socket, bytes] = {}
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        heads[s] = b""
    deadline = time.monotonic() + timeout
    open_count = n
    while open_count and time.monotonic() < deadline:
        for key, _ in sel.select(0.5):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            try:
                data = s.recv(262144)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if len(heads[s]) < 16:
                heads[s] += data[:16]
            if not data:
                sel.unregister(s)
                s.close()
                open_count -= 1
    for s in socks:
        try:
            s.close()
        except OSError:
            pass
    counts: dict[str, int] = {}
    for head in heads.values():
        code = head[9:12].decode("latin-1") or "none"
        counts[code] = counts.get(code, 0) + 1
    return counts


def count_files(root: Path) -> int:
    """Regular files directly in ``root`` (0 if it does not exist)."""
    try:
        with os.scandir(root) as it:
            return sum(1 for e in it if e.is_file(follow_symlinks=False))
    except FileNotFoundError:
        return 0


def wait_files(root: Path, n: int, since: float, timeout: float) -> float | None:
    """Seconds from ``since`` until ``root`` holds ``n`` files, or None after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if count_files(root) >= n:
            return time.monotonic() - since
        time.sleep(0.01)
    return None


def rss_kib(pid: int) -> int:
    """Current resident set size of ``pid`` and its child processes (cosedge's workers), in KiB."""
    total = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total + int(over_children(pid, rss_kib))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its child processes (cosedge's or nginx's workers) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") + over_children(pid, cpu_seconds)


def over_children(pid: int, measure: Callable[[int], float]) -> int | float:
    """``measure`` summed over the child processes of ``pid`` (cosedge's workers); one that ended counts 0."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        return 0
    total: int | float = 0
    for child in children:
        try:
            total += measure(child)
        except OSError:  # it ended meanwhile
            pass
    return total


class RssSampler:
    """Samples a process tree's VmRSS every few milliseconds in a thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_kib = max(self.peak_kib, rss_kib(self.pid))
            except OSError:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak_kib = rss_kib(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)


def origin_gets(access_log: Path, path: str) -> int:
    """How many GETs for ``path`` the origin's access log holds."""
    try:
        text = access_log.read_text()
    except FileNotFoundError:
        return 0
    return sum(1 for line in text.splitlines() if line.startswith(f"GET {path} "))
