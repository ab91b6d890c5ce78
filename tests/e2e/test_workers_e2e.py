"""
End-to-end: ``[server] workers = 2`` — the real daemon as a primary and a
worker process on one port, against the real misbehaving origin.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from ..tlsca import CA
from .conftest import FAST_FILL, Daemon, Reply, at_once, free_port, raw_request, tmp_files, wait_for
from .origin import MisbehavingOrigin, body_for

pytestmark = pytest.mark.e2e


def worker_pids(daemon: Daemon) -> list[int]:
    """The daemon's worker processes (children running cosedge.worker)."""
    assert daemon.proc is not None
    out = subprocess.run(
        ["ps", "-o", "pid=,args=", "--ppid", str(daemon.proc.pid)], capture_output=True, text=True, check=False
    ).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "cosedge.worker" in line]


def process_of(reply: Reply) -> str:
    """Which process answered: request ids start with a per-process prefix."""
    request_id = reply.header("x-cos-request-id")
    assert request_id
    return request_id.split("-")[0]


def answering_processes(daemon: Daemon, target: str, connections: int = 60) -> dict[str, list[Reply]]:
    """Ask over many connections at once; the replies grouped by the process that sent them."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        replies = list(pool.map(lambda _: daemon.request(target), range(connections), timeout=60))
    by_process: dict[str, list[Reply]] = {}
    for reply in replies:
        by_process.setdefault(process_of(reply), []).append(reply)
    return by_process


@pytest.fixture
def pair(tmp_path_factory: pytest.TempPathFactory, origin: MisbehavingOrigin) -> Iterator[Daemon]:
    """A daemon with two processes and an [admin] listener (stopped at the end)."""
    admin_port = free_port()
    daemon = Daemon(tmp_path_factory.mktemp("cosedge"), origin.netloc, dict(FAST_FILL), workers=2)
    daemon.extra_config = f'\n[admin]\nlisten = "tcp:{admin_port}:interface=127.0.0.1"\nmin_free_bytes = 0\n'
    daemon.start()
    daemon.wait_for_log(r"worker 1 \(pid \d+\) serving")
    yield daemon
    code = daemon.stop()
    assert code == 0
    assert daemon.problems() == [], "the daemon logged an unexpected error"


def test_two_processes_share_the_port(pair: Daemon) -> None:
    """
    With workers = 2, connections to the one configured port are answered
    by two processes (the primary and its worker), both serving the bucket.
    """
    key = pair.object_path("shared/hit.txt")
    key.parent.mkdir(parents=True)
    key.write_bytes(b"served by every process\n")
    assert len(worker_pids(pair)) == 1
    log = pair.log()
    assert log.index("cosedge ready") > log.index("worker 1 (pid"), "ready before the worker served"
    by_process = answering_processes(pair, "/shared/hit.txt")
    assert len(by_process) == 2, f"answered by {sorted(by_process)}"
    for replies in by_process.values():
        assert {r.status for r in replies} == {200}
        assert {r.body for r in replies} == {b"served by every process\n"}


def test_concurrent_misses_across_processes_make_one_origin_request(pair: Daemon, origin: MisbehavingOrigin) -> None:
    """
    Clients asking for the same missing object at once, whichever process
    they reach, all get the 302, and the origin is asked for it exactly once.
    """
    key = "slow/workers-concurrent.bin"
    try:
        replies = at_once(pair, f"/{key}", 100)
    finally:
        origin.release(f"/{key}")
    assert {r.status for r in replies} == {302}
    assert len({process_of(r) for r in replies}) == 2, "every client reached the same process"
    assert pair.fill_outcome(key) == "stored"
    wait_for(pair.object_path(key).exists, 10, "the object to be stored")
    time.sleep(0.5)  # a duplicate fill, if any, would have asked the origin by now
    assert origin.gets(f"/{key}") == 1
    assert pair.object_path(key).read_bytes() == body_for(f"/{key}")


def test_a_live_change_reaches_every_process(pair: Daemon, origin: MisbehavingOrigin) -> None:
    """
    A bucket added to the file and applied with SIGHUP (a live change) is
    served at once by every process, not only by the one that reloaded.
    """
    assert pair.proc is not None
    head = b"GET /ok/late.txt HTTP/1.1\r\nHost: late-1250000000.file.myqcloud.com\r\nConnection: close\r\n\r\n"

    def ask(connections: int) -> list[Reply]:
        with ThreadPoolExecutor(max_workers=8) as pool:
            return list(pool.map(lambda _: raw_request(pair.port, head), range(connections), timeout=60))

    before = ask(20)
    assert {r.error_code for r in before} == {"NoSuchBucket"}
    pair.buckets["late-1250000000"] = (origin.netloc, True)
    pair.write_config()
    pair.proc.send_signal(signal.SIGHUP)
    pair.wait_for_log(r"configuration reloaded .* 1 change")
    after = ask(40)
    assert len({process_of(r) for r in after}) == 2, "every client reached the same process"
    assert {r.status for r in after} <= {302, 200}, {r.error_code for r in after}


def test_a_killed_worker_is_started_again(pair: Daemon) -> None:
    """A worker that dies (SIGKILL) is replaced within seconds and the port keeps answering."""
    (old,) = worker_pids(pair)
    os.kill(old, signal.SIGKILL)
    pair.wait_for_log(rf"worker 1 \(pid {old}\) exited")
    wait_for(lambda: len(worker_pids(pair)) == 1 and worker_pids(pair) != [old], 10, "a new worker")
    pair.wait_for_log(rf"worker 1 \(pid (?!{old}\))\d+\) serving")
    pair.object_path("after-restart.txt").parent.mkdir(parents=True, exist_ok=True)
    pair.object_path("after-restart.txt").write_bytes(b"still here\n")
    by_process = answering_processes(pair, "/after-restart.txt", connections=40)
    assert len(by_process) == 2
    assert {r.status for replies in by_process.values() for r in replies} == {200}


def test_counters_cover_every_process(pair: Daemon) -> None:
    """/metrics counts the hits of the worker as well as the primary's."""
    obj = pair.object_path("counted.txt")
    obj.parent.mkdir(parents=True, exist_ok=True)
    obj.write_bytes(b"count me\n")
    by_process = answering_processes(pair, "/counted.txt", connections=50)
    assert len(by_process) == 2
    port = re.search(r"tcp:(\d+):", pair.extra_config).group(1)  # type: ignore[union-attr]

    def hits() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        line = next(x for x in text.splitlines() if x.startswith("cosedge_hits_total "))
        return float(line.split()[1])

    wait_for(lambda: hits() == 50, 5, "50 hits counted over both processes")


def test_stop_ends_every_process_and_leaves_no_temporary_file(pair: Daemon, origin: MisbehavingOrigin) -> None:
    """
    SIGTERM to the primary stops the worker too (fills cancelled, exit 0),
    and no temporary file is left.
    """
    keys = [f"slow/stop-{n}.bin" for n in range(6)]  # 1 MiB each, held by the origin
    try:
        for key in keys:
            assert pair.request(f"/{key}").status == 302
        wait_for(lambda: len(tmp_files(pair)) >= 1, 10, "fills under way")
        workers = worker_pids(pair)
        assert pair.stop() == 0
    finally:
        for key in keys:
            origin.release(f"/{key}")
    for pid in workers:
        wait_for(_gone(pid), 5, f"worker {pid} to exit")
    assert tmp_files(pair) == []
    pair.start()  # the fixture stops it again


def test_workers_end_with_a_killed_primary(pair: Daemon) -> None:
    """
    A primary killed outright (SIGKILL, an OOM kill) leaves no orphan: its
    worker sees the pipe close and stops by itself, and the port is free.
    """
    workers = worker_pids(pair)
    assert workers
    pair.kill()
    for pid in workers:
        wait_for(_gone(pid), 10, f"worker {pid} to exit")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", pair.port))  # nobody listens there any more
    pair.start()  # the fixture stops it again
    pair.wait_for_log(r"worker 1 \(pid \d+\) serving")


def _gone(pid: int) -> Callable[[], bool]:
    return lambda: not _alive(pid)


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie waiting for a parent that is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_sighup_reopens_the_access_log_in_every_process(pair: Daemon) -> None:
    """
    logrotate's postrotate (SIGHUP to the primary) makes every process write
    its access-log lines to a new file by the configured name.
    """
    assert pair.proc is not None
    obj = pair.object_path("logged.txt")
    obj.parent.mkdir(parents=True, exist_ok=True)
    obj.write_bytes(b"log me\n")
    answering_processes(pair, "/logged.txt", connections=10)
    rotated = pair.access_log.with_name("access.log.1")
    pair.access_log.rename(rotated)
    pair.proc.send_signal(signal.SIGHUP)
    pair.wait_for_log(r"configuration reloaded .* via sighup")
    time.sleep(0.5)  # the worker reopens when the primary's message reaches it
    by_process = answering_processes(pair, "/logged.txt?after", connections=40)
    assert len(by_process) == 2
    wait_for(
        lambda: pair.access_log.exists() and pair.access_log.read_text().count("/logged.txt?after") == 40,
        5,
        "all 40 lines in the new access log",
    )
    assert "/logged.txt?after" not in rotated.read_text()


def test_a_unix_listener_survives_a_worker_and_keeps_its_mode(
    tmp_path_factory: pytest.TempPathFactory, origin: MisbehavingOrigin
) -> None:
    """
    A unix: listener with mode=600 keeps that mode with two processes, and a
    worker that stops (SIGTERM) and is started again neither removes the
    socket path nor stops the port from answering.
    """
    root = tmp_path_factory.mktemp("cosedge")
    sock = root / "edge.sock"
    daemon = Daemon(root, origin.netloc, dict(FAST_FILL), workers=2, more_listen=(f"unix:{sock}:mode=600",))
    daemon.start()
    try:
        daemon.wait_for_log(r"worker 1 \(pid \d+\) serving")
        assert (sock.stat().st_mode & 0o777) == 0o600
        (old,) = worker_pids(daemon)
        os.kill(old, signal.SIGTERM)
        daemon.wait_for_log(rf"worker 1 \(pid (?!{old}\))\d+\) serving")
        assert sock.exists() and (sock.stat().st_mode & 0o777) == 0o600
        for _ in range(10):
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(str(sock))
                s.sendall(b"GET /u HTTP/1.1\r\nHost: example-1250000000.file.myqcloud.com\r\nConnection: close\r\n\r\n")
                assert s.recv(12) == b"HTTP/1.1 302"
        by_process = answering_processes(daemon, "/y", connections=20)  # and the TCP port
        assert {r.status for replies in by_process.values() for r in replies} == {302}
    finally:
        assert daemon.stop() == 0
    assert daemon.problems() == []
    assert not sock.exists()  # the primary removes it at the end


def test_a_killed_workers_temporary_files_are_removed(pair: Daemon, origin: MisbehavingOrigin) -> None:
    """
    A worker killed mid-fill (SIGKILL, an OOM kill) cannot remove its
    temporary files: the primary removes them when it sees the worker die,
    and leaves the primary's own fills alone.
    """
    keys = [f"slow/killed-{n}.bin" for n in range(8)]  # 1 MiB each, held by the origin
    try:
        for key in keys:
            assert pair.request(f"/{key}").status == 302
        (worker,) = worker_pids(pair)
        wait_for(lambda: any(n.startswith(f"{worker}.") for n in tmp_files(pair)), 10, "the worker's fills")
        wait_for(lambda: any(n.startswith(f"{pair.proc.pid}.") for n in tmp_files(pair)), 10, "the primary's fills")  # type: ignore[union-attr]
        os.kill(worker, signal.SIGKILL)
        pair.wait_for_log(r"worker 1: removed \d+ temporary file\(s\)")
        names = tmp_files(pair)
        assert not any(n.startswith(f"{worker}.") for n in names)
        assert any(n.startswith(f"{pair.proc.pid}.") for n in names)  # type: ignore[union-attr]
    finally:
        for key in keys:
            origin.release(f"/{key}")


def test_no_connection_waits_for_a_dead_workers_restart(pair: Daemon) -> None:
    """
    Right after a worker dies, new connections the kernel gives its socket
    are answered by the primary at once, not after the worker's restart
    (at least a second away).
    """
    obj = pair.object_path("quick.txt")
    obj.parent.mkdir(parents=True, exist_ok=True)
    obj.write_bytes(b"at once\n")
    (old,) = worker_pids(pair)
    os.kill(old, signal.SIGKILL)
    pair.wait_for_log(rf"worker 1 \(pid {old}\) exited")
    slowest = 0.0
    for _ in range(40):  # about half would go to the dead worker's socket
        started = time.monotonic()
        assert pair.request("/quick.txt").status == 200
        slowest = max(slowest, time.monotonic() - started)
    assert slowest < 0.9, f"a request waited {slowest:.2f}s"


def test_an_ssl_listener_is_tls_in_every_process(
    tmp_path_factory: pytest.TempPathFactory, origin: MisbehavingOrigin
) -> None:
    """
    An ``ssl:`` listener with two processes speaks TLS on every connection,
    whichever process accepts it: each of many TLS clients gets its answer,
    and a plain-text request to the TLS port never gets an HTTP answer
    (it used to from the worker, which took the shared socket as plain TCP).
    """
    root = tmp_path_factory.mktemp("cosedge")
    cert, key = CA.make().issue(["127.0.0.1"]).write(root, "edge")
    port = free_port()
    listen = f"ssl:{port}:privateKey={key}:certKey={cert}:interface=127.0.0.1"
    daemon = Daemon(root, origin.netloc, dict(FAST_FILL), workers=2, more_listen=(listen,))
    daemon.start()
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    request = b"GET /tls-x HTTP/1.1\r\nHost: example-1250000000.file.myqcloud.com\r\nConnection: close\r\n\r\n"
    try:
        daemon.wait_for_log(r"worker 1 \(pid \d+\) serving")

        def over_tls(_: int) -> str:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                with context.wrap_socket(raw) as s:
                    s.sendall(request)
                    head = s.recv(4096)
            assert head.startswith(b"HTTP/1.1 302"), head[:100]
            return head.lower().split(b"x-cos-request-id: ", 1)[1].split(b"-", 1)[0].decode()

        with ThreadPoolExecutor(max_workers=8) as pool:
            processes = set(pool.map(over_tls, range(40), timeout=60))
        assert len(processes) == 2, processes  # both processes took TLS connections
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(request)
                s.settimeout(2)
                try:
                    answer = s.recv(64)
                except (TimeoutError, ConnectionResetError):
                    answer = b""
            assert not answer.startswith(b"HTTP/"), answer
    finally:
        assert daemon.stop() == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_an_ssl_listener_refuses_connections_over_max_connections(
    tmp_path_factory: pytest.TempPathFactory, origin: MisbehavingOrigin, workers: int
) -> None:
    """
    With ``max_connections = 1`` per process and every process's one
    connection held, a further TLS client is closed before its handshake
    ends, and the daemon logs the refusal, not a traceback per connection
    (Twisted's TLS wrapper used to complete the handshake of a refused
    connection and then fail on it).
    """
    root = tmp_path_factory.mktemp("cosedge")
    cert, key = CA.make().issue(["127.0.0.1"]).write(root, "edge")
    port = free_port()
    listen = f"ssl:{port}:privateKey={key}:certKey={cert}:interface=127.0.0.1"
    daemon = Daemon(
        root, origin.netloc, dict(FAST_FILL), workers=workers, more_listen=(listen,), server_extra="max_connections = 1"
    )
    daemon.start()
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    held: list[ssl.SSLSocket] = []
    refused = 0
    try:
        if workers > 1:
            daemon.wait_for_log(r"worker 1 \(pid \d+\) serving")
        for _ in range(12):
            raw = socket.create_connection(("127.0.0.1", port), timeout=5)
            try:
                held.append(context.wrap_socket(raw))
            except (ssl.SSLError, OSError):
                raw.close()
                refused += 1
        assert 1 <= len(held) <= workers and refused == 12 - len(held)
        daemon.wait_for_log(r"max_connections \(1\) reached")
    finally:
        for s in held:
            s.close()
        assert daemon.stop() == 0
    assert "Traceback" not in daemon.log() and daemon.problems() == []
