"""
Operations, without a reactor: sd_notify, the journald and JSON log
observers, the [admin] and [log] sections, readiness reporting to systemd,
the admin listener's /metrics, /livez and /readyz.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import pytest
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, LogPublisher, eventsFromJSONLogFile
from twisted.python.failure import Failure
from twisted.web.server import Site
from zope.interface import implementer

from cosedge import logs
from cosedge.config import Config, ConfigError, ServerConfig
from cosedge.ops import service as ops
from cosedge.ops.metrics import Readiness, free_disk_check, make_registry, store_writable_check
from cosedge.ops.notify import notify, notify_socket_address, watchdog_interval
from cosedge.service import EdgeService, build_service
from cosedge.stats import Stats, Totals
from cosedge.storage.disk import DiskStore
from cosedge.testing import FakeOrigin, MemoryStore

from .helpers import BUCKET, Edge, StepCooperator, edge_config, result_of

# -- helpers --


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's notification socket."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    try:
        yield sock, path
    finally:
        sock.close()


def received(sock: socket.socket) -> list[str]:
    """Every datagram waiting on ``sock`` (non-blocking, bounded)."""
    messages = []
    for _ in range(100):
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            break
    return messages


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse Prometheus text into {(sample name, sorted labels): value}."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(resource: Any, path: str = "/metrics", method: str = "GET") -> tuple[int, dict[str, str], str]:
    """Ask the admin resource for ``path`` in memory; (status, headers, body)."""
    stub = StubTreq(resource)
    d = stub.request(method, f"http://127.0.0.1:9090{path}")
    stub.flush()
    response = result_of(d)
    text = response.text("utf-8")
    stub.flush()
    body = result_of(text)
    headers = {k.decode().lower(): v[0].decode() for k, v in response.headers.getAllRawHeaders()}
    return response.code, headers, body


def service_with(extra: dict[str, Any], *, data_dir: str = "var", store: Any = None) -> EdgeService:
    """A whole service on a memory reactor, with [admin]/[log] tables in ``extra``."""
    config = attrs.evolve(
        edge_config(data_dir=data_dir),
        server=ServerConfig(listen=("tcp:8080:interface=127.0.0.1",), data_dir=data_dir, access_log=""),
        extra=extra,
    )
    return build_service(
        config,
        MemoryReactorClock(),
        _agent=RequestTraversalAgent(FakeOrigin()),
        _store=MemoryStore() if store is None else store,
    )


def ops_of(service: EdgeService) -> ops.OpsService:
    found = service.getServiceNamed(ops.OPS_SERVICE)
    assert isinstance(found, ops.OpsService)
    return found


@implementer(IStreamServerEndpoint)
class HeldEndpoint:
    """A listening endpoint whose listen() result the test fires by hand."""

    def __init__(self) -> None:
        self.waiting: Deferred[Any] = Deferred()

    def listen(self, factory: Any) -> Deferred[Any]:
        return self.waiting


class FakePort:
    def getHost(self) -> Any:
        return SimpleNamespace(type="TCP", port=4242)

    def stopListening(self) -> None:
        pass


# -- sd_notify --


def test_notify_without_socket_is_a_no_op() -> None:
    """Outside systemd (no NOTIFY_SOCKET) notifying does nothing and says so."""
    assert notify("READY=1", {}) is False
    assert notify("READY=1", {"NOTIFY_SOCKET": ""}) is False


def test_notify_sends_one_datagram_to_a_path_socket(notify_socket: tuple[socket.socket, str]) -> None:
    """The state reaches the manager's socket as one datagram, byte for byte."""
    sock, path = notify_socket
    assert notify("READY=1\nSTATUS=Serving", {"NOTIFY_SOCKET": path}) is True
    assert received(sock) == ["READY=1\nSTATUS=Serving"]


def test_notify_reaches_an_abstract_socket() -> None:
    """A NOTIFY_SOCKET starting with '@' names an abstract-namespace socket, as systemd uses."""
    name = f"cosedge-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2)
        assert notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name}) is True
        assert sock.recv(100) == b"STOPPING=1"
    assert notify_socket_address({"NOTIFY_SOCKET": "@x"}) == b"\0x"


def test_notify_to_a_vanished_manager_is_logged_not_raised(tmp_path: Path) -> None:
    """If the manager's socket is gone the daemon carries on: False, and a warning."""
    events: list[dict[str, Any]] = []
    from twisted.logger import globalLogPublisher

    globalLogPublisher.addObserver(events.append)
    try:
        assert notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}) is False
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [e["log_level"] for e in events if e.get("log_namespace") == "cosedge.notify"] == [LogLevel.warn]


def test_notify_ignores_unsupported_addresses() -> None:
    """Addresses we cannot speak to (relative paths, vsock:) are treated as no manager."""
    assert notify_socket_address({"NOTIFY_SOCKET": "vsock:2:1234"}) is None
    assert notify_socket_address({"NOTIFY_SOCKET": "relative.sock"}) is None


def test_watchdog_interval_is_half_the_timeout_for_this_process() -> None:
    """WatchdogSec=30 asks for a keep-alive every 15 s, unless meant for another process."""
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, pid=7) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "8"}, pid=7) is None
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


# -- log observers --


def _event(level: LogLevel, text: str, **fields: Any) -> dict[str, Any]:
    return {
        "log_level": level,
        "log_namespace": "cosedge.test",
        "log_format": text,
        "log_time": 1_700_000_000.0,
        **fields,
    }


def journal_env(path: Path) -> dict[str, str]:
    st = os.stat(path)
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def test_journald_lines_carry_syslog_priorities(tmp_path: Path) -> None:
    """On the journal's stream every line starts with its priority and has no timestamp."""
    path = tmp_path / "stdout"
    with path.open("w") as out:
        observer = logs.journald(out, journal_env(path))
        observer(_event(LogLevel.info, "fill {key} stored", key="1.jpg"))
        observer(_event(LogLevel.warn, "fill failed"))
        observer(_event(LogLevel.error, "bad"))
        observer(_event(LogLevel.critical, "worse"))
        observer(_event(LogLevel.debug, "chatter"))
    assert path.read_text().splitlines() == [
        "<6>[cosedge.test#info] fill 1.jpg stored",
        "<4>[cosedge.test#warn] fill failed",
        "<3>[cosedge.test#error] bad",
        "<2>[cosedge.test#critical] worse",
        "<7>[cosedge.test#debug] chatter",
    ]


def test_journald_prefixes_every_line_of_a_traceback(tmp_path: Path) -> None:
    """A traceback is many journal entries; each keeps the event's priority."""
    path = tmp_path / "stdout"
    try:
        raise ValueError("boom")
    except ValueError:
        failure = Failure()
    with path.open("w") as out:
        logs.journald(out, journal_env(path))(_event(LogLevel.critical, "it broke", log_failure=failure))
    lines = path.read_text().splitlines()
    assert len(lines) > 3
    assert all(line.startswith("<2>") for line in lines), lines
    assert any("ValueError: boom" in line for line in lines)


def test_journald_falls_back_to_timestamped_text_off_the_journal(tmp_path: Path) -> None:
    """If standard output is not the journal's stream (redirected), lines are twistd's usual text."""
    path = tmp_path / "stdout"
    other = tmp_path / "other"
    other.write_text("")
    with path.open("w") as out:
        logs.journald(out, journal_env(other))(_event(LogLevel.warn, "hello"))
        logs.journald(out, {})(_event(LogLevel.warn, "again"))
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    assert all(not line.startswith("<") for line in lines)
    assert lines[0].endswith("[cosedge.test#warn] hello") and lines[0][:4].isdigit()


def test_json_logger_writes_one_parseable_event_per_line() -> None:
    """--logger cosedge.logs.json: each event a JSON line with its fields, readable back by Twisted."""
    out = io.StringIO()
    observer = logs.json(out)
    observer(_event(LogLevel.warn, "fill {bucket}/{key} failed: {reason}", bucket=BUCKET, key="a", reason="timeout"))
    observer(_event(LogLevel.info, "second"))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["reason"] == "timeout" and first["key"] == "a"
    assert first["log_level"]["name"] == "warn"
    events = list(eventsFromJSONLogFile(io.StringIO(out.getvalue())))
    assert [e["log_format"] for e in events] == ["fill {bucket}/{key} failed: {reason}", "second"]


def test_json_file_observer_rotates_by_size(tmp_path: Path) -> None:
    """The JSON log file is rotated once it passes the configured size."""
    path = tmp_path / "logs" / "events.json"
    observer, logfile = logs.json_file_observer(str(path), rotate_bytes=300, keep=2)
    try:
        for i in range(20):
            observer(_event(LogLevel.info, "event {i}", i=i))
    finally:
        logfile.close()
    assert path.exists() and (tmp_path / "logs" / "events.json.1").exists()
    assert not (tmp_path / "logs" / "events.json.3").exists()


def test_logger_names_resolve_as_twistd_loads_them() -> None:
    """`twistd --logger cosedge.logs.journald` (and .json) name factories callable with no arguments."""
    from twisted.logger import ILogObserver
    from twisted.python.reflect import namedAny

    for name in ("cosedge.logs.journald", "cosedge.logs.json"):
        assert ILogObserver.providedBy(namedAny(name)())


# -- configuration --


def test_admin_section_defaults_and_forms() -> None:
    """[admin] takes one endpoint string or a list; free-disk minimum defaults to 100 MiB."""
    assert ops.parse_admin({}) is None
    default = ops.parse_admin({"admin": {}})
    assert default == ops.AdminConfig(("tcp:9090:interface=127.0.0.1",), 100 * 1024 * 1024)
    one = ops.parse_admin({"admin": {"listen": "tcp:9191:interface=127.0.0.1", "min_free_bytes": 0}})
    assert one is not None and one.listen == ("tcp:9191:interface=127.0.0.1",) and one.min_free_bytes == 0
    two = ops.parse_admin({"admin": {"listen": ["tcp:1", "unix:/run/cosedge/admin.sock"]}})
    assert two is not None and two.listen == ("tcp:1", "unix:/run/cosedge/admin.sock")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"listen": []}, "[admin] listen must be an endpoint string"),
        ({"listen": 9090}, "[admin] listen must be an endpoint string"),
        ({"listen": ["tcp:1", ""]}, "[admin] listen entries must be non-empty"),
        ({"min_free_bytes": -1}, "[admin] min_free_bytes must be zero or a positive whole number"),
        ({"min_free_bytes": "1G"}, "[admin] min_free_bytes must be"),
        ({"min_free_bytes": True}, "[admin] min_free_bytes must be"),
        ({"port": 9090}, "[admin] has unknown setting(s) port; known: listen, min_free_bytes"),
    ],
)
def test_admin_section_errors_name_the_field(table: dict[str, Any], message: str) -> None:
    """A wrong [admin] value is refused with a message naming the section and field."""
    with pytest.raises(ConfigError) as e:
        ops.parse_admin({"admin": table})
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"json_file": 3}, "[log] json_file must be a path"),
        ({"json_rotate_bytes": -5}, "[log] json_rotate_bytes must be"),
        ({"json_keep": 0}, "[log] json_keep must be a positive whole number"),
        ({"level": "debug"}, "[log] has unknown setting(s) level"),
    ],
)
def test_log_section_errors_name_the_field(table: dict[str, Any], message: str) -> None:
    """A wrong [log] value is refused with a message naming the section and field."""
    with pytest.raises(ConfigError) as e:
        ops.parse_log({"log": table})
    assert message in str(e.value)


def test_check_config_covers_both_sections() -> None:
    """check_config refuses a configuration whose [admin] or [log] is wrong, and passes a good one."""
    ops.check_config(Config(extra={"admin": {"listen": "tcp:9090"}, "log": {"json_file": ""}}))
    with pytest.raises(ConfigError, match=r"\[admin\]"):
        ops.check_config(Config(extra={"admin": {"listen": 1}}))
    with pytest.raises(ConfigError, match=r"\[log\]"):
        ops.check_config(Config(extra={"log": {"json_keep": -1}}))


def test_bad_admin_endpoint_is_a_config_error() -> None:
    """An [admin] listen string Twisted cannot parse stops the build with a clear message."""
    with pytest.raises(ConfigError, match=r"\[admin\] listen: 'tcp:notaport' is not a valid endpoint"):
        service_with({"admin": {"listen": "tcp:notaport"}})


def test_unopenable_json_log_is_a_config_error(tmp_path: Path) -> None:
    """A [log] json_file that cannot be opened stops the build, naming the file."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"\[log\] json_file: cannot open"):
        service_with({"log": {"json_file": str(blocker / "events.json")}})


def test_services_are_added_in_order() -> None:
    """The admin listener comes after the bucket listeners and the notifier last of all."""
    service = service_with({"admin": {"listen": "tcp:9090:interface=127.0.0.1"}})
    children = list(service)
    assert children[-1] is ops_of(service)
    names = [child.name for child in children]
    assert names.index(ops.ADMIN_SERVICE) > 0
    assert isinstance(children[0], StreamServerEndpointService)
    without = service_with({})
    assert ops.ADMIN_SERVICE not in [c.name for c in without]
    assert list(without)[-1] is ops_of(without)


# -- readiness reported to systemd --


def test_ready_is_sent_after_the_listeners_and_stopping_on_stop(
    notify_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """systemd hears READY=1 once the listeners are up, and STOPPING=1 when the daemon stops."""
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    service = service_with({"admin": {"listen": "tcp:9090:interface=127.0.0.1"}})
    reactor = service.reactor
    service.startService()
    assert received(sock) == []  # the check runs once everything has been asked to start
    reactor.advance(0)
    messages = received(sock)
    assert len(messages) == 1 and messages[0].startswith("READY=1\nSTATUS=Serving on tcp:8080, tcp:9090")
    assert [port for port, *_ in reactor.tcpServers] == [8080, 9090]
    assert ops_of(service).ready
    service.stopService()
    assert received(sock) == ["STOPPING=1\nSTATUS=Stopping: closing listeners, cancelling fills"]
    assert not ops_of(service).ready


def started_with_a_held_listener() -> tuple[EdgeService, HeldEndpoint]:
    """A started service with one more listener, whose start the test decides (endpoint.waiting)."""
    service = service_with({})
    endpoint = HeldEndpoint()
    StreamServerEndpointService(endpoint, Site(FakeOrigin())).setServiceParent(service)
    service.startService()
    service.reactor.advance(0)
    return service, endpoint


def test_ready_waits_for_a_slow_listener(
    notify_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """READY=1 is not sent while any listener (even one added later) is still starting."""
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    service, endpoint = started_with_a_held_listener()
    assert received(sock) == []
    assert ops_of(service).readiness.problems() == ["listeners not up yet"]
    endpoint.waiting.callback(FakePort())
    assert received(sock) == ["READY=1\nSTATUS=Serving on tcp:8080, tcp:4242"]
    assert ops_of(service).readiness.problems() == []
    service.stopService()


def test_failed_listener_is_never_ready(
    notify_socket: tuple[socket.socket, str],
    monkeypatch: pytest.MonkeyPatch,
    logged_failures: list[dict[str, Any]],
) -> None:
    """A listener that fails to start means no READY=1 and a /readyz reason; systemd times the start out."""
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    service, endpoint = started_with_a_held_listener()
    endpoint.waiting.errback(OSError(errno.EADDRINUSE, "Address already in use"))
    assert received(sock) == ["STATUS=Not ready: a listener failed to start"]
    assert ops_of(service).readiness.problems() == ["listener(s) failed to start: HeldEndpoint"]
    assert logged_failures  # Twisted logs the listener's own failure
    logged_failures.clear()
    service.stopService()


def test_watchdog_keepalives_follow_the_interval(
    notify_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With WatchdogSec=2, WATCHDOG=1 is sent at start and every second after; none after stopping."""
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    service = service_with({})
    service.startService()
    assert received(sock) == ["WATCHDOG=1"]
    service.reactor.advance(0)
    received(sock)  # READY
    service.reactor.advance(1)
    assert received(sock) == ["WATCHDOG=1"]
    service.stopService()
    received(sock)
    service.reactor.advance(5)
    assert received(sock) == []


@pytest.mark.parametrize(("signum", "after"), [(signal.SIGTERM, None), (signal.SIGINT, signal.SIGINT)])
def test_sigterm_stop_is_a_clean_exit(signum: int, after: int | None) -> None:
    """
    After SIGTERM (a service manager's ordinary stop) the daemon exits 0
    instead of re-raising the signal; Ctrl-C (SIGINT) still ends it as
    interrupted.
    """
    service = service_with({})
    service.startService()
    service.reactor._exitSignal = signum
    service.stopService()
    assert service.reactor._exitSignal == after


def test_json_log_service_writes_while_running(tmp_path: Path) -> None:
    """[log] json_file gets every event as JSON while the daemon runs, and is closed when it stops."""
    path = tmp_path / "events.json"
    service = service_with({"log": {"json_file": str(path)}})
    json_log = service.getServiceNamed(ops.JSON_LOG_SERVICE)
    assert isinstance(json_log, ops.JsonLogService)
    publisher = LogPublisher()
    json_log._publisher = publisher
    service.startService()
    publisher(_event(LogLevel.info, "hello {who}", who="operator"))
    service.stopService()
    publisher(_event(LogLevel.info, "after stop"))
    lines = path.read_text().splitlines()
    assert [json.loads(line)["who"] for line in lines] == ["operator"]
    assert json_log.logfile.closed


# -- /metrics --


def _metrics_target(edge: Edge) -> SimpleNamespace:
    """What the metrics collector reads of a service, around an in-memory edge."""
    f = edge.filler
    return SimpleNamespace(
        totals=lambda: Totals(edge.stats, f.running, f.queued, f.remembered_not_found()),
        reactor=edge.clock,
        config=edge.config,
    )


def test_metrics_move_with_hits_misses_and_fills(monkeypatch: pytest.MonkeyPatch) -> None:
    """/metrics shows each request's outcome: a miss and its 302, the fill, then a hit and its bytes."""
    cooperator = StepCooperator()
    cooperator.install(monkeypatch)
    edge = Edge(cooperator, gated=True)
    edge.origin.add("1.jpg", b"x" * 1000, content_type="image/jpeg")
    target = _metrics_target(edge)
    ops_resource = ops.AdminResource(make_registry(target, process=False), Readiness([]))

    def metric(name: str, **labels: str) -> float:
        return samples(scrape(ops_resource)[2]).get((name, tuple(sorted(labels.items()))), 0.0)

    assert metric("cosedge_misses_total") == 0
    edge.clock.advance(100)  # a clock at 0.0 would hide the fill's start time
    assert edge.request("/1.jpg").status == 302
    assert metric("cosedge_misses_total") == 1
    assert metric("cosedge_redirects_total") == 1
    assert metric("cosedge_http_responses_total", code="302") == 1
    assert metric("cosedge_fills_started_total") == 1
    assert metric("cosedge_fills_in_flight") == 1
    assert metric("cosedge_fills_stored_total") == 0
    edge.clock.advance(0.3)
    edge.flush_origin()
    assert metric("cosedge_fills_stored_total") == 1
    assert metric("cosedge_pulled_bytes_total") == 1000
    assert metric("cosedge_fill_duration_seconds_count") == 1
    assert metric("cosedge_fill_duration_seconds_bucket", le="0.25") == 0
    assert metric("cosedge_fill_duration_seconds_bucket", le="0.5") == 1
    assert metric("cosedge_fill_duration_seconds_bucket", le="+Inf") == 1
    assert metric("cosedge_fill_duration_seconds_sum") == pytest.approx(0.3)
    hit = edge.request("/1.jpg")
    assert hit.status == 200 and hit.body == b"x" * 1000
    assert metric("cosedge_hits_total") == 1
    assert metric("cosedge_served_bytes_total") == 1000
    assert metric("cosedge_http_responses_total", code="200") == 1
    # The share answered locally, per bucket (issue 14): one redirect, then one hit.
    assert metric("cosedge_requests_total", bucket=BUCKET, outcome="redirect") == 1
    assert metric("cosedge_requests_total", bucket=BUCKET, outcome="hit") == 1
    assert metric("cosedge_fills_by_rule_total", type="proxy", outcome="stored") == 1


def test_metrics_show_failures_by_reason_queue_and_remembered_404s(monkeypatch: pytest.MonkeyPatch) -> None:
    """Failed fills are counted by reason; fills in flight and 404s remembered are gauges that go down again."""
    cooperator = StepCooperator()
    cooperator.install(monkeypatch)
    edge = Edge(cooperator, gated=True)
    edge.origin.add("a.jpg", b"a")
    target = _metrics_target(edge)
    resource = ops.AdminResource(make_registry(target, process=False), Readiness([]))

    def values() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return samples(scrape(resource)[2])

    edge.request("/a.jpg")
    edge.request("/missing.jpg")
    now = values()
    assert now[("cosedge_fills_in_flight", ())] == 2
    assert now[("cosedge_fills_queued", ())] == 0
    edge.flush_origin()
    now = values()
    assert now[("cosedge_fills_in_flight", ())] == 0
    assert now[("cosedge_fills_failed_total", (("reason", "http-404"),))] == 1
    assert now[("cosedge_not_found_remembered", ())] == 1
    edge.request("/missing.jpg")
    assert values()[("cosedge_fills_skipped_total", (("reason", "not-found"),))] == 1
    edge.clock.advance(edge.config.fill.not_found_ttl + 1)
    assert values()[("cosedge_not_found_remembered", ())] == 0


def test_metrics_page_format_and_process_metrics() -> None:
    """/metrics is Prometheus text (OpenMetrics on request) with the process's own metrics too."""
    service = service_with({"admin": {}})
    resource = ops_of(service).resource
    code, headers, body = scrape(resource)
    assert code == 200
    assert headers["content-type"].startswith("text/plain; version=")
    parsed = samples(body)
    assert ("cosedge_buckets", ()) in parsed and parsed[("cosedge_buckets", ())] == 2
    assert any(name == "cosedge_info" for name, _ in parsed)
    assert any(name.startswith("process_") for name, _ in parsed) or not os.path.exists("/proc/self/stat")
    stub = StubTreq(resource)
    d = stub.get("http://127.0.0.1:9090/metrics", headers={"Accept": "application/openmetrics-text"})
    stub.flush()
    response = result_of(d)
    assert response.headers.getRawHeaders("content-type")[0].startswith("application/openmetrics-text")
    text = response.text()
    stub.flush()
    assert result_of(text).rstrip().endswith("# EOF")


# -- /livez, /readyz and the rest --


def test_livez_and_unknown_paths_and_methods() -> None:
    """/livez is 200 while the process runs; other paths 404, other methods 405, nothing is cached."""
    service = service_with({"admin": {}})
    resource = ops_of(service).resource
    code, headers, body = scrape(resource, "/livez")
    assert (code, body) == (200, "ok\n")
    assert headers["cache-control"] == "no-store"
    assert scrape(resource, "/1.jpg")[0] == 404
    code, headers, _ = scrape(resource, "/metrics", method="POST")
    assert code == 405 and headers["allow"] == "GET, HEAD"


def test_readyz_follows_listeners_and_shutdown(tmp_path: Path) -> None:
    """/readyz is 503 before the listeners are up, 200 while serving, 503 once shutdown begins."""
    service = service_with({"admin": {"min_free_bytes": 0}}, data_dir=str(tmp_path), store=DiskStore(str(tmp_path)))
    resource = ops_of(service).resource
    assert scrape(resource, "/readyz")[:3:2] == (503, "not ready\n- listeners not up yet\n")
    service.startService()
    service.reactor.advance(0)
    assert scrape(resource, "/readyz")[:3:2] == (200, "ready\n")
    service.stopService()
    assert scrape(resource, "/readyz")[:3:2] == (503, "not ready\n- shutting down\n")


def test_readyz_fails_when_the_data_directory_is_not_writable(tmp_path: Path) -> None:
    """If fills cannot write their temporary files, /readyz says so (503) and recovers when fixed."""
    store = DiskStore(str(tmp_path))
    service = service_with({"admin": {"min_free_bytes": 0}}, data_dir=str(tmp_path), store=store)
    service.startService()
    service.reactor.advance(0)
    resource = ops_of(service).resource
    assert scrape(resource, "/readyz")[0] == 200
    tmp_dir = Path(store.tmp_dir)
    tmp_dir.rmdir()
    tmp_dir.write_text("not a directory")  # root ignores permissions; this blocks root too
    code, _, body = scrape(resource, "/readyz")
    assert code == 503
    assert "data directory not writable" in body and "Not a directory" in body
    tmp_dir.unlink()
    assert scrape(resource, "/readyz")[0] == 200
    assert os.listdir(tmp_dir) == []  # the probe leaves nothing behind
    service.stopService()


def test_store_probe_reports_a_full_disk() -> None:
    """A store that cannot take even two bytes is reported as not writable."""
    assert store_writable_check(MemoryStore(disk_limit=0))() is not None
    store = MemoryStore()
    assert store_writable_check(store)() is None
    assert store.objects == {}


def test_store_probe_reports_a_file_system_without_user_xattrs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    On a file system without user extended attributes every fill would fail
    (object metadata lives in one): /readyz says so, and the probe leaves
    nothing behind.
    """
    store = DiskStore(str(tmp_path))
    check = store_writable_check(store)
    assert check() is None

    def unsupported(*args: object) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "setxattr", unsupported)
    problem = check()
    assert problem is not None and "no user extended attributes" in problem
    assert os.listdir(store.tmp_dir) == []


def test_free_disk_threshold() -> None:
    """Below the configured free space /readyz fails with the numbers; at or above it passes."""
    check = free_disk_check("/data", lambda: 1000, _free=lambda path: 999)
    assert check() == "free disk space 999 bytes is below the 1000-byte minimum on /data"
    assert free_disk_check("/data", lambda: 1000, _free=lambda path: 1000)() is None

    def broken(path: str) -> int:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)

    assert "cannot measure free disk space of /data" in (free_disk_check("/data", lambda: 0, _free=broken)() or "")


def test_free_disk_minimum_follows_a_live_config_change(tmp_path: Path) -> None:
    """A new [admin] min_free_bytes applied live (SIGHUP, say) is used by the next /readyz."""
    service = service_with({"admin": {"min_free_bytes": 0}}, data_dir=str(tmp_path), store=DiskStore(str(tmp_path)))
    service.startService()
    service.reactor.advance(0)
    resource = ops_of(service).resource
    assert scrape(resource, "/readyz")[0] == 200
    service.replace_config(attrs.evolve(service.config, extra={"admin": {"min_free_bytes": 2**62}}))
    code, _, body = scrape(resource, "/readyz")
    assert code == 503 and "below the" in body
    service.stopService()


def test_a_broken_check_means_not_ready(logged_failures: list[dict[str, Any]]) -> None:
    """A readiness check that raises gives 503 with the reason, never a 500."""

    def broken() -> str | None:
        raise RuntimeError("surprise")

    assert Readiness([broken]).problems() == ["readiness check failed: surprise"]
    assert len(logged_failures) == 1
    logged_failures.clear()


# -- import hygiene --


def test_importing_ops_modules_installs_no_reactor() -> None:
    """Loading cosedge's operations modules (as twistd does before choosing a reactor) installs none."""
    code = (
        "import sys, cosedge.ops.service, cosedge.ops.metrics, cosedge.logs, cosedge.ops.notify;"
        "bad = [m for m in ('twisted.internet.reactor', 'prometheus_client.twisted') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_trailing_slash_is_accepted() -> None:
    """The admin resource answers the same with or without a trailing slash (probes differ)."""
    resource = ops.AdminResource(make_registry(SimpleNamespace(), process=False), Readiness([]))
    assert scrape(resource, "/readyz/")[0] == 200
    assert scrape(resource, "/livez/")[0] == 200


def test_a_restarted_service_reports_ready_again(
    notify_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Stopping and starting the notifier again gives a fresh READY=1 and
    /readyz 200 (with no bucket listener: Twisted's listeners themselves
    cannot be restarted).
    """
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    service = service_with({})
    for listener in [c for c in service if isinstance(c, StreamServerEndpointService)]:
        listener.disownServiceParent()
    for _ in range(2):
        service.startService()
        service.reactor.advance(0)
        assert received(sock)[0].startswith("READY=1")
        assert ops_of(service).readiness.problems() == []
        service.stopService()
        assert received(sock)[0].startswith("STOPPING=1")


def test_store_requests_are_metrics_summed_over_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A network store's requests: a counter by operation and outcome, and a summary of their seconds."""
    cooperator = StepCooperator()
    cooperator.install(monkeypatch)
    edge = Edge(cooperator)
    edge.stats.store_request("GET", "2xx", 0.25)
    edge.stats.store_request("GET", "4xx", 0.5)
    worker = Stats()
    worker.store_request("PUT", "error", 2.0)
    edge.stats.add(worker.to_json())  # another process's, as the primary sums them
    resource = ops.AdminResource(make_registry(_metrics_target(edge), process=False), Readiness([]))
    found = samples(scrape(resource)[2])

    def metric(name: str, **labels: str) -> float:
        return found.get((name, tuple(sorted(labels.items()))), 0.0)

    assert metric("cosedge_store_requests_total", operation="GET", outcome="2xx") == 1
    assert metric("cosedge_store_requests_total", operation="GET", outcome="4xx") == 1
    assert metric("cosedge_store_requests_total", operation="PUT", outcome="error") == 1
    assert metric("cosedge_store_request_seconds_count", operation="GET") == 2
    assert metric("cosedge_store_request_seconds_sum", operation="GET") == pytest.approx(0.75)
    assert metric("cosedge_store_request_seconds_sum", operation="PUT") == pytest.approx(2.0)
