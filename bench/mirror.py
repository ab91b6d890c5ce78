"""
Mirror mode (issue 11) against the nginx ``proxy_store`` peer, which does the
same job (answer a miss from the origin while storing it):

- N distinct 16 KiB misses over 32 keep-alive connections: answers/s, and the
  time until all are stored (cosedge: every object a file in its bucket, the
  fill log saying "stored"; nginx: every proxy_store file in place).
- 200 clients at once on one cold 50 MiB key, from an origin sending at a
  remote origin's pace (``limit_rate``): origin GETs (from the origin's access
  log) and the time until the last client has every byte, against one
  download of the same object straight from the origin, which has it.

Every answer's bytes are checked: its length, and byte for byte against the
file the origin serves (a full comparison is stronger than a hash and costs a
``memcmp``; hashing 200 × 50 MiB would take seconds of the two cores the
servers need).  The client is one thread with non-blocking sockets, so 200
connections cost no more than the bytes they read.
"""

from __future__ import annotations

import functools
import os
import selectors
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import attrs

from . import load, servers
from .servers import BUCKET, BUCKET_HOST, HOST

MiB = 1024 * 1024
HERD_SIZE = 50 * MiB  # the "one cold 50 MB key"; --quick uses 10 MiB
HERD_CLIENTS = 200
R = TypeVar("R")
ROUNDS = 2  # rounds of the distinct misses per server
WARM_UP = 200  # misses per server before them (connection pools, nginx's first requests)
CONNECTIONS = 32  # keep-alive connections for the distinct misses, as the fill workload's curl --parallel


def generate(gen: Path, size: int = HERD_SIZE) -> None:
    """The herd's object, ``gen/herd.bin`` (incompressible)."""
    with open(gen / "herd.bin", "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MiB)
            f.write(os.urandom(n))
            left -= n


@attrs.define
class Fetched:
    """What :func:`fetch_all` saw."""

    seconds: float  # first request sent → last answer whole (or the deadline)
    statuses: dict[str, int]
    good: int = 0  # 200 with exactly the expected bytes
    wrong: int = 0  # 200 with a wrong length or wrong bytes
    broken: int = 0  # connection closed or deadline before the answer was whole
    mirrored: int = 0  # answers with ``x-cos-mirror: origin`` (streamed from the origin)
    client_cpu: float = 0.0  # CPU seconds this client spent (it shares the cores with the servers)
    last: list[float] = attrs.Factory(list)  # seconds from the start until each good answer was whole
    streamed: list[bool] = attrs.Factory(list)  # for each of ``last``: whether it was streamed from the origin

    @property
    def rate(self) -> float:
        return self.good / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        codes = " ".join(f"{k}×{v}" for k, v in sorted(self.statuses.items()))
        return f"{self.good} good, {self.wrong} wrong bytes, {self.broken} cut/unfinished, {codes}"


class _Conn:
    __slots__ = ("sock", "path", "head", "length", "got", "status", "ok", "mirror")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.path = ""
        self.reset("")

    def reset(self, path: str) -> None:
        self.path = path
        self.head = b""
        self.length = -1  # -1: headers not complete yet
        self.got = 0
        self.status = ""
        self.ok = True
        self.mirror = False


def fetch_all(port: int, paths: list[str], connections: int, expected: bytes, timeout: float = 120.0) -> Fetched:
    """
    GET every path once over ``connections`` keep-alive connections (all
    opened first, then the first request sent on each back to back, so that
    they are in flight at once), each answer checked against ``expected``.
    """
    exp = memoryview(expected)
    todo: Iterator[str] = iter(paths)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    sel = selectors.DefaultSelector()
    res = Fetched(0.0, {})

    def request(c: _Conn) -> bool:
        path = next(todo, None)
        if path is None:
            return False
        c.reset(path)
        c.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {BUCKET_HOST}\r\n\r\n".encode())
        return True

    def connect() -> _Conn:
        s = socket.create_connection((HOST, port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Conn(s)

    def close(c: _Conn) -> None:
        sel.unregister(c.sock)
        c.sock.close()

    def done(c: _Conn, started: float) -> None:
        res.statuses[c.status] = res.statuses.get(c.status, 0) + 1
        res.mirrored += c.mirror
        if c.status == "200" and c.ok and c.got == len(exp):
            res.good += 1
            res.last.append(time.perf_counter() - started)
            res.streamed.append(c.mirror)
        elif c.status == "200":
            res.wrong += 1

    def body(c: _Conn, start: int, n: int) -> None:
        """``n`` body bytes at ``buf[start:]``."""
        if c.status == "200" and c.ok:
            c.ok = c.got + n <= len(exp) and buf.startswith(exp[c.got : c.got + n], start)
        c.got += n

    def headers(c: _Conn, n: int) -> None:
        c.head += bytes(view[:n])
        end = c.head.find(b"\r\n\r\n")
        if end < 0:
            return
        lines = c.head[:end].split(b"\r\n")
        c.status = lines[0].split(b" ")[1].decode("latin-1")
        c.length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                c.length = int(value)
            elif name == b"x-cos-mirror":
                c.mirror = True
        rest = len(c.head) - end - 4
        if rest:
            body(c, n - rest, rest)

    conns = [connect() for _ in range(min(connections, len(paths)))]
    started, cpu = time.perf_counter(), time.process_time()
    for c in conns:
        request(c)
        c.sock.setblocking(False)
        sel.register(c.sock, selectors.EVENT_READ, c)
    deadline = time.monotonic() + timeout
    open_count = len(conns)
    while open_count and time.monotonic() < deadline:
        for key, _ in sel.select(0.5):
            c = key.data
            try:
                n = c.sock.recv_into(buf)
            except BlockingIOError:
                continue
            except OSError:
                n = 0
            if not n:  # closed before the answer was whole: count it, go on on a new connection
                res.broken += 1
                close(c)
                open_count -= 1
                try:
                    fresh = connect()
                except OSError:
                    continue
                if request(fresh):
                    fresh.sock.setblocking(False)
                    sel.register(fresh.sock, selectors.EVENT_READ, fresh)
                    open_count += 1
                else:
                    fresh.sock.close()
                continue
            if c.length < 0:
                headers(c, n)
            else:
                body(c, 0, n)
            if c.length >= 0 and c.got >= c.length:
                if c.got > c.length:
                    c.ok = False
                done(c, started)
                c.sock.setblocking(True)
                more = request(c)
                c.sock.setblocking(False)
                if not more:
                    close(c)
                    open_count -= 1
    res.seconds = max(res.last) if res.last else time.perf_counter() - started
    res.client_cpu = time.process_time() - cpu
    res.broken += open_count + sum(1 for _ in todo)
    for key in list(sel.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    sel.close()
    return res


@attrs.define
class Figures:
    """The mirror workloads' results, for the table (see ``bench.__main__.mirror_rows``)."""

    n: int
    herd_size: int
    answered: dict[str, Fetched] = attrs.Factory(dict)  # the N distinct misses, per server
    stored_s: dict[str, float | None] = attrs.Factory(dict)
    herd: dict[str, Fetched] = attrs.Factory(dict)  # the 200 clients on one cold key, per server
    herd_gets: dict[str, int] = attrs.Factory(dict)
    single_s: float = 0.0  # one download of the herd's object straight from the origin
    single_cold_s: float = 0.0  # one client alone on a cold key through cosedge (mirror)
    herd_peak_mib: float = 0.0  # cosedge's RSS growth during its herd
    problems: list[str] = attrs.Factory(list)  # errors, warnings, tracebacks in cosedge's log
    notes: list[str] = attrs.Factory(list)  # anything else amiss (wrong bytes, missing log lines)


def _log_problems(text: str) -> list[str]:
    return [
        line
        for line in text.splitlines()
        if any(m in line for m in ("#critical]", "#error]", "#warn]", "Traceback (most recent call last)"))
    ]


def _s(seconds: float | None) -> str:
    return "never (timeout)" if seconds is None else f"{seconds:.2f}s"


def _settle(count: Callable[[], int], seconds: float = 5.0) -> int:
    """A count that may still grow (a log written at the end of each request): wait until it is stable."""
    value, deadline = count(), time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.25)
        again = count()
        if again == value:
            return value
        value = again
    return value


def measure(
    work: Path,
    gen: Path,
    origin_port: int,
    nginx_port: int,
    peer_root: Path,
    access: Path,
    n: int,
    fills: int,
    workers: int,
    say: Callable[[str], None],
) -> Figures:
    """Run both mirror workloads against a fresh mirror-mode cosedge and the nginx peer."""
    small = (gen / "obj16k.bin").read_bytes()
    big = (gen / "herd.bin").read_bytes()
    fig = Figures(n, len(big))
    data = work / "data-mirror"
    data.mkdir()
    port = servers.free_port()
    cosedge = servers.start_cosedge(
        work, data, port, origin_port, fills=fills, name="cosedge-mirror", workers=workers,
        extra=servers.mirror_rule(origin_port),
    )  # fmt: skip
    log_path = work / "cosedge-mirror.log"
    try:
        # 1: N distinct 16 KiB misses; a warm-up of WARM_UP misses each, then
        # ROUNDS rounds going round the servers, fresh keys each time; the
        # round with the shortest time until all stored counts.
        say(f"mirror: {n} distinct 16 KiB misses, {CONNECTIONS} connections, best of {ROUNDS} rounds")
        targets = {"cosedge": (port, data / BUCKET), "nginx": (nginx_port, peer_root)}
        for p, _ in targets.values():
            fetch_all(p, [f"/mirror/warm/{i}.bin" for i in range(WARM_UP)], CONNECTIONS, small)
        for r in range(ROUNDS):
            for server, (p, root) in targets.items():
                tag = f"{server[0]}{r}"
                t0 = time.monotonic()
                got = fetch_all(p, [f"/mirror/{tag}/{i}.bin" for i in range(n)], CONNECTIONS, small)
                stored = load.wait_files(root / "mirror" / tag, n, t0, timeout=180)
                say(
                    f"  {server:8s} round {r + 1}: answered in {got.seconds:.2f}s ({got.rate:,.0f}/s; {got.summary()},"
                    f" {got.mirrored} via the origin), all stored after {_s(stored)}"
                )
                if got.good != n:
                    fig.notes.append(f"{server} misses, round {r + 1}: {got.summary()}")
                if server == "cosedge" and got.mirrored != got.good:
                    fig.notes.append(f"round {r + 1}: {got.good - got.mirrored} cosedge answers without x-cos-mirror")
                best = fig.stored_s.get(server, None)
                if server not in fig.answered or (stored is not None and (best is None or stored < best)):
                    fig.answered[server], fig.stored_s[server] = got, stored
            hits = fetch_all(port, [f"/mirror/c{r}/{i}.bin" for i in range(n)], CONNECTIONS, small)
            if hits.good != n or hits.mirrored:
                fig.notes.append(f"second pass, round {r + 1}: {hits.summary()}, {hits.mirrored} via the origin")
        text = log_path.read_text("utf-8", "replace")
        for r in range(ROUNDS):
            prefix = f"fill {BUCKET}/mirror/c{r}/"
            stored_lines = sum(1 for line in text.splitlines() if prefix in line and " stored: " in line)
            if stored_lines != n:
                fig.notes.append(f"round {r + 1}: the cosedge log says 'stored' for {stored_lines} of {n} objects")
        say(f"  every cosedge object a local hit afterwards: {not any('second pass' in x for x in fig.notes)}")

        # 2: 200 clients on one cold key.
        say(f"mirror: {HERD_CLIENTS} clients on one cold {len(big) / MiB:g} MiB key")
        single = fetch_all(origin_port, ["/herd/single.bin"], 1, big)
        fig.single_s = single.seconds
        cold = fetch_all(port, ["/herd/alone.bin"], 1, big)
        fig.single_cold_s = cold.seconds
        say(f"  one download from the origin {single.seconds:.2f}s; one client alone via cosedge {cold.seconds:.2f}s")
        if single.good != 1 or cold.good != 1:
            fig.notes.append(f"single downloads: origin {single.summary()}; cosedge {cold.summary()}")
        idle = load.rss_kib(cosedge.pid)
        for server, p in (("cosedge", port), ("nginx", nginx_port)):
            path = f"/herd/{server[0]}.bin"
            if server == "cosedge":
                with load.RssSampler(cosedge.pid) as rss:
                    got = fetch_all(p, [path] * HERD_CLIENTS, HERD_CLIENTS, big, timeout=180)
                fig.herd_peak_mib = (rss.peak_kib - idle) / 1024
            else:
                got = fetch_all(p, [path] * HERD_CLIENTS, HERD_CLIENTS, big, timeout=180)
            fig.herd[server] = got
            fig.herd_gets[server] = _settle(functools.partial(load.origin_gets, access, path))
            say(
                f"  {server:8s} last client whole after {got.seconds:.2f}s ({got.summary()}, {got.mirrored} "
                f"streamed from the origin), {fig.herd_gets[server]} origin GET(s); client CPU {got.client_cpu:.2f}s"
            )
        h = fig.herd["cosedge"]
        if h.good != HERD_CLIENTS:
            fig.notes.append(f"cosedge herd: {h.summary()}")
        if load.wait_files(data / BUCKET / "herd", 2, time.monotonic(), timeout=30) is None:
            fig.notes.append("cosedge did not store the herd's object within 30 s")
        fig.problems = _log_problems(log_path.read_text("utf-8", "replace"))
        for line in fig.problems[:10]:
            say(f"  cosedge log: {line}")
    finally:
        servers.stop(cosedge, grace=15)
    return fig


def rows(fig: Figures, rate: str, row: Callable[..., R]) -> list[R]:
    """
    The mirror-mode rows (issue 11), each made by ``row`` (``bench.__main__.Row``);
    a target is met only if every answer had the right bytes too.
    """
    n, a, h = fig.n, fig.answered, fig.herd
    out: list[R] = []
    label = f"mirror: {n} × 16 KiB misses"
    rps: dict[str, float | None] = {s: f.rate for s, f in a.items()}
    whole = all(f.good == n for f in a.values())
    checked = f"{a['cosedge'].good}/{n} and {a['nginx'].good}/{n} answers byte-exact"
    out.append(
        row(
            label,
            "answers/s",
            rps,
            target="≥ 0.5× nginx",
            met=whole and a["cosedge"].rate >= 0.5 * a["nginx"].rate,
            note=f"{CONNECTIONS} keep-alive connections, best of {ROUNDS} rounds; {checked}",
        )
    )
    fc, fn = fig.stored_s["cosedge"], fig.stored_s["nginx"]
    out.append(
        row(
            label,
            "s until all stored",
            fig.stored_s,
            fmt="{:.2f}",
            higher_is_better=False,
            target="≤ 2× nginx",
            met=fc is not None and fn is not None and fc <= 2 * fn,
            note="cosedge fsyncs each object, nginx does not",
        )
    )
    label = f"mirror: {HERD_CLIENTS} clients, 1 cold {fig.herd_size / MiB:g} MiB key"
    out.append(
        row(
            label,
            "origin GETs",
            {s: float(v) for s, v in fig.herd_gets.items()},
            higher_is_better=False,
            target="cosedge = 1",
            met=fig.herd_gets["cosedge"] == 1,
            note=f"origin sends {rate}/s per connection",
        )
    )
    hc = h["cosedge"].seconds
    ok = all(f.good == HERD_CLIENTS for f in h.values())
    out.append(
        row(
            label,
            "s until the last has every byte",
            {s: f.seconds for s, f in h.items()},
            fmt="{:.2f}",
            higher_is_better=False,
            target=f"≤ 1.5× one download ({fig.single_s:.2f} s from the origin)",
            met=h["cosedge"].good == HERD_CLIENTS and hc <= 1.5 * fig.single_s,
            note=(
                f"cosedge {hc / fig.single_s:.2f}× one download; one client alone via cosedge "
                f"{fig.single_cold_s:.2f} s; "
                + ("every client's bytes exact" if ok else f"cosedge {h['cosedge'].summary()}")
                + f"; cosedge RSS +{fig.herd_peak_mib:.0f} MiB"
            ),
        )
    )
    if fig.problems or fig.notes:
        shown = "; ".join([*fig.notes, *(f"log: {p}" for p in fig.problems[:3])])
        count = float(len(fig.problems) + len(fig.notes))
        out.append(row("mirror: problems", "count", {"cosedge": count}, higher_is_better=False, note=shown))
    return out
