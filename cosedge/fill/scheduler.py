"""
Background fills: copying a missing object from the bucket's origin.

A :class:`Filler` owns every fill: exactly one per key however many requests
miss it at once, at most ``max_concurrent`` running with a bounded queue
behind them, deadlines on the injected clock around the headers, between body
bytes and around the whole fill, and a graceful :meth:`Filler.stop`.

An object is stored only when it is provably whole: status 200, a body framed
by Content-Length or chunked encoding that ended properly, and exactly as many
bytes as declared.  Anything else stores nothing, leaves no temporary file,
logs one line with the reason and counts it.

The fill talks to the origin through a plain :class:`IAgent`, not through
``treq.request``: treq always installs a gzip-decoding agent, and a fill must
keep the origin's exact bytes and check them against Content-Length.
"""

from __future__ import annotations

import errno
import re
from collections import deque
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

from attrs import define, field, frozen
from twisted.internet.defer import CancelledError, Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError, TimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IResponse

from ..config import FillConfig, Origin
from ..keys import encode_key
from ..stats import Stats
from ..storage.disk import IObjectStore, IPendingObject
from .claims import Claims

__all__ = ["FillFailed", "FillResult", "Filler", "KEPT_HEADERS", "origin_url"]

_log = Logger(namespace="cosedge.fill")  # the name operators filter on, kept across moves
_T = TypeVar("_T")

#: Origin response headers kept as object metadata (besides ``x-cos-meta-*``).
KEPT_HEADERS = (
    b"content-type",
    b"content-encoding",
    b"content-disposition",
    b"cache-control",
    b"expires",
    b"etag",
    b"last-modified",
)
_META_LIMIT = 2048  # COS limits user metadata to 2 KiB; it also fits any xattr.
#: A body declared (Content-Length) this small or smaller is received in
#: memory and written, made durable and published in one go in the thread
#: pool: no file is created before the body is whole, and no disk write runs
#: on the reactor thread.  Memory: at most max_concurrent times this.
SMALL_BODY = 256 * 1024
_MEMORY_LIMIT = 100_000  # remembered 404s / failures, oldest dropped first
_USER_AGENT = b"cosedge (back-to-origin fill)"
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # not kept: a header value never holds these


def origin_url(origin: Origin, segments: tuple[str, ...]) -> bytes:
    """``http://<origin>/<percent-encoded key>``."""
    return b"http://" + origin.netloc + b"/" + encode_key(segments)


class FillFailed(Exception):
    """A fill did not store its object, for ``reason``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


@frozen
class FillResult:
    """The outcome of a fill, as a waiter sees it."""

    bucket: str
    key: str
    stored: bool
    reason: str  # "stored" or why not
    size: int = 0


@define(eq=False)
class _InMemory:
    """A small body, received in memory (the ``pending`` of a small fill)."""

    chunks: list[bytes] = field(factory=list)
    size: int = 0

    def write(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)

    def take(self) -> bytes:
        data, self.chunks = b"".join(self.chunks), []
        return data


def _store_whole(
    store: IObjectStore, bucket: str, segments: tuple[str, ...], data: bytes, meta: dict[str, str]
) -> None:
    """Write, make durable and publish a whole object (blocking: the thread pool's work)."""
    pending = store.begin(bucket, segments)
    try:
        pending.write(data)
        pending.commit(meta, _mtime(meta))
    except BaseException:
        pending.abort()
        raise


@define(eq=False)
class _Fill:
    bucket: str
    segments: tuple[str, ...]
    url: bytes
    queued_at: float
    started_at: float | None = None
    expected: int | None = None
    pending: IPendingObject | _InMemory | None = None
    deferred: Deferred[FillResult] | None = None
    waiters: list[Deferred[FillResult]] = field(factory=list)
    result: FillResult | None = None

    @property
    def key(self) -> str:
        return "/".join(self.segments)

    @property
    def received(self) -> int:
        return self.pending.size if self.pending is not None else 0


class _BodyWriter(Protocol):
    """Streams a response body into a pending object, with bounded memory."""

    def __init__(self, pending: IPendingObject | _InMemory, limit: int, clock: IReactorTime, idle: float) -> None:
        self._pending = pending
        self._limit = limit
        self._clock = clock
        self._idle = idle
        self._timer: IDelayedCall | None = None
        self.done: Deferred[None] = Deferred(lambda d: self._abort())

    def connectionMade(self) -> None:
        self._timer = self._clock.callLater(self._idle, self._fail, FillFailed("idle-timeout"))

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        if self._pending.size + len(data) > self._limit:
            self._fail(FillFailed("too-large", f"over the {self._limit}-byte limit"))
            return
        try:
            self._pending.write(data)
        except OSError as e:
            reason = "disk-full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "disk-error"
            self._fail(FillFailed(reason, str(e)))
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._idle)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_timer()
        if self.done.called:
            return
        if reason.check(ResponseDone):
            self.done.callback(None)
        elif reason.check(PotentialDataLoss):
            # No Content-Length and no chunking: a cut-short body looks the
            # same as a whole one, so it is never trusted.
            self.done.errback(FillFailed("unframed", "no Content-Length and not chunked"))
        else:
            self.done.errback(FillFailed("truncated", reason.getErrorMessage()))

    def _fail(self, failure: FillFailed) -> None:
        self._cancel_timer()
        if not self.done.called:
            self.done.errback(failure)
        self._abort()

    def _abort(self) -> None:
        self._cancel_timer()
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class _Discard(Protocol):
    """Drop a response body we will not store, closing its connection."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        pass


def _kept_headers(response: IResponse) -> dict[str, str]:
    meta: dict[str, str] = {}
    for name, values in response.headers.getAllRawHeaders():
        lower = name.lower()
        value = b", ".join(values)
        if (lower in KEPT_HEADERS or lower.startswith(b"x-cos-meta-")) and not _CONTROL.search(value):
            meta[lower.decode("latin-1")] = value.decode("latin-1")
    if sum(len(k) + len(v) for k, v in meta.items()) > _META_LIMIT:
        raise FillFailed("metadata-too-large", f"kept headers exceed {_META_LIMIT} bytes")
    return meta


def _mtime(meta: dict[str, str]) -> float | None:
    try:
        return parsedate_to_datetime(meta["last-modified"]).timestamp()
    except (KeyError, TypeError, ValueError, IndexError, OverflowError):
        return None


def _reason(failure: Failure) -> tuple[str, str]:
    if failure.check(FillFailed):
        e: Any = failure.value
        return e.reason, e.detail
    # Deferred.addTimeout (the total deadline) raises defer.TimeoutError;
    # twisted.internet.error.TimeoutError is the connect timeout.
    if failure.check(DeferredTimeoutError):
        return "timeout", "deadline passed"
    if failure.check(TimeoutError):
        return "connect-failed", "connect timeout"
    if failure.check(DNSLookupError):  # an OSError, but not the disk's
        return "connect-failed", failure.getErrorMessage()
    if failure.check(CancelledError, ConnectingCancelledError):
        return "cancelled", "stopped"
    # Cancelling an agent request while it waits for the response fails it
    # with ResponseFailed / ResponseNeverReceived wrapping the CancelledError.
    if isinstance(failure.value, ResponseFailed) and any(r.check(CancelledError) for r in failure.value.reasons):
        return "cancelled", "stopped"
    if failure.check(ConnectError, ResponseNeverReceived):
        return "connect-failed", failure.getErrorMessage()
    if failure.check(ResponseFailed):
        # The origin's status line or headers were cut short or malformed.
        return "bad-response", failure.getErrorMessage()
    if failure.check(OSError):
        full = getattr(failure.value, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        return "disk-full" if full else "disk-error", failure.getErrorMessage()
    return "error", failure.getErrorMessage()


def _headers_timed_out(result: object, timeout: float | None) -> Failure:
    # The agent fails a request cancelled while it waits for the response
    # with ResponseFailed / ResponseNeverReceived, not CancelledError, so the
    # default conversion to TimeoutError would not apply.
    return Failure(FillFailed("timeout", f"no response headers within {timeout}s"))


async def _through_cancel(work: Deferred[_T]) -> tuple[_T, bool]:
    """
    Wait for ``work`` that may run in the thread pool, even if the fill is
    cancelled meanwhile (a stop, the total deadline): its thread cannot be
    stopped, and cleaning up under it would close a descriptor or remove a
    file it is still using.  Returns its result and whether the fill was
    cancelled; a failure is raised (as CancelledError if cancelled).
    """
    outcome: list[_T | Failure] = []
    waits: list[Deferred[None]] = []

    def ended(result: _T | Failure) -> None:
        outcome.append(result)
        for wait in waits:
            if not wait.called:
                wait.callback(None)

    work.addBoth(ended)
    cancelled = False
    while not outcome:
        wait: Deferred[None] = Deferred()
        waits.append(wait)
        try:
            await wait
        except CancelledError:
            cancelled = True
    result = outcome[0]
    if isinstance(result, Failure):
        if cancelled:
            raise CancelledError()
        result.raiseException()
    return result, cancelled  # type: ignore[return-value]


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
    #: Runs a blocking call (the fsync-and-rename commit) and returns a
    #: Deferred of its result; the service passes the reactor's thread pool,
    #: tests the default, which runs it at once.
    run_blocking: Callable[[Callable[[], Any]], Deferred[Any]] = field(default=maybeDeferred)
    #: Claims shared with the daemon's other processes (None: the only one).
    claims: Claims | None = None
    _fills: dict[tuple[str, tuple[str, ...]], _Fill] = field(factory=dict, init=False)
    _queue: deque[_Fill] = field(factory=deque, init=False)
    _running: int = field(default=0, init=False)
    _not_found: dict[tuple[str, tuple[str, ...]], float] = field(factory=dict, init=False)
    _backoff: dict[tuple[str, tuple[str, ...]], float] = field(factory=dict, init=False)
    _stopping: bool = field(default=False, init=False)

    def start(self, bucket: str, segments: tuple[str, ...], origin: Origin, *, force: bool = False) -> bool:
        """
        Start (or join) the fill of ``bucket``/``segments`` from ``origin``.
        Returns False when no fill runs for this key: a recent origin 404 or
        failure is remembered (unless ``force``), the queue is full, or the
        filler is stopping.
        """
        return isinstance(self._start(bucket, segments, origin, force), _Fill)

    def _start(self, bucket: str, segments: tuple[str, ...], origin: Origin, force: bool) -> _Fill | str:
        """The fill of this key (started, queued or joined), or why there is none."""
        key = (bucket, segments)
        if key in self._fills:
            return self._fills[key]
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
        fill = _Fill(bucket, segments, origin_url(origin, segments), now)
        has_slot = self._running < cfg.max_concurrent
        if has_slot or len(self._queue) < cfg.max_queue:
            refused = self._claim(bucket, segments, force)
            if refused is not None:
                return refused
            self._fills[key] = fill
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

    def fill(
        self, bucket: str, segments: tuple[str, ...], origin: Origin, *, force: bool = False
    ) -> Deferred[FillResult]:
        """
        Like :meth:`start`, and return a Deferred that fires with the
        :class:`FillResult` (it never fails; cancelling it does not cancel the
        shared fill).
        """
        fill = self._start(bucket, segments, origin, force)
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
            stored = None if force else self.store.open(bucket, segments)
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

    def _release(self, fill: _Fill) -> None:
        if self.claims is not None:
            self.claims.release(fill.bucket, fill.segments)

    def _run(self, fill: _Fill) -> None:
        cfg = self.config()
        self._running += 1
        fill.started_at = self.clock.seconds()
        self.stats.inc("fills_started")
        d = Deferred.fromCoroutine(self._fetch(fill, cfg))
        fill.deferred = d
        d.addTimeout(cfg.total_timeout, self.clock)
        d.addBoth(self._finished, fill)

    async def _fetch(self, fill: _Fill, cfg: FillConfig) -> FillResult:
        headers = Headers({b"user-agent": [_USER_AGENT], b"accept-encoding": [b"identity"]})
        request = self.agent.request(b"GET", fill.url, headers)
        request.addTimeout(cfg.header_timeout, self.clock, onTimeoutCancel=_headers_timed_out)
        response = await request
        if response.length is not UNKNOWN_LENGTH:
            fill.expected = response.length
        if response.code != 200:
            response.deliverBody(_Discard())
            raise FillFailed(f"http-{response.code}", response.phrase.decode("latin-1"))
        if fill.expected is not None and fill.expected > cfg.max_object_size:
            response.deliverBody(_Discard())
            raise FillFailed("too-large", f"Content-Length over the {cfg.max_object_size}-byte limit")
        meta = _kept_headers(response)
        if fill.expected is not None and fill.expected <= SMALL_BODY:
            return await self._fetch_small(fill, cfg, response, meta)
        # Creating a file can take a millisecond: not on the reactor thread.
        # Meanwhile the response buffers the body's first bytes.
        pending, cancelled = await _through_cancel(
            self.run_blocking(lambda: self.store.begin(fill.bucket, fill.segments))
        )
        fill.pending = pending
        if cancelled:
            pending.abort()
            response.deliverBody(_Discard())
            raise CancelledError()
        try:
            await self._receive(fill, cfg, response, pending)
            # A cancelled fill whose commit still succeeded is stored: whole and visible.
            await _through_cancel(self.run_blocking(lambda: pending.commit(meta, _mtime(meta))))
        except BaseException:
            pending.abort()
            raise
        return FillResult(fill.bucket, fill.key, True, "stored", pending.size)

    async def _receive(
        self, fill: _Fill, cfg: FillConfig, response: IResponse, into: IPendingObject | _InMemory
    ) -> None:
        """Stream the body into ``into``, and check it is exactly as long as declared."""
        fill.pending = into
        writer = _BodyWriter(into, cfg.max_object_size, self.clock, cfg.idle_timeout)
        response.deliverBody(writer)
        await writer.done
        if fill.expected is not None and into.size != fill.expected:
            raise FillFailed("length-mismatch")

    async def _fetch_small(self, fill: _Fill, cfg: FillConfig, response: IResponse, meta: dict[str, str]) -> FillResult:
        """Receive a small body in memory, then store it with one call in the thread pool."""
        body = _InMemory()
        await self._receive(fill, cfg, response, body)
        data = body.take()
        # A cancelled fill whose store still succeeded is stored: whole and visible.
        await _through_cancel(
            self.run_blocking(lambda: _store_whole(self.store, fill.bucket, fill.segments, data, meta))
        )
        return FillResult(fill.bucket, fill.key, True, "stored", len(data))

    def _finished(self, result: FillResult | Failure, fill: _Fill) -> None:
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
            expected=fill.expected,
            received=fill.received,
            seconds=round(duration, 3),
        )
        if isinstance(result, Failure):
            reason, detail = _reason(result)
            if reason == "error":
                _log.failure("fill {bucket}/{key} failed unexpectedly from {url}", result, **log_fields)
            else:
                _log.warn(
                    "fill {bucket}/{key} failed: {reason} ({detail}); expected {expected} bytes,"
                    " received {received} from {url}",
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
        else:
            _log.info("fill {bucket}/{key} stored: {received} bytes in {seconds}s from {url}", **log_fields)
            self.stats.inc("fills_stored")
            self.stats.inc("bytes_pulled", result.size)
            self.stats.observe_fill(duration)
            self.forget(*key)
        self._notify(fill, result)
        self._next()

    def _next(self) -> None:
        cfg = self.config()
        while self._queue and not self._stopping and self._running < cfg.max_concurrent:
            self._run(self._queue.popleft())

    @staticmethod
    def _notify(fill: _Fill, result: FillResult) -> None:
        fill.result = result
        waiters, fill.waiters = fill.waiters, []
        for waiter in waiters:
            waiter.callback(result)
