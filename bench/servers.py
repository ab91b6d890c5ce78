"""
Starting and stopping the servers under test, all on 127.0.0.1.

Every process is started in its own session and remembered; :func:`stop_all`
(run at exit and on SIGINT/SIGTERM) kills each one's process group, so the
benchmark never leaves a server behind.
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HOST = "127.0.0.1"
BUCKET = "bench-1250000000"
DOMAIN = "file.myqcloud.com"
BUCKET_HOST = f"{BUCKET}.{DOMAIN}"
REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"

_started: list[subprocess.Popen[bytes]] = []


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def spawn(
    argv: Sequence[str], log: Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a process in its own session, output to ``log`` (``env``: added to ours); remembered for stop_all."""
    out = open(log, "ab")
    proc = subprocess.Popen(
        list(argv),
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
        start_new_session=True,
        env={**os.environ, **env} if env else None,
    )
    out.close()
    _started.append(proc)
    return proc


def stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the process group, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(2)
    except subprocess.TimeoutExpired:
        pass
    if proc in _started:
        _started.remove(proc)


def stop_all() -> None:
    for proc in list(_started):
        stop(proc, grace=2.0)


def install_cleanup() -> None:
    """Kill every started process at exit, on SIGINT/SIGTERM/SIGHUP, and after a global deadline."""
    import atexit

    atexit.register(stop_all)

    def bail(signum: int, frame: object) -> None:
        # Unwind normally, so that atexit stops the servers and removes the
        # temporary files too.
        signal.signal(signum, signal.SIG_DFL)
        print(f"bench: stopped by signal {signum}", file=sys.stderr)
        raise SystemExit(128 + signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
        signal.signal(sig, bail)


def wait_http(port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something answers HTTP on ``port``; raise if not within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {proc.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=1) as s:
                s.sendall(b"HEAD / HTTP/1.0\r\nHost: " + BUCKET_HOST.encode() + b"\r\n\r\n")
                if s.recv(16).startswith(b"HTTP/"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"nothing answered on {HOST}:{port} within {timeout}s")


_NGINX_MAIN = """\
daemon off;
{user}master_process {master};
worker_processes {workers};
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    client_body_temp_path {tmp}/client;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    log_format bench '$request_method $request_uri $status $body_bytes_sent';
{body}
}}
"""


def _nginx(name: str, workdir: Path, body: str, workers: int = 1) -> subprocess.Popen[bytes]:
    tmp = workdir / name
    tmp.mkdir(parents=True, exist_ok=True)
    conf = tmp / "nginx.conf"
    master = "on" if workers > 1 else "off"
    # A master process started as root would run its workers as "nobody",
    # who cannot read the benchmark's files: keep them as the current user.
    user = f"user {pwd.getpwuid(os.getuid()).pw_name};\n" if workers > 1 and os.getuid() == 0 else ""
    conf.write_text(_NGINX_MAIN.format(tmp=tmp, body=body, workers=workers, master=master, user=user))
    return spawn(["nginx", "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log")], tmp / "stdout.log")


def start_origin(workdir: Path, gen: Path, port: int, herd_rate: str = "20m") -> tuple[subprocess.Popen[bytes], Path]:
    """
    The origin: nginx serving ``gen``.  Any key under /miss/, /fill/, /mirror/
    is the 16 KiB object, /cold/ is a 1 MiB object sent at 20 MB/s (a remote
    origin), /bigfill/ is the 1 GiB object, /herd/ the mirror herd's object
    (``herd.bin``) sent at ``herd_rate`` per connection (nginx's
    ``limit_rate``: "20m" is 20 MiB/s).  Its access log counts origin GETs.
    """
    access = workdir / "origin" / "access.log"
    body = f"""
    server {{
        listen {HOST}:{port};
        root {gen};
        access_log {access} bench;
        location / {{ }}
        location /miss/ {{ try_files /obj16k.bin =404; }}
        location /fill/ {{ try_files /obj16k.bin =404; }}
        location /cold/ {{ limit_rate 20m; try_files /obj1m.bin =404; }}
        location /bigfill/ {{ try_files /hit/1g.bin =404; }}
        location /mirror/ {{ try_files /obj16k.bin =404; }}
        location /herd/ {{ limit_rate {herd_rate}; try_files /herd.bin =404; }}
    }}"""
    proc = _nginx("origin", workdir, body)
    wait_http(port, proc=proc)
    return proc, access


def start_peer(
    workdir: Path, root: Path, port: int, origin_port: int, workers: int = 1, mark_fetched: bool = False
) -> subprocess.Popen[bytes]:
    """
    nginx mirror-on-demand: serve from ``root``, else proxy to the origin and
    store the copy.  With ``mark_fetched``, proxied answers carry
    ``x-bench-fetched: origin`` (those served from ``root`` do not).
    """
    mark = "add_header x-bench-fetched origin always;" if mark_fetched else ""
    body = f"""
    upstream origin {{ server {HOST}:{origin_port}; keepalive 64; }}
    server {{
        listen {HOST}:{port};
        root {root};
        access_log off;
        location / {{ try_files $uri @fetch; }}
        location @fetch {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host {HOST}:{origin_port};
            proxy_store on;
            proxy_store_access user:rw group:rw all:r;
            {mark}
        }}
    }}"""
    proc = _nginx("peer", workdir, body, workers)
    wait_http(port, proc=proc)
    return proc


def start_static(workdir: Path, root: Path, port: int) -> subprocess.Popen[bytes]:
    """Bare Twisted static.File (``twistd web --path``), no access log."""
    log = workdir / "static.log"
    proc = spawn(
        [
            str(VENV_BIN / "twistd"),
            "-n",
            "--pidfile=",
            "web",
            "--path",
            str(root),
            "--listen",
            f"tcp:{port}:interface={HOST}",
        ],
        log,
        cwd=workdir,
    )
    wait_http(port, proc=proc)
    return proc


_COSEDGE_CONFIG = """\
[server]
listen = ["tcp:{port}:interface={host}"]
domains = ["{domain}"]
data_dir = "{data}"
access_log = ""
request_timeout = 60
workers = {workers}

[fill]
max_concurrent = {fills}
max_queue = 100000
not_found_ttl = 10
retry_backoff = 5

[buckets."{bucket}"]
origin = "{host}:{origin_port}"
origin_pull = true
"""


def mirror_rule(origin_port: int) -> str:
    """The bucket's one rule: mirror mode, every key, from the origin (it takes over from ``origin``)."""
    return f"""
[[buckets."{BUCKET}".rules]]
priority = 1
type = "mirror"
hosts = ["{HOST}:{origin_port}"]
"""


_NO_SENDFILE = (
    "import sys, cosedge.web.sendfile as s; s.SENDFILE_MIN = 1 << 62; "
    "from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
)


def start_cosedge(
    workdir: Path,
    data: Path,
    port: int,
    origin_port: int,
    fills: int = 64,
    name: str = "cosedge",
    sendfile: bool = True,
    workers: int = 1,
    extra: str = "",
    code: Path | None = None,
) -> subprocess.Popen[bytes]:
    """
    cosedge under twistd, no access log, a big fill concurrency.  With
    ``sendfile=False`` every body takes the plain read-and-write path (to
    compare, in the same run).  ``extra`` is appended to the configuration
    (e.g. :func:`mirror_rule`).  ``code``: a folder with another version's
    ``cosedge`` and ``twisted/plugins`` (``--baseline``), run instead of this one.
    """
    config = workdir / f"{name}.toml"
    config.write_text(
        _COSEDGE_CONFIG.format(
            port=port,
            host=HOST,
            domain=DOMAIN,
            data=data,
            fills=fills,
            bucket=BUCKET,
            origin_port=origin_port,
            workers=workers,
        )
        + extra
    )
    twistd = [str(VENV_BIN / "twistd")] if sendfile else [str(VENV_BIN / "python"), "-c", _NO_SENDFILE]
    proc = spawn(
        [*twistd, "-n", "--pidfile=", "cosedge", "--config", str(config)],
        workdir / f"{name}.log",
        cwd=workdir,
        env={"PYTHONPATH": str(code)} if code is not None else None,
    )
    wait_http(port, proc=proc)
    # With workers, the primary answers first; "ready" comes once every process serves.
    log = workdir / f"{name}.log"
    deadline = time.monotonic() + 30
    while "cosedge ready" not in log.read_text("utf-8", "replace"):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"cosedge did not become ready; see {log}")
        time.sleep(0.05)
    return proc
