"""
The seams of the data path: the origin planner, the asynchronous storage
interface (listing, probing, producing into a consumer), a store that answers
later (as a network store does) behind the bucket listener, and the fill
scheduler's capacity and readers.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from attrs import define, field
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.interfaces import IPullProducer, IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from cosedge import origins
from cosedge.config import BucketConfig, FillConfig, Origin
from cosedge.interfaces import IObjectStore, IStoredObject, ShortObject, StoredEntry, StoreError
from cosedge.origins import NOT_FOUND, Plan, Source
from cosedge.settle import settled
from cosedge.storage.disk import DiskStore
from cosedge.storage.produce import CHUNK, RangeProducer
from cosedge.testing import MemoryStore
from cosedge.web.producers import SMALL_RESPONSE

from .helpers import BUCKET, Edge, StepCooperator, raw_request, result_of, source_for

ORIGIN = Origin("10.10.10.10", 8080)

# -- the origin planner --


def test_a_bucket_without_origin_pull_plans_a_plain_miss() -> None:
    """No origin, or origin-pull off: a miss is a 404 and nothing is copied."""
    key = ("a.jpg",)
    assert origins.plan(BucketConfig(), key, None, b"GET") is NOT_FOUND
    assert origins.plan(BucketConfig(origin=ORIGIN, origin_pull=False), key, None, b"GET") == Plan("not-found")


def test_a_get_miss_is_a_302_to_the_origin_and_a_copy_from_the_same_url() -> None:
    """The seed's rule: 302 to http://origin/key, the client's query kept, a fill from the key's URL."""
    bucket = BucketConfig(origin=ORIGIN, origin_pull=True)
    plan = origins.plan(bucket, ("img", "a b.jpg"), b"x=1&y=2", b"GET")
    assert plan.answer == "redirect" and plan.status == 302
    assert plan.location == b"http://10.10.10.10:8080/img/a%20b.jpg?x=1&y=2"
    assert plan.fetch == Source(b"http://10.10.10.10:8080/img/a%20b.jpg", rule="1:proxy")


def test_a_head_miss_is_answered_like_a_get_and_copies_too() -> None:
    """
    HEAD gets the same 302 and, since issue 11, starts the same copy:
    clients that HEAD first (coscmd) would otherwise never get the object.
    """
    plan = origins.plan(BucketConfig(origin=ORIGIN, origin_pull=True), ("a.jpg",), None, b"HEAD")
    assert plan.location == b"http://10.10.10.10:8080/a.jpg"
    assert plan.fetch == Source(b"http://10.10.10.10:8080/a.jpg", rule="1:proxy")


def test_a_prefetch_needs_an_origin_but_not_origin_pull() -> None:
    """An operator's prefetch copies from the origin even with origin-pull off; without an origin it cannot."""
    assert origins.prefetch_source(BucketConfig(origin=ORIGIN), ("k",)) == Source(
        b"http://10.10.10.10:8080/k", rule="1:proxy"
    )
    assert origins.prefetch_source(BucketConfig(), ("k",)) is None


def test_the_planner_is_the_only_place_that_builds_an_origin_url() -> None:
    """No module of cosedge but the planner puts a URL together from the http:// scheme."""
    root = Path(origins.__file__).parent
    builders = [
        f"{path.relative_to(root)}:{number}"
        for path in sorted(root.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"""(b?["']https?://["']\s*\+|f["']https?://)""", line)
    ]
    assert [b.partition(":")[0] for b in builders] == ["origins.py"]


# -- the storage interface --


@pytest.fixture(params=["disk", "memory"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "disk":
        return DiskStore(str(tmp_path))
    return MemoryStore()


def _store(store: Any, key: str, data: bytes) -> None:
    writer = result_of(store.writer(BUCKET, tuple(key.split("/")), len(data)))
    writer.write(data)
    assert result_of(writer.commit({}, None)) is None


def test_list_pages_through_keys_in_order_under_a_prefix(any_store: Any) -> None:
    """list() gives keys that start with the prefix, after the marker, in key order, at most limit."""
    for key in ["b/2", "a", "b/1", "b/10", "c"]:
        _store(any_store, key, key.encode())
    everything = result_of(any_store.list(BUCKET))
    assert [e.key for e in everything] == ["a", "b/1", "b/10", "b/2", "c"]
    assert everything[1] == StoredEntry("b/1", 3, everything[1].mtime, everything[1].etag)
    # Each entry's ETag is the one a GET of the object answers with.
    opened = result_of(any_store.open(BUCKET, ("b", "1")))
    assert everything[1].etag == opened.meta.get("etag", f'"{opened.identity}"') != ""
    opened.close()
    assert [e.key for e in result_of(any_store.list(BUCKET, "b/"))] == ["b/1", "b/10", "b/2"]
    assert [e.key for e in result_of(any_store.list(BUCKET, "b/1"))] == ["b/1", "b/10"]
    page = result_of(any_store.list(BUCKET, "", "b/1", 2))
    assert [e.key for e in page] == ["b/10", "b/2"]
    assert result_of(any_store.list(BUCKET, "nothing/")) == []
    assert result_of(any_store.list("other-1", "")) == []


def test_the_disk_listing_shows_no_symlink_and_no_escape(tmp_path: Path) -> None:
    """Symlinks and folders are not objects; a prefix of '..' reaches nothing."""
    store = DiskStore(str(tmp_path))
    _store(store, "real", b"x")
    os.symlink("/etc/passwd", tmp_path / BUCKET / "link")
    (tmp_path / BUCKET / "empty").mkdir()
    assert [e.key for e in result_of(store.list(BUCKET))] == ["real"]
    assert result_of(store.list(BUCKET, "../")) == []


def test_probe_passes_and_fails_with_the_reason(tmp_path: Path) -> None:
    """A writable store probes clean; a data directory that is a file cannot be written."""
    assert result_of(DiskStore(str(tmp_path)).probe()) is None
    (tmp_path / "file").write_bytes(b"")
    failure = result_of(DiskStore(str(tmp_path / "file")).probe())
    assert isinstance(failure, Failure) and failure.check(StoreError)
    assert str(failure.value).startswith("data directory not writable: ")
    assert isinstance(result_of(MemoryStore(disk_limit=0).probe()), Failure)


@implementer(IPullProducer)
class _Consumer:
    """A consumer that takes what it is given and asks for more only when told."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.producer: Any = None
        self.registrations = 0

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert not streaming and self.producer is None
        self.producer = producer
        self.registrations += 1

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.data.append(data)

    def pull(self) -> None:
        self.producer.resumeProducing()

    def resumeProducing(self) -> None:  # IPullProducer, for verifyObject's sake
        self.pull()

    def stopProducing(self) -> None:
        pass


def test_an_object_produces_a_range_only_as_fast_as_the_consumer_asks(any_store: Any) -> None:
    """produce() writes one chunk per request for more, never past the range, then unregisters and fires."""
    data = os.urandom(2 * CHUNK + 10)
    _store(any_store, "big", data)
    obj = result_of(any_store.open(BUCKET, ("big",)))
    consumer = _Consumer()
    done = obj.produce(consumer, 5, 2 * CHUNK + 7)
    assert consumer.data == [] and consumer.registrations == 1  # nothing read until asked
    for _ in range(3):
        consumer.pull()
    assert not done.called
    consumer.pull()  # the range is written: the producer goes
    assert result_of(done) == 2 * CHUNK + 2
    assert b"".join(consumer.data) == data[5 : 2 * CHUNK + 7] and consumer.producer is None
    obj.close()


def test_a_shrunk_object_fails_its_production_and_a_stopped_one_is_cancelled() -> None:
    """Fewer bytes than the range: ShortObject, after unregistering; stopProducing: CancelledError."""
    consumer = _Consumer()
    done = RangeProducer(lambda offset, length: b"x" * (length - 1), consumer, 0, 10).start()
    consumer.pull()
    assert result_of(done).check(ShortObject) and consumer.producer is None and consumer.data == []
    consumer = _Consumer()
    done = RangeProducer(lambda offset, length: b"x" * length, consumer, 0, 10).start()
    consumer.producer.stopProducing()
    assert result_of(done).check(CancelledError)


def test_a_small_object_is_held_in_memory_until_its_commit(tmp_path: Path) -> None:
    """A writer told a small length creates no file before commit; abort leaves nothing."""
    store = DiskStore(str(tmp_path))
    writer = result_of(store.writer(BUCKET, ("small",), 3))
    writer.write(b"abc")
    assert os.listdir(store.tmp_dir) == [] if os.path.isdir(store.tmp_dir) else True
    writer.abort()
    assert result_of(store.open(BUCKET, ("small",))) is None
    writer = result_of(store.writer(BUCKET, ("streamed",), None))
    writer.write(b"abc")
    assert len(os.listdir(store.tmp_dir)) == 1  # streamed to its temporary file
    writer.abort()
    assert os.listdir(store.tmp_dir) == []


# -- a store that answers later, behind the listener --


@define(eq=False)
class LaterStore:
    """A memory store whose every answer waits until the test releases it, as a network store's would."""

    inner: MemoryStore = field(factory=MemoryStore)
    held: list[tuple[Deferred[Any], Any]] = field(factory=list)
    #: Every object handed out, to check each gets closed.
    handed: list[_LaterObject] = field(factory=list)
    #: Fail every open with this, when set.
    error: Exception | None = None

    def _later(self, d: Deferred[Any]) -> Deferred[Any]:
        waiting: Deferred[Any] = Deferred()
        self.held.append((waiting, d))
        return waiting

    def release(self) -> None:
        """Answer everything asked so far (answers may ask again: those wait for the next release)."""
        held, self.held = self.held, []
        for waiting, d in held:
            d.chainDeferred(waiting)

    def open(self, bucket: str, segments: tuple[str, ...]) -> Deferred[Any]:
        if self.error is not None:
            return self._later(fail(self.error))
        return self._later(self.inner.open(bucket, segments).addCallback(self._hand_out))

    def _hand_out(self, obj: Any) -> Any:
        if obj is None:
            return None
        self.handed.append(_LaterObject(obj, self))
        return self.handed[-1]

    def writer(self, bucket: str, segments: tuple[str, ...], length: int | None = None) -> Deferred[Any]:
        return self._later(self.inner.writer(bucket, segments, length))

    def remove(self, bucket: str, segments: tuple[str, ...]) -> Deferred[bool]:
        return self._later(self.inner.remove(bucket, segments))

    def update_meta(self, bucket: str, segments: tuple[str, ...], changes: Any) -> Deferred[bool]:
        return self._later(self.inner.update_meta(bucket, segments, changes))

    def list(self, bucket: str, prefix: str = "", marker: str = "", limit: int = 1000) -> Deferred[Any]:
        return self._later(self.inner.list(bucket, prefix, marker, limit))

    def usage(self, bucket: str) -> Deferred[Any]:
        return self._later(self.inner.usage(bucket))

    def probe(self) -> Deferred[None]:
        return self._later(self.inner.probe())

    def sweep(self, owner: int | None = None) -> Deferred[int]:
        return self._later(self.inner.sweep(owner))


@define(eq=False)
class _LaterObject:
    inner: Any
    store: LaterStore
    closed: bool = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        return self.store._later(self.inner.read(offset, length))

    def close(self) -> None:
        self.closed = True
        self.inner.close()


IObjectStore.implementedBy(LaterStore) or implementer(IObjectStore)(LaterStore)
IStoredObject.implementedBy(_LaterObject) or implementer(IStoredObject)(_LaterObject)


@pytest.fixture
def later(cooperator: StepCooperator) -> Edge:
    store = LaterStore()
    assert verifyObject(IObjectStore, store)
    return Edge(cooperator, store=store)  # type: ignore[arg-type]


def _answer_later(edge: Edge, target: str, **kwargs: Any) -> Any:
    """Send a request, check nothing is answered before the store is, then let the store answer."""
    conn = edge.connect()
    conn.send(raw_request(target, **kwargs))
    assert conn.transport.value() == b""  # waiting on the store
    for _ in range(3):
        edge.store.release()  # type: ignore[attr-defined]
    response = conn.response()
    assert conn.closed
    return response


def test_a_small_hit_from_a_store_that_answers_later(later: Edge) -> None:
    """Open and read both wait: the answer comes when the store has, with its length, and the object is closed."""
    later.store.inner.put(BUCKET, ("s.txt",), b"hello", {"etag": '"e"'})  # type: ignore[attr-defined]
    response = _answer_later(later, "/s.txt")
    assert response.status == 200 and response.body == b"hello"
    assert response.header(b"content-length") == b"5" and response.header(b"etag") == b'"e"'
    head = _answer_later(later, "/s.txt", method=b"HEAD")
    assert head.status == 200 and head.body == b"" and head.header(b"content-length") == b"5"


def test_a_large_hit_from_a_store_that_answers_later_is_produced_whole(later: Edge) -> None:
    """Past the one-write size the object produces its bytes into the response."""
    data = os.urandom(SMALL_RESPONSE * 3 + 1)
    later.store.inner.put(BUCKET, ("big.bin",), data)  # type: ignore[attr-defined]
    response = _answer_later(later, "/big.bin")
    assert response.status == 200 and response.body == data
    ranged = _answer_later(later, "/big.bin", headers=[("Range", "bytes=10-19,100-109")])
    assert ranged.status == 206 and b"multipart/byteranges" in (ranged.header(b"content-type") or b"")


def test_a_miss_and_a_store_failure_from_a_store_that_answers_later(later: Edge) -> None:
    """A miss is the planner's 302 with a fill; a store that fails later is a 503 COS error."""
    response = _answer_later(later, "/missing.jpg")
    later.flush_origin()
    assert response.status == 302 and later.origin.gets(b"/missing.jpg") == 1  # the fill asked the origin
    store: Any = later.store
    store.error = StoreError(24, "Too many open files")
    failed = _answer_later(later, "/x.jpg")
    assert failed.status == 503 and failed.error_code() == "ServiceUnavailable"


def test_a_client_that_leaves_before_the_store_answers_costs_nothing(later: Edge) -> None:
    """The answer that comes after the client has gone is dropped, and the object is still closed."""
    later.store.inner.put(BUCKET, ("s.txt",), b"hello")  # type: ignore[attr-defined]
    conn = later.connect()
    conn.send(raw_request("/s.txt"))
    conn.transport.loseConnection()
    conn.transport.protocol.connectionLost(Failure(ConnectionError("gone")))
    store: Any = later.store
    for _ in range(3):
        store.release()
    assert [o.closed for o in store.handed] == [True]
    assert conn.transport.value() == b""  # nothing written to the closed connection


# -- the scheduler: capacity and readers --


@define(eq=False)
class Reader:
    meta: Mapping[str, str] | None = None
    length: int | None = None
    data: list[bytes] = field(factory=list)
    outcome: list[Failure | None] = field(factory=list)

    def response(self, meta: Mapping[str, str], length: int | None) -> None:
        self.meta, self.length = meta, length

    def write(self, data: bytes) -> None:
        self.data.append(data)

    def finished(self, failure: Failure | None) -> None:
        self.outcome.append(failure)


def test_a_reader_gets_the_body_as_it_is_stored(cooperator: StepCooperator) -> None:
    """A reader attached at the start sees the kept headers, every byte, then one 'whole' (None)."""
    edge = Edge(cooperator, gated=True)
    edge.origin.add("k", b"0123456789", content_type="text/plain")
    first = Reader()
    assert edge.filler.start(BUCKET, ("k",), source_for(ORIGIN, ("k",)), reader=first)
    edge.flush_origin()
    assert first.meta is not None and first.meta["content-type"] == "text/plain" and first.length == 10
    assert b"".join(first.data) == b"0123456789" and first.outcome == [None]
    assert edge.store.get(BUCKET, "k") == b"0123456789"  # type: ignore[attr-defined]


def test_a_reader_that_joins_after_the_origin_answered_is_told_it_is_late(cooperator: StepCooperator) -> None:
    """Joining a fill whose body has started would miss bytes: the reader gets 'joined-late' at once."""
    edge = Edge(cooperator, gated=True)
    edge.origin.add("k", b"x" * 10, mode="stall", cut=5)
    source = source_for(ORIGIN, ("k",))
    early, late = Reader(), Reader()
    edge.filler.start(BUCKET, ("k",), source, reader=early)
    edge.flush_origin()
    assert b"".join(early.data) == b"xxxxx" and early.outcome == []  # headers and 5 bytes, then the origin stalls
    assert edge.filler.start(BUCKET, ("k",), source, reader=late) is True  # the same fill, joined
    assert len(late.outcome) == 1 and late.outcome[0] is not None
    assert late.outcome[0].value.reason == "joined-late" and late.data == []
    edge.filler.stop()
    assert len(early.outcome) == 1 and early.outcome[0] is not None  # the stop reaches the reader too


def test_the_readers_of_a_failed_fill_get_its_failure(cooperator: StepCooperator) -> None:
    """An origin 404 or a cut body: every reader is told why, once, and nothing is stored."""
    edge = Edge(cooperator, gated=True)
    edge.origin.add("cut", b"y" * 10, mode="truncate", cut=4)
    missing, cut = Reader(), Reader()
    edge.filler.start(BUCKET, ("missing",), source_for(ORIGIN, ("missing",)), reader=missing)
    edge.filler.start(BUCKET, ("cut",), source_for(ORIGIN, ("cut",)), reader=cut)
    edge.flush_origin()
    assert [f.value.reason for f in missing.outcome if f is not None] == ["http-404"] and missing.data == []
    assert [f.value.reason for f in cut.outcome if f is not None] == ["truncated"] and b"".join(cut.data) == b"yyyy"
    assert edge.store.get(BUCKET, "cut") is None  # type: ignore[attr-defined]


def test_capacity_waits_for_room_instead_of_queue_full(cooperator: StepCooperator) -> None:
    """With every slot and queue place taken, capacity() waits; it fires when a fill ends, and fails at stop."""
    edge = Edge(cooperator, gated=True)
    edge.config = edge.config.__class__(
        server=edge.config.server, buckets=edge.config.buckets, fill=FillConfig(max_concurrent=1, max_queue=1)
    )
    assert result_of(edge.filler.capacity()) is None  # room now
    for key in ("a", "b"):
        edge.origin.add(key, b"x")
        assert edge.filler.start(BUCKET, (key,), source_for(ORIGIN, (key,)))
    waiting = edge.filler.capacity()
    assert not waiting.called
    assert edge.filler.start(BUCKET, ("c",), source_for(ORIGIN, ("c",))) is False  # queue-full, as before
    edge.flush_origin()
    assert waiting.called and result_of(waiting) is None
    edge.flush_origin()
    for key in ("d", "e"):
        edge.filler.start(BUCKET, (key,), source_for(ORIGIN, (key,)))
    stopped = edge.filler.capacity()
    edge.filler.stop()
    assert result_of(stopped).check(CancelledError)


def test_settled_answers_at_once_or_later() -> None:
    """settled(): a fired Deferred's value (its failure raised), else a Deferred of it."""
    d: Deferred[int] = Deferred()
    d.callback(3)
    assert settled(d) == 3
    failed: Deferred[int] = Deferred()
    failed.errback(ValueError("no"))
    with pytest.raises(ValueError):
        settled(failed)
    pending: Deferred[int] = Deferred()
    waiting = settled(pending)
    assert isinstance(waiting, Deferred) and not waiting.called
    pending.callback(4)
    assert result_of(waiting) == 4


# -- an object whose producer streams (a network store's) --


@implementer(IPushProducer)
class _Push:
    """A streaming producer the test feeds by hand; it records pauses."""

    def __init__(self) -> None:
        self.pauses = 0
        self.paused = False
        self.stopped = False

    def pauseProducing(self) -> None:
        self.pauses += 1
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True


@define(eq=False)
class _StreamingObject:
    """A stored object without ``read_now`` whose ``produce`` registers a streaming producer."""

    inner: Any
    produced: list[tuple[_Push, Any, int, int, Deferred[int]]] = field(factory=list)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def produce(self, consumer: Any, start: int, end: int) -> Deferred[int]:
        push, done = _Push(), Deferred[int]()
        consumer.registerProducer(push, True)
        self.produced.append((push, consumer, start, end, done))
        return done

    def close(self) -> None:
        self.inner.close()


@define(eq=False)
class StreamingStore(LaterStore):
    """A store whose objects produce through a streaming producer."""

    streamed: list[_StreamingObject] = field(factory=list)

    def _hand_out(self, obj: Any) -> Any:
        if obj is None:
            return None
        self.streamed.append(_StreamingObject(obj))
        return self.streamed[-1]


def test_a_streaming_object_producer_is_paused_and_resumed_by_the_client_connection(cooperator: StepCooperator) -> None:
    """
    The response's producer becomes a streaming one as soon as the object's
    producer is (no pull loop on the cooperator while the bytes are on
    their way), and the client connection's pauses reach the object's producer.
    """
    data = os.urandom(SMALL_RESPONSE * 3)
    store = StreamingStore()
    store.inner.put(BUCKET, ("s.bin",), data)
    edge = Edge(cooperator, store=store)  # type: ignore[arg-type]
    conn = edge.connect()
    conn.send(raw_request("/s.bin"))
    store.release()
    handed = store.streamed
    (push, consumer, start, end, done) = handed[0].produced[0]
    channel = conn.transport.protocol
    assert channel._requestProducerStreaming is True
    channel.pauseProducing()
    assert push.pauses == 1 and push.paused
    channel.resumeProducing()
    assert not push.paused
    consumer.write(data[start:end])
    consumer.unregisterProducer()
    done.callback(end - start)
    response = conn.response()
    assert (response.status, response.body) == (200, data)
    assert not push.stopped
