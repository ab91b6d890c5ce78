"""
``python -m bench``: run every workload against every server in one run,
print the table and write it into BENCHMARKS.md.  ``bash bench/run`` installs
nginx and wrk first if they are missing.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs

from . import load, migration, mirror, servers, stream
from .servers import BUCKET, REPO

MiB = 1024 * 1024
STREAM_TRIES = 5  # downloads per server for the single stream; the median counts
PACE_MS = 100  # wrk delay between requests on each connection, paced miss run
SERVERS = ("cosedge", "nginx", "static")
#: Groups of workloads ``--only`` selects: "core" (hits, streams, misses, fills, RSS), "mirror" (issue 11),
#: "migration" (issue 14: backfill against aria2c, a Zipf replay then backfill and verify), "stream" (issue 15:
#: one 256 MiB stream with three clients, and CPU seconds per GB).
WORKLOADS = ("core", "mirror", "migration", "stream")
_START = "<!-- bench:results:start -->"
_END = "<!-- bench:results:end -->"


@attrs.define
class Row:
    workload: str
    metric: str
    values: dict[str, float | None]
    fmt: str = "{:.0f}"
    higher_is_better: bool = True
    target: str = ""
    met: bool | None = None
    note: str = ""

    def cell(self, server: str) -> str:
        v = self.values.get(server)
        return "–" if v is None else self.fmt.format(v)

    def ratio(self, peer: str) -> str:
        a, b = self.values.get("cosedge"), self.values.get(peer)
        if a is None or b is None or b == 0:
            return "–"
        return f"{a / b:.2f}×"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def generate(gen: Path, with_gib: bool, hits: bool = True) -> None:
    """The objects: hit/{1k,100k,256m,1g}.bin (unless not ``hits``), obj16k.bin, obj1m.bin (incompressible bytes)."""
    (gen / "hit").mkdir(parents=True)
    block = os.urandom(MiB)

    def write(path: Path, size: int) -> None:
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(left, len(block))
                f.write(block[:n])
                left -= n

    write(gen / "obj16k.bin", 16 * 1024)
    write(gen / "obj1m.bin", MiB)
    if not hits:
        return
    write(gen / "hit" / "1k.bin", 1024)
    write(gen / "hit" / "100k.bin", 100 * 1024)
    write(gen / "hit" / "256m.bin", 256 * MiB)
    write(gen / "hit" / "1g.bin", 1024 * MiB if with_gib else 64 * MiB)


def link_tree(src: Path, dst: Path) -> None:
    """Hard-link the files of ``src`` into ``dst`` (same inodes, same page cache)."""
    dst.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        os.link(entry, dst / entry.name)


def versions() -> dict[str, str]:
    def cmd(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (p.stdout + p.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    import twisted

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": f"{os.cpu_count()} × {cpu}",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "nginx": cmd(["nginx", "-v"]).replace("nginx version: ", ""),
        "wrk": cmd(["wrk", "-v"]).split(" [")[0],
        "curl": cmd(["curl", "--version"]).split(" (")[0],
        "aria2c": cmd(["aria2c", "--version"]),
        "loadavg": Path("/proc/loadavg").read_text().split(" ")[0],
        "code": code_version(),
    }


def code_version() -> str:
    """The commit measured, and whether cosedge/ had uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "cosedge"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        head = dirty = None
    if head is None or head.returncode or dirty is None:
        return f"commit {os.environ.get('COSEDGE_COMMIT', 'unknown')}"
    return f"commit {head.stdout.strip()}" + (" with uncommitted changes in cosedge/" if dirty.stdout.strip() else "")


def run(args: argparse.Namespace) -> list[Row]:
    """Generate the objects, start the origin and the nginx peer, run the selected workloads."""
    only = args.only or list(WORKLOADS)
    work = Path(tempfile.mkdtemp(prefix="cosedge-bench-"))
    if not args.keep:
        import atexit

        # Registered after servers.install_cleanup, so it runs first: stop
        # the servers, then remove their files.
        atexit.register(lambda: (servers.stop_all(), shutil.rmtree(work, True)))
    log(f"work dir {work}, workloads: {', '.join(only)}")
    gen = work / "gen"
    generate(gen, with_gib=not args.quick, hits="core" in only or "stream" in only)
    if "mirror" in only:
        mirror.generate(gen, 10 * MiB if args.quick else mirror.HERD_SIZE)
    peer_root = work / "peer-root"
    peer_root.mkdir()
    ports = {name: servers.free_port() for name in ("origin", "nginx")}
    origin, access = servers.start_origin(work, gen, ports["origin"], herd_rate=args.herd_rate)
    peer = servers.start_peer(work, peer_root, ports["nginx"], ports["origin"], args.workers)
    rows: list[Row] = []
    if "core" in only:
        rows += core(args, work, gen, peer_root, access, ports)
    if "stream" in only:
        data = work / "data-stream"
        link_tree(gen / "hit", data / BUCKET / "hit")
        if not (peer_root / "hit").exists():
            link_tree(gen / "hit", peer_root / "hit")
        pid, port = stream.start(work, data, ports["origin"], args.workers)
        pids, stream_ports = {"cosedge": pid, "nginx": peer.pid}, {"cosedge": port, "nginx": ports["nginx"]}
        if args.baseline:
            code = stream.baseline_code(work, args.baseline)
            pids["baseline"], stream_ports["baseline"] = stream.start(work, data, ports["origin"], args.workers, code)
        log(f"256 MiB single stream, clients {', '.join(stream.CLIENTS)}: {args.rounds + 1} rounds, the median counts")
        streamed = stream.measure(work, pids, stream_ports, rounds=args.rounds + 1, seconds=args.seconds, say=log)
        rows += stream.rows(streamed, Row, f"baseline {args.baseline}")
    if "mirror" in only:
        figures = mirror.measure(
            work, gen, ports["origin"], ports["nginx"], peer_root, access,
            n=args.fill_objects, fills=args.fills, workers=args.workers, say=log,
        )  # fmt: skip
        rows += mirror.rows(figures, args.herd_rate, Row)
    if "migration" in only:
        moved = migration.measure(
            work, gen, ports["origin"], access, quick=args.quick, jobs=args.job_concurrency, fills=args.fills,
            workers=args.workers, say=log,
        )  # fmt: skip
        args.sections.append(
            "### Migration jobs (issue 14)\n\n" + migration.section(moved, args.job_concurrency, args.workers)
        )
    return rows


def core(
    args: argparse.Namespace, work: Path, gen: Path, peer_root: Path, access: Path, ports: dict[str, int]
) -> list[Row]:
    """Hits, single streams, misses, fills, 200 cold requests (302 mode) and RSS, against every server."""
    secs = args.seconds
    rounds = args.rounds
    n_fill = args.fill_objects
    data = work / "data"
    link_tree(gen / "hit", data / BUCKET / "hit")
    link_tree(gen / "hit", peer_root / "hit")

    workers = args.workers
    ports.update({name: servers.free_port() for name in ("cosedge", "static", "one")})
    servers.start_static(work, gen, ports["static"])
    cosedge = servers.start_cosedge(work, data, ports["cosedge"], ports["origin"], fills=args.fills, workers=workers)
    # The same daemon as one process, for the 1 KiB hits (stopped after them).
    one = servers.start_cosedge(work, data, ports["one"], ports["origin"], fills=args.fills, name="cosedge-one")
    log(f"servers up: {ports}")

    for server in SERVERS:
        for path in ("/hit/1k.bin", "/hit/100k.bin"):
            size, _ = load.stream(ports[server], path)
            assert size in (1024, 100 * 1024), (server, path, size)

    rows: list[Row] = []

    # 1 and 2: hits, keep-alive, 32 connections.  Rounds go round the
    # servers (A B C, A B C) so that a burst of load from elsewhere on the
    # machine is less likely to favour one of them; the best round counts.
    for label, path, size in (("1 KiB hits", "/hit/1k.bin", "1k"), ("100 KiB hits", "/hit/100k.bin", "100k")):
        log(f"{label}: {rounds} round(s) of {secs}s per server")
        res: dict[str, load.WrkResult] = {}
        for i in range(rounds):
            for s in (*SERVERS, "one") if size == "1k" else SERVERS:
                r = load.wrk(work, ports[s], path, secs)
                log(f"  {s:8s} round {i + 1}: {r.rps:,.0f} req/s p99 {r.p99_ms:.2f} ms errors {r.errors}")
                if s not in res or r.rps > res[s].rps:
                    res[s] = r
        errors = sum(r.errors for r in res.values())
        note = f"{errors} errors" if errors else ""
        if size == "1k":
            servers.stop(one, grace=15)
            one_result = res.pop("one")
            rps = {s: r.rps for s, r in res.items()}
            met = rps["cosedge"] >= 1.5 * rps["static"] and rps["cosedge"] >= 0.25 * rps["nginx"]
            rows.append(Row(label, "req/s", rps, target="≥ 1.5× static, ≥ 0.25× nginx", met=met, note=note))
            rows.append(
                Row(label, "p99 ms", {s: r.p99_ms for s, r in res.items()}, fmt="{:.2f}", higher_is_better=False)
            )
            rows.append(
                Row(
                    f"{label}, cosedge workers = 1",
                    "req/s",
                    {**rps, "cosedge": one_result.rps},
                    note=f"one process; p99 {one_result.p99_ms:.2f} ms",
                )
            )
        else:
            rows.append(Row(label, "req/s", {s: r.rps for s, r in res.items()}, note=note))
            rows.append(Row(label, "GB/s", {s: r.rps * 100 * 1024 / 1e9 for s, r in res.items()}, fmt="{:.2f}"))

    # 3: one 256 MiB object, one stream; cosedge also with sendfile off, for
    # comparison.  Tries go round the servers too; the median counts (a
    # quiet moment on the shared machine can double one try).
    log(f"256 MiB single stream: median of {STREAM_TRIES} per server (a lean Python client)")
    ports["plain"] = servers.free_port()
    plain = servers.start_cosedge(work, data, ports["plain"], ports["origin"], name="cosedge-plain", sendfile=False)
    tries: dict[str, list[float]] = {s: [] for s in (*SERVERS, "plain")}
    for _ in range(STREAM_TRIES):
        for s in tries:
            size, seconds = load.download(ports[s], "/hit/256m.bin")
            assert size == 256 * MiB, (s, size)
            tries[s].append(size / seconds / 1e9)
    servers.stop(plain)
    for s, speeds in tries.items():
        log(f"  {s:8s} {' '.join(f'{x:.2f}' for x in speeds)} GB/s")
    gbps: dict[str, float | None] = {s: statistics.median(tries[s]) for s in SERVERS}
    assert gbps["cosedge"] is not None and gbps["nginx"] is not None
    rows.append(
        Row(
            "256 MiB, 1 stream",
            "GB/s",
            gbps,
            fmt="{:.2f}",
            target="≥ 0.8× nginx",
            met=gbps["cosedge"] >= 0.8 * gbps["nginx"],
        )
    )
    rows.append(
        Row(
            "256 MiB, 1 stream, sendfile off",
            "GB/s",
            {"cosedge": statistics.median(tries["plain"]), "nginx": gbps["nginx"], "static": gbps["static"]},
            fmt="{:.2f}",
            note="cosedge on the plain read + write path, for comparison",
        )
    )

    # 4a: misses on distinct keys (cosedge: 302 + fill starts; nginx: proxied and stored).
    # Each cosedge run gets a fresh daemon, so no fill backlog of an earlier
    # run takes CPU from the next measurement.
    log(f"misses on distinct keys: {secs}s per server")
    servers.stop(cosedge, grace=15)
    miss: dict[str, load.WrkResult] = {}
    for name, delay in (("cosedge", 0), ("paced", PACE_MS)):
        ports["cosedge"] = servers.free_port()
        cosedge = servers.start_cosedge(
            work, data, ports["cosedge"], ports["origin"], fills=args.fills, name=f"cosedge-{name}", workers=workers
        )
        miss[name] = load.wrk(work, ports["cosedge"], "/", secs, distinct_prefix=f"/miss/{name}-", delay_ms=delay)
        servers.stop(cosedge, grace=15)
    miss["nginx"] = load.wrk(work, ports["nginx"], "/", secs, distinct_prefix="/miss/nginx-")
    for s, r in miss.items():
        log(f"  {s:8s} {r.rps:,.0f} req/s p99 {r.p99_ms:.2f} ms errors {r.errors}")
    rows.append(
        Row(
            "misses, distinct keys",
            "answers/s",
            {s: miss[s].rps for s in ("cosedge", "nginx")},
            note="cosedge 302 + fill, nginx 200 via origin",
        )
    )
    rows.append(
        Row(
            "misses, distinct keys",
            "p99 ms",
            {s: miss[s].p99_ms for s in ("cosedge", "nginx")},
            fmt="{:.2f}",
            higher_is_better=False,
            target="cosedge ≤ 2 ms",
            met=miss["cosedge"].p99_ms <= 2.0,
        )
    )
    # The same 302s at a fixed pace over 32 connections: the latency a request
    # sees when cosedge is not saturated.
    paced = miss["paced"]
    rows.append(
        Row(
            f"misses, paced ({PACE_MS} ms/conn)",
            "p99 ms",
            {"cosedge": paced.p99_ms},
            fmt="{:.2f}",
            higher_is_better=False,
            target="≤ 2 ms",
            met=paced.p99_ms <= 2.0,
            note=f"{paced.rps:,.0f} req/s over 32 connections",
        )
    )

    # A fresh cosedge (empty fill queue) for fills and memory.
    ports["cosedge"] = servers.free_port()
    cosedge = servers.start_cosedge(
        work, data, ports["cosedge"], ports["origin"], fills=args.fills, name="cosedge-fill", workers=workers
    )
    for _ in range(200):
        load.stream(ports["cosedge"], "/hit/100k.bin")
    idle_kib = load.rss_kib(cosedge.pid)
    log(f"cosedge idle RSS {idle_kib / 1024:.1f} MiB")

    # 4b: N distinct 16 KiB objects, all stored.
    log(f"fill {n_fill} distinct 16 KiB objects")
    fill_s: dict[str, float | None] = {}
    fill_codes: dict[str, dict[str, int]] = {}
    with load.RssSampler(cosedge.pid) as fill_rss:
        t0 = time.monotonic()
        fill_codes["cosedge"] = load.parallel_get(work, ports["cosedge"], [f"/fill/c/{i}.bin" for i in range(n_fill)])
        drive = time.monotonic() - t0
        fill_s["cosedge"] = load.wait_files(data / BUCKET / "fill" / "c", n_fill, t0, timeout=180)
    log(f"  cosedge answered in {drive:.2f}s {fill_codes['cosedge']}, all stored after {fill_s['cosedge']}s")
    t0 = time.monotonic()
    fill_codes["nginx"] = load.parallel_get(work, ports["nginx"], [f"/fill/n/{i}.bin" for i in range(n_fill)])
    fill_s["nginx"] = load.wait_files(peer_root / "fill" / "n", n_fill, t0, timeout=180)
    log(f"  nginx   {fill_codes['nginx']}, all stored after {fill_s['nginx']}s")
    fc, fn = fill_s["cosedge"], fill_s["nginx"]
    rows.append(
        Row(
            f"fill {n_fill} × 16 KiB",
            "s until all stored",
            fill_s,
            fmt="{:.2f}",
            higher_is_better=False,
            target="≤ nginx",
            met=fc is not None and fn is not None and fc <= fn,
            note=f"cosedge answered all in {drive:.2f}s ({args.fills} parallel fills)",
        )
    )

    # 5: 200 simultaneous cold requests for one key.
    log("200 concurrent cold requests for one key")
    cold: dict[str, float | None] = {}
    codes = load.burst(ports["cosedge"], "/cold/one.bin", 200)
    load.wait_files(data / BUCKET / "cold", 1, time.monotonic(), timeout=30)
    time.sleep(0.5)
    cold["cosedge"] = load.origin_gets(access, "/cold/one.bin")
    log(f"  cosedge {codes} → {cold['cosedge']} origin GET(s)")
    codes = load.burst(ports["nginx"], "/cold/peer.bin", 200)
    time.sleep(0.5)
    cold["nginx"] = load.origin_gets(access, "/cold/peer.bin")
    log(f"  nginx   {codes} → {cold['nginx']} origin GET(s)")
    rows.append(
        Row(
            "200 cold requests, 1 key",
            "origin GETs",
            cold,
            higher_is_better=False,
            target="cosedge = 1",
            met=cold["cosedge"] == 1,
        )
    )

    # 6: memory while filling and serving a 1 GiB object.
    big = "1 GiB" if not args.quick else "64 MiB"
    log(f"RSS while filling and serving {big}")
    with load.RssSampler(cosedge.pid) as big_fill_rss:
        t0 = time.monotonic()
        load.burst(ports["cosedge"], "/bigfill/1g.bin", 1)
        big_fill_s = load.wait_files(data / BUCKET / "bigfill", 1, t0, timeout=180)
    log(f"  fill of {big} stored after {big_fill_s}s, peak RSS {big_fill_rss.peak_kib / 1024:.1f} MiB")
    with load.RssSampler(cosedge.pid) as serve_rss:
        size, seconds = load.download(ports["cosedge"], "/bigfill/1g.bin", timeout=120)
    log(f"  served {size} bytes in {seconds:.2f}s, peak RSS {serve_rss.peak_kib / 1024:.1f} MiB")
    limit = 64 * 1024
    rows.append(
        Row(
            "cosedge RSS",
            "MiB",
            {"cosedge": idle_kib / 1024},
            fmt="{:.1f}",
            higher_is_better=False,
            note="idle, after warm-up",
        )
    )
    for label, peak in (
        (f"RSS growth, {n_fill} fills", fill_rss.peak_kib),
        (f"RSS growth, filling {big}", big_fill_rss.peak_kib),
        (f"RSS growth, serving {big}", serve_rss.peak_kib),
    ):
        growth = (peak - idle_kib) / 1024
        rows.append(
            Row(
                label,
                "MiB",
                {"cosedge": growth},
                fmt="{:.1f}",
                higher_is_better=False,
                target="≤ 64 MiB",
                met=peak - idle_kib <= limit,
                note=f"peak {peak / 1024:.1f} MiB",
            )
        )
    rows.append(
        Row(
            f"{big}, 1 stream (hit)",
            "GB/s",
            {"cosedge": size / seconds / 1e9},
            fmt="{:.2f}",
        )
    )
    servers.stop(cosedge, grace=15)
    return rows


def table(rows: list[Row]) -> str:
    head = "| workload | metric | cosedge | nginx | static.File | cosedge÷nginx | cosedge÷static | target | met |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        met = "" if r.met is None else ("**met**" if r.met else "not met")
        target = r.target + (f" ({r.note})" if r.note else "")
        metric = r.metric if r.higher_is_better else f"{r.metric} ↓"
        lines.append(
            f"| {r.workload} | {metric} | {r.cell('cosedge')} | {r.cell('nginx')} | {r.cell('static')} "
            f"| {r.ratio('nginx')} | {r.ratio('static')} | {target} | {met} |"
        )
    return "\n".join(lines)


def report(rows: list[Row], info: dict[str, str], args: argparse.Namespace, elapsed: float) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            f"Run {now} with `bash bench/run{' ' + ' '.join(args.argv) if args.argv else ''}` in {elapsed:.0f} s.",
            "",
            f"Code: {info['code']}.  ",
            f"Machine: {info['cpu']}, Linux {info['kernel']}, load average {info['loadavg']} at the start.  ",
            f"Versions: Python {info['python']}, Twisted {info['twisted']}, {info['nginx']}, "
            f"{info['wrk']}, {info['curl']}"
            + (f", {info['aria2c']}" if "migration" in (args.only or WORKLOADS) else "")
            + ".  ",
            f"Settings: {args.seconds:g} s per wrk run, best of {args.rounds} rounds for hits, "
            f"median of {STREAM_TRIES} for single streams, 32 connections, "
            f"2 wrk threads; nginx with worker_processes {args.workers}; cosedge with workers = {args.workers},"
            f' access_log = "" and {args.fills} parallel fills per process.',
            *(
                [
                    f"Mirror rows: a second cosedge whose bucket has one mirror rule; {mirror.CONNECTIONS} keep-alive"
                    f" connections for the misses; the herd's object comes from the origin at {args.herd_rate}/s per"
                    " connection (nginx limit_rate, a remote origin); every answer checked byte for byte.",
                ]
                if "mirror" in (args.only or WORKLOADS)
                else []
            ),
            "",
            *([table(rows), ""] if rows else []),
            *getattr(args, "sections", []),
        ]
    )


def write_benchmarks(path: Path, section: str) -> None:
    """Replace the results section of BENCHMARKS.md, keeping everything else."""
    block = f"{_START}\n{section}\n{_END}"
    if path.exists():
        text = path.read_text()
        if _START in text and _END in text:
            before, rest = text.split(_START, 1)
            _, after = rest.split(_END, 1)
            path.write_text(before + block + after)
            return
        path.write_text(text.rstrip() + "\n\n## Latest results\n\n" + block + "\n")
        return
    path.write_text("# Benchmarks\n\n## Latest results\n\n" + block + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="bash bench/run", description=__doc__)
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each wrk run (default 6)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per hit workload; the best counts (default 2)")
    parser.add_argument("--fill-objects", type=int, default=2000, help="distinct objects to fill (default 2000)")
    parser.add_argument("--fills", type=int, default=64, help="cosedge's fill.max_concurrent (default 64)")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes of cosedge (server.workers) and of the nginx peer (worker_processes); default: one per CPU",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short smoke run: 64 MiB instead of 1 GiB, 2 s runs, 500 fills, a 10 MiB mirror herd, "
        "2,000 keys and 20,000 requests for the migration workloads",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary work dir")
    parser.add_argument(
        "--only",
        action="append",
        choices=WORKLOADS,
        help="run only this group of workloads (repeatable): core (hits, streams, misses, fills, RSS), "
        "mirror (issue 11's mirror mode against nginx proxy_store), migration (issue 14's backfill against "
        "aria2c, and a Zipf replay, backfill and verify against nginx proxy_store) or stream (issue 15: one "
        "256 MiB stream read by the lean client, curl and wrk -c1, and CPU seconds per GB); a selection writes "
        "no file unless --out is given",
    )
    parser.add_argument(
        "--herd-rate",
        default="20m",
        help="the origin's pace per connection for the mirror herd's object, as nginx's limit_rate (default 20m)",
    )
    parser.add_argument(
        "--job-concurrency",
        type=int,
        default=4,
        help="cosedge's [jobs] max_concurrent and aria2c's -j for the migration workloads (default 4, cosedge's own)",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="stream: also run cosedge at this git revision in the same rounds (a before-and-after)",
    )
    parser.add_argument("--out", help="where to write the results (default BENCHMARKS.md)")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    args.argv = argv
    args.sections = []
    if args.out is None and args.only:
        args.no_write = True  # a partial table must not replace the full one in BENCHMARKS.md
    out = Path(args.out or REPO / "BENCHMARKS.md")
    if args.quick:
        args.seconds, args.rounds, args.fill_objects = min(args.seconds, 2.0), 1, min(args.fill_objects, 500)
    tools = ["nginx", "wrk", "curl"]
    if "migration" in (args.only or WORKLOADS):
        tools += ["aria2c", "ssh", "ssh-keygen"]
    for tool in tools:
        if shutil.which(tool) is None:
            print(f"bench: {tool} is missing; run `bash bench/run`, which installs it", file=sys.stderr)
            return 2
    servers.install_cleanup()
    signal.alarm(900)  # the whole run is bounded: 15 minutes at most
    info = versions()
    started = time.monotonic()
    rows = run(args)
    section = report(rows, info, args, time.monotonic() - started)
    servers.stop_all()
    print(section)
    if not args.no_write:
        write_benchmarks(out, section)
        log(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
