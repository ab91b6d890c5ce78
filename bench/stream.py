"""
Big objects (issue 15): one 256 MiB hit over one connection, with three
clients that read differently — the lean Python client (``recv_into`` 4 MiB
at a time), ``curl`` and ``wrk -c1 -t1`` (downloads back to back on one
keep-alive connection for the run's length) — against the nginx peer, in
the same rounds; and the CPU seconds each server spends per GB it serves
(its processes' user + system time, read from ``/proc`` around each client
run).  Tries go round the servers; the median of the rounds counts.  With
``--baseline REV`` a cosedge of that git revision takes its turn in the same
rounds (its figures are in the notes): a before-and-after on a machine whose
speed moves by half from one minute to the next.
"""

from __future__ import annotations

import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import attrs

from . import load, servers

MiB = 1024 * 1024
SIZE = 256 * MiB
PATH = "/hit/256m.bin"
R = TypeVar("R")
CLIENTS = ("python", "curl", "wrk -c1")


@attrs.frozen
class Streamed:
    """Per server and client: GB/s of each round, and CPU seconds per GB served over all rounds."""

    gbps: dict[str, dict[str, list[float]]]
    cpu_per_gb: dict[str, dict[str, float]]


def _one(client: str, port: int, work: Path, seconds: float) -> tuple[int, float]:
    """Bytes served and seconds taken by one try of ``client``."""
    if client == "python":
        return load.download(port, PATH)
    if client == "curl":
        return load.stream(port, PATH)
    result = load.wrk(work, port, PATH, seconds, connections=1, threads=1)
    if result.errors:
        raise RuntimeError(f"wrk -c1 on port {port}: {result.errors} errors")
    return result.requests * SIZE, result.seconds


def measure(
    work: Path, pids: dict[str, int], ports: dict[str, int], rounds: int, seconds: float, say: Callable[[str], None]
) -> Streamed:
    """Every client against every server in ``ports`` (whose process is ``pids``), ``rounds`` times."""
    gbps: dict[str, dict[str, list[float]]] = {s: {c: [] for c in CLIENTS} for s in ports}
    served = {s: dict.fromkeys(CLIENTS, 0) for s in ports}
    cpu = {s: dict.fromkeys(CLIENTS, 0.0) for s in ports}
    for port in ports.values():  # warm: the file in the page cache, connections set up
        load.download(port, PATH)
    for i in range(rounds):
        for client in CLIENTS:
            for server, port in ports.items():
                before = load.cpu_seconds(pids[server])
                size, took = _one(client, port, work, seconds)
                cpu[server][client] += load.cpu_seconds(pids[server]) - before
                served[server][client] += size
                gbps[server][client].append(size / took / 1e9)
                say(f"  round {i + 1} {client:8s} {server:8s} {size / took / 1e9:.2f} GB/s")
    per_gb = {s: {c: cpu[s][c] / (served[s][c] / 1e9) for c in CLIENTS if served[s][c]} for s in ports}
    return Streamed(gbps, per_gb)


def rows(streamed: Streamed, row: Callable[..., R], baseline: str = "") -> list[R]:
    """
    The table's rows: GB/s per client (target ≥ 0.9× nginx), CPU seconds
    per GB (target ≤ 2× nginx); a ``baseline`` server's figures in the notes.
    """
    out: list[R] = []
    for client in CLIENTS:
        median = {s: statistics.median(streamed.gbps[s][client]) for s in streamed.gbps}
        spread = " ".join(f"{x:.2f}" for x in streamed.gbps["cosedge"][client])
        if "baseline" in median:
            spread += f"; {baseline}: {median.pop('baseline'):.2f} GB/s"
            spread += f" ({statistics.median(streamed.gbps['baseline'][client]) / median['nginx']:.2f}× nginx)"
        out.append(
            row(
                f"256 MiB, 1 stream, {client}",
                "GB/s",
                median,
                fmt="{:.2f}",
                target="≥ 0.9× nginx",
                met=median["cosedge"] >= 0.9 * median["nginx"],
                note=f"cosedge's rounds {spread}",
            )
        )
    for client in CLIENTS:
        per_gb = {s: streamed.cpu_per_gb[s].get(client) for s in streamed.cpu_per_gb}
        before = per_gb.pop("baseline", None)
        a, b = per_gb["cosedge"], per_gb["nginx"]
        out.append(
            row(
                f"256 MiB, 1 stream, {client}",
                "CPU s per GB",
                per_gb,
                fmt="{:.3f}",
                higher_is_better=False,
                target="≤ 2× nginx",
                met=None if a is None or b is None else a <= 2 * b,
                note=f"{baseline}: {before:.3f}" if before is not None else "",
            )
        )
    return out


def start(work: Path, data: Path, origin_port: int, workers: int, code: Path | None = None) -> tuple[int, int]:
    """A cosedge for the streams (its pid, its port); ``code``: another version's (see ``--baseline``)."""
    port = servers.free_port()
    name = "cosedge-stream" if code is None else "cosedge-baseline"
    proc = servers.start_cosedge(work, data, port, origin_port, name=name, workers=workers, code=code)
    return proc.pid, port


def baseline_code(work: Path, revision: str) -> Path:
    """The ``cosedge`` and ``twisted/plugins`` folders of ``revision`` (a git revision), in a folder of ``work``."""
    folder = work / "baseline"
    folder.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(servers.REPO), "archive", revision, "cosedge", "twisted"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder
