"""
Live administration without a reactor: the ``edge`` façade, persistence of
live changes, reloads, the ``[manhole]`` section, telnet passwords and the
shell protocol driven over an in-memory transport.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, cast

import pytest
from attrs import evolve
from treq.testing import RequestTraversalAgent
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThreadPool
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import directlyProvides

from cosedge.admin import manhole as admin_manhole
from cosedge.admin import passwords as admin_passwords
from cosedge.admin.errors import AdminError
from cosedge.admin.live import LiveConfig, check_config
from cosedge.admin.manhole import parse_manhole
from cosedge.admin.shell import Edge
from cosedge.admin.state import State, StateFile, state_path
from cosedge.config import BucketConfig, Config, ConfigError, Origin, ServerConfig, load_config
from cosedge.service import EdgeService, build_service
from cosedge.storage.disk import DiskStore
from cosedge.testing import FakeOrigin

BUCKET = "example-1250000000"
NEW = "new-1250000000"
FILE_ORIGIN = "127.0.0.1:8081"


@pytest.fixture
def audit_lines() -> Iterator[list[dict[str, Any]]]:
    """The audit events logged during the test."""
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "cosedge.audit":
            events.append(event)

    observer = cast(ILogObserver, observe)
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def toml_for(data_dir: Path, extra: str = "", origin_pull: bool = True) -> str:
    return f"""
[server]
listen = ["tcp:0:interface=127.0.0.1"]
data_dir = "{data_dir}"
access_log = ""

[buckets."{BUCKET}"]
origin = "{FILE_ORIGIN}"
origin_pull = {str(origin_pull).lower()}
{extra}
"""


class Harness:
    """A whole service built as ``twistd cosedge`` builds it, on a MemoryReactorClock."""

    def __init__(self, root: Path, extra: str = "") -> None:
        self.root = root
        self.data_dir = root / "data"
        self.config_file = root / "cosedge.toml"
        self.config_file.write_text(toml_for(self.data_dir, extra))
        self.origin = FakeOrigin()
        self.agent = RequestTraversalAgent(self.origin)
        self.service = self.build()

    def build(self) -> EdgeService:
        config = load_config(self.config_file)
        return build_service(
            config,
            MemoryReactorClock(),
            config_path=str(self.config_file),
            _agent=self.agent,
            _store=DiskStore(str(self.data_dir)),
        )

    @property
    def live(self) -> LiveConfig:
        live: LiveConfig = self.service.getServiceNamed("admin")
        return live

    def edge(self, channel: str = "test") -> Edge:
        return self.live.edge(channel)

    @property
    def state_file(self) -> Path:
        return Path(state_path(str(self.data_dir)))


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


# -- the façade: buckets and origins --


def test_set_origin_applies_at_once_and_is_saved(harness: Harness, audit_lines: list[dict[str, Any]]) -> None:
    """
    A valid origin is in the running configuration at once (the next request
    reads it), saved in the state file, and logged as one audit line with
    what changed, from what, to what and through which channel.
    """
    result = harness.edge("ssh:admin@127.0.0.1").set_origin(BUCKET, "abc.example.com:8080")
    assert repr(result) == f"origin of {BUCKET}: {FILE_ORIGIN} -> abc.example.com:8080"
    assert harness.service.config.buckets[BUCKET].origin == Origin("abc.example.com", 8080)
    assert StateFile(str(harness.state_file)).load().buckets[BUCKET] == {"origin": "abc.example.com:8080"}
    assert len(audit_lines) == 1
    event = audit_lines[0]
    assert (event["what"], event["subject"], event["old"], event["new"], event["channel"]) == (
        "origin",
        BUCKET,
        FILE_ORIGIN,
        "abc.example.com:8080",
        "ssh:admin@127.0.0.1",
    )


@pytest.mark.parametrize(
    "address",
    [
        "http://abc.example.com",
        "https://abc.example.com",
        "abc.example.com/images",
        "abc.example.com?x=1",
        "user@abc.example.com",
        "",
        "   ",
        "abc example.com",
        "abc.example.com:",
        "abc.example.com:0",
        "abc.example.com:65536",
        "abc.example.com:http",
        "10.10.10.256",
        "-abc.example.com",
        None,
        8080,
    ],
)
def test_set_origin_refuses_every_invalid_form_and_changes_nothing(
    harness: Harness, audit_lines: list[dict[str, Any]], address: Any
) -> None:
    """
    Each form the seed document forbids (a scheme, a path, blanks, a bad port,
    not a domain or IPv4 address) is refused with a clear message; the
    running configuration, the state file and the audit log stay untouched.
    """
    before = harness.service.config
    with pytest.raises(AdminError) as e:
        harness.edge().set_origin(BUCKET, address)
    assert "nothing changed" in str(e.value)
    assert "origin" in str(e.value)
    assert harness.service.config is before
    assert not harness.state_file.exists()
    assert audit_lines == []


def test_set_origin_on_an_unknown_bucket_names_the_known_ones(harness: Harness) -> None:
    """A typo in the bucket name is refused and the message lists the real buckets."""
    with pytest.raises(AdminError, match=f"no bucket named 'exmple-1250000000'.*{BUCKET}"):
        harness.edge().set_origin("exmple-1250000000", "10.10.10.10")


def test_origin_pull_cannot_be_enabled_without_an_origin(harness: Harness) -> None:
    """As the seed says, enabling origin-pull without an address cannot be saved."""
    edge = harness.edge()
    edge.add_bucket(NEW)
    with pytest.raises(AdminError, match="no origin address"):
        edge.enable_origin_pull(NEW)
    assert harness.service.config.buckets[NEW].origin_pull is False
    edge.set_origin(NEW, "10.10.10.10:8080")
    assert repr(edge.enable_origin_pull(NEW)) == f"origin_pull of {NEW}: off -> on"
    assert harness.service.config.buckets[NEW] == BucketConfig(origin="10.10.10.10:8080", origin_pull=True)


def test_disable_origin_pull_turns_misses_into_404(harness: Harness) -> None:
    """Disabling origin-pull is applied at once; doing it twice changes nothing more."""
    edge = harness.edge()
    assert repr(edge.disable_origin_pull(BUCKET)) == f"origin_pull of {BUCKET}: on -> off"
    assert harness.service.config.buckets[BUCKET].origin_pull is False
    assert repr(edge.disable_origin_pull(BUCKET)) == f"origin_pull of {BUCKET}: unchanged"


@pytest.mark.parametrize(
    ("args", "kwargs", "words"),
    [
        (("Example-1",), {}, "bucket name"),
        (("example",), {}, "bucket name"),
        ((BUCKET,), {}, "already exists"),
        ((NEW,), {"origin_pull": True}, "without an origin"),
        ((NEW,), {"origin": "http://x.example.com"}, "scheme"),
        ((NEW,), {"origin": ""}, "empty"),
        ((NEW,), {"origin": "x.example.com", "origin_pull": "yes"}, "True or False"),
    ],
)
def test_add_bucket_refuses_invalid_input(
    harness: Harness, args: tuple[Any, ...], kwargs: dict[str, Any], words: str
) -> None:
    """A bad name, an existing bucket, or a bad origin adds nothing."""
    before = harness.service.config
    with pytest.raises(AdminError, match=words):
        harness.edge().add_bucket(*args, **kwargs)
    assert harness.service.config is before


def test_remove_bucket_keeps_the_objects_and_adding_it_back_serves_them(harness: Harness) -> None:
    """Removing a bucket never deletes its files; adding it again brings it back whole."""
    stored = harness.data_dir / BUCKET / "1.jpg"
    stored.parent.mkdir(parents=True)
    stored.write_bytes(b"jpeg")
    edge = harness.edge()
    message = edge.remove_bucket(BUCKET)
    assert "stay in" in repr(message)
    assert BUCKET not in harness.service.config.buckets
    assert stored.read_bytes() == b"jpeg"
    edge.add_bucket(BUCKET, origin="10.0.0.1", origin_pull=True)
    assert harness.service.config.buckets[BUCKET] == BucketConfig(origin="10.0.0.1", origin_pull=True)
    assert stored.read_bytes() == b"jpeg"


def test_a_restart_keeps_every_live_change(harness: Harness) -> None:
    """A new daemon built from the same file and data directory starts with the live changes."""
    edge = harness.edge()
    edge.set_origin(BUCKET, "10.10.10.10:8080")
    edge.add_bucket(NEW, origin="abc.example.com", origin_pull=True)
    restarted = harness.build()
    assert restarted.config.buckets == harness.service.config.buckets
    assert restarted.config.buckets[BUCKET].origin == Origin("10.10.10.10", 8080)
    assert NEW in restarted.config.buckets


def test_a_change_that_cannot_be_saved_is_not_applied(
    harness: Harness, audit_lines: list[dict[str, Any]], tmp_path: Path
) -> None:
    """If the state file cannot be written the change is refused: never half-applied."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    harness.live.state_file = StateFile(str(blocker / "state.json"))
    before = harness.service.config
    with pytest.raises(AdminError, match="could not save"):
        harness.edge().set_origin(BUCKET, "10.10.10.10")
    assert harness.service.config is before
    assert harness.live.state == State()
    assert audit_lines == []


def test_a_change_saved_but_not_synced_is_applied_with_a_warning(
    harness: Harness,
    audit_lines: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """
    If the state file was replaced but its folder could not be synced, the
    change is in the file a restart loads: it is applied and audited, and the
    operator is warned that a crash may undo it (not told "nothing changed").
    """
    import stat

    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    warnings: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "cosedge.admin" and "not synced" in event.get("log_format", ""):
            warnings.append(event)

    monkeypatch.setattr(os, "fsync", fsync)
    observer = cast(ILogObserver, observe)
    globalLogPublisher.addObserver(observer)
    try:
        result = harness.edge().set_origin(BUCKET, "10.10.10.10")
    finally:
        globalLogPublisher.removeObserver(observer)
    assert str(result).splitlines() == [
        f"origin of {BUCKET}: {FILE_ORIGIN} -> 10.10.10.10",
        "warning: saved, but not synced to disk ([Errno 5] Input/output error): a crash of the machine may undo it",
    ]
    assert str(harness.service.config.buckets[BUCKET].origin) == "10.10.10.10"
    assert StateFile(str(harness.state_file)).load() == harness.live.state
    assert harness.live.state.buckets[BUCKET] == {"origin": "10.10.10.10"}
    assert [e["what"] for e in audit_lines] == ["origin"]
    assert len(warnings) == 1
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert str(harness.edge().set_origin(BUCKET, "10.10.10.11")) == f"origin of {BUCKET}: 10.10.10.10 -> 10.10.10.11"


def test_changes_and_revert_show_and_undo_live_changes(harness: Harness) -> None:
    """An operator can list live changes and hand a bucket back to the configuration file."""
    edge = harness.edge()
    assert repr(edge.changes()) == "(none)"
    edge.set_origin(BUCKET, "10.10.10.10")
    assert edge.changes() == [
        {"bucket": BUCKET, "change": "changed", "origin": "10.10.10.10", "origin_pull": "(file)", "rules": "(file)"}
    ]
    assert repr(edge.revert(BUCKET)) == f"origin of {BUCKET}: 10.10.10.10 -> {FILE_ORIGIN} (the file's settings apply)"
    assert str(harness.service.config.buckets[BUCKET].origin) == FILE_ORIGIN
    with pytest.raises(AdminError, match="no live changes"):
        edge.revert(BUCKET)


class HeldPool:
    """A reactor thread pool that runs queued work only when the test says so."""

    def __init__(self) -> None:
        self.queued: list[tuple[Callable[..., None], Callable[[], Any]]] = []

    def callInThreadWithCallback(self, on_result: Callable[..., None], f: Callable[[], Any]) -> None:
        self.queued.append((on_result, f))

    def run_one(self) -> None:
        on_result, f = self.queued.pop(0)
        on_result(True, f())


class PoolReactor(MemoryReactorClock):
    """A MemoryReactorClock with a :class:`HeldPool` as its thread pool."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = HeldPool()

    def getThreadPool(self) -> HeldPool:
        return self.pool

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


def in_a_held_pool(harness: Harness) -> PoolReactor:
    """Give the harness's service a reactor whose thread pool (the disk store's blocking calls) waits for the test."""
    reactor = PoolReactor()
    harness.service.reactor = reactor
    harness.service.store.run_blocking = partial(deferToThreadPool, reactor, reactor.pool)  # type: ignore[attr-defined]
    return reactor


def test_buckets_lists_origin_pull_and_usage(harness: Harness) -> None:
    """
    edge.buckets() shows each bucket; usage=True adds object count and
    bytes, counted in the reactor's thread pool (never on the reactor
    thread, which serves the buckets), one walk at a time.
    """
    (harness.data_dir / BUCKET / "a").mkdir(parents=True)
    (harness.data_dir / BUCKET / "a" / "b.jpg").write_bytes(b"12345")
    reactor = in_a_held_pool(harness)
    edge = harness.edge()
    results: list[Any] = []
    edge.buckets(usage=True).addBoth(results.append)
    edge.buckets(usage=True).addBoth(results.append)
    assert results == [] and len(reactor.pool.queued) == 1  # nothing walked on this thread; one walk at a time
    reactor.pool.run_one()
    assert len(results) == 1 and len(reactor.pool.queued) == 1
    reactor.pool.run_one()
    expected = [
        {"bucket": BUCKET, "origin": FILE_ORIGIN, "origin_pull": True, "live": "", "rules": 0, "objects": 1, "bytes": 5}
    ]
    assert results == [expected, expected]
    text = repr(edge.buckets())
    assert text.splitlines()[0].split() == ["bucket", "origin", "origin_pull", "live", "rules"]
    assert text.splitlines()[1].split() == [BUCKET, FILE_ORIGIN, "on", "0"]


def test_stats_and_fills_report_the_counters(harness: Harness) -> None:
    """edge.stats() shows the service's counters and fills running/queued; fills() is empty at rest."""
    harness.service.stats.inc("hits", 3)
    harness.service.stats.fill_failed("http-404")
    report = harness.edge().stats()
    assert report["hits"] == 3
    assert report["fills_failed_by_reason"] == {"http-404": 1}
    assert report["fills_running"] == 0 and report["fills_queued"] == 0
    assert "hits" in repr(report)
    assert repr(harness.edge().fills()) == "(none)"


# -- the façade: objects --


def test_purge_deletes_one_stored_object(harness: Harness, audit_lines: list[dict[str, Any]]) -> None:
    """purge removes the stored file (audited); purging again says nothing was stored."""
    stored = harness.data_dir / BUCKET / "img" / "a b.jpg"
    stored.parent.mkdir(parents=True)
    stored.write_bytes(b"x")
    edge = harness.edge()
    assert repr(edge.purge(BUCKET, "img/a b.jpg")) == f"purged {BUCKET}/img/a b.jpg"
    assert not stored.exists()
    assert [e["what"] for e in audit_lines] == ["object"]
    assert "not stored" in repr(edge.purge(BUCKET, "img/a b.jpg"))


@pytest.mark.parametrize("key", ["../etc/passwd", "a/../../b", ".cosedge/state.json", "a\x00b", "", "/", 7])
def test_purge_refuses_keys_that_could_leave_the_bucket(harness: Harness, key: Any) -> None:
    """Keys are validated like request keys: nothing outside the bucket can be deleted."""
    harness.state_file.parent.mkdir(parents=True, exist_ok=True)
    harness.state_file.write_text('{"version": 1}')
    with pytest.raises(AdminError):
        harness.edge().purge(BUCKET, key)
    assert harness.state_file.exists()


def test_prefetch_copies_an_object_now(harness: Harness) -> None:
    """prefetch pulls one object from the origin and fires with the outcome."""
    harness.origin.add("1.jpg", b"jpeg bytes", content_type="image/jpeg")
    d = harness.edge().prefetch(BUCKET, "1.jpg")
    results: list[Any] = []
    d.addBoth(results.append)
    for _ in range(20):
        if results:
            break
        harness.agent.flush()
    assert results and results[0].stored, results
    assert (harness.data_dir / BUCKET / "1.jpg").read_bytes() == b"jpeg bytes"


def test_prefetch_needs_an_origin(harness: Harness) -> None:
    """A bucket without an origin cannot prefetch."""
    harness.edge().add_bucket(NEW)
    with pytest.raises(AdminError, match="no origin"):
        harness.edge().prefetch(NEW, "1.jpg")


def test_help_names_every_command(harness: Harness) -> None:
    """help(edge) documents each command an operator needs."""
    import pydoc

    text = pydoc.render_doc(harness.edge(), renderer=pydoc.plaintext)  # type: ignore[attr-defined]
    for name in [
        "buckets",
        "set_origin",
        "enable_origin_pull",
        "disable_origin_pull",
        "add_bucket",
        "remove_bucket",
        "fills",
        "stats",
        "purge",
        "prefetch",
        "reload",
        "revert",
        "processes",
    ]:
        assert f"edge.{name}(" in text


def test_processes_of_a_one_process_daemon(harness: Harness) -> None:
    """edge.processes() shows the one process, serving, when workers is 1."""
    rows = harness.edge().processes()
    assert rows == [{"process": 0, "pid": os.getpid(), "serving": True, "uptime": None, "restarts": 0}]
    assert repr(rows).splitlines()[0].split() == ["process", "pid", "serving", "uptime", "restarts"]


# -- reload (SIGHUP) --


def test_reload_applies_a_good_file_and_keeps_live_changes(harness: Harness, audit_lines: list[dict[str, Any]]) -> None:
    """
    A reload reads the edited file; live changes stay on top of it, and every
    resulting change is audited with the reload's channel.
    """
    harness.edge().set_origin(BUCKET, "10.10.10.10")
    audit_lines.clear()
    harness.config_file.write_text(
        toml_for(harness.data_dir, f'[buckets."{NEW}"]\norigin = "10.0.0.2"\norigin_pull = true\n', origin_pull=False)
    )
    changes = harness.live.reload("sighup")
    config = harness.service.config
    assert config.buckets[BUCKET] == BucketConfig(origin="10.10.10.10", origin_pull=False)
    assert config.buckets[NEW] == BucketConfig(origin="10.0.0.2", origin_pull=True)
    assert {(c.what, c.subject) for c in changes} == {("origin_pull", BUCKET), ("bucket", NEW)}
    assert {e["channel"] for e in audit_lines} == {"sighup"}


def test_reload_keeps_listeners_and_says_a_restart_is_needed(harness: Harness) -> None:
    """
    Listeners and the data directory are bound at start: a reload keeps the
    running values and logs that the edited setting needs a restart.
    """
    warnings: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "cosedge.admin" and "restart" in event.get("log_format", ""):
            warnings.append(event["settings"])

    harness.config_file.write_text(
        toml_for(harness.data_dir).replace("tcp:0:interface=127.0.0.1", "tcp:9999:interface=127.0.0.1")
    )
    observer = cast(ILogObserver, observe)
    globalLogPublisher.addObserver(observer)
    try:
        harness.live.reload("sighup")
    finally:
        globalLogPublisher.removeObserver(observer)
    assert harness.service.config.server.listen == ("tcp:0:interface=127.0.0.1",)
    assert warnings == ["listen"]


@pytest.fixture
def restart_warnings() -> Iterator[list[str]]:
    """The settings named by each "needs a restart" warning logged during the test."""
    warnings: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "cosedge.admin" and "restart" in event.get("log_format", ""):
            warnings.append(event["settings"])

    observer = cast(ILogObserver, observe)
    globalLogPublisher.addObserver(observer)
    yield warnings
    globalLogPublisher.removeObserver(observer)


def test_reload_of_an_unedited_file_says_nothing_of_a_command_line_listen(
    tmp_path: Path, restart_warnings: list[str]
) -> None:
    """
    A daemon started with --listen (overriding the file's listen) and sent
    SIGHUP on an unedited file keeps the command-line listener and warns of
    nothing; editing the file's listen afterwards is reported once.
    """
    harness = Harness(tmp_path)
    config = load_config(harness.config_file)
    override = ("tcp:8999:interface=127.0.0.1",)
    harness.service = build_service(
        evolve(config, server=evolve(config.server, listen=override)),
        MemoryReactorClock(),
        config_path=str(harness.config_file),
        _agent=harness.agent,
        _store=DiskStore(str(harness.data_dir)),
    )
    harness.live.reload("sighup")
    assert restart_warnings == []
    assert harness.service.config.server.listen == override
    harness.config_file.write_text(
        toml_for(harness.data_dir).replace("tcp:0:interface=127.0.0.1", "tcp:9999:interface=127.0.0.1")
    )
    harness.live.reload("sighup")
    harness.live.reload("sighup")
    assert restart_warnings == ["listen"]
    assert harness.service.config.server.listen == override


def test_reload_says_the_admin_listener_and_the_json_log_need_a_restart(
    tmp_path: Path, restart_warnings: list[str]
) -> None:
    """
    The admin listener and the JSON log file are opened at start: a reload
    that edits them logs that they need a restart, while [admin]
    min_free_bytes (read live) changes without a word.
    """
    harness = Harness(tmp_path, '[admin]\nlisten = "tcp:0:interface=127.0.0.1"\n')
    harness.config_file.write_text(
        toml_for(
            harness.data_dir,
            '[admin]\nlisten = "tcp:0:interface=127.0.0.1"\nmin_free_bytes = 5\n',
        )
    )
    harness.live.reload("sighup")
    assert restart_warnings == []
    assert harness.service.config.extra["admin"]["min_free_bytes"] == 5
    harness.config_file.write_text(
        toml_for(
            harness.data_dir,
            '[admin]\nlisten = "tcp:1:interface=127.0.0.1"\n'
            f'[log]\njson_file = "{tmp_path / "events.json"}"\njson_keep = 2\n',
        )
    )
    harness.live.reload("sighup")
    assert restart_warnings == ["[admin] listen, [log] json_file, [log] json_keep"]


def test_reload_applies_fill_connect_timeout_live(
    harness: Harness, audit_lines: list[dict[str, Any]], restart_warnings: list[str]
) -> None:
    """
    [fill] connect_timeout changes live on a reload (new origin connections
    read it): it is audited as a change, and no restart is asked for.
    """
    harness.config_file.write_text(toml_for(harness.data_dir, "[fill]\nconnect_timeout = 2.5\n"))
    changes = harness.live.reload("sighup")
    assert harness.service.config.fill.connect_timeout == 2.5
    assert [(c.what, c.subject, c.new) for c in changes] == [("connect_timeout", "fill", 2.5)]
    assert [e["what"] for e in audit_lines] == ["connect_timeout"]
    assert restart_warnings == []


def test_reload_passes_other_sections_on_but_keeps_the_running_manhole(tmp_path: Path) -> None:
    """
    Sections read live by other features ([admin]) follow the file on a
    reload; the [manhole] section stays as started (its listeners are bound).
    """
    harness = Harness(tmp_path, '[manhole]\ntelnet = "unix:/tmp/never-started.sock"\n')
    running_manhole = harness.service.config.extra["manhole"]
    harness.config_file.write_text(
        toml_for(harness.data_dir, '[admin]\nmin_free_bytes = 12345\n[manhole]\ntelnet = "unix:/tmp/other.sock"\n')
    )
    harness.live.reload("sighup")
    assert harness.service.config.extra["admin"] == {"min_free_bytes": 12345}
    assert harness.service.config.extra["manhole"] == running_manhole


@pytest.mark.parametrize(
    "text",
    [
        "this is not toml [",
        '[buckets."example-1250000000"]\norigin = "http://abc.example.com"\n',
        '[buckets."example-1250000000"]\norigin_pull = true\n',
        '[manhole]\ntelnet = "tcp:2323"\n',
        "[admin]\nmin_free_bytes = -1\n",
    ],
)
def test_reload_rejects_a_bad_file_and_keeps_running(harness: Harness, text: str) -> None:
    """A broken or invalid file is rejected; the running configuration stays as it was."""
    before = harness.service.config
    harness.config_file.write_text(text)
    with pytest.raises(AdminError, match="reload rejected"):
        harness.live.reload("sighup")
    assert harness.service.config is before


def test_sighup_reloads_through_the_reactor_and_is_restored_on_stop(harness: Harness) -> None:
    """
    The SIGHUP handler hands the reload to the reactor thread (never runs it
    inside the signal handler) and the previous handler is back after stop.
    """

    class ThreadsReactor(MemoryReactorClock):
        def __init__(self) -> None:
            super().__init__()
            self.from_thread: list[Callable[[], None]] = []

        def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
            self.from_thread.append(lambda: f(*args, **kwargs))

    reactor = ThreadsReactor()
    directlyProvides(reactor, IReactorThreads)  # callFromThread is all the handler uses
    harness.service.reactor = reactor
    previous = signal.getsignal(signal.SIGHUP)
    harness.live.startService()
    try:
        harness.config_file.write_text(toml_for(harness.data_dir, origin_pull=False))
        os.kill(os.getpid(), signal.SIGHUP)
        deadline = time.monotonic() + 5
        while not reactor.from_thread and time.monotonic() < deadline:
            time.sleep(0.01)
        assert harness.service.config.buckets[BUCKET].origin_pull is True  # not yet: queued for the reactor
        assert len(reactor.from_thread) == 1
        reactor.from_thread.pop()()
        assert harness.service.config.buckets[BUCKET].origin_pull is False
    finally:
        harness.live.stopService()
    assert signal.getsignal(signal.SIGHUP) == previous


def test_no_sighup_handler_without_a_threaded_reactor(harness: Harness) -> None:
    """Unit-test services (MemoryReactorClock) never touch the process's signal handlers."""
    previous = signal.getsignal(signal.SIGHUP)
    harness.live.startService()
    assert signal.getsignal(signal.SIGHUP) == previous
    harness.live.stopService()


def test_start_refuses_live_changes_that_no_longer_fit(harness: Harness) -> None:
    """A state file at odds with the file stops the start with a clear message, before serving."""
    harness.edge().set_origin(BUCKET, "10.10.10.10")
    harness.state_file.write_text('{"version": 1, "buckets": {"example-1250000000": {"origin_pull": true}}}')
    harness.config_file.write_text(toml_for(harness.data_dir).replace(f'origin = "{FILE_ORIGIN}"', ""))
    with pytest.raises(ConfigError, match="origin_pull cannot be enabled"):
        check_config(load_config(harness.config_file))
    with pytest.raises(ConfigError, match="origin_pull cannot be enabled"):
        harness.build()


# -- the [manhole] section --


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """An authorized_keys file with one key and a password file with one user."""
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from twisted.conch.ssh import keys

    key = keys.Key(ed25519.Ed25519PrivateKey.generate())
    authorized = tmp_path / "authorized_keys"
    authorized.write_bytes(b"# operators\n" + key.public().toString("openssh") + b" op@laptop\n")
    passwords = tmp_path / "passwd"
    passwords.write_text("# users\nalice:" + admin_passwords.hash_password("s3cret") + "\n")
    return {"keys": str(authorized), "passwords": str(passwords), "dir": str(tmp_path)}


def test_a_good_manhole_section_is_accepted(files: dict[str, str]) -> None:
    """SSH with keys plus telnet on loopback with passwords is a valid setup."""
    settings = parse_manhole(
        {
            "ssh": "tcp:2222:interface=127.0.0.1",
            "ssh_authorized_keys": files["keys"],
            "telnet": "tcp:2323:interface=127.0.0.1",
            "telnet_passwords": files["passwords"],
        },
        "var",
    )
    assert settings.ssh_host_key == os.path.join("var", ".cosedge", "ssh_host_ed25519_key")
    admin_manhole.check_manhole_files(settings)
    unix = parse_manhole({"telnet": "unix:/run/cosedge/manhole.sock"}, "var")
    assert admin_manhole.telnet_endpoint_parts(unix.telnet or "")[0] == "unix"


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ({}, "neither ssh nor telnet"),
        ({"telnet": "tcp:2323"}, "refusing to listen for telnet on all interfaces"),
        ({"telnet": "tcp:2323:interface=0.0.0.0", "telnet_passwords": "p"}, "refusing to listen for telnet"),
        ({"telnet": "tcp:2323:interface=10.1.2.3", "telnet_passwords": "p"}, "interface '10.1.2.3'"),
        ({"telnet": "tcp:2323:interface=localhost", "telnet_passwords": "p"}, "refusing"),
        ({"telnet": "tcp:2323:interface=127.0.0.1"}, "telnet on TCP needs telnet_passwords"),
        ({"telnet": "unix:/tmp/m.sock:mode=666"}, "mode 600"),
        ({"telnet": "ssl:2323"}, "only 'unix:PATH' or 'tcp:PORT"),
        ({"telnet": "tcp:notaport:interface=127.0.0.1", "telnet_passwords": "p"}, "not a valid endpoint"),
        ({"ssh": "tcp:2222"}, "ssh needs ssh_authorized_keys"),
        ({"ssh": "nonsense:1", "ssh_authorized_keys": "k"}, "ssh 'nonsense:1' is not a valid endpoint"),
        ({"ssh": 2222, "ssh_authorized_keys": "k"}, "ssh must be a non-empty string"),
        ({"ssh_authorized_keys": "k", "telnet": "unix:/tmp/m.sock"}, "ssh_authorized_keys is set but ssh is not"),
        ({"telnet": "unix:/tmp/m.sock", "port": 1}, "unknown setting(s) port"),
    ],
)
def test_a_bad_manhole_section_is_refused_naming_the_field(table: dict[str, Any], words: str) -> None:
    """Every unsafe or malformed [manhole] setting stops the daemon with a message naming it."""
    with pytest.raises(ConfigError) as e:
        parse_manhole(table, "var")
    assert words in str(e.value)
    assert str(e.value).startswith("[manhole]")


def test_manhole_files_are_checked_before_start(files: dict[str, str], tmp_path: Path) -> None:
    """Unreadable or unusable key and password files are refused at start, naming the file."""
    empty = tmp_path / "empty_keys"
    empty.write_text("# nobody yet\n")
    bad = tmp_path / "bad_passwd"
    bad.write_text("alice:plaintext\n")
    public = tmp_path / "host_key.pub"
    public.write_text(Path(files["keys"]).read_text().splitlines()[1])
    cases = [
        ({"ssh": "tcp:2222", "ssh_authorized_keys": str(tmp_path / "missing")}, "cannot read"),
        ({"ssh": "tcp:2222", "ssh_authorized_keys": str(empty)}, "no usable public key"),
        ({"ssh": "tcp:2222", "ssh_authorized_keys": files["keys"], "ssh_host_key": str(public)}, "public key"),
        ({"telnet": "unix:/tmp/m.sock", "telnet_passwords": str(bad)}, "line 1"),
    ]
    for table, words in cases:
        with pytest.raises(ConfigError, match=words):
            admin_manhole.check_manhole_files(parse_manhole(table, "var"))


def test_check_config_validates_the_manhole_section(files: dict[str, str]) -> None:
    """The twistd options check refuses a config whose [manhole] is unsafe."""
    config = Config(
        server=ServerConfig(data_dir=files["dir"]), extra={"manhole": {"telnet": "tcp:2323:interface=0.0.0.0"}}
    )
    with pytest.raises(ConfigError, match="refusing"):
        check_config(config)


# -- telnet passwords --


def test_password_hashes_verify_only_the_right_password() -> None:
    """The scrypt line format verifies the right password and nothing else."""
    encoded = admin_passwords.hash_password("correct horse")
    assert encoded.startswith("scrypt$16384$8$1$")
    assert admin_passwords.verify_password(encoded, "correct horse")
    assert not admin_passwords.verify_password(encoded, "correct horse ")
    assert not admin_passwords.verify_password(encoded, "")
    assert not admin_passwords.verify_password("scrypt$garbage", "correct horse")
    assert admin_passwords.hash_password("x") != admin_passwords.hash_password("x")  # salted


def test_hash_password_command_prints_a_usable_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`python -m cosedge.admin hash-password alice` prints a line the password file accepts."""
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdin", io.StringIO("s3cret\n"))
    monkeypatch.setattr(sys, "stdout", out)
    assert admin_passwords.main(["hash-password", "alice"]) == 0
    line = out.getvalue().strip()
    path = tmp_path / "passwd"
    path.write_text(line + "\n")
    users = admin_passwords.read_password_file(str(path))
    assert list(users) == ["alice"]
    assert admin_passwords.verify_password(users["alice"], "s3cret")
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert admin_passwords.main(["hash-password", "bad:name"]) == 2
    assert admin_passwords.main([]) == 2


def test_password_checker_accepts_the_right_password_only(files: dict[str, str]) -> None:
    """The telnet checker reads the file at login, hashes off the reactor thread, and refuses wrong input."""
    from twisted.cred.credentials import UsernamePassword
    from twisted.cred.error import UnauthorizedLogin

    from cosedge.admin.telnet import PasswordFileChecker

    class InlinePool:
        def callInThreadWithCallback(self, on_result: Callable[..., None], f: Callable[[], Any]) -> None:
            on_result(True, f())

    class Reactor:
        def getThreadPool(self) -> InlinePool:
            return InlinePool()

        def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
            f(*args)

    checker = PasswordFileChecker(files["passwords"], Reactor())

    def outcome(user: bytes, password: bytes) -> Any:
        results: list[Any] = []
        checker.requestAvatarId(UsernamePassword(user, password)).addBoth(results.append)
        assert results
        return results[0]

    assert outcome(b"alice", b"s3cret") == b"alice"
    for user, password in [(b"alice", b"wrong"), (b"bob", b"s3cret"), (b"alice", b"")]:
        result = outcome(user, password)
        assert result.check(UnauthorizedLogin), result


def telnet_login_connection(checker: Any) -> tuple[MemoryReactorClock, StringTransport, Any, list[str]]:
    """A telnet connection at the password prompt's protocol, on a MemoryReactorClock; also the sessions opened."""
    from twisted.conch.telnet import TelnetTransport
    from twisted.cred.portal import Portal

    from cosedge.admin.telnet import _Login, _TelnetRealm

    sessions: list[str] = []

    def namespace(channel: str) -> dict[str, Any]:
        sessions.append(channel)
        return {}

    reactor = MemoryReactorClock()
    portal = Portal(_TelnetRealm(namespace), [checker])
    telnet = TelnetTransport(_Login, portal, reactor)
    transport = StringTransport()
    telnet.makeConnection(transport)
    return reactor, transport, telnet, sessions


def test_a_telnet_connection_that_never_logs_in_is_closed() -> None:
    """
    A telnet client that connects and never sends a user name (or a
    password) is disconnected after 30 seconds, so idle connections cannot
    use up the daemon's file descriptors.
    """
    from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse

    reactor, transport, _, _ = telnet_login_connection(InMemoryUsernamePasswordDatabaseDontUse(alice=b"pw"))
    assert b"Username: " in transport.value()
    reactor.advance(29)
    assert not transport.disconnecting
    reactor.advance(1)
    assert transport.disconnecting
    assert b"Login timed out" in transport.value()
    assert reactor.getDelayedCalls() == []


def test_a_telnet_login_cancels_the_login_deadline() -> None:
    """A user who logs in keeps the shell open past the login deadline."""
    from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse

    reactor, transport, telnet, sessions = telnet_login_connection(InMemoryUsernamePasswordDatabaseDontUse(alice=b"pw"))
    telnet.dataReceived(b"alice\r\n")
    telnet.dataReceived(b"pw\r\n")
    assert sessions == ["telnet:alice@192.168.1.1"]
    assert b"cosedge manhole (telnet:alice@192.168.1.1)" in transport.value()
    reactor.advance(3600)
    assert not transport.disconnecting
    assert b"Login timed out" not in transport.value()


def test_a_login_checked_after_the_deadline_opens_no_shell() -> None:
    """
    When the deadline closes the connection while the password is still
    being checked, a late success opens no shell on the closed connection.
    """
    from twisted.cred import credentials
    from twisted.internet.defer import Deferred

    pending: list[Deferred[bytes]] = []

    class SlowChecker:
        credentialInterfaces = (credentials.IUsernamePassword,)

        def requestAvatarId(self, creds: Any) -> Deferred[bytes]:
            pending.append(Deferred())
            return pending[-1]

    reactor, transport, telnet, _ = telnet_login_connection(SlowChecker())
    telnet.dataReceived(b"alice\r\npw\r\n")
    assert len(pending) == 1
    reactor.advance(30)
    assert transport.disconnecting
    telnet.connectionLost(Failure(ConnectionDone()))
    pending[0].callback(b"alice")
    assert b"cosedge manhole" not in transport.value()  # no shell started on the closed connection


def test_password_checks_run_one_at_a_time(files: dict[str, str]) -> None:
    """
    Many telnet logins at once hash their passwords one after the other, so
    they never take more than one thread of the pool the fills use.
    """
    from twisted.cred.credentials import UsernamePassword
    from twisted.cred.error import UnauthorizedLogin

    from cosedge.admin.telnet import PasswordFileChecker

    reactor = PoolReactor()
    pool = reactor.pool
    checker = PasswordFileChecker(files["passwords"], reactor)
    results: list[Any] = []
    for password in (b"wrong", b"s3cret", b"also wrong"):
        checker.requestAvatarId(UsernamePassword(b"alice", password)).addBoth(results.append)
    assert len(pool.queued) == 1
    pool.run_one()
    assert len(pool.queued) == 1 and len(results) == 1
    pool.run_one()
    pool.run_one()
    assert pool.queued == []
    assert results[0].check(UnauthorizedLogin) and results[1] == b"alice" and results[2].check(UnauthorizedLogin)


def test_a_flood_of_password_checks_is_refused_beyond_the_waiting_limit(files: dict[str, str]) -> None:
    """
    Login attempts beyond max_waiting queued behind the running check are
    refused at once (no hashing queued without bound); once the queue
    drains, logins work again.
    """
    from twisted.cred.credentials import UsernamePassword
    from twisted.cred.error import UnauthorizedLogin

    from cosedge.admin.telnet import PasswordFileChecker

    reactor = PoolReactor()
    checker = PasswordFileChecker(files["passwords"], reactor)
    checker.max_waiting = 2
    results: list[Any] = []
    for _ in range(5):  # one runs, two wait, two are refused
        checker.requestAvatarId(UsernamePassword(b"alice", b"wrong")).addBoth(results.append)
    assert len(results) == 2 and all(r.check(UnauthorizedLogin) for r in results)
    for _ in range(3):
        reactor.pool.run_one()
    assert len(results) == 5 and reactor.pool.queued == []
    checker.requestAvatarId(UsernamePassword(b"alice", b"s3cret")).addBoth(results.append)
    reactor.pool.run_one()
    assert results[-1] == b"alice"


def test_the_host_key_is_created_privately_and_durably(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    On first start the SSH host key is written to a fresh private file that
    no planted symbolic link can redirect (not even at the name an older
    cosedge used), and the folder is synced after the rename.
    """
    from cosedge.admin.ssh import load_host_key

    folder = tmp_path / "keys"
    folder.mkdir()
    path = folder / "ssh_host_ed25519_key"
    victim = tmp_path / "victim"
    victim.write_bytes(b"not yours")
    (folder / f"{path.name}.{os.getpid()}.tmp").symlink_to(victim)
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    key = load_host_key(str(path))
    assert victim.read_bytes() == b"not yours"
    assert not path.is_symlink()
    assert path.stat().st_mode & 0o777 == 0o600
    assert not key.isPublic()
    assert synced[-1] == folder.stat().st_ino
    assert path.stat().st_ino in synced
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"{path.name}.{os.getpid()}.tmp", path.name])
    assert load_host_key(str(path)) == key  # kept, not generated again


# -- the shell --


def test_shell_runs_edge_commands_and_shows_refusals_as_one_line(harness: Harness) -> None:
    """
    Typing into the manhole runs Python with ``edge`` in scope; a refused
    change prints one ``error:`` line instead of a traceback.
    """
    from twisted.conch.insults import insults

    from cosedge.admin.shells import Shell

    transport = StringTransport()
    protocol = insults.ServerProtocol(Shell, {"edge": harness.edge("telnet:unix")}, "telnet:unix")
    protocol.makeConnection(transport)
    assert b"cosedge manhole (telnet:unix)" in transport.value()
    transport.clear()
    protocol.dataReceived(b"edge.set_origin('example-1250000000', 'http://abc.example.com')\r")
    output = transport.value().decode()
    assert "error: set_origin refused: origin address" in output and "has a scheme" in output
    assert "Traceback" not in output
    transport.clear()
    protocol.dataReceived(b"edge.set_origin('example-1250000000', 'abc.example.com')\r")
    assert f"origin of {BUCKET}: {FILE_ORIGIN} -> abc.example.com" in transport.value().decode()
    assert str(harness.service.config.buckets[BUCKET].origin) == "abc.example.com"


def test_the_shell_prints_a_bucket_usage_table_when_the_walk_ends(harness: Harness) -> None:
    """
    edge.buckets(usage=True) typed into the shell answers at once with a
    Deferred; the table follows, from its first line, when the walk ends.
    """
    from twisted.conch.insults import insults

    from cosedge.admin.shells import Shell

    reactor = in_a_held_pool(harness)
    transport = StringTransport()
    protocol = insults.ServerProtocol(Shell, {"edge": harness.edge("telnet:unix")}, "telnet:unix")
    protocol.makeConnection(transport)
    transport.clear()
    protocol.dataReceived(b"edge.buckets(usage=True)\r")
    assert "<Deferred #0>" in transport.value().decode()
    reactor.pool.run_one()
    output = transport.value().decode()
    assert (
        "Deferred #0 called back:\r\nbucket              origin          origin_pull  live  rules  objects  bytes"
        in output
    )
    assert f"{BUCKET}  {FILE_ORIGIN}  on                 0      0        0" in output


# -- one command per ssh invocation (scripts) --


def run(source: str, namespace: dict[str, Any]) -> tuple[str, list[int]]:
    from cosedge.admin.shells import run_command

    written: list[bytes] = []
    codes: list[int] = []
    run_command(source, namespace, written.append, codes.append)
    return b"".join(written).decode(), codes


def test_a_command_prints_its_value_and_exits_0(harness: Harness) -> None:
    """`ssh … 'edge.buckets()'` prints what the shell would show and succeeds."""
    out, codes = run("edge.buckets()", {"edge": harness.edge("ssh:ops@127.0.0.1")})
    assert out.splitlines()[0].split() == ["bucket", "origin", "origin_pull", "live", "rules"]
    assert codes == [0]
    out, codes = run("x = 2; print(x * 21)", {})
    assert (out, codes) == ("42\n", [0])


def test_a_refused_command_prints_one_error_line_and_exits_1(harness: Harness) -> None:
    """A script sees a refused change as exit status 1 and one error line; nothing changed."""
    before = harness.service.config
    out, codes = run(f"edge.set_origin({BUCKET!r}, 'http://x')", {"edge": harness.edge()})
    assert out.startswith("error: set_origin refused") and out.count("\n") == 1
    assert codes == [1]
    assert harness.service.config is before
    out, codes = run("1/0", {})
    assert "ZeroDivisionError" in out and "run_command" not in out
    assert codes == [1]


def test_a_command_returning_a_deferred_waits_for_it() -> None:
    """`ssh … 'edge.prefetch(...)'` ends only when the fill does, with its outcome."""
    from twisted.internet.defer import Deferred

    pending: Deferred[str] = Deferred()
    written: list[bytes] = []
    codes: list[int] = []
    from cosedge.admin.shells import run_command

    run_command("d", {"d": pending}, written.append, codes.append)
    assert codes == []
    pending.callback("stored")
    assert (b"".join(written), codes) == (b"'stored'\n", [0])


def test_an_ssh_connection_that_never_logs_in_is_closed(files: dict[str, str]) -> None:
    """
    An SSH connection that does not log in within a minute, key exchange
    included, is closed: a network peer cannot hold manhole connections open.
    """
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import MemoryReactorClock, StringTransport

    from cosedge.admin.ssh import _ssh_factory
    from tests.helpers import capture_logs

    settings = parse_manhole(
        {
            "ssh": "tcp:2222:interface=127.0.0.1",
            "ssh_authorized_keys": files["keys"],
            "ssh_host_key": os.path.join(files["dir"], "host_key"),
        },
        files["dir"],
    )
    reactor = MemoryReactorClock()
    factory = _ssh_factory(settings, lambda channel: {}, reactor)
    factory.doStart()
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    with capture_logs() as events:
        protocol.makeConnection(transport)
        reactor.advance(59)
        assert not transport.disconnecting
        reactor.advance(1)
    assert transport.disconnecting
    assert any("timed out" in e.get("log_format", "") for e in events)
