"""
Migration jobs (issue 14), against peers measured in the same run:

1. **Backfill** of N × 16 KiB keys (a ``keys:`` file) through the real daemon:
   ``edge.backfill(bucket, 'keys:/path')`` over the SSH manhole (OpenSSH's
   ``ssh``, one command, as a script would), timed from the command until the
   job's file (``<data_dir>/.cosedge/jobs/<id>.json``) says ``done``, against
   ``aria2c -i urls -j N -x1 -d <folder>`` downloading the same URLs from the
   same nginx origin with the same concurrency (N = ``[jobs] max_concurrent``).
   Rounds alternate (cosedge, aria2c, cosedge, aria2c), each on a fresh
   daemon / folder after an ``os.sync()``; the best round of each counts.
2. **A migration replay**: a Zipf access pattern (s = 1.1, seeded) over
   10,000 keys of 4–16 KiB, 100,000 requests from 32 keep-alive clients
   against a cold bucket (the seed's proxy rule: 302 + one background fill),
   the clients following nothing; then a backfill of the keys never asked for;
   then ``edge.verify``.  Origin bytes come from the origin's access log
   (``$body_bytes_sent`` of every GET).  The same replay goes through an nginx
   ``proxy_store`` peer whose proxied answers carry an ``x-bench-fetched``
   header, so "served locally" is exact for both: cosedge 200 (not 302), nginx
   200 without the header.

The replay's client (:func:`replay`) is one Python thread driving 32
non-blocking keep-alive sockets with ``selectors`` (no pipelining, one
request in flight per connection), checking each 200's Content-Length against
the key's size; its CPU time is reported next to the wall time.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import resource
import selectors
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import attrs

from . import load, servers
from .servers import BUCKET, BUCKET_HOST, HOST

KiB = 1024
KEYS = 10_000  # keys of the backfill and of the replay
BACKFILL_SIZE = 16 * KiB
REPLAY_REQUESTS = 100_000
REPLAY_CLIENTS = 32
ZIPF_S = 1.1
SEED = 14  # the number: the key sizes and the access pattern
SIZES = (4 * KiB, 16 * KiB)  # replay objects: uniform in this range (seeded)
WINDOWS = 10  # the replay's requests in this many windows (10,000 each)
ROUNDS = 2  # backfill rounds per tool; the best counts
JOB_TIMEOUT = 300.0  # the longest a job or aria2c may take
MARK = b"x-bench-fetched"  # the nginx peer's header on answers it proxied (not served from its store)

Say = Callable[[str], None]


# ---------------------------------------------------------------------------
# The objects.


def generate(gen: Path, keys: int) -> list[int]:
    """``gen/bf/<i>.bin`` (16 KiB each) and ``gen/zipf/<i>.bin`` (4–16 KiB, seeded sizes): incompressible bytes."""
    rng = random.Random(SEED)
    sizes = [rng.randint(*SIZES) for _ in range(keys)]
    for folder, size_of in (("bf", lambda i: BACKFILL_SIZE), ("zipf", lambda i: sizes[i])):
        (gen / folder).mkdir(parents=True, exist_ok=True)
        for i in range(keys):
            (gen / folder / f"{i:05d}.bin").write_bytes(os.urandom(size_of(i)))
    return sizes


def zipf_sequence(keys: int, requests: int, s: float = ZIPF_S, seed: int = SEED) -> list[int]:
    """``requests`` key numbers drawn from a Zipf law of exponent ``s`` over ``keys`` (key 0 the most asked)."""
    weights = [1.0 / (rank**s) for rank in range(1, keys + 1)]
    cum = list(itertools.accumulate(weights))
    return random.Random(seed).choices(range(keys), cum_weights=cum, k=requests)


# ---------------------------------------------------------------------------
# The daemon's manhole, over OpenSSH.


class Manhole:
    """An Ed25519 key in an authorized_keys file, and ``ssh admin@127.0.0.1 COMMAND``."""

    def __init__(self, work: Path) -> None:
        self.key = work / "manhole_id"
        if not self.key.exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f", str(self.key)],
                check=True,
                timeout=30,
            )
        self.authorized = work / "manhole_authorized_keys"
        shutil.copy(f"{self.key}.pub", self.authorized)
        self.port = 0

    def section(self, port: int) -> str:
        """The ``[manhole]`` section of a daemon listening for SSH on ``port``."""
        self.port = port
        return f'\n[manhole]\nssh = "tcp:{port}:interface={HOST}"\nssh_authorized_keys = "{self.authorized}"\n'

    def run(self, command: str) -> str:
        argv = [
            "ssh", "-p", str(self.port), "-i", str(self.key), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            f"admin@{HOST}", command,
        ]  # fmt: skip
        p = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        if p.returncode:
            raise RuntimeError(f"ssh {command!r} exited {p.returncode}: {p.stdout}{p.stderr}")
        return p.stdout

    def start(self, command: str) -> int:
        """``edge.<command>`` (a job); its id."""
        out = self.run(f"edge.{command}")
        words = out.split()
        if len(words) < 3 or words[0] != "job" or words[2].rstrip(":") not in ("started", "queued"):
            raise RuntimeError(f"edge.{command} said {out!r}")
        return int(words[1])


def wait_job(data: Path, job: int, timeout: float = JOB_TIMEOUT) -> tuple[dict[str, object], float]:
    """Poll the job's file until the job has ended; (its contents, time.monotonic() when seen ended)."""
    path = data / ".cosedge" / "jobs" / f"{job}.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state: dict[str, object] = json.loads(path.read_text())
        except (OSError, ValueError):  # not written yet
            state = {}
        if state.get("state") in ("done", "cancelled", "failed"):
            return state, time.monotonic()
        time.sleep(0.02)
    raise RuntimeError(f"job {job} did not end within {timeout:.0f}s; see {path}")


def _start_daemon(
    work: Path, data: Path, origin_port: int, manhole: Manhole, jobs: int, fills: int, workers: int, name: str
) -> tuple[int, subprocess.Popen[bytes]]:
    port = servers.free_port()
    extra = f"\n[jobs]\nmax_concurrent = {jobs}\n" + manhole.section(servers.free_port())
    proc = servers.start_cosedge(work, data, port, origin_port, fills=fills, name=name, workers=workers, extra=extra)
    return port, proc


def log_problems(path: Path) -> list[str]:
    """A note if the daemon's log has errors or tracebacks (none expected)."""
    lines = [
        line
        for line in path.read_text("utf-8", "replace").splitlines()
        if any(m in line for m in ("#critical]", "#error]", "Traceback (most recent call last)"))
    ]
    return [f"{len(lines)} error line(s) in {path.name}, the first: {lines[0]}"] if lines else []


# ---------------------------------------------------------------------------
# The origin's access log.


@attrs.define
class OriginCount:
    gets: int = 0
    distinct: int = 0
    bytes: int = 0

    @property
    def repeated(self) -> int:
        return self.gets - self.distinct


def log_size(access: Path) -> int:
    try:
        return access.stat().st_size
    except FileNotFoundError:
        return 0


def origin_count(access: Path, start: int, end: int | None, prefix: str) -> OriginCount:
    """GETs of paths under ``prefix`` in ``access[start:end]`` (``$request_method $request_uri $status $bytes``)."""
    with open(access, "rb") as f:
        f.seek(start)
        text = f.read(-1 if end is None else end - start).decode("latin-1")
    count, paths = OriginCount(), set()
    for line in text.splitlines():
        parts = line.split(" ")
        if len(parts) == 4 and parts[0] == "GET" and parts[1].startswith(prefix):
            count.gets += 1
            count.bytes += int(parts[3])
            paths.add(parts[1])
    count.distinct = len(paths)
    return count


def settled_size(access: Path, seconds: float = 5.0) -> int:
    """The access log's size once it stops growing (answers still being logged), ``seconds`` at most."""
    size, deadline = log_size(access), time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.3)
        again = log_size(access)
        if again == size:
            return size
        size = again
    return size


# ---------------------------------------------------------------------------
# 1: backfill against aria2c.


@attrs.define
class Backfill:
    keys: int
    jobs: int
    cosedge: list[float] = attrs.Factory(list)  # seconds, command → job done, per round
    job_seconds: list[float] = attrs.Factory(list)  # the job's own running time, per round
    aria2c: list[float] = attrs.Factory(list)
    cosedge_cpu: list[float] = attrs.Factory(list)  # CPU seconds of the daemon's processes, per round
    aria2c_cpu: list[float] = attrs.Factory(list)  # CPU seconds of aria2c, per round
    notes: list[str] = attrs.Factory(list)

    @staticmethod
    def rate(keys: int, seconds: list[float]) -> float:
        return keys / min(seconds) if seconds else 0.0


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_aria2c(urls: Path, folder: Path, jobs: int, log_path: Path) -> float:
    """``aria2c -i urls -j jobs -x1 -d folder``; seconds it took (raises if it fails)."""
    argv = [
        "aria2c", "-i", str(urls), "-j", str(jobs), "-x1", "-d", str(folder), "--no-conf",
        "--allow-overwrite=true", "--auto-file-renaming=false", "--console-log-level=warn",
        "--summary-interval=0", "--download-result=hide", "--file-allocation=none",
    ]  # fmt: skip
    with open(log_path, "ab") as out:
        t0 = time.monotonic()
        p = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=JOB_TIMEOUT)
        seconds = time.monotonic() - t0
    if p.returncode:
        raise RuntimeError(f"aria2c exited {p.returncode}; see {log_path}")
    return seconds


def measure_backfill(
    work: Path,
    gen: Path,
    origin_port: int,
    access: Path,
    keys: int,
    jobs: int,
    fills: int,
    workers: int,
    rounds: int,
    say: Say,
) -> Backfill:
    res = Backfill(keys, jobs)
    base = work / "migration"
    manhole = Manhole(base)
    names = [f"bf/{i:05d}.bin" for i in range(keys)]
    key_file = base / "backfill.keys"
    key_file.write_text("".join(f"{name}\n" for name in names))
    urls = base / "backfill.urls"
    urls.write_text("".join(f"http://{HOST}:{origin_port}/{name}\n" for name in names))
    say(f"migration: backfill of {keys} × 16 KiB keys, cosedge job vs aria2c -j {jobs}, {rounds} round(s) each")
    for r in range(rounds):
        # cosedge: a fresh daemon on an empty data dir, so every key is copied.
        data = base / f"data-bf{r}"
        _, proc = _start_daemon(work, data, origin_port, manhole, jobs, fills, workers, f"cosedge-bf{r}")
        try:
            os.sync()
            mark = log_size(access)
            cpu = load.cpu_seconds(proc.pid)
            t0 = time.monotonic()
            job = manhole.start(f"backfill({BUCKET!r}, 'keys:{key_file}')")
            state, t1 = wait_job(data, job)
            res.cosedge_cpu.append(load.cpu_seconds(proc.pid) - cpu)
        finally:
            servers.stop(proc, grace=15)
        seconds = t1 - t0
        res.cosedge.append(seconds)
        res.job_seconds.append(float(state.get("seconds") or 0.0))  # type: ignore[arg-type]
        got = origin_count(access, mark, settled_size(access), "/bf/")
        stored = load.count_files(data / BUCKET / "bf")
        say(
            f"  cosedge round {r + 1}: {seconds:.2f}s ({keys / seconds:,.0f} objects/s; the job's own time "
            f"{res.job_seconds[-1]:.2f}s; CPU {res.cosedge_cpu[-1]:.2f}s), {state.get('state')}, "
            f"outcomes {state.get('outcomes')}, failures "
            f"{state.get('failures')}; {stored} files stored, origin {got.gets} GETs, {got.bytes} bytes"
        )
        if state.get("outcomes") != {"stored": keys} or stored != keys or got.gets != keys:
            res.notes.append(
                f"cosedge round {r + 1}: outcomes {state.get('outcomes')}, failures {state.get('failures')}, "
                f"{stored} stored, {got.gets} origin GETs"
            )
        res.notes += log_problems(work / f"cosedge-bf{r}.log")
        shutil.rmtree(data, ignore_errors=True)

        # aria2c: the same URLs into an empty folder.
        folder = base / f"aria2c-{r}"
        folder.mkdir()
        os.sync()
        mark = log_size(access)
        cpu = children_cpu()
        seconds = run_aria2c(urls, folder, jobs, base / "aria2c.log")
        res.aria2c.append(seconds)
        res.aria2c_cpu.append(children_cpu() - cpu)
        got = origin_count(access, mark, settled_size(access), "/bf/")
        files = [e for e in os.scandir(folder) if e.is_file()]
        right = sum(1 for e in files if e.stat().st_size == BACKFILL_SIZE)
        say(
            f"  aria2c  round {r + 1}: {seconds:.2f}s ({keys / seconds:,.0f} objects/s; "
            f"CPU {res.aria2c_cpu[-1]:.2f}s), {len(files)} files "
            f"({right} of 16 KiB), origin {got.gets} GETs"
        )
        if right != keys or len(files) != keys:
            res.notes.append(f"aria2c round {r + 1}: {len(files)} files, {right} of the right size")
        shutil.rmtree(folder, ignore_errors=True)
    return res


# ---------------------------------------------------------------------------
# 2: the replay's client.

LOCAL, REDIRECT, FETCHED, OTHER = 1, 2, 3, 4  # a request's answer (0: none)


@attrs.define
class Replayed:
    codes: bytearray  # per request: LOCAL (200 from the store), REDIRECT (302), FETCHED (nginx via origin), OTHER
    seconds: float
    client_cpu: float
    wrong_length: int = 0  # 200 whose Content-Length is not the key's size
    broken: int = 0  # connections closed or unparsable before an answer was whole

    @property
    def rate(self) -> float:
        return len(self.codes) / self.seconds if self.seconds else 0.0

    def count(self, code: int) -> int:
        return self.codes.count(code)


class _Conn:
    __slots__ = ("sock", "index", "head", "need", "close_after")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.index = -1
        self.head = b""
        self.need = -1  # body bytes still to read; -1 while the headers are incomplete
        self.close_after = False


def replay(
    port: int, sequence: list[int], sizes: list[int], prefix: str, connections: int, timeout: float = 300.0
) -> Replayed:
    """
    GET ``/<prefix><key>.bin`` for every key of ``sequence`` in order over
    ``connections`` keep-alive connections (one request in flight on each),
    recording each answer's kind.  Bounded by ``timeout``; a connection that
    breaks is replaced (at most 1,000 times).
    """
    requests = [f"GET /{prefix}{k:05d}.bin HTTP/1.1\r\nHost: {BUCKET_HOST}\r\n\r\n".encode() for k in range(len(sizes))]
    codes = bytearray(len(sequence))
    res = Replayed(codes, 0.0, 0.0)
    buf = bytearray(1 << 18)
    view = memoryview(buf)
    sel = selectors.DefaultSelector()
    total = len(sequence)
    nxt = 0
    reconnects = 1000

    def connect() -> _Conn:
        s = socket.create_connection((HOST, port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        c = _Conn(s)
        sel.register(s, selectors.EVENT_READ, c)
        return c

    def send(c: _Conn) -> bool:
        nonlocal nxt
        if nxt >= total:
            return False
        c.index, nxt = nxt, nxt + 1
        c.head, c.need, c.close_after = b"", -1, False
        data = requests[sequence[c.index]]
        try:
            sent = c.sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):  # never for a request this small, but be correct
            c.sock.setblocking(True)
            c.sock.sendall(data[sent:])
            c.sock.setblocking(False)
        return True

    def close(c: _Conn) -> None:
        sel.unregister(c.sock)
        c.sock.close()

    def finish(c: _Conn) -> None:
        head = c.head.lower()
        status = head[9:12]
        if status == b"200":
            codes[c.index] = FETCHED if MARK in head else LOCAL
            at = head.find(b"\r\ncontent-length:")
            if at < 0 or int(head[at + 17 : head.find(b"\r\n", at + 2)]) != sizes[sequence[c.index]]:
                res.wrong_length += 1
        elif status == b"302":
            codes[c.index] = REDIRECT
        else:
            codes[c.index] = OTHER

    started, cpu = time.perf_counter(), time.process_time()
    deadline = time.monotonic() + timeout
    live = 0
    for _ in range(min(connections, total)):
        c = connect()
        send(c)
        live += 1
    while live and time.monotonic() < deadline:
        for key, _ in sel.select(0.5):
            c = key.data
            try:
                n = c.sock.recv_into(buf)
            except BlockingIOError:
                continue
            except OSError:
                n = 0
            if n and c.need < 0:
                c.head += view[:n]
                end = c.head.find(b"\r\n\r\n")
                if end < 0:
                    if len(c.head) < 65536:
                        continue
                    n = 0  # no end of headers: give up on this connection
                else:
                    lower = c.head[:end].lower()
                    at = lower.find(b"\r\ncontent-length:")
                    if at < 0 or b"\r\ntransfer-encoding:" in lower:
                        n = 0  # this client reads Content-Length bodies only
                    else:
                        eol = lower.find(b"\r\n", at + 2)
                        length = int(lower[at + 17 : eol if eol > 0 else len(lower)])
                        c.need = length - (len(c.head) - end - 4)
                        c.close_after = b"\r\nconnection: close" in lower
                        c.head = c.head[: end + 4]
            elif n:
                c.need -= n
            if not n or c.need < 0:  # closed, unparsable, or more bytes than announced
                if c.need != 0:
                    res.broken += 1
                    codes[c.index] = OTHER
                close(c)
                live -= 1
                if reconnects > 0 and nxt < total:
                    reconnects -= 1
                    try:
                        fresh = connect()
                    except OSError:
                        continue
                    send(fresh)
                    live += 1
                continue
            if c.need == 0:
                finish(c)
                if c.close_after:
                    close(c)
                    live -= 1
                    if nxt < total:
                        fresh = connect()
                        send(fresh)
                        live += 1
                elif not send(c):
                    close(c)
                    live -= 1
    res.seconds = time.perf_counter() - started
    res.client_cpu = time.process_time() - cpu
    for key in list(sel.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    sel.close()
    return res


# ---------------------------------------------------------------------------
# 2: the replay, cosedge then nginx.


@attrs.define
class Window:
    requests: int
    first: int  # requests that are a key's first in the sequence
    local: dict[str, int] = attrs.Factory(dict)  # per server: answered from its store
    local_repeat: dict[str, int] = attrs.Factory(dict)  # per server: repeats answered from its store


@attrs.define
class Replay:
    keys: int
    requests: int
    unique_keys: int
    unique_bytes: int
    all_bytes: int
    answered: dict[str, Replayed] = attrs.Factory(dict)
    origin: dict[str, OriginCount] = attrs.Factory(dict)  # the replay's origin GETs, per server
    windows: list[Window] = attrs.Factory(list)
    stored_after_s: float | None = None  # replay end → every requested key stored (cosedge)
    backfill_keys: int = 0
    backfill: dict[str, object] = attrs.Factory(dict)  # the job's file
    backfill_s: float = 0.0
    whole: OriginCount = attrs.Factory(OriginCount)  # cosedge: replay + backfill (+ verify's HEADs: no bytes)
    stored: int = 0  # objects in cosedge's bucket after the backfill
    verify: dict[str, object] = attrs.Factory(dict)
    verify_s: float = 0.0
    report_lines: list[str] = attrs.Factory(list)
    notes: list[str] = attrs.Factory(list)

    @property
    def differences(self) -> int:
        outcomes = self.verify.get("outcomes") or {}
        failures = self.verify.get("failures") or {}
        assert isinstance(outcomes, dict) and isinstance(failures, dict)
        checked = sum(outcomes.values()) + sum(failures.values())
        return checked - int(outcomes.get("same", 0)) + max(0, self.stored - checked)


def measure_replay(
    work: Path,
    gen: Path,
    sizes: list[int],
    origin_port: int,
    access: Path,
    requests: int,
    jobs: int,
    fills: int,
    workers: int,
    say: Say,
) -> Replay:
    keys = len(sizes)
    base = work / "migration"
    manhole = Manhole(base)
    sequence = zipf_sequence(keys, requests)
    asked = set(sequence)
    res = Replay(keys, requests, len(asked), sum(sizes[k] for k in asked), sum(sizes))
    say(
        f"migration: replay of {requests} Zipf(s={ZIPF_S}) requests over {keys} keys ({len(asked)} asked for, "
        f"{res.unique_bytes / 1e6:.1f} MB), {REPLAY_CLIENTS} clients"
    )

    # cosedge: a cold bucket, the seed's proxy rule (302 + background fill).
    data = base / "data-replay"
    port, proc = _start_daemon(work, data, origin_port, manhole, jobs, fills, workers, "cosedge-replay")
    try:
        os.sync()
        start = log_size(access)
        got = replay(port, sequence, sizes, "zipf/", REPLAY_CLIENTS)
        res.answered["cosedge"] = got
        t0 = time.monotonic()
        waited = load.wait_files(data / BUCKET / "zipf", len(asked), t0, timeout=120)
        res.stored_after_s = waited
        middle = settled_size(access)
        res.origin["cosedge"] = origin_count(access, start, middle, "/zipf/")
        say(
            f"  cosedge: {got.rate:,.0f} req/s ({got.seconds:.2f}s, client CPU {got.client_cpu:.2f}s), "
            f"200 {got.count(LOCAL)}, 302 {got.count(REDIRECT)}, other {got.count(OTHER)}, broken {got.broken}, "
            f"wrong length {got.wrong_length}; every asked key stored {waited if waited is None else f'{waited:.2f}'}s "
            f"after the last answer; origin {res.origin['cosedge']}"
        )

        # The keys never asked for, backfilled; then a verify of the whole bucket.
        never = [k for k in range(keys) if k not in asked]
        res.backfill_keys = len(never)
        key_file = base / "replay-never-asked.keys"
        key_file.write_text("".join(f"zipf/{k:05d}.bin\n" for k in never))
        t0 = time.monotonic()
        job = manhole.start(f"backfill({BUCKET!r}, 'keys:{key_file}')")
        res.backfill, t1 = wait_job(data, job)
        res.backfill_s = t1 - t0
        res.stored = load.count_files(data / BUCKET / "zipf")
        say(
            f"  backfill of the {len(never)} keys never asked for: {res.backfill_s:.2f}s, "
            f"{res.backfill.get('state')}, outcomes {res.backfill.get('outcomes')}, failures "
            f"{res.backfill.get('failures')}; {res.stored} objects stored"
        )
        t0 = time.monotonic()
        job = manhole.start(f"verify({BUCKET!r})")
        res.verify, t1 = wait_job(data, job)
        res.verify_s = t1 - t0
        report = res.verify.get("report")
        if isinstance(report, str) and os.path.exists(report):
            res.report_lines = Path(report).read_text().splitlines()[1:]
        res.whole = origin_count(access, start, settled_size(access), "/zipf/")
        say(
            f"  verify: {res.verify_s:.2f}s, {res.verify.get('state')}, total {res.verify.get('total')}, outcomes "
            f"{res.verify.get('outcomes')}, failures {res.verify.get('failures')}; report {res.report_lines[:5]}"
        )
        say(f"  origin over the whole migration: {res.whole} for {res.all_bytes} bytes of {keys} keys")
        res.notes += log_problems(work / "cosedge-replay.log")
    finally:
        servers.stop(proc, grace=15)

    # nginx proxy_store: the same replay on a fresh peer that marks what it proxied.
    root = base / "peer-root"
    root.mkdir()
    port = servers.free_port()
    peer = servers.start_peer(base, root, port, origin_port, workers, mark_fetched=True)
    try:
        os.sync()
        start = log_size(access)
        got = replay(port, sequence, sizes, "zipf/", REPLAY_CLIENTS)
        res.answered["nginx"] = got
        res.origin["nginx"] = origin_count(access, start, settled_size(access), "/zipf/")
        say(
            f"  nginx:   {got.rate:,.0f} req/s ({got.seconds:.2f}s, client CPU {got.client_cpu:.2f}s), "
            f"200 local {got.count(LOCAL)}, 200 via origin {got.count(FETCHED)}, other {got.count(OTHER)}, "
            f"broken {got.broken}, wrong length {got.wrong_length}; origin {res.origin['nginx']}"
        )
    finally:
        servers.stop(peer)

    # Windows of the sequence (in the order the requests were sent).
    size = max(1, requests // WINDOWS)
    seen: set[int] = set()
    for w in range(0, requests, size):
        win = Window(min(size, requests - w), 0)
        local = {s: 0 for s in res.answered}
        repeat = {s: 0 for s in res.answered}
        for i in range(w, w + win.requests):
            k = sequence[i]
            first = k not in seen
            seen.add(k)
            win.first += first
            for s, a in res.answered.items():
                if a.codes[i] == LOCAL:
                    local[s] += 1
                    repeat[s] += not first
        win.local, win.local_repeat = local, repeat
        res.windows.append(win)
    for s, a in res.answered.items():
        if a.broken or a.wrong_length or a.count(OTHER) or a.codes.count(0):
            res.notes.append(
                f"{s} replay: {a.broken} broken, {a.wrong_length} wrong lengths, {a.count(OTHER)} other statuses, "
                f"{a.codes.count(0)} unanswered"
            )
    return res


# ---------------------------------------------------------------------------
# Everything, and the section of BENCHMARKS.md.


@attrs.define
class Figures:
    backfill: Backfill
    replay: Replay


def measure(
    work: Path,
    gen: Path,
    origin_port: int,
    access: Path,
    quick: bool,
    jobs: int,
    fills: int,
    workers: int,
    say: Say,
) -> Figures:
    keys = 2_000 if quick else KEYS
    requests = 20_000 if quick else REPLAY_REQUESTS
    (work / "migration").mkdir(exist_ok=True)
    say(f"migration: generating {keys} × 16 KiB and {keys} × 4–16 KiB objects")
    sizes = generate(gen, keys)
    backfill = measure_backfill(
        work, gen, origin_port, access, keys, jobs, fills, workers, 1 if quick else ROUNDS, say
    )  # fmt: skip
    replayed = measure_replay(work, gen, sizes, origin_port, access, requests, jobs, fills, workers, say)
    return Figures(backfill, replayed)


def _met(ok: bool) -> str:
    return "**met**" if ok else "not met"


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.2f} %" if whole else "–"


def section(fig: Figures, jobs: int, workers: int) -> str:
    """The migration tables (markdown)."""
    b, r = fig.backfill, fig.replay
    c_rate, a_rate = Backfill.rate(b.keys, b.cosedge), Backfill.rate(b.keys, b.aria2c)
    ratio = c_rate / a_rate if a_rate else 0.0
    rounds = (
        f"cosedge {', '.join(f'{s:.2f}' for s in b.cosedge)} s (the job's own time "
        f"{', '.join(f'{s:.2f}' for s in b.job_seconds)} s; CPU {', '.join(f'{s:.2f}' for s in b.cosedge_cpu)} s);"
        f" aria2c {', '.join(f'{s:.2f}' for s in b.aria2c)} s (CPU {', '.join(f'{s:.2f}' for s in b.aria2c_cpu)} s)"
    )
    ca, na = r.answered["cosedge"], r.answered["nginx"]
    co, no = r.origin["cosedge"], r.origin["nginx"]

    def worst(server: str) -> tuple[str, int, int]:
        """The lowest share of repeats served locally over the windows: (share, its window, windows ≥ 99 %)."""
        shares = [w.local_repeat[server] / (w.requests - w.first) for w in r.windows if w.requests > w.first]
        if not shares:
            return "–", 0, 0
        low = min(shares)
        return f"{100 * low:.2f} %", shares.index(low) + 1, sum(1 for x in shares if x >= 0.99)

    cw, nw = worst("cosedge"), worst("nginx")
    lines = [
        f"Backfill: {b.keys} keys of 16 KiB from the origin, `[jobs] max_concurrent = {jobs}` and `aria2c -j {jobs}"
        f" -x1`; cosedge timed from the `ssh … edge.backfill(…)` command until the job's file says done, best"
        f" of {len(b.cosedge)} round(s) each (rounds alternate; {rounds}).  ",
        f"Replay: {r.requests} requests, Zipf s = {ZIPF_S} (seed {SEED}) over {r.keys} keys of 4–16 KiB"
        f" ({r.unique_keys} asked for, {r.unique_bytes} bytes), {REPLAY_CLIENTS} keep-alive clients (one Python"
        f" thread, non-blocking sockets); cosedge with `workers = {workers}`, the seed's proxy rule (302 + fill);"
        f" nginx `proxy_store` with worker_processes {workers}.",
        "",
        "| workload | metric | cosedge | peer | peer's figure | cosedge÷peer | target | met |",
        "|---|---|---|---|---|---|---|---|",
        f"| backfill {b.keys} × 16 KiB | objects/s | {c_rate:.0f} | aria2c -j {jobs} | {a_rate:.0f} | {ratio:.2f}× "
        f"| ≥ 0.5× aria2c | {_met(ratio >= 0.5 and not b.notes)} |",
        f"| replay, {r.requests} requests | origin bytes ÷ unique bytes ↓ | {co.bytes / r.unique_bytes:.3f} "
        f"| nginx proxy_store | {no.bytes / r.unique_bytes:.3f} | – | cosedge 1.0 "
        f"({co.gets} GETs for {r.unique_keys} keys, nginx {no.gets}) | {_met(co.bytes == r.unique_bytes)} |",
        f"| whole migration (replay + backfill + verify) | origin bytes ÷ bytes of all {r.keys} keys ↓ "
        f"| {r.whole.bytes / r.all_bytes:.3f} | – | – | – | 1.0 ({r.whole.gets} GETs, {r.stored} objects stored) "
        f"| {_met(r.whole.bytes == r.all_bytes and r.stored == r.keys)} |",
        f"| replay | served locally, all requests | {_pct(ca.count(LOCAL), r.requests)} | nginx proxy_store "
        f"| {_pct(na.count(LOCAL), r.requests)} | – | | |",
        f"| replay, worst window | served locally, repeat requests | {cw[0]} (window {cw[1]}) | nginx proxy_store "
        f"| {nw[0]} (window {nw[1]}) | – | ≥ 99 % in every window of {len(r.windows)} (per window below) "
        f"| {_met(cw[2] == len(r.windows))}: {cw[2]} of {len(r.windows)} windows (nginx {nw[2]}) |",
        f"| verify of {r.stored} objects | differences ↓ | {r.differences} | – | – | – | 0 "
        f"(outcomes {r.verify.get('outcomes')}, failures {r.verify.get('failures')}) "
        f"| {_met(r.differences == 0 and r.verify.get('state') == 'done')} |",
        f"| replay | req/s | {ca.rate:.0f} | nginx proxy_store | {na.rate:.0f} | {ca.rate / na.rate:.2f}× "
        f"| (the client's CPU: {ca.client_cpu:.1f} s of {ca.seconds:.1f} s; "
        f"{na.client_cpu:.1f} s of {na.seconds:.1f} s) | |",
        f"| backfill of the {r.backfill_keys} keys never asked for | s ↓ | {r.backfill_s:.2f} | – | – | – "
        f"| (outcomes {r.backfill.get('outcomes')}, failures {r.backfill.get('failures')}) | |",
        f"| verify of {r.stored} objects | s ↓ | {r.verify_s:.2f} | – | – | – | | |",
        "",
        "Served locally per window of the replay (cosedge: 200, not 302; nginx: 200 without the header its"
        ' proxied answers carry). "Repeats" are requests for a key asked for earlier in the sequence.',
        "",
        "| requests | first asks | cosedge, all | cosedge, repeats | nginx, all | nginx, repeats |",
        "|---|---|---|---|---|---|",
    ]
    start = 0
    for w in r.windows:
        rep = w.requests - w.first
        lines.append(
            f"| {start + 1}–{start + w.requests} | {w.first} | {_pct(w.local['cosedge'], w.requests)} "
            f"| {_pct(w.local_repeat['cosedge'], rep)} | {_pct(w.local['nginx'], w.requests)} "
            f"| {_pct(w.local_repeat['nginx'], rep)} |"
        )
        start += w.requests
    notes = [*b.notes, *r.notes]
    if r.report_lines:
        notes.append(f"verify report: {'; '.join(r.report_lines[:5])}")
    if notes:
        lines += ["", "Problems: " + "; ".join(notes)]
    return "\n".join(lines) + "\n"
