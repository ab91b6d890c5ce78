"""
Running one job: its keys read from the source one at a time, each worked on
in a slot (at most ``[jobs] max_concurrent`` keys at once over all jobs), at
the job's rate, the outcome journalled as the key finishes.

- backfill: a key already stored is skipped (``store.open``, no origin
  request); else it is filled through the daemon's fill scheduler (waiting
  for :meth:`~cosedge.fill.scheduler.Filler.capacity` rather than being
  refused), so single flight, limits and metrics are the live misses' own.
- verify: ``HEAD`` of the key at its origin (the URL a fill would copy it
  from): 404 or 410 is ``gone``; a length or ETag unlike the stored
  object's is ``differs``; both are written to the job's report.  The ETags
  are compared only when the origin sends one and the stored object keeps
  one in its metadata, which only a fill puts there (the origin's ``ETag``
  header as it was copied): an object placed by hand has none, and the ETag
  a listing shows for it is cosedge's own, which no origin could match.

Everything runs in the reactor (Deferreds and coroutines): the source is read
a line at a time, the journal's ``fsync`` goes to the store's thread pool.
"""

from __future__ import annotations

import os
from collections.abc import Coroutine
from contextlib import aclosing
from typing import Any

from attrs import define, field
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..fill.fetch import CHECKED, FillFailed
from ..origins import Source, prefetch_source
from .journal import AppendFile, DiffReport, Journal, replay
from .model import Item, Job, JobFailed
from .origin import ask, compare, drop, fetch_sitemap, sitemap_source
from .shared import Limiter, Shared
from .sources import PARSERS, Counted, FileSource, ListingSource, parse_loc, split_spec

__all__ = ["Runner"]

_log = Logger(namespace="cosedge.jobs")
#: Keys finished between two marks of the journal (it is also marked and synced every second).
_BATCH = 256
#: Keys taken between two turns of the reactor (stored keys finish at once).
_BREATHE = 64
#: Tries of a fill refused as queue-full after the scheduler said it had room (live misses took it).
_QUEUE_TRIES = 100
#: Why a fill did not store, and the outcome that is for a backfill (else a failure).
_FILL_OUTCOMES = {"stored": "skipped", "elsewhere": "elsewhere"}


@define(eq=False)
class Runner:
    """Works through one job; :meth:`run` once (see the module's docstring)."""

    job: Job
    shared: Shared
    _limiter: Limiter = field(init=False)
    journal: Journal = field(init=False)
    report: DiffReport | None = field(default=None, init=False)
    _in_flight: dict[int, Item] = field(factory=dict, init=False)
    _calls: dict[int, Deferred[Any]] = field(factory=dict, init=False)
    #: The key read but not taken yet (number, position).
    _pending: tuple[int, str] | None = field(default=None, init=False)
    #: Where the source goes on after the last key taken.
    _after: tuple[int, str] = field(default=(0, ""), init=False)
    _unpause: Deferred[None] | None = field(default=None, init=False)
    _waiting: Deferred[Any] | None = field(default=None, init=False)
    _drained: Deferred[None] | None = field(default=None, init=False)
    #: Why the run stops early: "cancelled", "stopped" (the daemon stops) or "failed".
    stopped: str | None = field(default=None, init=False)
    _error: Failure | None = field(default=None, init=False)
    _since_mark: int = field(default=0, init=False)
    _timer: IDelayedCall | None = field(default=None, init=False)
    #: Keys whose fill (or HEAD) has been asked for: the daemon stopping lets them finish.
    _asked: set[int] = field(factory=set, init=False)
    _winding: bool = field(default=False, init=False)
    #: Keys taken but left unfinished (the run stopped): the mark stays before them.
    _dropped: list[tuple[int, str]] = field(factory=list, init=False)
    _grace: IDelayedCall | None = field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        job, jobs = self.job, self.shared.config
        self._limiter = Limiter(
            self.shared.clock,
            lambda: job.rate_objects if job.rate_objects is not None else jobs().jobs.rate_objects,
            lambda: job.rate_bytes if job.rate_bytes is not None else jobs().jobs.rate_bytes,
        )
        self.journal = Journal(self.shared.path(job, ".journal"), self.shared.run_blocking)

    # -- control --

    def pause(self) -> None:
        """Take no more keys (those under way finish)."""
        if self._unpause is None:
            self._unpause = Deferred()

    def resume(self) -> None:
        unpause, self._unpause = self._unpause, None
        if unpause is not None:
            unpause.callback(None)

    def wind_down(self, grace: float) -> None:
        """
        The daemon stops: take no more keys, drop those not asked of the
        origin yet, let the others finish (``grace`` seconds at most: then
        they are dropped too), then stop.  A dropped key is not journalled:
        it is done after the restart.
        """
        if self.stopped is not None or self._winding:
            return
        self._winding = True
        self.pause()
        for seq, call in list(self._calls.items()):
            if seq not in self._asked:
                call.cancel()
        if self._in_flight:
            self._grace = self.shared.clock.callLater(grace, self.stop, "stopped")
        else:
            self.stop("stopped")

    def stop(self, why: str) -> None:
        """End the run early: take no more keys, and stop waiting for those under way (not journalled)."""
        if self.stopped is not None:
            return
        self.stopped = why
        if self._grace is not None and self._grace.active():
            self._grace.cancel()
        self.resume()
        if self._waiting is not None:
            self._waiting.cancel()
        for call in list(self._calls.values()):
            call.cancel()

    # -- the run --

    async def run(self) -> str:
        """Work until the source is done; the state the job ends in ("done", or why it stopped)."""
        job = self.job
        counting: Deferred[None] | None = None
        try:
            os.makedirs(self.shared.folder, mode=0o700, exist_ok=True)
            replayed = replay(self.journal.path)
            replayed.restore(job)
            self._after = (replayed.mark, replayed.position)
            self.journal.open()
            if job.kind == "verify":
                self.report = DiffReport(AppendFile(self.shared.path(job, ".report.tsv"), self.shared.run_blocking))
                job.report = self.report.file.path
                self.report.open(f"verify job {job.id} of {job.bucket}, prefix {job.source!r}")
            self._timer = self.shared.clock.callLater(1.0, self._tick)
            source = await self._source()
            if job.total is None:
                counting = Deferred.fromCoroutine(self._count(source))
                counting.addErrback(self._count_failed)
            await self._dispatch(source, replayed.after)
            await self._drain()
            if counting is not None and self.stopped is None:
                await counting
        finally:
            if counting is not None:
                counting.cancel()
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            await self._close()
        if self._error is not None:
            self._error.raiseException()
        return self.stopped or "done"

    async def _close(self) -> None:
        self._mark()
        files = [self.journal] + ([self.report.file] if self.report is not None else [])
        for f in files:
            try:
                await f.close()
            except OSError as e:
                _log.error("job {job}: cannot sync {path}: {error}", job=self.job.id, path=f.path, error=e)

    async def _source(self) -> FileSource | ListingSource:
        job, shared = self.job, self.shared
        if job.kind in ("verify", "refresh"):
            return ListingSource(shared.store, job.bucket, job.source)
        kind, where = split_spec(job.source)
        if kind != "sitemap":
            return FileSource(where, PARSERS[kind], shared.breathe)
        path = shared.path(job, ".locs")
        if not job.fetched:
            source = sitemap_source(where, shared.config().buckets.get(job.bucket))
            with open(path + ".tmp", "wb") as out:
                locs = await self._waited(fetch_sitemap(shared.agents, source, shared.config().fill, shared.clock, out))
                out.flush()
                await shared.run_blocking(lambda: os.fsync(out.fileno()))
            os.replace(path + ".tmp", path)
            _log.info("job {job}: {locs} URL(s) in the sitemap {url}", job=job.id, locs=locs, url=where)
            job.fetched = True
            shared.save(job)
        return FileSource(path, parse_loc, shared.breathe)

    async def _count(self, source: FileSource | ListingSource) -> None:
        counted: Counted = await source.count()
        job = self.job
        job.total, job.bad, job.ignored = counted.total, counted.bad, counted.ignored
        self.shared.save(job)

    def _count_failed(self, failure: Failure) -> None:
        if not failure.check(CancelledError):  # cancelled: the run ended first
            self._fail(failure)

    async def _waited(self, work: Coroutine[Any, Any, Any]) -> Any:
        """Await ``work`` so that :meth:`stop` cancels it."""
        self._waiting = Deferred.fromCoroutine(work)
        try:
            return await self._waiting
        finally:
            self._waiting = None

    async def _dispatch(self, source: FileSource | ListingSource, done: dict[int, str]) -> None:
        taken = 0
        async with aclosing(source.items(self._after[1], self._after[0])) as items:
            async for item in items:
                if self.stopped is not None:
                    return
                if done.get(item.seq) == item.key:  # finished before a restart
                    self._after = (item.seq + 1, item.after)
                    continue
                self._pending = (item.seq, item.resume)
                if not await self._ready():
                    return
                self._pending = None
                self._after = (item.seq + 1, item.after)
                self._launch(item)
                taken += 1
                if taken % _BREATHE == 0:
                    try:
                        await self._waited(self._breathe())
                    except CancelledError:
                        return

    async def _breathe(self) -> None:
        await self.shared.breathe()

    async def _ready(self) -> bool:
        """Wait until the job may take a key (not paused, a slot free); False if it stops."""
        slots = self.shared.slots
        while self.stopped is None:
            try:
                if self._unpause is not None:
                    self._waiting = self._unpause
                    await self._unpause
                    continue
                self._waiting = slots.acquire()
                await self._waiting
            except CancelledError:
                continue
            finally:
                self._waiting = None
            if self.stopped is None and self._unpause is None:
                return True
            slots.release()
        return False

    def _launch(self, item: Item) -> None:
        self._in_flight[item.seq] = item
        work = {"backfill": self._backfill, "verify": self._verify, "refresh": self._refresh}[self.job.kind]
        call = Deferred.fromCoroutine(work(item))
        call.addBoth(self._finished, item)
        if item.seq in self._in_flight:
            self._calls[item.seq] = call

    def _finished(self, result: tuple[str, int] | None | Failure, item: Item) -> None:
        del self._in_flight[item.seq]
        self._calls.pop(item.seq, None)
        self._asked.discard(item.seq)
        self.shared.slots.release()
        if isinstance(result, Failure) and not result.check(JobFailed, CancelledError):
            _log.failure("job {job}: key {key} failed unexpectedly", result, job=self.job.id, key=item.key)
            result = ("!error", 0)
        if isinstance(result, tuple):
            self._record(item, *result)
        else:
            self._dropped.append((item.seq, item.resume))
            if isinstance(result, Failure) and result.check(JobFailed):
                self._fail(result)
        if not self._in_flight and self._winding:
            self.stop("stopped")
        if not self._in_flight and self._drained is not None:
            drained, self._drained = self._drained, None
            drained.callback(None)

    async def _drain(self) -> None:
        if self._in_flight:
            self._drained = Deferred()
            await self._drained

    def _fail(self, failure: Failure) -> None:
        if self._error is None:
            self._error = failure
        self.stop("failed")

    # -- the journal --

    def _record(self, item: Item, outcome: str, size: int) -> None:
        job = self.job
        job.count(outcome, size, self.shared.clock.seconds())
        self.shared.counted(job.kind, outcome, size)
        try:
            self.journal.finished(item, outcome, size)
        except OSError as e:
            self._fail(Failure(JobFailed(f"cannot write the journal {self.journal.path}: {e}")))
        self._since_mark += 1
        if self._since_mark >= _BATCH:
            self._mark()

    def _mark(self) -> None:
        """Mark how far the job has come without a gap, and sync the journal (and report)."""
        self._since_mark = 0
        points = [(item.seq, item.resume) for item in self._in_flight.values()] + self._dropped
        if self._pending is not None:
            points.append(self._pending)
        seq, position = min(points) if points else self._after
        try:
            self.journal.mark(seq, position)
        except OSError as e:
            self._fail(Failure(JobFailed(f"cannot write the journal {self.journal.path}: {e}")))
        files = [self.journal] + ([self.report.file] if self.report is not None else [])
        for f in files:
            f.sync().addErrback(
                lambda failure, path: _log.error(
                    "job {job}: cannot sync {path}: {error}", job=self.job.id, path=path, error=failure.value
                ),
                f.path,
            )

    def _tick(self) -> None:
        if self._since_mark:
            self._mark()
        self._timer = self.shared.clock.callLater(1.0, self._tick)

    # -- one key --

    def _origin(self, item: Item) -> Source | None:
        bucket = self.shared.config().buckets.get(self.job.bucket)
        if bucket is None:
            raise JobFailed(f"bucket {self.job.bucket} is no longer configured")
        return prefetch_source(bucket, item.segments)

    async def _stored(self, item: Item) -> tuple[int, str | None] | str | None:
        """The stored object's size and origin ETag, None if not stored, or a failure outcome."""
        try:
            obj = await self.shared.store.open(self.job.bucket, item.segments)
        except OSError:
            return "!store-error"
        if obj is None:
            return None
        size, etag = obj.size, obj.meta.get("etag")
        obj.close()
        return size, etag

    async def _backfill(self, item: Item) -> tuple[str, int] | None:
        stored = await self._stored(item)
        if isinstance(stored, str):
            return stored, 0
        if stored is not None:
            return "skipped", 0
        source = self._origin(item)
        if source is None:
            return "!no-origin", 0
        await self._limiter.take()
        filler, bucket = self.shared.filler, self.job.bucket
        for _ in range(_QUEUE_TRIES):
            await filler.capacity()
            self._asked.add(item.seq)
            result = await filler.fill(bucket, item.segments, source)
            if result.reason != "queue-full":
                break
        if result.stored:
            self._limiter.spend(result.size)
            return "stored", result.size
        if result.reason in ("cancelled", "stopping"):
            return None  # the daemon stops: the key is done again on resume
        return _FILL_OUTCOMES.get(result.reason, "!" + result.reason), 0

    async def _verify(self, item: Item) -> tuple[str, int] | None:
        stored = await self._stored(item)
        if stored is None:
            return "!not-stored", 0  # removed since it was listed
        if isinstance(stored, str):
            return stored, 0
        size, etag = stored
        source = self._origin(item)
        if source is None:
            return "!no-origin", 0
        await self._limiter.take()
        self._asked.add(item.seq)
        try:
            response = await ask(self.shared.agents, b"HEAD", source, self.shared.config().fill, self.shared.clock)
        except FillFailed as e:
            return "!" + e.reason, 0
        drop(response)
        if response.code in (404, 410):
            self._report(item, "gone", f"the origin answers {response.code}")
            return "gone", size
        if response.code != 200:
            return f"!http-{response.code}", 0
        problem = compare(size, etag, response.headers)
        if problem:
            self._report(item, "differs", problem)
            return "differs", size
        return "same", size

    async def _refresh(self, item: Item) -> tuple[str, int] | None:
        """
        Re-check a stored copy with a conditional GET (its ETag and
        Last-Modified): 304 → fresh; 200 → replaced atomically; 404/410 →
        kept (``origin-gone``).  A copy checked within the bucket's
        ``revalidate_after`` is fresh without asking.
        """
        try:
            obj = await self.shared.store.open(self.job.bucket, item.segments)
        except OSError:
            return "!store-error", 0
        if obj is None:
            return "!not-stored", 0  # removed since it was listed
        meta = dict(obj.meta)
        obj.close()
        bucket = self.shared.config().buckets.get(self.job.bucket)
        window = bucket.revalidate_after if bucket is not None else 0
        checked = meta.get(CHECKED, "")
        if window and checked.replace(".", "", 1).isdigit() and self.shared.clock.seconds() - float(checked) <= window:
            return "fresh", 0
        source = self._origin(item)
        if source is None:
            return "!no-origin", 0
        validators = tuple(
            (header, meta[field].encode("latin-1"))
            for field, header in (("etag", b"if-none-match"), ("last-modified", b"if-modified-since"))
            if meta.get(field)
        )
        await self._limiter.take()
        self._asked.add(item.seq)
        result = await self.shared.filler.fill(
            self.job.bucket, item.segments, source, force=True, validators=validators
        )
        if result.stored:
            self._limiter.spend(result.size)
            return "replaced", result.size
        if result.reason == "not-modified":
            return "fresh", 0
        if result.reason in ("origin-gone", "http-404", "http-410"):
            return "origin-gone", 0
        if result.reason in ("cancelled", "stopping"):
            return None
        return "!" + result.reason, 0

    def _report(self, item: Item, problem: str, detail: str) -> None:
        if self.report is None:
            return
        try:
            self.report.add(item.key, problem, detail)
        except OSError as e:
            _log.error("job {job}: cannot write {path}: {error}", job=self.job.id, path=self.report.file.path, error=e)
