"""
What the migration page (:mod:`cosedge.ops.page`) needs to remember between
page loads, all bounded:

- :class:`RequestHistory`: the per-bucket request counters sampled once a
  minute (61 samples: the last hour), from which the page draws the share
  of requests answered locally, minute by minute;
- :class:`UsageCache`: the objects and bytes of each bucket.  Counting walks
  a bucket's folder, so it runs at most every few minutes per bucket (less
  often for a bucket whose count takes long), never on each page load.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..interfaces import IObjectStore

__all__ = ["HIT", "Point", "RequestHistory", "Usage", "UsageCache", "by_bucket"]

_log = Logger(namespace="cosedge.ops")

#: The request outcome that means "answered locally" (see :meth:`cosedge.stats.Stats.request`).
HIT = "hit"

#: Per bucket: (requests answered locally, all requests).
Counts = dict[str, tuple[int, int]]


def by_bucket(requests: Mapping[str, int]) -> Counts:
    """``Stats.requests`` (keyed ``"<bucket> <outcome>"``) as (hits, all requests) per bucket."""
    counts: Counts = {}
    for name, n in requests.items():
        bucket, _, outcome = name.partition(" ")
        hits, total = counts.get(bucket, (0, 0))
        counts[bucket] = (hits + (n if outcome == HIT else 0), total + n)
    return counts


@frozen
class Point:
    """One interval of the chart: the share of its requests answered locally."""

    #: Seconds before now at which the interval ended.
    ago: float
    #: Hits ÷ requests in the interval; None when it had no request.
    share: float | None
    requests: int
    #: The interval still running (from the last sample to now).
    partial: bool = False


class RequestHistory:
    """
    The request counters, sampled every ``interval`` seconds on ``clock``
    (a :class:`LoopingCall` started and stopped with the ops service); at
    most ``keep`` samples, so an hour of minutes and the one before it.
    """

    def __init__(
        self,
        clock: Any,
        read: Callable[[], Mapping[str, int]],
        interval: float = 60.0,
        keep: int = 61,
    ) -> None:
        self._clock = clock
        self._read = read
        self.interval = interval
        self.samples: deque[tuple[float, Counts]] = deque(maxlen=keep)
        self._call: LoopingCall | None = None

    def sample(self) -> None:
        """Remember the counters as they are now."""
        try:
            counts = by_bucket(self._read())
        except Exception:  # never stop the loop over one bad read
            _log.failure("sampling the request counters failed")
            return
        self.samples.append((self._clock.seconds(), counts))

    def start(self) -> None:
        if self._call is not None and self._call.running:
            return
        self._call = LoopingCall(self.sample)
        self._call.clock = self._clock
        self._call.start(self.interval, now=True)

    def stop(self) -> None:
        if self._call is not None and self._call.running:
            self._call.stop()
        self._call = None

    def points(self, bucket: str, now_counts: Counts, now: float, window: float = 3600.0) -> list[Point]:
        """
        One point per sampling interval of the last ``window`` seconds, oldest
        first, and one for the interval still running (from the last sample
        to ``now_counts``), so the page shows what there is before the first
        minute has passed.
        """
        series = list(self.samples)
        running = bool(series) and now > series[-1][0]
        if running:
            series.append((now, now_counts))
        points = []
        for i, ((_, before), (at, after)) in enumerate(zip(series, series[1:], strict=False)):
            ago = now - at
            if ago > window:
                continue
            hits0, total0 = before.get(bucket, (0, 0))
            hits1, total1 = after.get(bucket, (0, 0))
            requests, hits = total1 - total0, hits1 - hits0
            share = min(1.0, max(0.0, hits / requests)) if requests > 0 else None
            points.append(Point(ago, share, max(requests, 0), partial=running and i == len(series) - 2))
        return points

    def window_counts(self, bucket: str, now_counts: Counts, now: float, window: float = 3600.0) -> tuple[int, int]:
        """(hits, requests) of ``bucket`` since the oldest sample of the last ``window`` seconds."""
        start = next((counts for at, counts in self.samples if now - at <= window), None)
        if start is None:
            return (0, 0)
        hits0, total0 = start.get(bucket, (0, 0))
        hits1, total1 = now_counts.get(bucket, (0, 0))
        return (max(hits1 - hits0, 0), max(total1 - total0, 0))


@frozen
class Usage:
    """A bucket's objects and bytes as counted at ``counted_at`` (clock seconds)."""

    objects: int
    bytes: int
    counted_at: float
    #: Seconds the count took.
    took: float


class UsageCache:
    """
    ``store.usage(bucket)``, remembered.  A bucket is counted again once its
    count is ``max_age`` seconds old, or ``slowness`` times as long as the
    last count took if that is longer (a bucket of millions of files is not
    walked every few minutes); a failed count is tried again after
    ``max_age``.  Only :meth:`get` starts a count, and only one per bucket
    at a time.
    """

    def __init__(self, store: IObjectStore, clock: Any, max_age: float = 300.0, slowness: float = 30.0) -> None:
        self._store = store
        self._clock = clock
        self.max_age = max_age
        self.slowness = slowness
        self.known: dict[str, Usage] = {}
        #: The last count's error, per bucket (cleared by a good count).
        self.errors: dict[str, str] = {}
        self._next: dict[str, float] = {}
        #: Buckets being counted, with the page loads waiting for their first count.
        self._counting: dict[str, list[Deferred[None]]] = {}
        self.counts_started = 0

    def get(self, bucket: str, wait: float = 0.0) -> Deferred[Usage | None]:
        """
        The bucket's last count (None if there is none yet), starting a new
        count when it is due.  With no count yet, wait up to ``wait``
        seconds for the one just started.
        """
        if bucket not in self._counting and self._clock.seconds() >= self._next.get(bucket, float("-inf")):
            self._count(bucket)
        known = self.known.get(bucket)
        if known is not None or bucket not in self._counting or wait <= 0:
            return succeed(known)
        waiter: Deferred[None] = Deferred()
        self._counting[bucket].append(waiter)

        def give_up() -> None:
            if not waiter.called:
                waiter.callback(None)

        timer = self._clock.callLater(wait, give_up)

        def done(_: object) -> Usage | None:
            if timer.active():
                timer.cancel()
            return self.known.get(bucket)

        return waiter.addCallback(done)

    def forget_others(self, buckets: Mapping[str, object]) -> None:
        """Drop what is remembered of buckets no longer configured."""
        for table in (self.known, self.errors, self._next):
            for name in [b for b in table if b not in buckets]:
                del table[name]

    def _count(self, bucket: str) -> None:
        self._counting[bucket] = []
        self.counts_started += 1
        started = self._clock.seconds()

        def counted(result: tuple[int, int] | Failure) -> None:
            now = self._clock.seconds()
            if isinstance(result, Failure):
                self.errors[bucket] = result.getErrorMessage()
                self._next[bucket] = now + self.max_age
            else:
                objects, size = result
                took = now - started
                self.known[bucket] = Usage(objects, size, now, took)
                self.errors.pop(bucket, None)
                self._next[bucket] = now + max(self.max_age, self.slowness * took)
            for waiter in self._counting.pop(bucket, []):
                if not waiter.called:
                    waiter.callback(None)

        maybeDeferred(self._store.usage, bucket).addBoth(counted)
