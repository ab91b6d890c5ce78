"""
Background fills (reliability.md F1-F16, as far as memory can drive them):
an object is stored only when provably whole; anything else is a clean miss
(nothing stored, no temporary file, one log line with the reason, a counter).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any

import pytest
from attrs import define, field
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from cosedge.config import FillConfig, Origin
from cosedge.fill import scheduler as fill_module
from cosedge.fill.scheduler import Filler, FillResult
from cosedge.interfaces import IObjectStore
from cosedge.origins import origin_url
from cosedge.stats import Stats
from cosedge.storage.disk import SMALL_BODY, DiskStore
from cosedge.testing import FakeOrigin, MemoryStore

from .helpers import BUCKET, capture_logs, flush_origin, origin_agents, result_of, source_for

ORIGIN = Origin("10.10.10.10", 8080)
LAST_MODIFIED = "Wed, 21 Oct 2015 07:28:00 GMT"


@define(eq=False)
class Fills:
    """A filler on a clock, pulling from a fake origin through an in-memory agent."""

    store: IObjectStore = field(factory=MemoryStore)
    config: FillConfig = field(factory=FillConfig)
    gated: bool = False
    origin: FakeOrigin = field(factory=FakeOrigin)
    clock: Clock = field(factory=Clock)
    stats: Stats = field(factory=Stats)
    origin_agent: RequestTraversalAgent = field(init=False)
    agent: Any = field(init=False)
    filler: Filler = field(init=False)

    def __attrs_post_init__(self) -> None:
        self.origin_agent, self.agent = origin_agents(self.origin, self.gated)
        self.filler = self.filler_using(self.agent)

    def filler_using(self, agent: Any) -> Filler:
        """A filler on this store, clock, config and counters, fetching through ``agent``."""
        return Filler(self.store, agent, self.clock, lambda: self.config, self.stats)

    def fill(self, key: str, **kwargs: Any) -> Deferred[FillResult]:
        segments = tuple(key.split("/"))
        return self.filler.fill(BUCKET, segments, source_for(ORIGIN, segments), **kwargs)

    def start(self, key: str, **kwargs: Any) -> bool:
        segments = tuple(key.split("/"))
        return self.filler.start(BUCKET, segments, source_for(ORIGIN, segments), **kwargs)

    def flush(self) -> None:
        flush_origin(self.agent, self.origin_agent)

    def run(self, key: str, **kwargs: Any) -> FillResult:
        """Fill ``key`` to the end and return its result."""
        d = self.fill(key, **kwargs)
        self.flush()
        result = result_of(d)
        assert isinstance(result, FillResult)
        return result

    def stored(self, key: str) -> bytes | None:
        obj = result_of(self.store.open(BUCKET, tuple(key.split("/"))))
        if obj is None:
            return None
        try:
            return bytes(result_of(obj.read(0, obj.size)))
        finally:
            obj.close()


@pytest.fixture
def fills() -> Fills:
    return Fills()


@pytest.fixture
def gated() -> Fills:
    return Fills(gated=True)


@pytest.fixture
def disk(tmp_path: Path) -> Fills:
    return Fills(store=DiskStore(str(tmp_path / "data")))


def assert_clean_miss(fills: Fills, key: str, reason: str, events: list[dict[str, Any]]) -> None:
    """Nothing stored, nothing pending, counted once under ``reason``, one log line naming it."""
    assert fills.stored(key) is None
    if isinstance(fills.store, MemoryStore):
        assert fills.store.pending == []
    if isinstance(fills.store, DiskStore):
        tmp = Path(fills.store.tmp_dir)
        assert not tmp.exists() or list(tmp.iterdir()) == []
    assert fills.stats.fill_failures[reason] == 1
    assert fills.stats.events["fills_failed"] == sum(fills.stats.fill_failures.values())
    assert fills.stats.events["fills_stored"] == 0
    failed = [e for e in events if e.get("log_namespace") == "cosedge.fill" and "reason" in e]
    assert len(failed) == 1, failed
    event = failed[0]
    assert event["reason"] == reason
    assert event["bucket"] == BUCKET and event["key"] == key
    assert event["url"] == f"http://{ORIGIN}/{key}"
    assert "expected" in event and "received" in event


# -- whole objects -------------------------------------------------------------------


def test_stores_exact_bytes_and_kept_metadata(disk: Fills) -> None:
    """A 200 with Content-Length is stored byte for byte with the kept headers as metadata (xattr)."""
    body = os.urandom(200_000)
    disk.origin.add(
        "img/1.jpg",
        body,
        content_type="image/jpeg",
        headers={
            "ETag": '"abc"',
            "Last-Modified": LAST_MODIFIED,
            "Cache-Control": "max-age=60",
            "Content-Disposition": "inline",
            "Expires": "Thu, 01 Dec 2030 16:00:00 GMT",
            "X-Cos-Meta-Author": "alice",
            "Set-Cookie": "session=1",
            "X-Other": "dropped",
        },
    )
    with capture_logs() as events:
        result = disk.run("img/1.jpg")
    assert result == FillResult(BUCKET, "img/1.jpg", True, "stored", len(body))
    obj = result_of(disk.store.open(BUCKET, ("img", "1.jpg")))
    assert obj is not None
    try:
        assert obj.size == len(body)
        assert result_of(obj.read(0, obj.size)) == body
        assert dict(obj.meta) == {
            "content-type": "image/jpeg",
            "etag": '"abc"',
            "last-modified": LAST_MODIFIED,
            "cache-control": "max-age=60",
            "content-disposition": "inline",
            "expires": "Thu, 01 Dec 2030 16:00:00 GMT",
            "x-cos-meta-author": "alice",
            "cosedge-checked": "0",  # when the copy was known to be the origin's (the test clock's time)
        }
        assert obj.mtime == 1445412480.0  # from Last-Modified
    finally:
        obj.close()
    assert isinstance(disk.store, DiskStore)
    assert Path(disk.store.bucket_path(BUCKET), "img", "1.jpg").read_bytes() == body  # a plain file
    assert list(Path(disk.store.tmp_dir).iterdir()) == []
    assert disk.stats.events["fills_started"] == 1
    assert disk.stats.events["fills_stored"] == 1
    assert disk.stats.events["bytes_pulled"] == len(body)
    stored = [e for e in events if e.get("log_namespace") == "cosedge.fill" and "stored" in e.get("log_format", "")]
    assert len(stored) == 1 and stored[0]["received"] == len(body)


def test_request_to_origin(gated: Fills) -> None:
    """The fill GETs the percent-encoded key from the origin, asking for the raw (identity) bytes."""
    gated.origin.add("a b/\u4e2d.txt", b"x")
    gated.start("a b/\u4e2d.txt")
    (_, (method, uri, headers, _)) = gated.agent.held[0]
    assert method == b"GET"
    assert uri == b"http://10.10.10.10:8080/a%20b/%E4%B8%AD.txt"
    assert headers.getRawHeaders(b"accept-encoding") == [b"identity"]
    assert origin_url(Origin("abc.example.com"), ("1.jpg",)) == b"http://abc.example.com/1.jpg"


def test_chunked_body_is_stored(fills: Fills) -> None:
    """A complete chunked body (no Content-Length) is whole, so it is stored."""
    body = b"0123456789" * 100
    fills.origin.add("c.txt", body, mode="chunked")
    assert fills.run("c.txt").stored
    assert fills.stored("c.txt") == body


def test_zero_byte_object_is_stored(fills: Fills) -> None:
    """A 0-byte object is a valid object and is stored (F15)."""
    fills.origin.add("empty", b"")
    result = fills.run("empty")
    assert result.stored and result.size == 0
    assert fills.stored("empty") == b""


def test_gzip_body_stored_raw(gated: Fills) -> None:
    """A gzip-encoded body is stored as the origin's exact bytes, never decoded (F7)."""
    raw = gzip.compress(b"hello " * 1000)
    gated.origin.add("app.js", raw, content_type="application/javascript", headers={"Content-Encoding": "gzip"})
    d = gated.fill("app.js")
    gated.flush()
    assert result_of(d).stored
    assert gated.stored("app.js") == raw
    obj = result_of(gated.store.open(BUCKET, ("app.js",)))
    assert obj is not None and obj.meta["content-encoding"] == "gzip"
    obj.close()


def test_object_at_the_size_limit_is_stored(fills: Fills) -> None:
    """An object exactly max_object_size bytes long is stored."""
    fills.config = FillConfig(max_object_size=100)
    fills.origin.add("edge", b"e" * 100)
    assert fills.run("edge").stored


# -- clean misses ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "reason"),
    [("truncate", "truncated"), ("chunked-cut", "truncated")],
)
def test_cut_bodies_are_clean_misses(disk: Fills, mode: str, reason: str) -> None:
    """A body shorter than its Content-Length (F1) or a chunked body without its last chunk (F2) is not stored."""
    disk.origin.add("cut.bin", b"x" * 5000, mode=mode, cut=1234)
    with capture_logs() as events:
        result = disk.run("cut.bin")
    assert not result.stored and result.reason == reason
    assert_clean_miss(disk, "cut.bin", reason, events)
    event = next(e for e in events if "reason" in e)
    assert event["received"] == 1234
    if mode == "truncate":
        assert event["expected"] == 5000


@pytest.mark.parametrize("status", [404, 403, 500, 503, 304, 206, 301, 302, 307, 201, 204])
def test_non_200_is_a_clean_miss(fills: Fills, status: int) -> None:
    """Any origin answer but 200 stores nothing (F5, F6)."""
    fills.origin.add("k", b"body", status=status)
    with capture_logs() as events:
        result = fills.run("k")
    assert result.reason == f"http-{status}"
    assert_clean_miss(fills, "k", f"http-{status}", events)


def test_redirect_is_not_followed(fills: Fills) -> None:
    """An origin 3xx pointing elsewhere (metadata service, loopback) is never followed (F6)."""
    fills.origin.add("r", b"", status=302, headers={"Location": "http://169.254.169.254/latest/meta-data/"})
    fills.origin.add("latest/meta-data/", b"secret")
    assert fills.run("r").reason == "http-302"
    assert [path for _, path, _ in fills.origin.requests] == [b"/r"]
    assert fills.stored("r") is None


def test_not_found_is_remembered_for_its_ttl(fills: Fills) -> None:
    """An origin 404 is remembered for not_found_ttl, then the key is fetched again (F5)."""
    fills.config = FillConfig(not_found_ttl=10, retry_backoff=0)
    assert fills.run("gone").reason == "http-404"
    assert fills.start("gone") is False
    assert result_of(fills.fill("gone")).reason == "not-found"  # the origin's 404 is remembered
    assert fills.stats.events["fills_skipped_not_found"] == 2
    assert fills.filler.remembered_not_found() == 1
    fills.clock.advance(9.9)
    assert fills.start("gone") is False
    assert fills.origin.gets(b"/gone") == 1
    fills.clock.advance(0.2)
    fills.origin.add("gone", b"now here")
    assert fills.run("gone").stored
    assert fills.origin.gets(b"/gone") == 2
    assert fills.filler.remembered_not_found() == 0


def test_force_and_forget_bypass_the_memory(fills: Fills) -> None:
    """force=True fetches despite a remembered 404; forget() drops the memory."""
    assert fills.run("gone").reason == "http-404"
    fills.origin.add("gone", b"back")
    assert fills.run("gone", force=True).stored
    assert fills.run("other").reason == "http-404"
    fills.filler.forget(BUCKET, ("other",))
    assert fills.start("other") is True


def test_failure_backs_off_then_retries(fills: Fills) -> None:
    """After a failed fill the key waits retry_backoff seconds, then may be fetched again (F11)."""
    fills.config = FillConfig(retry_backoff=5)
    fills.origin.add("flaky", b"data", status=503)
    assert fills.run("flaky").reason == "http-503"
    assert fills.start("flaky") is False
    assert fills.stats.events["fills_skipped_backoff"] == 1
    fills.clock.advance(5)
    fills.origin.add("flaky", b"data")
    assert fills.run("flaky").stored
    assert fills.stored("flaky") == b"data"
    assert fills.origin.gets(b"/flaky") == 2


def test_stall_mid_body_times_out(disk: Fills) -> None:
    """An origin that stops sending mid-body is cut off by the idle timeout on the clock (F4)."""
    disk.config = FillConfig(idle_timeout=30)
    disk.origin.add("slow", b"s" * (SMALL_BODY + 1000), mode="stall", cut=100)  # streamed to a file
    with capture_logs() as events:
        d = disk.fill("slow")
        disk.flush()
        assert not d.called
        assert disk.filler.in_flight()[0]["bytes"] == 100
        assert isinstance(disk.store, DiskStore)
        assert len(list(Path(disk.store.tmp_dir).iterdir())) == 1  # being written
        disk.clock.advance(29)
        assert not d.called
        disk.clock.advance(1)
        disk.flush()
    assert result_of(d).reason == "idle-timeout"
    assert_clean_miss(disk, "slow", "idle-timeout", events)
    assert disk.filler.in_flight() == [] and disk.filler.running == 0


def test_a_small_body_is_received_in_memory_and_stored_at_once(disk: Fills) -> None:
    """
    A body declared no larger than SMALL_BODY creates no file while it
    arrives (a stall leaves nothing on disk) and is stored whole at the end;
    one byte more and it is streamed to a temporary file as it arrives.
    """
    disk.config = FillConfig(idle_timeout=30)
    assert isinstance(disk.store, DiskStore)
    tmp = Path(disk.store.tmp_dir)

    def temporary_files() -> list[Path]:
        return list(tmp.iterdir()) if tmp.exists() else []

    disk.origin.add("small", b"m" * SMALL_BODY, mode="stall", cut=100)
    d = disk.fill("small")
    disk.flush()
    assert disk.filler.in_flight()[0]["bytes"] == 100
    assert temporary_files() == []  # nothing on disk yet
    disk.clock.advance(30)
    disk.flush()
    assert result_of(d).reason == "idle-timeout"
    assert temporary_files() == []

    disk.origin.add("whole", b"w" * SMALL_BODY)
    result = result_of(disk.fill("whole"))
    assert (result.stored, result.size) == (True, SMALL_BODY)
    assert result_of(disk.store.open(BUCKET, ("whole",))) is not None

    disk.origin.add("bigger", b"b" * (SMALL_BODY + 1), mode="stall", cut=100)
    disk.fill("bigger")
    disk.flush()
    assert len(temporary_files()) == 1  # streamed


def test_idle_timer_restarts_with_each_byte(fills: Fills) -> None:
    """Bytes that keep arriving reset the idle timer; only the total deadline ends a trickling fill."""
    fills.config = FillConfig(idle_timeout=10, total_timeout=100, min_rate=0)  # the rate rule is tested apart
    agent = ScriptedAgent()
    response = ScriptedResponse(length=1000)
    agent.responses[b"/trickle"] = response
    filler = fills.filler_using(agent)
    d = filler.fill(BUCKET, ("trickle",), source_for(ORIGIN, ("trickle",)))
    for _ in range(11):
        fills.clock.advance(9)
        response.send(b"t")
    assert not d.called
    fills.clock.advance(1)
    assert result_of(d).reason == "timeout"
    assert fills.stored("trickle") is None
    assert isinstance(fills.store, MemoryStore) and fills.store.pending == []
    assert response.transport.producerState == "stopped"
    assert fills.stats.fill_failures == {"timeout": 1}


def test_headers_that_never_come_time_out(gated: Fills) -> None:
    """An origin that accepts the request but never answers fails after header_timeout (F4)."""
    gated.config = FillConfig(header_timeout=30)
    with capture_logs() as events:
        d = gated.fill("k")
        gated.clock.advance(29.9)
        assert not d.called
        gated.clock.advance(0.1)
    assert result_of(d).reason == "timeout"
    assert_clean_miss(gated, "k", "timeout", events)


def test_too_large_by_content_length(fills: Fills) -> None:
    """An object whose Content-Length is over max_object_size is not read at all (F8)."""
    fills.config = FillConfig(max_object_size=100)
    fills.origin.add("big", b"b" * 101)
    with capture_logs() as events:
        assert fills.run("big").reason == "too-large"
    assert_clean_miss(fills, "big", "too-large", events)
    assert next(e for e in events if "reason" in e)["received"] == 0


def test_too_large_while_streaming(fills: Fills) -> None:
    """A body without a length that grows past max_object_size is cut off at the limit (F8)."""
    fills.config = FillConfig(max_object_size=100)
    fills.origin.add("big", b"b" * 1000, mode="chunked")
    with capture_logs() as events:
        assert fills.run("big").reason == "too-large"
    assert_clean_miss(fills, "big", "too-large", events)
    assert next(e for e in events if "reason" in e)["received"] <= 100


def test_too_large_stops_reading(fills: Fills) -> None:
    """Passing the size limit stops the body's transport at once."""
    fills.config = FillConfig(max_object_size=10)
    agent = ScriptedAgent()
    response = agent.responses[b"/big"] = ScriptedResponse()
    filler = fills.filler_using(agent)
    d = filler.fill(BUCKET, ("big",), source_for(ORIGIN, ("big",)))
    response.send(b"x" * 8)
    assert response.transport.producerState == "producing"
    response.send(b"x" * 8)
    assert response.transport.producerState == "stopped"
    assert result_of(d).reason == "too-large"


def test_unframed_body_is_not_trusted(fills: Fills) -> None:
    """A body with neither length nor chunking may have been cut, so it is never stored (F3)."""
    agent = ScriptedAgent()
    response = agent.responses[b"/u"] = ScriptedResponse()
    filler = fills.filler_using(agent)
    with capture_logs() as events:
        d = filler.fill(BUCKET, ("u",), source_for(ORIGIN, ("u",)))
        response.send(b"looks complete")
        response.finish(PotentialDataLoss())
    assert result_of(d).reason == "unframed"
    assert_clean_miss(fills, "u", "unframed", events)


def test_more_bytes_than_content_length_is_not_stored(fills: Fills) -> None:
    """A body longer than its Content-Length is a clean miss, never a stored over-long object (F7)."""
    agent = ScriptedAgent()
    response = agent.responses[b"/long"] = ScriptedResponse(length=5)
    filler = fills.filler_using(agent)
    with capture_logs() as events:
        d = filler.fill(BUCKET, ("long",), source_for(ORIGIN, ("long",)))
        response.send(b"0123456789")
        response.finish(ResponseDone())
    assert result_of(d).reason == "length-mismatch"
    assert_clean_miss(fills, "long", "length-mismatch", events)


def test_connection_refused(fills: Fills) -> None:
    """An unreachable origin fails the fill as connect-failed and backs off (F14)."""
    agent = ScriptedAgent()
    agent.failures[b"/k"] = ConnectionRefusedError()
    filler = fills.filler_using(agent)
    with capture_logs() as events:
        result = result_of(filler.fill(BUCKET, ("k",), source_for(ORIGIN, ("k",))))
    assert result.reason == "connect-failed"
    assert_clean_miss(fills, "k", "connect-failed", events)
    assert filler.start(BUCKET, ("k",), source_for(ORIGIN, ("k",))) is False


def test_disk_full() -> None:
    """A disk that fills up mid-object is a clean miss (F12)."""
    fills = Fills(store=MemoryStore(disk_limit=1000))
    fills.origin.add("big", b"d" * 5000)
    fills.origin.add("small", b"s" * 100)
    with capture_logs() as events:
        assert fills.run("big").reason == "disk-full"
    assert_clean_miss(fills, "big", "disk-full", events)
    assert fills.run("small").stored  # the store keeps working


def test_publish_failure_on_disk_is_a_clean_miss(disk: Fills) -> None:
    """If the object cannot be put in place (a file where its folder should be), nothing is left (F12)."""
    assert isinstance(disk.store, DiskStore)
    bucket = Path(disk.store.bucket_path(BUCKET))
    bucket.mkdir(parents=True)
    (bucket / "a").write_bytes(b"a file, not a folder")
    disk.origin.add("a/b", b"inner")
    with capture_logs() as events:
        assert disk.run("a/b").reason == "disk-error"
    assert_clean_miss(disk, "a/b", "disk-error", events)
    assert (bucket / "a").read_bytes() == b"a file, not a folder"


def test_metadata_too_large(fills: Fills) -> None:
    """Kept headers over the metadata limit are refused, not truncated."""
    fills.origin.add("m", b"x", headers={"X-Cos-Meta-Big": "v" * 3000})
    with capture_logs() as events:
        assert fills.run("m").reason == "metadata-too-large"
    assert_clean_miss(fills, "m", "metadata-too-large", events)


# -- one fill per key, limits, stop ---------------------------------------------------------


def test_many_simultaneous_misses_make_one_origin_get(gated: Fills) -> None:
    """200 simultaneous starts for one key make exactly one origin GET, and every waiter gets the result (F10)."""
    gated.origin.add("hot.jpg", b"h" * 4321)
    waiters = []
    for i in range(200):
        if i % 2:
            assert gated.start("hot.jpg") is True
        else:
            waiters.append(gated.fill("hot.jpg"))
    assert len(gated.agent.held) == 1
    assert gated.stats.events["fills_started"] == 1
    gated.flush()
    assert gated.origin.gets(b"/hot.jpg") == 1
    results = [result_of(w) for w in waiters]
    assert all(r == FillResult(BUCKET, "hot.jpg", True, "stored", 4321) for r in results)
    assert gated.stored("hot.jpg") == b"h" * 4321


def test_shared_failure_reaches_every_waiter(gated: Fills) -> None:
    """When the shared fill fails, no waiter hangs: each gets the failure (F11)."""
    gated.origin.add("x", b"x" * 100, mode="truncate", cut=10)
    waiters = [gated.fill("x") for _ in range(20)]
    gated.flush()
    assert {result_of(w).reason for w in waiters} == {"truncated"}


def test_cancelling_a_waiter_does_not_cancel_the_fill(gated: Fills) -> None:
    """A waiter that gives up does not stop the shared fill."""
    gated.origin.add("k", b"data")
    first, second = gated.fill("k"), gated.fill("k")
    first.addErrback(lambda f: None)
    first.cancel()
    gated.flush()
    assert result_of(second).stored
    assert gated.stored("k") == b"data"


def test_concurrency_limit_and_bounded_queue(gated: Fills) -> None:
    """At most max_concurrent fills run, max_queue wait, and a full queue is counted and refused."""
    gated.config = FillConfig(max_concurrent=2, max_queue=3)
    for i in range(6):
        gated.origin.add(f"k{i}", b"%d" % i)
    with capture_logs() as events:
        started = [gated.start(f"k{i}") for i in range(6)]
    assert started == [True] * 5 + [False]
    assert gated.filler.running == 2 and gated.filler.queued == 3
    assert len(gated.agent.held) == 2
    states = sorted((f["key"], f["state"]) for f in gated.filler.in_flight())
    assert states == [("k0", "running"), ("k1", "running"), ("k2", "queued"), ("k3", "queued"), ("k4", "queued")]
    assert gated.stats.fill_failures["queue-full"] == 1
    assert [e["reason"] for e in events if "reason" in e] == []  # the refusal is logged, not as a fill
    assert any("queue-full" in e.get("log_format", "") for e in events)
    for _ in range(3):
        gated.flush()
        assert gated.filler.running <= 2
    assert gated.filler.running == 0 and gated.filler.queued == 0
    assert [gated.stored(f"k{i}") for i in range(6)] == [b"0", b"1", b"2", b"3", b"4", None]
    assert gated.stats.events["fills_stored"] == 5


def test_zero_queue_refuses_beyond_the_limit(gated: Fills) -> None:
    """With max_queue = 0, a fill beyond the concurrency limit is refused at once."""
    gated.config = FillConfig(max_concurrent=1, max_queue=0)
    assert gated.start("a") is True
    assert gated.start("b") is False
    assert result_of(gated.fill("c")).reason == "queue-full"


def test_stop_cancels_running_and_queued_fills(tmp_path: Path) -> None:
    """stop() cancels every fill, each waiter gets a result, and no temporary file is left (F16)."""
    fills = Fills(store=DiskStore(str(tmp_path)), config=FillConfig(max_concurrent=1, max_queue=5))
    fills.origin.add("stalled", b"s" * (SMALL_BODY + 1000), mode="stall", cut=100)  # streamed to a file
    fills.origin.add("queued", b"q")
    running, queued = fills.fill("stalled"), fills.fill("queued")
    fills.flush()
    assert fills.filler.running == 1 and fills.filler.queued == 1
    assert isinstance(fills.store, DiskStore)
    assert len(list(Path(fills.store.tmp_dir).iterdir())) == 1
    with capture_logs() as events:
        done = fills.filler.stop()
        fills.flush()
    assert done.called
    assert result_of(running).reason == "cancelled"
    assert result_of(queued).reason == "cancelled"
    assert fills.filler.running == 0 and fills.filler.queued == 0 and fills.filler.in_flight() == []
    assert list(Path(fills.store.tmp_dir).iterdir()) == []
    assert fills.stored("stalled") is None and fills.stored("queued") is None
    assert fills.origin.gets(b"/queued") == 0
    assert fills.stats.fill_failures["cancelled"] == 1
    assert [e["reason"] for e in events if "reason" in e] == ["cancelled"]
    # A stopping filler starts nothing new.
    assert fills.start("other") is False
    assert result_of(fills.fill("other")).reason == "stopping"


def test_stop_while_waiting_for_headers(gated: Fills) -> None:
    """stop() also cancels a fill still waiting for the origin's headers."""
    d = gated.fill("k")
    stopped = gated.filler.stop()
    assert stopped.called
    assert result_of(d).reason == "cancelled"
    assert isinstance(gated.store, MemoryStore) and gated.store.pending == []


def test_stop_with_nothing_running(fills: Fills) -> None:
    """stop() with no fills fires at once."""
    assert fills.filler.stop().called


def test_total_deadline(gated: Fills) -> None:
    """A fill that takes longer than total_timeout is abandoned as a timeout."""
    gated.config = FillConfig(header_timeout=1000, total_timeout=60)
    with capture_logs() as events:
        d = gated.fill("k")
        gated.clock.advance(59.9)
        assert not d.called
        gated.clock.advance(0.1)
    assert result_of(d).reason == "timeout"
    assert_clean_miss(gated, "k", "timeout", events)


# -- scripted responses, for what a real HTTP parser would not let through -------------------


@implementer(IResponse)
class ScriptedResponse:
    """A response whose body bytes and ending the test sends by hand."""

    def __init__(self, code: int = 200, length: int | object = UNKNOWN_LENGTH) -> None:
        self.version = (b"HTTP", 1, 1)
        self.code = code
        self.phrase = b"OK"
        self.headers = Headers()
        self.length = length
        self.request = None
        self.previousResponse: IResponse | None = None
        self.transport = StringTransport()
        self.protocol: Any = None

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    def send(self, data: bytes) -> None:
        if self.transport.producerState != "stopped":
            self.protocol.dataReceived(data)

    def finish(self, reason: Exception) -> None:
        self.protocol.connectionLost(Failure(reason))


@implementer(IAgent)
class ScriptedAgent:
    """Answers each path with a scripted response or failure."""

    def __init__(self) -> None:
        self.responses: dict[bytes, ScriptedResponse] = {}
        self.failures: dict[bytes, Exception] = {}

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        path = b"/" + uri.split(b"/", 3)[3]
        if path in self.failures:
            return fail(self.failures[path])
        return succeed(self.responses[path])


def test_malformed_origin_response(fills: Fills) -> None:
    """An origin whose status line or headers are cut or malformed is a 'bad-response' clean miss."""
    agent = ScriptedAgent()
    agent.failures[b"/k"] = ResponseFailed([Failure(ValueError("bad status line"))])
    filler = fills.filler_using(agent)
    with capture_logs() as events:
        assert result_of(filler.fill(BUCKET, ("k",), source_for(ORIGIN, ("k",)))).reason == "bad-response"
    assert_clean_miss(fills, "k", "bad-response", events)


def test_request_cancelled_inside_the_agent(fills: Fills) -> None:
    """A request the agent reports as cancelled (wrapped in ResponseFailed) counts as cancelled, with no back-off."""
    agent = ScriptedAgent()
    agent.failures[b"/k"] = ResponseFailed([Failure(CancelledError())])
    filler = fills.filler_using(agent)
    assert result_of(filler.fill(BUCKET, ("k",), source_for(ORIGIN, ("k",)))).reason == "cancelled"
    assert fills.stats.fill_failures == {"cancelled": 1}
    assert filler.start(BUCKET, ("k",), source_for(ORIGIN, ("k",))) is True  # no back-off after a cancellation


def test_unexpected_error_is_logged_with_its_traceback(fills: Fills, logged_failures: list[Any]) -> None:
    """A bug (an unexpected exception) fails the fill as 'error', logs the traceback, and no waiter hangs."""
    agent = ScriptedAgent()
    agent.failures[b"/k"] = ZeroDivisionError("bug")
    filler = fills.filler_using(agent)
    assert result_of(filler.fill(BUCKET, ("k",), source_for(ORIGIN, ("k",)))).reason == "error"
    assert fills.stats.fill_failures == {"error": 1}
    assert len(logged_failures) == 1
    assert logged_failures[0]["log_failure"].check(ZeroDivisionError)
    logged_failures.clear()


def test_remembered_failures_are_bounded(fills: Fills, monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory of 404s is bounded: the oldest entries are forgotten first."""
    monkeypatch.setattr(fill_module, "_MEMORY_LIMIT", 3)
    for i in range(5):
        assert fills.run(f"gone{i}").reason == "http-404"
    assert fills.filler.remembered_not_found() == 3
    assert fills.start("gone0") is True  # forgotten: fetched again
    assert fills.start("gone4") is False  # still remembered


class _ManualThreadPool:
    """Stands in for the reactor's thread pool: runs each blocking call when the test says."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, Deferred[None]]] = []

    def __call__(self, f: Any) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.calls.append((f, d))
        return d

    def finish(self) -> None:
        """Run the calls queued so far (calls they queue wait for the next finish)."""
        calls, self.calls = self.calls, []
        for f, d in calls:
            try:
                d.callback(f())
            except Exception:
                d.errback()


def _in_a_manual_pool(tmp_path: Path, config: FillConfig | None = None) -> tuple[Fills, _ManualThreadPool, Filler]:
    """Fills on a disk store, and a filler whose blocking calls wait in a :class:`_ManualThreadPool`."""
    fills = Fills(store=DiskStore(str(tmp_path)), config=config or FillConfig())
    pool = _ManualThreadPool()
    fills.store.run_blocking = pool  # type: ignore[attr-defined]
    filler = fills.filler_using(fills.origin_agent)
    return fills, pool, filler


def _up_to_the_commit(
    fills: Fills, pool: _ManualThreadPool, filler: Filler, segments: tuple[str, ...]
) -> Deferred[FillResult]:
    """Start a streamed fill and run it until its commit waits in the pool (creating the file runs there too)."""
    d = filler.fill(BUCKET, segments, source_for(ORIGIN, segments))
    fills.flush()
    pool.finish()
    fills.flush()
    return d


#: A body larger than SMALL_BODY: streamed to a temporary file as it arrives,
#: created and committed in the thread pool in two steps.
STREAMED = b"whole object" * (SMALL_BODY // 12 + 1)


def test_stop_while_the_temporary_file_is_being_created(tmp_path: Path) -> None:
    """stop() while a fill creates its temporary file in a thread waits for it, then removes the file."""
    fills, pool, filler = _in_a_manual_pool(tmp_path)
    fills.origin.add("k", STREAMED)
    d = filler.fill(BUCKET, ("k",), source_for(ORIGIN, ("k",)))
    fills.flush()
    assert len(pool.calls) == 1  # the file is being created in the pool
    stopped = filler.stop()
    assert not stopped.called
    pool.finish()
    fills.flush()
    assert stopped.called
    assert result_of(d).reason == "cancelled"
    assert list(Path(tmp_path, ".cosedge", "tmp").iterdir()) == []
    assert fills.stored("k") is None


def test_stop_waits_for_a_commit_running_in_a_thread(tmp_path: Path) -> None:
    """stop() during a commit (fsync + rename in a thread) waits for it and never pulls the file from under it."""
    fills, pool, filler = _in_a_manual_pool(tmp_path)
    fills.origin.add("k", STREAMED)
    d = _up_to_the_commit(fills, pool, filler, ("k",))
    assert len(pool.calls) == 1  # the commit is in the thread pool
    tmp = Path(tmp_path, ".cosedge", "tmp")
    assert len(list(tmp.iterdir())) == 1
    stopped = filler.stop()
    assert not stopped.called  # a thread cannot be cancelled: stop waits for it
    assert len(list(tmp.iterdir())) == 1  # and nothing was cleaned up under it
    pool.finish()
    assert stopped.called
    assert result_of(d).reason == "stored"  # the commit went through: the object is whole and visible
    assert list(tmp.iterdir()) == []
    assert fills.stored("k") == STREAMED


def test_stop_during_a_failing_commit(tmp_path: Path) -> None:
    """A commit that fails in its thread after stop() began leaves nothing behind and reports the cancellation."""
    fills, pool, filler = _in_a_manual_pool(tmp_path)
    Path(tmp_path, BUCKET).mkdir()
    Path(tmp_path, BUCKET, "a").write_bytes(b"a file where a folder should be")
    fills.origin.add("a/b", STREAMED)
    d = _up_to_the_commit(fills, pool, filler, ("a", "b"))
    stopped = filler.stop()
    assert not stopped.called
    pool.finish()
    assert stopped.called
    assert result_of(d).reason == "cancelled"
    assert list(Path(tmp_path, ".cosedge", "tmp").iterdir()) == []


def test_total_deadline_during_a_commit_waits_for_it(tmp_path: Path) -> None:
    """The total deadline passing while a commit runs in a thread does not clean up under the commit."""
    fills, pool, filler = _in_a_manual_pool(tmp_path, FillConfig(total_timeout=10))
    fills.origin.add("k", STREAMED)
    d = _up_to_the_commit(fills, pool, filler, ("k",))
    fills.clock.advance(10)
    assert not d.called
    pool.finish()
    assert result_of(d).reason == "stored"
    assert list(Path(tmp_path, ".cosedge", "tmp").iterdir()) == []
    assert fills.stored("k") == STREAMED


def test_commit_failure_in_the_thread(tmp_path: Path) -> None:
    """A commit that fails in the thread pool is a clean miss, reported as a disk error."""
    fills, pool, filler = _in_a_manual_pool(tmp_path)
    Path(tmp_path, BUCKET).mkdir()
    Path(tmp_path, BUCKET, "a").write_bytes(b"file")
    fills.origin.add("a/b", STREAMED)
    d = _up_to_the_commit(fills, pool, filler, ("a", "b"))
    with capture_logs() as events:
        pool.finish()
    assert result_of(d).reason == "disk-error"
    assert_clean_miss(fills, "a/b", "disk-error", events)


def test_stop_waits_for_the_one_call_store_of_a_small_body(tmp_path: Path) -> None:
    """
    A small body is stored with one call in the thread pool once it is
    whole; stop() during that call waits for it, and the object it stored is
    whole and visible.
    """
    fills, pool, filler = _in_a_manual_pool(tmp_path)
    fills.origin.add("k", b"whole object")
    d = filler.fill(BUCKET, ("k",), source_for(ORIGIN, ("k",)))
    fills.flush()
    assert len(pool.calls) == 1  # the whole body arrived; one call stores it
    stopped = filler.stop()
    assert not stopped.called
    pool.finish()
    fills.flush()
    assert stopped.called
    assert result_of(d).stored
    assert fills.stored("k") == b"whole object"
    assert list(Path(tmp_path, ".cosedge", "tmp").iterdir()) == []


def test_failure_reasons_name_the_real_cause() -> None:
    """
    An origin name that does not resolve and a connect timeout are
    connect-failed (not disk-error, not the fill deadline); a stop during
    connect is cancelled; the total deadline is timeout.
    """
    from twisted.internet import defer, error
    from twisted.python.failure import Failure

    from cosedge.fill.fetch import reason_of as _reason

    assert _reason(Failure(error.DNSLookupError("nonexistent.invalid")))[0] == "connect-failed"
    assert _reason(Failure(error.TimeoutError()))[0] == "connect-failed"
    assert _reason(Failure(error.ConnectingCancelledError(None)))[0] == "cancelled"
    assert _reason(Failure(defer.TimeoutError()))[0] == "timeout"
    assert _reason(Failure(OSError(28, "No space left on device")))[0] == "disk-full"
    assert _reason(Failure(OSError(5, "Input/output error")))[0] == "disk-error"


def test_unusable_header_values_and_dates_from_the_origin_are_not_kept() -> None:
    """
    An origin header value with control characters is not kept as metadata,
    and a Last-Modified that overflows does not stop the object being stored.
    """
    fills = Fills()
    fills.origin.add(
        "k",
        b"whole",
        headers={"X-Cos-Meta-Bad": "a\x0bb", "Last-Modified": "Mon, 01 Jan 2000 00:00:00 +99999999999999999999"},
    )
    d = fills.fill("k")
    fills.flush()
    assert result_of(d).reason == "stored"
    obj = result_of(fills.store.open(BUCKET, ("k",)))
    assert obj is not None and "x-cos-meta-bad" not in obj.meta


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_a_revalidation_keeps_a_not_modified_copy_and_replaces_a_changed_one(where: str, tmp_path: Path) -> None:
    """
    With validators, a 304 keeps the stored bytes and marks them checked now;
    a 200 replaces them atomically; an origin 404 leaves the copy alone.
    """
    fills = Fills(store=DiskStore(str(tmp_path)) if where == "disk" else MemoryStore())
    fills.origin.add("r.txt", b"version 1", headers={"ETag": '"v1"'})
    assert fills.run("r.txt").stored
    validators = ((b"if-none-match", b'"v1"'),)

    def checked() -> str:
        obj = result_of(fills.store.open(BUCKET, ("r.txt",)))
        try:
            return str(obj.meta["cosedge-checked"])
        finally:
            obj.close()

    assert checked() == "0"
    fills.clock.advance(3600)
    fills.origin.add("r.txt", b"", status=304, headers={"ETag": '"v1"'})
    assert fills.run("r.txt", force=True, validators=validators) == FillResult(BUCKET, "r.txt", False, "not-modified")
    assert fills.stored("r.txt") == b"version 1" and checked() == "3600"
    assert fills.origin.requests[-1][2][b"If-None-Match"] == [b'"v1"']
    assert fills.stats.events["fills_not_modified"] == 1
    fills.origin.add("r.txt", b"version 2", headers={"ETag": '"v2"'})
    assert fills.run("r.txt", force=True, validators=validators).stored
    assert fills.stored("r.txt") == b"version 2"
    del fills.origin.objects["r.txt"]  # the old server no longer has it: the copy stays
    fills.clock.advance(60)
    assert fills.run("r.txt", force=True, validators=((b"if-none-match", b'"v2"'),)).reason == "origin-gone"
    assert fills.stored("r.txt") == b"version 2" and checked() == "3660"  # kept, and not asked again at once
