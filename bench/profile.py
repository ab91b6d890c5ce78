"""
``python -m bench.profile``: where cosedge's time goes.

Starts an origin and cosedge on 127.0.0.1 as the benchmark does, drives one
workload at a time with wrk (or curl for the large object) and samples
cosedge with ``py-spy record --format raw`` meanwhile; prints, per workload,
the functions with the most samples on the stack (inclusive) and at the top
of the stack (self).  ``bash bench/profile`` installs py-spy first.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from . import load, servers
from .__main__ import MiB, generate, link_tree, log
from .servers import BUCKET, VENV_BIN

RATE = 250
#: Distinct 16 KiB objects per round of the fill workload (the benchmark's fill row).
FILL_BATCH = 2000
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m.group("file")
    for marker in ("site-packages/", "lib/python3", "/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{m.group('func')} ({path})"


_IDLE_LEAVES = ("Condition.wait", "Queue.get", "Event.wait")


def summarise(raw: Path, top: int, seconds: float, rate: int) -> str:
    """
    Per thread kind (the reactor's thread; the thread pool), the share of
    samples per function, inclusive and self, from py-spy's collapsed stacks.
    py-spy leaves out idle threads (epoll_wait, lock waits), so the reactor
    thread's sample count against ``seconds * rate`` is how busy it was.
    """
    inclusive: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    own: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    totals: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";") if f]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames or frames[-1].startswith(_IDLE_LEAVES):
            continue
        kind = "reactor thread" if any(f.startswith("ReactorBase.run ") for f in frames) else "thread pool"
        totals[kind] += count
        for f in set(frames):
            inclusive[kind][f] += count
        own[kind][frames[-1]] += count
    out = []
    possible = seconds * rate
    for kind in ("reactor thread", "thread pool"):
        total = totals[kind]
        if not total:
            continue
        out.append(f"{kind}: {total} samples, busy {100 * total / possible:.0f}% of the {seconds:g} s")
        out.append("  inclusive (share of this thread's samples):")
        skip = ("run (", "runApp", "ApplicationRunner", "<module>", "runReactorWithLogging", "UnixApplicationRunner")
        ranked = [(f, c) for f, c in inclusive[kind].most_common() if not f.startswith(skip)]
        out += [f"    {100 * c / total:5.1f}%  {f}" for f, c in ranked[:top]]
        out.append("  self:")
        out += [f"    {100 * c / total:5.1f}%  {f}" for f, c in own[kind].most_common(top)]
    return "\n".join(out) + "\n" if out else "(no samples)\n"


def profile(pid: int, seconds: int, out: Path, drive: threading.Thread) -> None:
    """Sample ``pid`` with py-spy while ``drive`` runs."""
    spy = subprocess.Popen(
        [
            str(VENV_BIN / "py-spy"),
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(seconds),
            "--rate",
            str(RATE),
            "--threads",
            "--format",
            "raw",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    drive.start()
    drive.join(seconds + 60)
    try:
        _, err = spy.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        spy.send_signal(signal.SIGINT)
        _, err = spy.communicate(timeout=10)
    if spy.returncode:
        raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bash bench/profile", description=__doc__)
    parser.add_argument("--seconds", type=int, default=8, help="sampling time per workload (default 8)")
    parser.add_argument("--top", type=int, default=25, help="functions listed per table (default 25)")
    parser.add_argument("--only", default="", help="comma-separated workloads: hit1k,hit100k,miss,big,fill")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (raw py-spy files)")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None or not (VENV_BIN / "py-spy").exists():
        print("bench.profile: needs wrk and py-spy; run `bash bench/profile`", file=sys.stderr)
        return 2
    servers.install_cleanup()
    signal.alarm(600)
    work = Path(tempfile.mkdtemp(prefix="cosedge-profile-"))
    if not args.keep:
        import atexit

        # Registered after servers.install_cleanup, so it runs first: stop
        # the servers, then remove their files.
        atexit.register(lambda: (servers.stop_all(), shutil.rmtree(work, True)))
    gen = work / "gen"
    generate(gen, with_gib=False)
    data = work / "data"
    link_tree(gen / "hit", data / BUCKET / "hit")
    origin_port, port = servers.free_port(), servers.free_port()
    servers.start_origin(work, gen, origin_port)
    secs = args.seconds

    def wrk_thread(path: str, distinct: str | None = None) -> threading.Thread:
        return threading.Thread(target=load.wrk, args=(work, port, path, secs), kwargs={"distinct_prefix": distinct})

    def big_thread() -> threading.Thread:
        def run() -> None:
            import time

            deadline = time.monotonic() + secs
            while time.monotonic() < deadline:
                load.download(port, "/hit/256m.bin")

        return threading.Thread(target=run)

    def fill_thread() -> threading.Thread:
        def run() -> None:
            import time

            deadline, batch = time.monotonic() + secs, 0
            while time.monotonic() < deadline:
                batch += 1
                paths = [f"/fill/p{batch}/{i}.bin" for i in range(FILL_BATCH)]
                since = time.monotonic()
                load.parallel_get(work, port, paths)
                load.wait_files(data / BUCKET / "fill" / f"p{batch}", FILL_BATCH, since, timeout=60)

        return threading.Thread(target=run)

    workloads = {
        "hit1k": ("1 KiB hits, wrk -c32", lambda: wrk_thread("/hit/1k.bin")),
        "hit100k": ("100 KiB hits, wrk -c32", lambda: wrk_thread("/hit/100k.bin")),
        "miss": ("misses on distinct keys (302 + 16 KiB fills), wrk -c32", lambda: wrk_thread("/", "/miss/p-")),
        "big": (f"256 MiB hits, one curl stream at a time ({256 * MiB} bytes)", big_thread),
        "fill": (f"{FILL_BATCH} distinct 16 KiB fills until stored, again and again (curl, 32 at a time)", fill_thread),
    }
    chosen = [w for w in args.only.split(",") if w] or list(workloads)
    for name in chosen:
        title, make = workloads[name]
        proc = servers.start_cosedge(work, data, port, origin_port, name=f"cosedge-{name}")
        load.stream(port, "/hit/1k.bin")
        raw = work / f"{name}.txt"
        log(f"profiling {title} for {secs}s")
        profile(proc.pid, secs, raw, make())
        servers.stop(proc, grace=15)
        print(f"## {title}\n\n```\n{summarise(raw, args.top, secs, RATE)}```\n", flush=True)
    servers.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
