"""
The fill scheduler: which fills run, and when.

A :class:`Filler` owns every fill: exactly one per key however many requests
miss it at once (and, with :class:`~cosedge.fill.claims.Claims`, across the
daemon's processes), at most ``max_concurrent`` running with a bounded queue
behind them, a short memory of origin 404s and a back-off after failures,
a deadline on the injected clock around the whole fill, and a graceful
:meth:`Filler.stop`.  Callers that would rather wait than be refused
(``queue-full``) wait for :meth:`Filler.capacity`.

Each fill is handed to a :class:`~cosedge.fill.fetch.Fetcher`, which copies
the object from the :class:`~cosedge.origins.Source` the origin planner
named; the outcome is one log line, counters, and a :class:`FillResult` for
whoever waits.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent

from ..config import FillConfig
from ..interfaces import IObjectStore
from ..origins import Source
from ..settle import settled
from ..stats import Stats
from .claims import Claims
from .fetch import Fetcher, Fill, FillFailed, FillResult, Reader, reason_of
from .health import Health
from .partial import Partial, Partials

__all__ = ["FillFailed", "FillResult", "Filler"]

_log = Logger(namespace="cosedge.fill")  # the name operators filter on, kept across moves
_MEMORY_LIMIT = 100_000  # remembered 404s / failures, oldest dropped first


def _remember(memory: dict[Any, float], key: Any, until: float) -> None:
    memory.pop(key, None)
    memory[key] = until
    while len(memory) > _MEMORY_LIMIT:
        del memory[next(iter(memory))]


def _remembered(memory: dict[Any, float], key: Any, now: float) -> bool:
    until = memory.get(key)
    if until is None:
        return False
    if until > now:
        return True
    del memory[key]
    return False


@define(eq=False)
class Filler:
    """
    Runs and tracks every background fill.

    :param config: called for the current :class:`FillConfig` (it may be
        replaced live).
    """

    store: IObjectStore
    agent: IAgent
    clock: IReactorTime
    config: Callable[[], FillConfig]
    stats: Stats
    #: Claims shared with the daemon's other processes (None: the only one).
    claims: Claims | None = None
    #: The agent for ``https://`` origins with a CA file and a name to verify (None: ``agent`` for all).
    tls: Callable[[str | None, bytes | None], IAgent] | None = None
    #: ``[cluster]``: hands a background fill to the key's owner edge (see
    #: :meth:`cosedge.cluster.Cluster.hand_over`); None: every fill is this edge's.
    hand_over: Callable[[str, tuple[str, ...], Source, Callable[[], object]], bool] | None = None
    #: Where mirror fills are published while under way (None: they are not; see :mod:`.partial`).
    partials: Partials | None = None
    _fills: dict[tuple[str, tuple[str, ...]], Fill] = field(factory=dict, init=False)
    _queue: deque[Fill] = field(factory=deque, init=False)
    _running: int = field(default=0, init=False)
    _not_found: dict[tuple[str, tuple[str, ...]], float] = field(factory=dict, init=False)
    _backoff: dict[tuple[str, tuple[str, ...]], float] = field(factory=dict, init=False)
    _stopping: bool = field(default=False, init=False)
    _room_waiters: list[Deferred[None]] = field(factory=list, init=False)
    _fetcher: Fetcher = field(init=False)
    #: Which origin hosts are believed up (the planner asks it).
    health: Health = field(init=False)

    def __attrs_post_init__(self) -> None:
        self.health = Health(self.clock, self.config, lambda url, source: self._fetcher.agent_for(url, source))
        self._fetcher = Fetcher(self.store, self.agent, self.clock, self.tls, self.health, partials=self.partials)

    def start(
        self,
        bucket: str,
        segments: tuple[str, ...],
        source: Source,
        *,
        force: bool = False,
        reader: Reader | None = None,
        here: bool = False,
    ) -> bool:
        """
        Start (or join) the fill of ``bucket``/``segments`` from ``source``,
        with ``reader`` reading the body as it arrives (a reader that comes
        after the origin has answered is told at once that it is too late:
        ``FillFailed("joined-late")``).
        Returns False when no fill runs for this key: a recent origin 404 or
        failure is remembered (unless ``force``), the queue is full, or the
        filler is stopping.  In a cluster, a background fill (no ``reader``,
        not ``force``d, not ``here``) of a key another edge owns is handed
        to that edge (True).
        """
        key = (bucket, segments)
        if (
            self.hand_over is not None
            and reader is None
            and not (force or here or self._stopping)
            and key not in self._fills
            and not _remembered(self._not_found, key, self.clock.seconds())
            and not _remembered(self._backoff, key, self.clock.seconds())
            and self.hand_over(bucket, segments, source, lambda: self._start(bucket, segments, source, False))
        ):
            return True
        return isinstance(self._start(bucket, segments, source, force, reader), Fill)

    def _start(
        self,
        bucket: str,
        segments: tuple[str, ...],
        source: Source,
        force: bool,
        reader: Reader | None = None,
        validators: tuple[tuple[bytes, bytes], ...] = (),
    ) -> Fill | str:
        """The fill of this key (started, queued or joined), or why there is none."""
        key = (bucket, segments)
        if key in self._fills:
            joined = self._fills[key]
            if reader is not None:
                if joined.answered:
                    reader.finished(Failure(FillFailed("joined-late", "the origin has answered already")))
                else:
                    joined.readers.append(reader)
            return joined
        if self._stopping:
            return "stopping"
        now = self.clock.seconds()
        if not force:
            if _remembered(self._not_found, key, now):
                self.stats.inc("fills_skipped_not_found")
                return "not-found"
            if _remembered(self._backoff, key, now):
                self.stats.inc("fills_skipped_backoff")
                return "backoff"
        cfg = self.config()
        fill = Fill(bucket, segments, source, now, validators=validators)
        has_slot = self._running < cfg.max_concurrent
        if has_slot or len(self._queue) < cfg.max_queue:
            refused = self._claim(bucket, segments, force)
            if refused is not None:
                return refused
            self._fills[key] = fill
            if reader is not None:
                fill.readers.append(reader)
            if has_slot:
                self._run(fill)
            else:
                self._queue.append(fill)
        else:
            self.stats.fill_failed("queue-full")
            _log.warn(
                "fill {bucket}/{key} not started: queue-full ({queued} waiting) from {url}",
                bucket=bucket,
                key=fill.key,
                queued=len(self._queue),
                url=fill.url.decode(),
            )
            return "queue-full"
        return fill

    def read(self, bucket: str, segments: tuple[str, ...], source: Source, reader: Reader) -> str | None:
        """
        Like :meth:`start` with a reader: None when the reader reads a fill
        (started or joined), else why no fill runs ("not-found", "backoff",
        "queue-full", "stopping", "elsewhere", "stored").
        """
        started = self._start(bucket, segments, source, False, reader)
        return started if isinstance(started, str) else None

    def capacity(self) -> Deferred[None]:
        """
        Fires once a new fill would not be refused as ``queue-full`` (at
        once if there is room now), for callers that would rather wait: a
        backfill job.  Fails with CancelledError when the filler stops.
        """
        if self._has_room():
            return succeed(None)
        waiter: Deferred[None] = Deferred(lambda d: self._room_waiters.remove(d))
        self._room_waiters.append(waiter)
        return waiter

    def fill(
        self,
        bucket: str,
        segments: tuple[str, ...],
        source: Source,
        *,
        force: bool = False,
        validators: tuple[tuple[bytes, bytes], ...] = (),
    ) -> Deferred[FillResult]:
        """
        Like :meth:`start`, and return a Deferred that fires with the
        :class:`FillResult` (it never fails; cancelling it does not cancel the
        shared fill).  ``validators`` make it a revalidation of a stored copy
        (``If-None-Match``/``If-Modified-Since``): the origin's 304 keeps the
        copy (reason ``not-modified``), a 200 replaces it atomically.
        """
        fill = self._start(bucket, segments, source, force, None, validators)
        if isinstance(fill, str):
            return succeed(FillResult(bucket, "/".join(segments), False, fill))
        if fill.result is not None:  # it finished synchronously
            return succeed(fill.result)
        waiter: Deferred[FillResult] = Deferred()
        fill.waiters.append(waiter)
        return waiter

    def in_flight(self) -> list[dict[str, object]]:
        """The fills running and queued: key, state, bytes so far, age."""
        now = self.clock.seconds()
        return [
            {
                "bucket": f.bucket,
                "key": f.key,
                "state": "queued" if f.started_at is None else "running",
                "bytes": f.received,
                "expected": f.expected,
                "age": round(now - f.queued_at, 3),
                "url": f.url.decode(),
                "rule": f.source.rule,
            }
            for f in self._fills.values()
        ]

    @property
    def running(self) -> int:
        return self._running

    @property
    def queued(self) -> int:
        return len(self._queue)

    def remembered_not_found(self) -> int:
        """How many keys' origin 404s are remembered right now."""
        now = self.clock.seconds()
        return sum(1 for until in self._not_found.values() if until > now)

    def filling_elsewhere(self, bucket: str, segments: tuple[str, ...]) -> bool:
        """Whether another process of the daemon holds this key's claim (is filling it) right now."""
        if self.claims is None or (bucket, segments) in self._fills:
            return False
        try:
            if not self.claims.claim(bucket, segments):
                return True
        except OSError:
            return False
        self.claims.release(bucket, segments)
        return False

    def partial(self, bucket: str, segments: tuple[str, ...]) -> Partial | None:
        """
        The key's mirror fill under way, in this process or another, opened
        where its bytes so far can be read (None: no such fill, or not yet
        published; the caller closes it).
        """
        if self.partials is None:
            return None
        if (bucket, segments) in self._fills:
            pid: int | None = self.partials.pid
        elif self.claims is not None:
            pid = self.claims.holder(bucket, segments)
        else:
            pid = None
        return None if pid is None else self.partials.open(bucket, segments, pid)

    def recently_failed(self, bucket: str, segments: tuple[str, ...]) -> bool:
        """Whether a recent failure of this key holds it back (the back-off), as a miss would find."""
        return _remembered(self._backoff, (bucket, segments), self.clock.seconds())

    def recently_not_found(self, bucket: str, segments: tuple[str, ...]) -> bool:
        """Whether the origin's 404 for this key is remembered (``not_found_ttl``), as a miss would find."""
        return _remembered(self._not_found, (bucket, segments), self.clock.seconds())

    def forget(self, bucket: str, segments: tuple[str, ...]) -> None:
        """Drop any remembered 404 or failure for a key (after a purge, say)."""
        self._not_found.pop((bucket, segments), None)
        self._backoff.pop((bucket, segments), None)

    def stop(self) -> Deferred[Any]:
        """Cancel queued and running fills; fires once all have cleaned up."""
        self._stopping = True
        while self._queue:
            fill = self._queue.popleft()
            del self._fills[(fill.bucket, fill.segments)]
            self._release(fill)
            self._notify(fill, FillResult(fill.bucket, fill.key, False, "cancelled"))
        waiting, self._room_waiters = self._room_waiters, []
        for waiter in waiting:
            waiter.errback(CancelledError())
        running = [f.deferred for f in self._fills.values() if f.deferred is not None]
        for d in running:
            d.cancel()
        return DeferredList(running, consumeErrors=True)

    # -- internals --

    def _claim(self, bucket: str, segments: tuple[str, ...], force: bool) -> str | None:
        """
        Claim a key against the daemon's other processes: the reason not to
        fill when one of them is filling it ("elsewhere"), or has stored it
        since this process missed it ("stored"; a forced fill, a prefetch,
        copies it again all the same).
        """
        if self.claims is None:
            return None
        try:
            if not self.claims.claim(bucket, segments):
                self.stats.inc("fills_skipped_elsewhere")
                return "elsewhere"
            # A store on local disk answers at once; another is not waited
            # for here (its writes refuse to replace an object anyway).
            opened = None if force else settled(self.store.open(bucket, segments))
            stored = None if isinstance(opened, Deferred) else opened
        except OSError as e:
            # A claim protects against a duplicate GET, not against damage:
            # filling without one is still safe (publishing is a rename).
            _log.warn(
                "fill {bucket}/{key}: cannot check claims: {error}", bucket=bucket, key="/".join(segments), error=e
            )
            return None
        if stored is not None:
            stored.close()
            self.claims.release(bucket, segments)
            self.stats.inc("fills_skipped_stored")
            return "stored"
        return None

    def _release(self, fill: Fill) -> None:
        if self.claims is not None:
            self.claims.release(fill.bucket, fill.segments)

    def _run(self, fill: Fill) -> None:
        cfg = self.config()
        self._running += 1
        fill.started_at = self.clock.seconds()
        self.stats.inc("fills_started")
        d = Deferred.fromCoroutine(self._fetcher.fetch(fill, cfg))
        fill.deferred = d
        d.addTimeout(cfg.total_timeout, self.clock)
        d.addBoth(self._finished, fill)

    def _finished(self, result: FillResult | Failure, fill: Fill) -> None:
        self._running -= 1
        del self._fills[(fill.bucket, fill.segments)]
        self._release(fill)
        now = self.clock.seconds()
        duration = now - fill.started_at if fill.started_at is not None else 0.0
        key = (fill.bucket, fill.segments)
        log_fields: dict[str, Any] = dict(
            bucket=fill.bucket,
            key=fill.key,
            url=fill.url.decode(),
            rule=fill.source.rule or "-",
            expected=fill.expected,
            received=fill.received,
            seconds=round(duration, 3),
        )
        if isinstance(result, Failure):
            reason, detail = reason_of(result)
            if self._stopping and reason != "error":
                # Stopped by stop(): however the cancellation surfaced (a
                # name lookup cut short reads as a DNS failure), it is one.
                reason, detail = "cancelled", f"stopped ({detail})"
            if reason == "error":
                _log.failure("fill {bucket}/{key} failed unexpectedly from {url}", result, **log_fields)
            else:
                _log.warn(
                    "fill {bucket}/{key} failed: {reason} ({detail}); expected {expected} bytes,"
                    " received {received} from {url} (rule {rule})",
                    reason=reason,
                    detail=detail,
                    **log_fields,
                )
            self.stats.fill_failed(reason)
            cfg = self.config()
            if reason == "http-404":
                _remember(self._not_found, key, now + cfg.not_found_ttl)
            elif reason != "cancelled":
                _remember(self._backoff, key, now + cfg.retry_backoff)
            result = FillResult(fill.bucket, fill.key, False, reason, fill.received)
        elif not result.stored:  # a revalidation's 304: the stored copy stays, fresh again
            _log.info("fill {bucket}/{key} not modified: the stored copy is fresh ({url})", **log_fields)
            self.stats.inc("fills_not_modified")
        else:
            _log.info(
                "fill {bucket}/{key} stored: {received} bytes in {seconds}s from {url} (rule {rule})", **log_fields
            )
            self.stats.inc("fills_stored")
            self.stats.inc("bytes_pulled", result.size)
            self.stats.observe_fill(duration)
            self.forget(*key)
        kind = fill.source.rule.partition(":")[2] or "proxy"
        self.stats.inc(f"fills_by_rule_{kind}_{'stored' if result.stored else 'failed'}")
        if self._fetcher.failed_over:
            self.stats.inc("fills_failed_over", self._fetcher.failed_over)
            self._fetcher.failed_over = 0
        self._notify(fill, result)
        self._next()

    def _next(self) -> None:
        cfg = self.config()
        while self._queue and not self._stopping and self._running < cfg.max_concurrent:
            self._run(self._queue.popleft())
        while self._room_waiters and self._has_room():
            self._room_waiters.pop(0).callback(None)

    def _has_room(self) -> bool:
        cfg = self.config()
        return not self._stopping and (self._running < cfg.max_concurrent or len(self._queue) < cfg.max_queue)

    @staticmethod
    def _notify(fill: Fill, result: FillResult) -> None:
        fill.result = result
        waiters, fill.waiters = fill.waiters, []
        for waiter in waiters:
            waiter.callback(result)
