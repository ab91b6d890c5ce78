"""
``python -m bench.tls_fill``: the throughput of one big fill (256 MiB by
default) through the real daemon, from a plain HTTP origin and from an
HTTPS origin (a certificate from a CA made at run time, trusted through a
rule's ``ca_file``), both on 127.0.0.1, in one run.  Issue 11's target:
HTTPS at least 0.5x plain HTTP on loopback.

Both origins are the same Python server (:class:`tests.tlsca.LoopbackOrigin`)
in threads of this process, one with TLS; one daemon has a rule for each
(``plain/`` keys from the HTTP origin, ``tls/`` keys from the HTTPS one).
Each try asks a missing key (a proxy rule: 302 and a background fill),
waits (bounded) for the fill's log line and checks the stored file's bytes.
The figure is the daemon's own fill time (first request to the origin until
the object is committed, fsync included); the wall time from the client's
request until the file is visible is shown beside it.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.tlsca import CA, LoopbackOrigin

from . import servers
from .servers import BUCKET, BUCKET_HOST, HOST, VENV_BIN

MiB = 1024 * 1024
TARGET = 0.5

_CONFIG = """\
[server]
listen = ["tcp:{port}:interface={host}"]
domains = ["{domain}"]
data_dir = "{data}"
access_log = ""

[fill]
max_concurrent = 4
header_timeout = 30
idle_timeout = 30
total_timeout = 600

[[buckets."{bucket}".rules]]
priority = 1
type = "proxy"
prefix = "plain/"
hosts = ["{plain}"]
protocol = "http"

[[buckets."{bucket}".rules]]
priority = 2
type = "proxy"
prefix = "tls/"
hosts = ["{tls}"]
protocol = "https"
ca_file = "{ca_file}"
"""


def start_daemon(workdir: Path, plain: LoopbackOrigin, tls: LoopbackOrigin, ca_file: Path) -> tuple[int, Path]:
    """cosedge under twistd with the two rules; its port and log file."""
    port = servers.free_port()
    config = workdir / "cosedge.toml"
    config.write_text(
        _CONFIG.format(
            port=port,
            host=HOST,
            domain=servers.DOMAIN,
            data=workdir / "data",
            bucket=BUCKET,
            plain=plain.netloc,
            tls=tls.netloc,
            ca_file=ca_file,
        )
    )
    log = workdir / "cosedge.log"
    proc = servers.spawn([str(VENV_BIN / "twistd"), "-n", "--pidfile=", "cosedge", "--config", str(config)], log)
    servers.wait_http(port, proc=proc)
    return port, log


def fill(port: int, log: Path, workdir: Path, key: str, digest: bytes, timeout: float) -> tuple[float, float]:
    """Fill ``key`` (bounded by ``timeout``); (the daemon's fill seconds, wall seconds until the file is there)."""
    since = len(log.read_bytes())
    started = time.monotonic()
    client = http.client.HTTPConnection(HOST, port, timeout=30)
    client.request("GET", f"/{key}", headers={"Host": BUCKET_HOST})
    status = client.getresponse().status
    client.close()
    if status != 302:
        raise RuntimeError(f"GET /{key}: {status}, expected a 302 (a miss)")
    line = re.compile(rf"fill {BUCKET}/{re.escape(key)} (stored: \d+ bytes in ([\d.]+)s|failed: .*)")
    stored = workdir / "data" / BUCKET / key
    while True:
        match = line.search(log.read_text("utf-8", "replace")[since:])
        if match is not None and stored.exists():
            wall = time.monotonic() - started
            break
        if match is not None and match.group(2) is None:
            raise RuntimeError(f"the fill of {key} {match.group(1)}")
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"the fill of {key} did not end within {timeout}s; see {log}")
        time.sleep(0.005)
    with stored.open("rb") as f:
        if hashlib.file_digest(f, "sha256").digest() != digest:
            raise RuntimeError(f"{stored}: not the origin's bytes")
    stored.unlink()  # room for the next try
    return float(match.group(2)), wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tls_fill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="object size in MiB (default 256)")
    parser.add_argument("--tries", type=int, default=5, help="fills per scheme, alternating; the median counts")
    parser.add_argument("--timeout", type=float, default=300.0, help="bound on each fill, in seconds")
    args = parser.parse_args(argv)
    servers.install_cleanup()
    size = args.size * MiB
    body = os.urandom(size)  # incompressible
    digest = hashlib.sha256(body).digest()
    ca = CA.make()
    with tempfile.TemporaryDirectory(prefix="cosedge-tls-bench-") as tmp:
        workdir = Path(tmp)
        ca_file = workdir / "ca.pem"
        ca_file.write_bytes(ca.pem)
        with (
            LoopbackOrigin(lambda path: body, None) as plain,
            LoopbackOrigin(lambda path: body, ca.issue(["127.0.0.1"])) as tls,
        ):
            port, log = start_daemon(workdir, plain, tls, ca_file)
            seconds: dict[str, list[float]] = {"plain": [], "tls": []}
            try:
                for scheme in seconds:  # a first fill of each, not counted: connections, caches, allocator
                    fill(port, log, workdir, f"{scheme}/warm-up.bin", digest, args.timeout)
                for i in range(args.tries):
                    for scheme in ("plain", "tls") if i % 2 == 0 else ("tls", "plain"):
                        took, wall = fill(port, log, workdir, f"{scheme}/big-{i}.bin", digest, args.timeout)
                        seconds[scheme].append(took)
                        rate = size / MiB / took
                        print(f"{scheme:>5} try {i + 1}: fill {took:.2f}s ({rate:.0f} MiB/s), wall {wall:.2f}s")
            finally:
                servers.stop_all()
    rate = {scheme: size / MiB / statistics.median(s) for scheme, s in seconds.items()}
    ratio = rate["tls"] / rate["plain"]
    print(f"one {args.size} MiB fill on loopback, median of {args.tries}:")
    print(f"  HTTP origin   {rate['plain']:7.0f} MiB/s")
    print(f"  HTTPS origin  {rate['tls']:7.0f} MiB/s")
    print(f"  HTTPS / HTTP  {ratio:7.2f}  (target >= {TARGET}: {'met' if ratio >= TARGET else 'NOT met'})")
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
