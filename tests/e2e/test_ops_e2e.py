"""
Operations, end to end: the real daemon started with the systemd unit's own
command line tells a fake service manager READY=1 once it accepts
connections and STOPPING=1 on SIGTERM; logs carry journal priorities;
/metrics moves with real hits, misses and fills; /readyz turns 503 when the
data directory cannot be written; SIGTERM mid-fill exits 0 and leaves no
temporary file; the socket-activation drop-in serves on a socket it was
handed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import (
    FAST_FILL,
    START_TIMEOUT,
    Daemon,
    _daemons_in_test,
    free_port,
    raw_request,
    tmp_files,
    wait_for,
)
from .origin import MisbehavingOrigin, body_for

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
INSTALLED_BIN = "/opt/cosedge/bin/"
INSTALLED_CONFIG = "/etc/cosedge/cosedge.toml"


def unit_exec_start(path: Path) -> list[str]:
    """The last ExecStart= of a unit file or drop-in, as an argument list."""
    lines = [line.partition("=")[2] for line in path.read_text().splitlines() if line.startswith("ExecStart=")]
    assert lines and lines[-1], f"no ExecStart in {path}"
    return lines[-1].split()


#: What systemd does before it runs a socket-activated service: the
#: listening socket at fd 3 and LISTEN_PID naming the service's own pid
#: (which only the process itself knows, hence exec in place).
_ACTIVATE = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


@attrs.define(eq=False)
class OpsDaemon(Daemon):
    """
    A daemon started with the systemd unit's ExecStart (paths adjusted to
    this checkout), with an [admin] listener, an environment of its own and
    a fake service manager: the datagram socket its NOTIFY_SOCKET names.
    """

    unit_file: Path = REPO / "etc" / "cosedge.service"
    admin_port: int = attrs.field(factory=free_port)
    #: Another [admin] listen endpoint than tcp:<admin_port> ("{root}": the daemon's directory).
    admin_listen: str | None = None
    env: dict[str, str] = attrs.field(factory=dict)
    pass_fds: tuple[int, ...] = ()
    #: Hand this inherited descriptor over as systemd does (fd 3, LISTEN_PID).
    activate_fd: int | None = None
    #: Another --logger than the unit's.
    logger: str | None = None
    manager: socket.socket | None = None
    #: The READY=1 message of the last start().
    ready: str = ""

    def write_config(self) -> None:
        super().write_config()
        listen = (self.admin_listen or f"tcp:{self.admin_port}:interface=127.0.0.1").replace("{root}", str(self.root))
        with self.config_path.open("a") as f:
            f.write(f'\n[admin]\nlisten = "{listen}"\nmin_free_bytes = 0\n')

    def command(self) -> list[str]:
        argv = [
            arg.replace(INSTALLED_BIN, f"{VENV_BIN}/").replace(INSTALLED_CONFIG, str(self.config_path))
            for arg in unit_exec_start(self.unit_file)
        ]
        if self.logger is not None:
            argv[argv.index("--logger") + 1] = self.logger
        if self.activate_fd is not None:
            return [sys.executable, "-c", _ACTIVATE, str(self.activate_fd), *argv]
        return argv

    def launch(self) -> None:
        """Start the process and return at once."""
        assert self.proc is None, "already running"
        if self.manager is None:
            self.manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.manager.bind(str(self.root / "notify.sock"))
        self.write_config()
        self.starts += 1
        env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "WATCHDOG_USEC", "LISTEN_FDS")}
        env["NOTIFY_SOCKET"] = str(self.root / "notify.sock")
        with self.stdout_path.open("ab") as out, self.stderr_path.open("ab") as err:
            st = os.fstat(out.fileno())
            env.update({k: v.replace("{stdout}", f"{st.st_dev}:{st.st_ino}") for k, v in self.env.items()})
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                pass_fds=self.pass_fds,
            )
        _daemons_in_test.append(self)

    def message(self, timeout: float = START_TIMEOUT) -> str:
        """The next sd_notify message from the daemon (bounded wait)."""
        assert self.manager is not None
        deadline = time.monotonic() + timeout
        while True:
            self.manager.settimeout(0.2)
            try:
                return self.manager.recv(4096).decode()
            except TimeoutError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no sd_notify message within {timeout}s:\n{self.log()}")
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"twistd exited with {self.proc.returncode} before notifying:\n{self.log()}")

    def start(self) -> None:
        """Start and wait for READY=1, which names this daemon's own ports."""
        self.launch()
        assert self.proc is not None
        try:
            ready = self.message()
        except pytest.fail.Exception:
            if self.starts < 3 and self.proc is not None and "Address already in use" in self.log():
                # Another process took a free port in the meantime: take others.
                self.proc.wait(5)
                self.proc = None
                self.port, self.admin_port = free_port(), free_port()
                self.start()
                return
            raise
        assert ready.startswith("READY=1"), ready
        assert f"tcp:{self.port}" in ready, ready
        self.ready = ready

    def close(self) -> None:
        self.stop()
        if self.manager is not None:
            self.manager.close()

    def admin(self, path: str) -> tuple[int, str]:
        reply = raw_request(
            self.admin_port, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        return reply.status, reply.body.decode()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, text = self.admin("/metrics")
        assert status == 200
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def terminate(self, timeout: float = 10) -> int:
        """SIGTERM and wait (bounded); the exit status."""
        proc, self.proc = self.proc, None
        assert proc is not None
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            pytest.fail(f"the daemon did not stop within {timeout}s of SIGTERM:\n{self.log()}")


@pytest.fixture
def ops_daemon(
    tmp_path_factory: pytest.TempPathFactory, origin: MisbehavingOrigin
) -> Iterator[Callable[..., OpsDaemon]]:
    """Make daemons (not started) of one's own; each is stopped at the end of the test."""
    daemons: list[OpsDaemon] = []

    def make(**kwargs: object) -> OpsDaemon:
        daemon = OpsDaemon(tmp_path_factory.mktemp("cosedge-ops"), origin.netloc, dict(FAST_FILL), **kwargs)
        daemons.append(daemon)
        return daemon

    yield make
    for daemon in daemons:
        daemon.close()
    for daemon in daemons:
        assert daemon.problems() == [], "the daemon logged an unexpected error"


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_unit_command_reports_ready_then_stopping(ops_daemon: Callable[..., OpsDaemon]) -> None:
    """
    Started exactly as the unit starts it, the daemon sends READY=1 only when
    both its ports already accept connections, logs with journal priorities,
    and on SIGTERM sends STOPPING=1 and exits 0.
    """
    daemon = ops_daemon(env={"JOURNAL_STREAM": "{stdout}"})
    daemon.start()
    ready = daemon.ready
    assert ready.startswith("READY=1\nSTATUS=Serving on "), ready
    assert accepts(daemon.port) and accepts(daemon.admin_port)  # at once, no retry
    assert f"tcp:{daemon.port}" in ready and f"tcp:{daemon.admin_port}" in ready
    assert daemon.admin("/readyz") == (200, "ready\n")
    assert daemon.admin("/livez") == (200, "ok\n")

    assert daemon.terminate() == 0
    assert daemon.message(timeout=1).startswith("STOPPING=1")
    lines = daemon.stdout_path.read_text().splitlines()
    assert lines and all(re.match(r"<[0-7]>\[", line) for line in lines), lines[:5]
    assert any(line.startswith("<6>[cosedge.ops#info] cosedge ready") for line in lines)


def test_metrics_move_with_real_requests(ops_daemon: Callable[..., OpsDaemon], origin: MisbehavingOrigin) -> None:
    """
    /metrics counts what clients and the origin really did: a miss, its 302
    and the fill with its bytes; then a hit; then a 404 at the origin that is
    remembered.  The [log] JSON file has the fill's event.
    """
    daemon = ops_daemon()
    events = daemon.root / "logs" / "events.json"
    daemon.extra_config = f'\n[log]\njson_file = "{events}"\n'
    daemon.start()
    key, missing = "ok/ops-metrics.bin", "status/404/ops-metrics.bin"
    body = body_for(f"/{key}")
    before = daemon.metrics()
    assert before[("cosedge_fills_stored_total", ())] == 0

    assert daemon.request(f"/{key}").status == 302
    assert daemon.fill_outcome(key) == "stored"
    m = daemon.metrics()
    assert m[("cosedge_misses_total", ())] == 1
    assert m[("cosedge_redirects_total", ())] == 1
    assert m[("cosedge_http_responses_total", (("code", "302"),))] == 1
    assert m[("cosedge_fills_started_total", ())] == 1
    assert m[("cosedge_fills_stored_total", ())] == 1
    assert m[("cosedge_pulled_bytes_total", ())] == len(body)
    assert m[("cosedge_fill_duration_seconds_count", ())] == 1
    assert m[("cosedge_fills_in_flight", ())] == 0

    hit = daemon.request(f"/{key}")
    assert hit.status == 200 and hit.body == body
    m = daemon.metrics()
    assert m[("cosedge_hits_total", ())] == 1
    assert m[("cosedge_served_bytes_total", ())] == len(body)
    assert m[("cosedge_http_responses_total", (("code", "200"),))] == 1

    assert daemon.request(f"/{missing}").status == 302
    assert daemon.fill_outcome(missing) == "http-404"
    assert daemon.request(f"/{missing}").status == 302
    m = daemon.metrics()
    assert m[("cosedge_fills_failed_total", (("reason", "http-404"),))] == 1
    assert m[("cosedge_not_found_remembered", ())] == 1
    assert m[("cosedge_fills_skipped_total", (("reason", "not-found"),))] == 1
    assert m[("cosedge_http_responses_total", (("code", "302"),))] == 3
    assert origin.gets(f"/{missing}") == 1

    stored = [json.loads(line) for line in events.read_text().splitlines()]
    assert any(e.get("log_namespace") == "cosedge.fill" and e.get("key") == key for e in stored)


def test_readyz_turns_503_when_the_data_directory_cannot_be_written(ops_daemon: Callable[..., OpsDaemon]) -> None:
    """
    /readyz is 200 while fills can write, 503 with the reason once they
    cannot (the temporary-file directory replaced by a file: root ignores
    permissions, this stops root too), and 200 again when repaired.
    """
    daemon = ops_daemon()
    daemon.start()
    wait_for(lambda: daemon.admin("/readyz")[0] == 200, 5, "/readyz to become 200")
    shutil.rmtree(daemon.tmp_dir)
    daemon.tmp_dir.write_text("in the way")
    status, body = daemon.admin("/readyz")
    assert status == 503
    assert body.startswith("not ready\n- data directory not writable: ")
    assert daemon.admin("/livez")[0] == 200  # alive, just not ready
    daemon.tmp_dir.unlink()
    assert daemon.admin("/readyz") == (200, "ready\n")


def test_sigterm_during_a_fill_exits_zero_and_leaves_no_temporary_file(
    ops_daemon: Callable[..., OpsDaemon], origin: MisbehavingOrigin
) -> None:
    """
    SIGTERM while a large object is half copied: the service manager hears
    STOPPING=1, the fill is cancelled, its temporary file removed, nothing is
    stored, and the daemon exits 0 within a few seconds.
    """
    daemon = ops_daemon()
    daemon.start()
    key = "slow/ops-sigterm.bin"
    try:
        assert daemon.request(f"/{key}").status == 302
        wait_for(
            lambda: any((daemon.tmp_dir / n).stat().st_size > 0 for n in tmp_files(daemon)),
            5,
            "the fill to write its temporary file",
        )
        started = time.monotonic()
        assert daemon.terminate() == 0
        assert time.monotonic() - started < 5
    finally:
        origin.release(f"/{key}")
    assert daemon.message(timeout=1).startswith("STOPPING=1")
    assert daemon.fill_outcome(key, timeout=0) == "cancelled"
    assert tmp_files(daemon) == []
    assert not daemon.object_path(key).exists()


def _socket_activated(ops_daemon: Callable[..., OpsDaemon], **more: object) -> OpsDaemon:
    """
    A daemon started with the socket-activation drop-in's command line on a
    listening socket handed over as systemd does (fd 3, named cosedge-http),
    logging JSON, its admin listener on a UNIX socket (no second TCP port to
    race for).
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    fd = listener.fileno()
    daemon = ops_daemon(
        unit_file=REPO / "etc" / "cosedge.service.d" / "socket.conf",
        port=listener.getsockname()[1],
        env={"LISTEN_FDS": "1", "LISTEN_FDNAMES": "cosedge-http"},
        pass_fds=(fd,),
        activate_fd=fd,
        logger="cosedge.logs.json",
        admin_listen="unix:{root}/admin.sock",
        **more,
    )
    try:
        daemon.launch()
    finally:
        listener.close()  # the daemon holds its own copy now
    return daemon


def test_socket_activation_serves_on_the_handed_socket(ops_daemon: Callable[..., OpsDaemon]) -> None:
    """
    With the socket-activation drop-in's command line, the daemon serves on
    the listening socket systemd hands it (fd 3, named cosedge-http) rather
    than binding one itself; with --logger cosedge.logs.json every log line
    is a JSON event.
    """
    daemon = _socket_activated(ops_daemon)
    ready = daemon.message()
    assert ready.startswith("READY=1") and f"tcp:{daemon.port}" in ready, ready
    key = "ok/ops-socket.bin"
    assert daemon.request(f"/{key}").status == 302

    def events() -> list[dict[str, object]]:
        return [json.loads(line) for line in daemon.stdout_path.read_text().splitlines() if line.strip()]

    def stored() -> bool:
        return any(e.get("key") == key and "stored" in str(e.get("log_format")) for e in events())

    wait_for(stored, 10, "the fill's JSON log event")
    assert daemon.request(f"/{key}").body == body_for(f"/{key}")
    assert daemon.terminate() == 0
    assert any(e.get("log_namespace") == "cosedge.ops" for e in events())


def test_socket_activation_with_workers(ops_daemon: Callable[..., OpsDaemon]) -> None:
    """
    With workers = 2 under socket activation, the worker serves the handed
    socket too; READY=1 comes only once it does, and its log events reach
    the JSON log marked with the worker.
    """
    daemon = _socket_activated(ops_daemon, workers=2)
    ready = daemon.message()
    assert ready.startswith("READY=1"), ready
    events = [json.loads(line) for line in daemon.stdout_path.read_text().splitlines() if line.strip()]
    serving = [i for i, e in enumerate(events) if str(e.get("log_format", "")).startswith("worker {index}")]
    assert serving, "no worker reported serving before READY=1"
    assert any(str(e.get("log_system", "")).startswith("worker-1") for e in events)
    assert daemon.request("/missing-here").status == 302
    assert daemon.terminate() == 0


def test_bad_admin_section_stops_the_daemon_with_its_message(tmp_path: Path) -> None:
    """A wrong [admin] value stops twistd with a non-zero status and a message naming the field."""
    config = tmp_path / "cosedge.toml"
    config.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n\n[admin]\nlisten = 9090\n')
    result = subprocess.run(
        [str(VENV_BIN / "twistd"), "-n", "--pidfile=", "cosedge", "--config", str(config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
    )
    assert result.returncode != 0
    assert "[admin] listen must be an endpoint string" in result.stdout + result.stderr
