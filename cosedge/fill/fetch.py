"""
Fetching one object from its origin into the store.

A :class:`Fetcher` runs one fill's HTTP request and streams the body into an
:class:`~cosedge.interfaces.IObjectWriter`, and to any :class:`Reader`
attached to the fill (the mirror path: clients that read the object while it
is stored).  An object is stored only when it is provably whole: status 200,
a body framed by Content-Length or chunked encoding that ended properly, and
exactly as many bytes as declared.  Anything else raises :class:`FillFailed`
with a reason, and the writer is aborted: nothing is left behind.

The fill talks to the origin through a plain :class:`IAgent`, not through
``treq.request``: treq always installs a gzip-decoding agent, and a fill must
keep the origin's exact bytes and check them against Content-Length.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar
from typing import Protocol as TypingProtocol
from urllib.parse import urljoin, urlsplit, urlunsplit

from attrs import define, field, frozen
from OpenSSL import SSL
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError, TimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IResponse

from ..config import ConfigError, FillConfig, parse_origin
from ..interfaces import IObjectStore, IObjectWriter
from ..origins import Source
from .client import OriginFault
from .partial import Partials

__all__ = ["CHECKED", "FillFailed", "FillResult", "Fetcher", "Fill", "KEPT_HEADERS", "Reader", "reason_of"]

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
    b"vary",
)
_META_LIMIT = 2048  # COS limits user metadata to 2 KiB; it also fits any xattr.
_USER_AGENT = b"cosedge (back-to-origin fill)"
#: The metadata field that says when the stored copy was last known to be the origin's (POSIX seconds).
CHECKED = "cosedge-checked"
_MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: Failures after which the next host is tried (nothing has reached a reader yet).
_FAIL_OVER = frozenset({"connect-failed", "timeout", "tls"})
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # not kept: a header value never holds these


class HealthMarks(TypingProtocol):
    """Where the fetcher reports hosts that failed or answered (:class:`cosedge.fill.health.Health`)."""

    def down(self, base: str, source: Source, why: str) -> None: ...

    def ok(self, base: str) -> None: ...


#: A parent edge's answers a fill takes (the object; the origin's 404 or failure, which
#: the origin would give this edge too); any other (refused, 403 from a secret that
#: differs, 503 from a full queue) passes to the origin itself.
_PARENT_ANSWERS = frozenset({200, 404, 410, 424})


def _is_parent(source: Source, url: bytes) -> bool:
    """Whether ``url`` is the source's parent edge (see :attr:`Source.parent_headers`)."""
    return bool(source.parent_headers) and url == source.url


def _base(url: bytes) -> bytes:
    """``scheme://host[:port]`` of an absolute URL."""
    scheme, _, rest = url.partition(b"://")
    return scheme + b"://" + rest.split(b"/", 1)[0]


def redirect_target(url: bytes, location: bytes) -> bytes:
    """
    The absolute URL an origin's redirect from ``url`` names, held to the
    rules of a rule's hosts (http or https; a domain name or an IPv4 address
    with an optional port; no user-info).

    :raises FillFailed: ``bad-redirect`` otherwise.
    """
    try:
        text = urljoin(url.decode("ascii"), location.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise FillFailed("bad-redirect", f"Location {location!r} is not an ASCII URL") from None
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise FillFailed("bad-redirect", f"Location {text!r} is not an http(s) URL")
    try:
        parse_origin(parts.netloc)
    except ConfigError as e:
        raise FillFailed("bad-redirect", f"Location {text!r}: {e}") from None
    return urlunsplit((parts.scheme, parts.netloc.lower(), parts.path or "/", parts.query, "")).encode("ascii")


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


class Reader(TypingProtocol):
    """
    Something that reads a fill's body as it arrives, besides the store (a
    client answered from the origin's stream).  It is told of the response
    once its headers are accepted, given every chunk of the body, and told
    once that the body is whole (``None``) or why the fill failed.
    """

    def response(self, meta: Mapping[str, str], length: int | None) -> None: ...

    def write(self, data: bytes) -> None: ...

    def finished(self, failure: Failure | None) -> None: ...


@define(eq=False)
class Fill:
    """One fill: what it copies, from where, and how far it has come."""

    bucket: str
    segments: tuple[str, ...]
    source: Source
    queued_at: float
    started_at: float | None = None
    expected: int | None = None
    writer: IObjectWriter | None = None
    readers: list[Reader] = field(factory=list)
    #: The origin's response headers were accepted: a reader joining now would miss bytes.
    answered: bool = False
    deferred: Deferred[FillResult] | None = None
    waiters: list[Deferred[FillResult]] = field(factory=list)
    result: FillResult | None = None
    #: The URL asked last (another host after a fail-over, or a redirect's target).
    tried: bytes | None = None
    #: A revalidation's conditional headers (If-None-Match, If-Modified-Since): a 304 keeps the stored copy.
    validators: tuple[tuple[bytes, bytes], ...] = ()

    @property
    def key(self) -> str:
        return "/".join(self.segments)

    @property
    def url(self) -> bytes:
        return self.tried if self.tried is not None else self.source.url

    @property
    def received(self) -> int:
        return self.writer.size if self.writer is not None else 0


class _BodyWriter(Protocol):
    """
    Streams a response body into a writer (and the fill's readers), with
    bounded memory, an idle timeout, and a minimum rate: fewer than
    ``min_rate`` bytes a second over a ``min_rate_window`` is a drip that
    would hold a fill slot for hours (Varnish and Traffic Server have the same
    rule), so the fill fails ``too-slow``.
    """

    def __init__(self, pending: IObjectWriter, readers: list[Reader], cfg: FillConfig, clock: IReactorTime) -> None:
        self._pending = pending
        self._readers = readers
        self._limit = cfg.max_object_size
        self._clock = clock
        self._idle = cfg.idle_timeout
        self._min_bytes = cfg.min_rate * cfg.min_rate_window
        self._window = cfg.min_rate_window
        self._timer: IDelayedCall | None = None
        self._rate_timer: IDelayedCall | None = None
        self._window_bytes = 0
        self.done: Deferred[None] = Deferred(lambda d: self._abort())

    def connectionMade(self) -> None:
        self._timer = self._clock.callLater(self._idle, self._fail, FillFailed("idle-timeout"))
        if self._min_bytes > 0:
            self._rate_timer = self._clock.callLater(self._window, self._check_rate)

    def _check_rate(self) -> None:
        got, self._window_bytes = self._window_bytes, 0
        if got < self._min_bytes:
            self._rate_timer = None
            rate = got / self._window
            self._fail(FillFailed("too-slow", f"{rate:.0f} bytes/s over {self._window:g}s, below the minimum"))
            return
        self._rate_timer = self._clock.callLater(self._window, self._check_rate)

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._window_bytes += len(data)
        if self._pending.size + len(data) > self._limit:
            self._fail(FillFailed("too-large", f"over the {self._limit}-byte limit"))
            return
        try:
            self._pending.write(data)
            for reader in self._readers:
                reader.write(data)
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
        for timer in (self._timer, self._rate_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._rate_timer = None


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


def reason_of(failure: Failure) -> tuple[str, str]:
    """The reason (a counter label) and detail of a failed fill."""
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
    if _tls_failure(failure):
        return "tls", failure.getErrorMessage()
    # The origin connection's guard (fill/client.py) ended the connection: the
    # client reports it as a lost response, with the guard's reason inside.
    for inner in [failure, *getattr(failure.value, "reasons", [])]:
        if isinstance(inner, Failure) and inner.check(OriginFault):
            fault: Any = inner.value
            return fault.reason, str(fault)
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


def _tls_failure(failure: Failure) -> bool:
    """A TLS handshake or certificate verification failure, however the HTTP client wrapped it."""
    for inner in [failure, *getattr(failure.value, "reasons", [])]:
        if isinstance(inner, Failure) and inner.check(SSL.Error):
            return True
    return False


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


@define(eq=False)
class Fetcher:
    """Fetches a fill's object from its source into the store (see the module's docstring)."""

    store: IObjectStore
    agent: IAgent
    clock: IReactorTime
    #: The agent for ``https://`` URLs with a CA file and a name to verify (None: ``agent`` for every URL).
    tls: Callable[[str | None, bytes | None], IAgent] | None = None
    #: Down marks of origin hosts (None: none kept).
    health: HealthMarks | None = None
    #: URLs passed over for the next one (a fail-over), for the counters.
    failed_over: int = 0
    #: Where mirror fills are published for late readers (None: not published).
    partials: Partials | None = None

    async def fetch(self, fill: Fill, cfg: FillConfig) -> FillResult:
        """Copy ``fill``'s object; raises :class:`FillFailed` (or CancelledError) when nothing is stored."""
        try:
            result = await self._fetch(fill, cfg)
        except BaseException as e:
            for reader in fill.readers:
                reader.finished(Failure(e))
            raise
        return result

    def agent_for(self, url: bytes, source: Source) -> IAgent:
        """The agent that asks ``url`` for ``source`` (its TLS settings for ``https://``; not a parent edge's)."""
        if self.tls is not None and url.startswith(b"https:") and not _is_parent(source, url):
            return self.tls(source.ca_file, source.server_name)
        return self.agent

    async def _ask(self, fill: Fill, url: bytes, cfg: FillConfig) -> IResponse:
        """One GET of ``url``, following the origin's redirects when the source says so."""
        source = fill.source
        extra = [*(source.parent_headers if _is_parent(source, url) else source.headers), *fill.validators]
        for hop in range(_MAX_REDIRECTS + 1):
            fill.tried = url
            headers = Headers({b"user-agent": [_USER_AGENT], b"accept-encoding": [b"identity"]})
            agent_named = False
            for name, value in extra:
                if name.lower() == b"user-agent" and not agent_named:  # the client's (headers_pass) replaces ours
                    headers.setRawHeaders(b"user-agent", [value])
                    agent_named = True
                else:
                    headers.addRawHeader(name, value)
            request = self.agent_for(url, source).request(b"GET", url, headers)
            request.addTimeout(cfg.header_timeout, self.clock, onTimeoutCancel=_headers_timed_out)
            response: IResponse = await request
            # A parent edge's redirect is not followed (its headers are for it alone): the origin is asked instead.
            if not source.follow_redirects or response.code not in _REDIRECTS or _is_parent(source, url):
                return response
            response.deliverBody(_Discard())
            if hop == _MAX_REDIRECTS:
                raise FillFailed("too-many-redirects", f"more than {_MAX_REDIRECTS} redirects")
            location = response.headers.getRawHeaders(b"location", [b""])[0]
            following = redirect_target(url, location)
            if _base(following) != _base(url):  # the Host names the first host only
                extra = [(n, v) for n, v in extra if n != b"host"]
            url = following
        raise AssertionError("unreachable")

    async def _respond(self, fill: Fill, cfg: FillConfig) -> IResponse:
        """
        The origin's response: the source's URLs in order, passing over a
        host that refuses, times out or answers 5xx (and marking it down).
        """
        source = fill.source
        failure: FillFailed | None = None
        for url in source.urls:
            parent = _is_parent(source, url)
            try:
                response = await self._ask(fill, url, cfg)
            except CancelledError:
                raise
            except Exception as e:
                reason, detail = reason_of(Failure(e))
                if reason not in _FAIL_OVER:
                    raise
                failure = FillFailed(reason, detail)
            else:
                if (response.code in _PARENT_ANSWERS) if parent else (response.code < 500):
                    if self.health is not None and not parent:
                        self.health.ok(_base(url).decode("ascii"))
                    return response
                response.deliverBody(_Discard())
                failure = FillFailed(f"http-{response.code}", response.phrase.decode("latin-1"))
            # A TLS refusal says more about this rule's trust (its CA file, its
            # name) than about the host, which other rules may reach fine: the
            # next host is tried, but the host is not marked down.  Nor is a
            # parent edge that answered, say, 403 or a redirect (its
            # configuration, not its health); one that is unreachable, slow
            # or failing is, and the next misses of its keys go straight to
            # the origin until its probe finds it up again.
            answered = failure.reason.startswith("http-") and not failure.reason.startswith("http-5")
            if self.health is not None and failure.reason != "tls" and not (answered and parent):
                self.health.down(_base(url).decode("ascii"), source, f"{failure.reason} ({failure.detail})")
            if not parent:  # (the counter is of origin hosts passed over)
                self.failed_over += 1
        assert failure is not None
        raise failure

    async def _fetch(self, fill: Fill, cfg: FillConfig) -> FillResult:
        response = await self._respond(fill, cfg)
        if response.length is not UNKNOWN_LENGTH:
            fill.expected = response.length
        if response.code == 304 and fill.validators:
            # The stored copy is still the origin's: it is fresh again from now.
            response.deliverBody(_Discard())
            checked = {CHECKED: f"{self.clock.seconds():.0f}"}
            await _through_cancel(self.store.update_meta(fill.bucket, fill.segments, checked))
            return FillResult(fill.bucket, fill.key, False, "not-modified")
        if response.code in (404, 410) and fill.validators:
            # The old server no longer has it (it is going away): the copy is
            # kept, and not asked about again before the next revalidation.
            response.deliverBody(_Discard())
            checked = {CHECKED: f"{self.clock.seconds():.0f}"}
            await _through_cancel(self.store.update_meta(fill.bucket, fill.segments, checked))
            raise FillFailed("origin-gone", f"the origin answered {response.code}; the stored copy is kept")
        if response.code != 200:
            response.deliverBody(_Discard())
            raise FillFailed(f"http-{response.code}", response.phrase.decode("latin-1"))
        if fill.expected is not None and fill.expected > cfg.max_object_size:
            response.deliverBody(_Discard())
            raise FillFailed("too-large", f"Content-Length over the {cfg.max_object_size}-byte limit")
        meta = _kept_headers(response)
        # The store makes its writer off the reactor thread where that can
        # block (creating a file can take a millisecond), or holds a small
        # body in memory.  Meanwhile the response buffers the body's first
        # bytes, and readers may still join: none has missed any.
        writer, cancelled = await _through_cancel(self.store.writer(fill.bucket, fill.segments, fill.expected))
        fill.writer = writer
        if cancelled:
            writer.abort()
            response.deliverBody(_Discard())
            raise CancelledError()
        published = self._publish(fill, writer, meta)
        try:
            fill.answered = True
            for reader in fill.readers:
                reader.response(meta, fill.expected)
            body = _BodyWriter(writer, fill.readers, cfg, self.clock)
            response.deliverBody(body)
            await body.done
            if fill.expected is not None and writer.size != fill.expected:
                raise FillFailed("length-mismatch")
            readers, fill.readers = fill.readers, []
            for reader in readers:
                reader.finished(None)
            if published is not None:  # whole: its late readers end as the stream's readers just did
                Partials.withdraw(published)
                published = None
            # A cancelled fill whose commit still succeeded is stored: whole and visible.
            meta[CHECKED] = f"{self.clock.seconds():.0f}"  # not a header: never served
            await _through_cancel(writer.commit(meta, _mtime(meta)))
        except BaseException:
            writer.abort()
            raise
        finally:
            if published is not None:
                Partials.withdraw(published)
        return FillResult(fill.bucket, fill.key, True, "stored", writer.size)

    def _publish(self, fill: Fill, writer: IObjectWriter, meta: Mapping[str, str]) -> str | None:
        """A mirror fill of known length into a local file is readable as it grows (:mod:`.partial`)."""
        if (
            self.partials is None
            or writer.spool is None
            or fill.expected is None
            or not fill.source.rule.endswith(":mirror")
        ):
            return None
        return self.partials.publish(fill.bucket, fill.segments, writer.spool, fill.expected, meta)
