"""
Backfill and verify jobs (:mod:`cosedge.jobs`) without a reactor: the whole
daemon built by ``build_service`` on a ``MemoryReactorClock``, its store on
disk, its origin a ``FakeOrigin`` (behind a ``GatedAgent`` where a test holds
requests), its jobs driven through the ``edge`` façade.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from treq.testing import RequestTraversalAgent
from twisted.conch.insults import insults
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, globalLogPublisher

from cosedge.admin.errors import AdminError
from cosedge.admin.shell import Edge
from cosedge.admin.values import Report
from cosedge.config import ConfigError, JobsConfig, load_config, parse_config
from cosedge.jobs import Job, JobsService
from cosedge.jobs.sources import FileSource, Skip, parse_keys_line, parse_loc, parse_log_line
from cosedge.service import EdgeService, build_service
from cosedge.storage.disk import DiskStore
from cosedge.testing import FakeOrigin
from tests.helpers import GatedAgent, result_of

BUCKET = "example-1250000000"
BARE = "bare-1250000000"  # a bucket with no origin: its keys fail as no-origin
_LOG = '203.0.113.9 - - [10/Oct/2023:13:55:36 +0000] "{method} {target} HTTP/1.1" {status} 512 "-" "curl/8.0 \\"x\\""'
_CONFIG = """
[server]
listen = ["tcp:0:interface=127.0.0.1"]
data_dir = "{data_dir}"
access_log = ""

[jobs]
{jobs}

[buckets."{bucket}"]
origin = "10.10.10.10:8080"
origin_pull = true

[buckets."{bare}"]
"""


def log_line(target: str, status: int = 200, method: str = "GET") -> str:
    return _LOG.format(method=method, target=target, status=status)


class Daemon:
    """A whole daemon on a MemoryReactorClock: its origin, its clock, its ``edge``."""

    def __init__(self, root: Path, jobs: str = "", *, gated: bool = False, origin: FakeOrigin | None = None) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.origin = origin or FakeOrigin()
        self.inner = RequestTraversalAgent(self.origin)
        self.agent: Any = GatedAgent(self.inner) if gated else self.inner
        self.clock = MemoryReactorClock()
        config = root / "cosedge.toml"
        config.write_text(_CONFIG.format(data_dir=self.data_dir, jobs=jobs, bucket=BUCKET, bare=BARE))
        self.service: EdgeService = build_service(
            load_config(config), self.clock, _agent=self.agent, _store=DiskStore(str(self.data_dir))
        )
        self.service.startService()
        self.clock.advance(0)

    @property
    def jobs(self) -> JobsService:
        assert self.service.jobs is not None
        return self.service.jobs

    def edge(self, channel: str = "test") -> Edge:
        edge: Edge = self.service.getServiceNamed("admin").edge(channel)
        return edge

    def job(self, job_id: int = 1) -> Job:
        return self.jobs.get(job_id)

    def run(self, seconds: float = 1.0, *, release: bool = True, step: float = 0.1) -> None:
        """Let ``seconds`` pass in steps, letting bytes flow to and from the origin."""
        for _ in range(round(seconds / step)):
            if release and isinstance(self.agent, GatedAgent):
                self.agent.release()
            for _ in range(3):
                self.inner.flush()
            self.clock.advance(step)

    def stop(self) -> None:
        stopped = self.service.stopService()
        self.run(15)
        assert result_of(stopped) is not None


def keys_file(root: Path, lines: list[str], name: str = "keys.txt") -> Path:
    path = root / name
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def add_keys(origin: FakeOrigin, count: int, size: int = 10) -> list[str]:
    keys = [f"k/{i}.bin" for i in range(count)]
    for i, key in enumerate(keys):
        origin.add(key, bytes([65 + i % 26]) * size, headers={"ETag": f'"e{i}"'})
    return keys


def job_id(message: str) -> int:
    match = re.match(r"job (\d+) ", message)
    assert match is not None, message
    return int(match.group(1))


@pytest.fixture
def audit_lines() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, lambda e: events.append(e) if e.get("log_namespace") == "cosedge.audit" else None)
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


# -- the sources --


def test_a_file_of_keys_one_a_line() -> None:
    """Plain keys as edge.prefetch takes them; blank and comment lines ignored; invalid keys are bad lines."""
    assert parse_keys_line(b"img/a b.jpg") == ("img", "a b.jpg")
    assert parse_keys_line(b"/1.jpg") == ("1.jpg",)
    assert parse_keys_line(b"100%.txt") == ("100%.txt",)
    assert parse_keys_line(b"") == parse_keys_line(b"# a comment") == Skip(False, "blank")
    for line in (b"a/../b", b"a\x01b", b".cosedge/state.json", b"a//b"):
        assert parse_keys_line(line) == Skip(True, "invalid-key"), line
    assert parse_keys_line(b"\xff.jpg") == Skip(True, "not-utf8")
    assert parse_keys_line(b"x" * 900) == Skip(True, "key-too-long")


@pytest.mark.parametrize(
    ("line", "parsed"),
    [
        (log_line("/img/a%20b.jpg?v=2"), ("img", "a b.jpg")),  # combined format, query dropped, decoded
        ('::1 - frank [10/Oct/2000:13:55:36 -0700] "GET /1.jpg HTTP/1.0" 200 -', ("1.jpg",)),  # common format
        (log_line("http://www.example.com/x/y"), ("x", "y")),  # absolute form
        ('1.2.3.4 - - [10/Oct/2000:13:55:36 -0700] "GET /old" 200 5', ("old",)),  # HTTP/0.9
        (log_line("/1.jpg", method="POST"), Skip(False, "not-get")),
        (log_line("/1.jpg", status=404), Skip(False, "not-200")),
        (log_line("/1.jpg", status=304), Skip(False, "not-200")),
        (log_line("/"), Skip(False, "no-key")),
        ("garbage", Skip(True, "unparsable")),
        ('1.2.3.4 - - [10/Oct/2000:13:55:36 -0700] "-" 400 0 "-" "-"', Skip(True, "unparsable")),
        (log_line("/a/%2e%2e/b"), Skip(True, "invalid-key")),
        (log_line("/%252e%252e/x"), Skip(True, "invalid-key")),  # double-encoded
        (log_line("/a%ZZ"), Skip(True, "invalid-key")),
        (log_line("/" + "x" * 900), Skip(True, "key-too-long")),
    ],
)
def test_an_access_log_line(line: str, parsed: object) -> None:
    """The path of a GET answered 200, validated like a request's target; anything else counted."""
    assert parse_log_line(line.encode()) == parsed


def test_a_sitemap_loc() -> None:
    """The path of an http(s) URL; anything else is a bad line."""
    assert parse_loc(b"https://www.example.com/img/a%20b.jpg?x=1") == ("img", "a b.jpg")
    assert parse_loc(b"  http://10.0.0.1:8080/c  ") == ("c",)
    assert parse_loc(b"https://www.example.com/") == Skip(False, "no-key")
    for line in (b"ftp://x/y", b"/relative", b"https://x/a b", b"not a url"):
        assert parse_loc(line) == Skip(True, "bad-url"), line
    assert parse_loc(b"https://x/%2e%2e/y") == Skip(True, "invalid-key")


def test_a_file_source_counts_in_chunks_and_goes_on_from_a_position(tmp_path: Path) -> None:
    """An overlong line is bad and skipped whole; reading again from an item's position gives it first."""
    path = tmp_path / "keys"
    path.write_bytes(b"a\n" + b"x" * 70_000 + b"\nb\r\n\n#c\nc")
    source = FileSource(str(path), parse_keys_line, lambda: succeed(None))
    counted = result_of(Deferred.fromCoroutine(source.count()))
    assert (counted.total, dict(counted.bad), dict(counted.ignored)) == (3, {"too-long": 1}, {"blank": 2})

    async def items(resume: str, seq: int) -> list[tuple[int, str]]:
        return [(item.seq, item.key) async for item in source.items(resume, seq)]

    everything = result_of(Deferred.fromCoroutine(items("", 0)))
    assert everything == [(0, "a"), (1, "b"), (2, "c")]
    second = result_of(Deferred.fromCoroutine(items(str(2 + 70_001), 1)))
    assert second == [(1, "b"), (2, "c")]


def test_the_jobs_section() -> None:
    """[jobs] defaults below [fill] max_concurrent; bad values are refused by name."""
    assert parse_config({}).jobs == JobsConfig(max_concurrent=4, max_running=1, rate_objects=0, rate_bytes=0)
    assert parse_config({"jobs": {"rate_objects": 2.5}}).jobs.rate_objects == 2.5
    for table, message in [
        ({"max_concurrent": 0}, "max_concurrent must be a positive"),
        ({"max_running": 1.5}, "max_running must be a whole number"),
        ({"rate_bytes": -1}, "rate_bytes must be zero or a positive"),
        ({"speed": 1}, "has unknown setting"),
    ]:
        with pytest.raises(ConfigError, match=rf"\[jobs\] {message}"):
            parse_config({"jobs": table})


# -- backfill --


def test_a_backfill_from_an_access_log_copies_each_key_answered_200_once(
    tmp_path: Path, audit_lines: list[dict[str, Any]]
) -> None:
    """
    Each GET answered 200 is copied once (a repeated key is found stored),
    a key stored already is skipped without an origin request, other lines
    are ignored or counted bad; one audit line at the start, one at the end.
    """
    d = Daemon(tmp_path)
    keys = add_keys(d.origin, 30)
    (d.data_dir / BUCKET / "k").mkdir(parents=True)
    (d.data_dir / BUCKET / "k" / "0.bin").write_bytes(b"here already")
    lines = [log_line(f"/{key}?v=1") for key in keys] * 2 + [
        log_line("/k/missing.bin"),
        log_line("/k/1.bin", method="POST"),
        log_line("/k/404.bin", status=404),
        "garbage",
        log_line("/a/%2e%2e/b"),
    ]
    log = keys_file(tmp_path, lines, "access.log")
    message = d.edge("ssh:ops@127.0.0.1").backfill(BUCKET, f"log:{log}")
    assert message == f"job 1 started: backfill of {BUCKET} (edge.watch(1) follows it)"
    d.run(2)
    job = d.job()
    assert (job.state, job.total, job.done) == ("done", 61, 61)
    assert dict(job.outcomes) == {"stored": 29, "skipped": 31}
    assert dict(job.failures) == {"http-404": 1}
    assert (dict(job.bad), dict(job.ignored)) == ({"unparsable": 1, "invalid-key": 1}, {"not-get": 1, "not-200": 1})
    assert [d.origin.gets(f"/{key}".encode()) for key in keys] == [0] + [1] * 29
    assert d.origin.gets(b"/k/404.bin") == 0
    assert (d.data_dir / BUCKET / "k" / "7.bin").read_bytes() == b"H" * 10
    assert job.bytes == 290
    starts, ends = audit_lines[0], audit_lines[1]
    assert [starts["job"], starts["channel"], ends["state"], ends["done"]] == [1, "ssh:ops@127.0.0.1", "done", 61]
    assert "stored 29" in ends["totals"] and "bad lines 2" in ends["totals"]
    row = d.edge().jobs()[0]
    assert [row[k] for k in ("state", "done", "total", "failures", "bad")] == ["done", 61, 61, {"http-404": 1}, 2]


def test_keys_with_no_origin_fail_and_an_unreadable_source_is_refused(tmp_path: Path) -> None:
    """A bucket without an origin or rule for a key: the key fails as no-origin; the job still ends done."""
    d = Daemon(tmp_path)
    d.edge().backfill(BARE, f"keys:{keys_file(tmp_path, ['a', 'b', '', '# c'])}")
    d.run(1)
    assert (d.job().state, dict(d.job().failures), dict(d.job().ignored)) == ("done", {"no-origin": 2}, {"blank": 2})
    with pytest.raises(AdminError, match="cannot read .*nowhere: No such file or directory; nothing started"):
        d.edge().backfill(BUCKET, f"keys:{tmp_path / 'nowhere'}")
    with pytest.raises(AdminError, match="the source must be 'keys:"):
        d.edge().backfill(BUCKET, str(tmp_path / "keys.txt"))
    with pytest.raises(AdminError, match="no bucket named"):
        d.edge().backfill("nope-1250000000", f"keys:{tmp_path / 'keys.txt'}")
    with pytest.raises(AdminError, match="rate_objects must be a number"):
        d.edge().backfill(BUCKET, f"keys:{tmp_path / 'keys.txt'}", rate_objects=-1)


def test_no_more_keys_at_once_than_max_concurrent(tmp_path: Path) -> None:
    """[jobs] max_concurrent keys at most are in the origin's hands, whatever the fill slots."""
    d = Daemon(tmp_path, "max_concurrent = 3", gated=True)
    keys = add_keys(d.origin, 20)
    d.edge().backfill(BUCKET, f"keys:{keys_file(tmp_path, keys)}")
    most = 0
    for _ in range(40):
        d.run(0.1, release=False)
        most = max(most, len(d.agent.held), d.service.filler.running)
        d.agent.release()
    d.run(1)
    assert most == 3
    assert (d.job().state, d.job().outcomes["stored"]) == ("done", 20)
    assert all(d.origin.gets(f"/{key}".encode()) == 1 for key in keys)


def test_rates_pace_the_keys(tmp_path: Path) -> None:
    """rate_objects spaces the origin requests; a job's rate_bytes waits for the bytes copied."""
    d = Daemon(tmp_path, "rate_objects = 2")
    keys = add_keys(d.origin, 30, size=1000)
    d.edge().backfill(BUCKET, f"keys:{keys_file(tmp_path, keys[:20])}")
    d.run(2.05)
    assert 4 <= d.job(1).outcomes["stored"] <= 6
    d.run(10)
    assert d.job(1).state == "done"
    d.edge().backfill(BUCKET, f"keys:{keys_file(tmp_path, keys[20:], 'more')}", rate_objects=0, rate_bytes=2000)
    d.run(2.05)
    assert 4 <= d.job(2).outcomes["stored"] <= 4 + 5  # the first [jobs] max_concurrent at once, then 2 a second
    d.run(5)
    assert d.job(2).state == "done"


def test_pause_resume_cancel_and_one_job_at_a_time(tmp_path: Path, audit_lines: list[dict[str, Any]]) -> None:
    """
    A second job waits while one runs ([jobs] max_running); a paused job
    takes no more keys and lets the next one run; resume and cancel.
    """
    d = Daemon(tmp_path, "rate_objects = 2\nmax_concurrent = 1")
    keys = add_keys(d.origin, 40)
    edge = d.edge()
    first = job_id(edge.backfill(BUCKET, f"keys:{keys_file(tmp_path, keys[:20])}"))
    second = edge.backfill(BUCKET, f"keys:{keys_file(tmp_path, keys[20:], 'second')}")
    assert second.startswith("job 2 queued")
    d.run(1.05)
    assert edge.pause(first) == "job 1 paused"
    assert d.job(2).state == "running"
    done = d.job(1).done
    d.run(3)
    assert d.job(1).done <= done + 1 and d.job(1).state == "paused"
    with pytest.raises(AdminError, match="job 1 is paused; only a queued or running job can be paused"):
        edge.pause(1)
    assert edge.resume(1) == "job 1 queued"  # job 2 runs: it waits for its turn
    assert edge.cancel(2) == "job 2 cancelled"
    assert d.job(1).state == "running"
    with pytest.raises(AdminError, match="job 2 has ended"):
        edge.cancel(2)
    d.run(12)
    assert (d.job(1).state, d.job(1).outcomes["stored"]) == ("done", 20)
    assert sum(d.origin.gets(f"/{key}".encode()) for key in keys[20:]) == d.job(2).done < 20
    ended = [e for e in audit_lines if "state" in e]
    assert [(e["job"], e["state"]) for e in ended] == [(2, "cancelled"), (1, "done")]
    assert "(cancelled via test)" in ended[0]["via"]
    with pytest.raises(AdminError, match=r"no job '9' \(jobs: 1, 2\)"):
        edge.job("9")


def test_a_restart_goes_on_where_the_job_stopped_without_fetching_a_key_twice(tmp_path: Path) -> None:
    """
    The daemon stops mid-job (keys asked of the origin finish first), starts
    again on the same data directory: the job goes on from its journal, every
    key fetched once; what was done before is not even looked up again.
    """
    origin = FakeOrigin()
    keys = add_keys(origin, 40)
    d = Daemon(tmp_path, "rate_objects = 10", origin=origin)
    d.edge().backfill(BUCKET, f"keys:{keys_file(tmp_path, keys)}")
    d.run(1.5)
    d.stop()
    before = d.job().done
    assert 10 <= before < 40
    journal = (d.data_dir / ".cosedge" / "jobs" / "1.journal").read_text()
    assert journal.count("\nm\t") >= 1 and journal.count("\tstored\t") == before

    again = Daemon(tmp_path, "rate_objects = 10", origin=origin)
    assert again.job().state == "running" and again.job().done >= before  # the journal's counts
    again.run(5)
    job = again.job()
    assert (job.state, job.done, dict(job.outcomes)) == ("done", 40, {"stored": 40})
    assert [origin.gets(f"/{key}".encode()) for key in keys] == [1] * 40


def test_a_crash_that_lost_the_journals_last_lines_fetches_nothing_again(tmp_path: Path) -> None:
    """Keys whose journal lines were lost are found stored and skipped: no origin request either."""
    origin = FakeOrigin()
    keys = add_keys(origin, 10)
    d = Daemon(tmp_path, origin=origin)
    d.edge().backfill(BUCKET, f"keys:{keys_file(tmp_path, keys)}")
    d.run(1)
    assert d.job().state == "done"
    folder = d.data_dir / ".cosedge" / "jobs"
    lines = (folder / "1.journal").read_text().splitlines(keepends=True)
    (folder / "1.journal").write_text("".join(lines[:4]) + lines[4][:5])  # four keys, and a cut line
    state = (folder / "1.json").read_text().replace('"state": "done"', '"state": "running"')
    (folder / "1.json").write_text(state)
    again = Daemon(tmp_path, origin=origin)
    again.run(1)
    assert dict(again.job().outcomes) == {"stored": 4, "skipped": 6}
    assert [origin.gets(f"/{key}".encode()) for key in keys] == [1] * 10


def test_a_paused_job_stays_paused_across_a_restart(tmp_path: Path) -> None:
    origin = FakeOrigin()
    keys = add_keys(origin, 10)
    d = Daemon(tmp_path, "rate_objects = 2", origin=origin)
    d.edge().backfill(BUCKET, f"keys:{keys_file(tmp_path, keys)}")
    d.run(1.05)
    d.edge().pause(1)
    d.stop()
    again = Daemon(tmp_path, "rate_objects = 2", origin=origin)
    again.run(2)
    assert again.job().state == "paused"
    again.edge().resume(1)
    again.run(6)
    assert (again.job().state, again.job().outcomes["stored"]) == ("done", 10)


def _sitemap(*locs: str, doctype: str = "", root: str = "urlset") -> bytes:
    urls = "".join(f"<url><loc>{loc}</loc><lastmod>2024-01-01</lastmod></url>" for loc in locs)
    xmlns = 'xmlns="http://www.sitemaps.org/schemas/sitemap/0.9"'
    return f'<?xml version="1.0" encoding="UTF-8"?>{doctype}<{root} {xmlns}>{urls}</{root}>'.encode()


def test_a_backfill_from_a_sitemap_on_the_origin(tmp_path: Path) -> None:
    """Each <loc> of the sitemap (fetched from the bucket's origin) is copied; bad URLs are counted."""
    d = Daemon(tmp_path)
    keys = add_keys(d.origin, 5)
    locs = [f"https://www.example.com/{key}" for key in keys] + ["ftp://x/y", "https://www.example.com/a?b=1&amp;c"]
    d.origin.add("maps/sitemap.xml", _sitemap(*locs))
    d.edge().backfill(BUCKET, "sitemap:/maps/sitemap.xml")
    d.run(1)
    job = d.job()
    assert (job.state, job.total, job.outcomes["stored"], dict(job.bad)) == ("done", 6, 5, {"bad-url": 1})
    assert job.failures == {"http-404": 1}  # a?b=1&c: the key "a"
    copy = (d.data_dir / ".cosedge" / "jobs" / "1.locs").read_text().splitlines()
    assert copy[-1] == "https://www.example.com/a?b=1&c"
    assert not (d.data_dir / BUCKET / "maps").exists()  # the sitemap is read, not stored


@pytest.mark.parametrize(
    ("document", "error"),
    [
        (_sitemap("https://x/a", doctype='<!DOCTYPE urlset [<!ENTITY x SYSTEM "file:///etc/passwd">]>'), "DOCTYPE"),
        (_sitemap("https://x/a", root="sitemapindex"), "sitemap index"),
        (b"<html><body>hello</body></html>", "not a sitemap: the document is a <html>"),
        (b"<urlset><url><loc>https://x/a</loc></url>", "not well-formed XML"),
    ],
)
def test_a_sitemap_cosedge_does_not_read_fails_the_job(tmp_path: Path, document: bytes, error: str) -> None:
    d = Daemon(tmp_path)
    d.origin.add("sitemap.xml", document)
    d.edge().backfill(BUCKET, "sitemap:http://10.10.10.10:8080/sitemap.xml")
    d.run(1)
    assert d.job().state == "failed" and error in d.job().error
    assert d.origin.gets(b"/a") == 0


# -- verify --


def test_verify_reports_the_objects_that_differ_and_those_gone(tmp_path: Path) -> None:
    """
    Length or origin ETag unlike the stored copy's: differs; 404 or 410: gone;
    an object placed by hand keeps no origin ETag, so only its length counts.
    """
    d = Daemon(tmp_path)
    keys = add_keys(d.origin, 8)
    d.edge().backfill(BUCKET, f"keys:{keys_file(tmp_path, keys)}")
    d.run(1)
    (d.data_dir / BUCKET / "hand.bin").write_bytes(b"z" * 4)
    d.origin.add("hand.bin", b"y" * 4, headers={"ETag": '"other"'})
    d.origin.objects["k/1.bin"].body = b"longer body"
    d.origin.objects["k/2.bin"].headers = {"ETag": 'W/"changed"'}
    d.origin.objects["k/3.bin"].headers = {"ETag": 'W/"e3"'}  # the same tag, weak: the same
    del d.origin.objects["k/4.bin"]
    d.origin.objects["k/5.bin"].status = 410
    message = d.edge().verify(BUCKET)
    d.run(1)
    job = d.jobs.get(job_id(message))
    assert (job.state, job.total, dict(job.outcomes)) == ("done", 9, {"same": 5, "differs": 2, "gone": 2})
    report = Path(d.edge().job(job.id)["report"]).read_text().splitlines()
    assert report[0].startswith("# verify job 2 of example-1250000000")
    assert sorted(line.split("\t")[:2] for line in report[1:]) == [
        ["k/1.bin", "differs"],
        ["k/2.bin", "differs"],
        ["k/4.bin", "gone"],
        ["k/5.bin", "gone"],
    ]
    assert "length 10 stored, 11 at the origin" in "\n".join(report)
    heads = [m for m, _, _ in d.origin.requests if m == b"HEAD"]
    assert len(heads) == 9 and d.origin.gets(b"/k/1.bin") == 1  # HEADs only: nothing fetched again
    prefixed = d.jobs.get(job_id(d.edge().verify(BUCKET, "k/")))
    d.run(1)
    assert (prefixed.total, prefixed.outcomes["gone"]) == (8, 2)


# -- watch, metrics, workers --


def _shell(d: Daemon) -> tuple[Any, StringTransport]:
    from cosedge.admin.shells import Shell

    transport = StringTransport()
    protocol = insults.ServerProtocol(Shell, {"edge": d.edge("telnet:unix")}, "telnet:unix")
    protocol.makeConnection(transport)
    transport.clear()
    return protocol, transport


def test_watch_draws_a_bar_until_ctrl_c_and_the_job_goes_on(tmp_path: Path) -> None:
    d = Daemon(tmp_path, "rate_objects = 5")
    keys = add_keys(d.origin, 20)
    d.edge().backfill(BUCKET, f"keys:{keys_file(tmp_path, keys)}")
    protocol, transport = _shell(d)
    protocol.dataReceived(b"edge.watch(1)\r")
    d.run(1.05)
    shown = transport.value().decode()
    assert "job 1 backfill running [#" in shown and "/20 " in shown and "/s" in shown
    protocol.dataReceived(b"x")  # the session takes no input while it watches
    protocol.dataReceived(b"\x03")
    shown = transport.value().decode()
    assert "stopped watching; job 1 goes on" in shown and shown.endswith(">>> ")
    transport.clear()
    d.run(1)
    assert transport.value() == b"" and d.job().state == "running"
    protocol.dataReceived(b"edge.watch(1, interval=0.5)\r")
    d.run(4)
    shown = transport.value().decode()
    assert "job 1 done: 20/20 keys, stored 20" in shown and shown.endswith(">>> ")
    protocol.dataReceived(b"edge.job(1)['state']\r")
    assert "'done'" in transport.value().decode()


def test_watch_from_a_script_rewrites_the_bar_and_prints_the_end(tmp_path: Path) -> None:
    from cosedge.admin.shells import run_command

    d = Daemon(tmp_path, "rate_objects = 4")
    keys = add_keys(d.origin, 10)
    d.edge().backfill(BUCKET, f"keys:{keys_file(d.root, keys)}")
    written: list[bytes] = []
    codes: list[int] = []
    run_command("edge.watch(1)", {"edge": d.edge()}, written.append, codes.append)
    d.run(3)
    out = b"".join(written).decode()
    assert codes == [0]
    bars, _, details = out.partition("\n")
    assert bars.startswith("\rjob 1 backfill running [") and bars.count("\r") >= 3
    assert "job 1 backfill done [####" in bars.rsplit("\r", 1)[1]
    assert re.search(r"^state +done$", details, re.MULTILINE)
    assert cast(Report, d.edge().watch(1))["state"] == "done"  # ended: its details at once


def test_job_metrics(tmp_path: Path) -> None:
    from prometheus_client.exposition import generate_latest

    from cosedge.ops.metrics import make_registry

    d = Daemon(tmp_path)
    keys = add_keys(d.origin, 3)
    d.edge().backfill(BUCKET, f"keys:{keys_file(tmp_path, [*keys, 'k/gone.bin'])}")
    d.run(1)
    text = generate_latest(make_registry(d.service, process=False)).decode()
    assert 'cosedge_job_objects_total{kind="backfill",outcome="stored"} 3.0' in text
    assert 'cosedge_job_objects_total{kind="backfill",outcome="failed"} 1.0' in text
    assert 'cosedge_job_failures_total{kind="backfill",reason="http-404"} 1.0' in text
    assert 'cosedge_job_bytes_total{kind="backfill"} 30.0' in text
    assert 'cosedge_jobs{kind="backfill",state="done"} 1.0' in text
    assert 'cosedge_jobs{kind="verify",state="running"} 0.0' in text


def test_jobs_run_in_the_primary_only(tmp_path: Path) -> None:
    """A worker's service has no jobs; the façade says where they run."""
    d = Daemon(tmp_path)
    d.service.jobs = None
    with pytest.raises(AdminError, match="this process runs no jobs"):
        d.edge().jobs()


def test_refresh_keeps_fresh_copies_replaces_changed_ones_and_keeps_those_gone(tmp_path: Path) -> None:
    """A conditional GET per copy: 304 fresh, 200 replaced atomically, 404 kept (origin-gone)."""
    d = Daemon(tmp_path)
    keys = add_keys(d.origin, 4)
    d.edge().backfill(BUCKET, f"keys:{keys_file(tmp_path, keys)}")
    d.run(1)
    d.origin.add("k/0.bin", b"", status=304)  # unchanged (the fake origin answers 304 as told)
    d.origin.add("k/1.bin", b"", status=304)
    d.origin.add("k/2.bin", b"a new version", headers={"ETag": '"new"'})
    del d.origin.objects["k/3.bin"]
    job = d.jobs.get(job_id(d.edge().refresh(BUCKET)))
    d.run(1)
    assert (job.state, job.total, dict(job.outcomes)) == ("done", 4, {"fresh": 2, "replaced": 1, "origin-gone": 1})
    assert (d.data_dir / BUCKET / "k" / "2.bin").read_bytes() == b"a new version"
    assert (d.data_dir / BUCKET / "k" / "3.bin").exists()  # the old server lost it: the copy stays
    conditional = [h for m, p, h in d.origin.requests if m == b"GET" and b"If-None-Match" in h]
    assert len(conditional) == 4
