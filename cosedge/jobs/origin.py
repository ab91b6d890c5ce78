"""
What jobs ask origins directly, beside fills: a verify's ``HEAD`` of each
object, and a backfill's sitemap.  Both go through the filler's agent (its
connection pool, its framing guard, its TLS settings) with the ``[fill]``
deadlines, try the source's hosts in order (the next one after a refusal, a
time-out or a 5xx) and follow redirects when the rule says so, as a fill does.

A sitemap is read as it arrives, at most :data:`MAX_SITEMAP_BYTES` (the
sitemaps.org limit), by expat with no DOCTYPE accepted (so no entity of any
kind, and no external resource is ever loaded); each ``<urlset><url><loc>``
is written to a file, one a line, which the job then reads like a file of keys.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import IO, Any, NoReturn
from urllib.parse import urlsplit
from xml.parsers import expat

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from ..config import BucketConfig, FillConfig
from ..cosxml import safe_parser
from ..fill.fetch import FillFailed, reason_of, redirect_target
from ..keys import BadKey, split_key
from ..origins import Source, prefetch_source
from .model import JobError, JobFailed

__all__ = ["MAX_SITEMAP_BYTES", "Agents", "ask", "compare", "drop", "fetch_sitemap", "sitemap_source"]

#: The largest sitemap read (sitemaps.org: 50 MiB uncompressed, 50,000 URLs).
MAX_SITEMAP_BYTES = 50 * 1024 * 1024
#: The longest ``<loc>`` kept (a longer one is cut, and its key is then too long: a bad line).
_MAX_LOC = 16 * 1024
_USER_AGENT = b"cosedge (job)"
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 5
#: Failures after which the source's next host is asked.
_NEXT_HOST = frozenset({"connect-failed", "timeout", "tls"})
_SPACE = re.compile(r"[\x00-\x20\x7f]")

#: The agent for a URL of a source (its TLS settings for https).
Agents = Callable[[bytes, Source], IAgent]


class _Ignore(Protocol):
    """Takes a body nobody reads (a HEAD's is empty), leaving the connection to the pool."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        pass


def drop(response: IResponse) -> None:
    """Let go of a response whose body is not read."""
    response.deliverBody(_Ignore())


def _timed_out(result: object, timeout: float | None) -> Failure:
    return Failure(FillFailed("timeout", f"no response headers within {timeout}s"))


def _base(url: bytes) -> bytes:
    return url.split(b"/", 3)[2]


async def _follow(agents: Agents, method: bytes, url: bytes, source: Source, cfg: FillConfig, clock: Any) -> IResponse:
    headers = list(source.headers)
    for _ in range(_MAX_REDIRECTS + 1):
        sent = Headers({b"user-agent": [_USER_AGENT], b"accept-encoding": [b"identity"]})
        for name, value in headers:
            sent.addRawHeader(name, value)
        asked = agents(url, source).request(method, url, sent)
        asked.addTimeout(cfg.header_timeout, clock, onTimeoutCancel=_timed_out)
        response: IResponse = await asked
        if not source.follow_redirects or response.code not in _REDIRECTS:
            return response
        drop(response)
        target = redirect_target(url, response.headers.getRawHeaders(b"location", [b""])[0])
        if _base(target) != _base(url):
            headers = [(n, v) for n, v in headers if n.lower() != b"host"]
        url = target
    raise FillFailed("too-many-redirects", f"more than {_MAX_REDIRECTS} redirects")


async def ask(agents: Agents, method: bytes, source: Source, cfg: FillConfig, clock: IReactorTime) -> IResponse:
    """
    The origin's response to ``method`` for ``source`` (any status below
    500, the body not read); :raises FillFailed: with a fill's reason.
    """
    failed = FillFailed("connect-failed", "no URL")
    for url in source.urls:
        try:
            response = await _follow(agents, method, url, source, cfg, clock)
        except CancelledError:
            raise
        except Exception as e:
            reason, detail = reason_of(Failure(e))
            if reason == "cancelled":
                raise CancelledError() from None
            failed = FillFailed(reason, detail)
            if reason in _NEXT_HOST:
                continue
            raise failed from None
        if response.code < 500:
            return response
        drop(response)
        failed = FillFailed(f"http-{response.code}", response.phrase.decode("latin-1"))
    raise failed


def _opaque(tag: str) -> str:
    return tag.strip().removeprefix("W/")


def compare(size: int, etag: str | None, headers: Headers) -> str:
    """How a stored object (its size, its origin ETag if kept) differs from the origin's ``HEAD``; "" if not."""
    problems = []
    length = headers.getRawHeaders(b"content-length", [b""])[0].strip()
    if length.isdigit() and int(length) != size:
        problems.append(f"length {size} stored, {int(length)} at the origin")
    theirs = headers.getRawHeaders(b"etag", [b""])[0].decode("latin-1")
    if etag and theirs and _opaque(etag) != _opaque(theirs):
        problems.append(f"etag {etag} stored, {theirs} at the origin")
    return "; ".join(problems)


# -- sitemaps --


def _refuse(*args: object) -> NoReturn:
    raise JobFailed("the sitemap has a DOCTYPE, which is not accepted (nor any entity)")


class _Sitemap:
    """An expat parser fed as bytes arrive, writing each ``<loc>`` of ``<urlset><url>`` to ``out``."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._path: list[str] = []
        self._loc: list[str] | None = None
        self._kept = 0
        self.locs = 0
        self._parser = safe_parser(_refuse, self._start, self._end, self._text, " ", encoding=None)

    def _start(self, name: str, attributes: object) -> None:
        local = name.rpartition(" ")[2]
        if not self._path and local != "urlset":
            raise JobFailed(
                "the sitemap is a sitemap index: back-fill each of its sitemaps"
                if local == "sitemapindex"
                else f"not a sitemap: the document is a <{local}>, not a <urlset>"
            )
        self._path.append(local)
        if self._path == ["urlset", "url", "loc"]:
            self._loc, self._kept = [], 0

    def _text(self, data: str) -> None:
        if self._loc is not None and self._kept < _MAX_LOC:
            self._loc.append(data[: _MAX_LOC - self._kept])
            self._kept += len(data)

    def _end(self, name: str) -> None:
        if self._loc is not None and len(self._path) == 3:
            loc = " ".join("".join(self._loc).split())  # one line, whatever it holds
            self._out.write(loc.encode("utf-8") + b"\n")
            self.locs += 1
            self._loc = None
        self._path.pop()

    def feed(self, data: bytes, last: bool = False) -> None:
        try:
            self._parser.Parse(data, last)
        except expat.ExpatError as e:
            problem = f"{expat.ErrorString(e.code)} at line {e.lineno}"
            raise JobFailed(f"the sitemap is not well-formed XML: {problem}") from None


class _Body(Protocol):
    """Feeds a response body to a parser, bounded in size and in idle time."""

    def __init__(self, feed: Callable[[bytes], None], limit: int, idle: float, clock: IReactorTime) -> None:
        self._feed = feed
        self._limit = limit
        self._received = 0
        self.done: Deferred[None] = Deferred(lambda d: self._stop())
        self._idle = idle
        self._timer: IDelayedCall = clock.callLater(idle, self._fail, JobFailed(f"the sitemap stalled for {idle}s"))

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._received += len(data)
        if self._received > self._limit:
            self._fail(JobFailed(f"the sitemap is over {self._limit} bytes"))
            return
        try:
            self._feed(data)
        except Exception as e:
            self._fail(e)
            return
        if self._timer.active():
            self._timer.reset(self._idle)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer.active():
            self._timer.cancel()
        if not self.done.called:
            if reason.check(ResponseDone):
                self.done.callback(None)
            else:
                self.done.errback(JobFailed(f"the sitemap was cut short: {reason.getErrorMessage()}"))

    def _fail(self, error: Exception) -> None:
        if not self.done.called:
            self.done.errback(error)
        self._stop()

    def _stop(self) -> None:
        if self._timer.active():
            self._timer.cancel()
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]


def sitemap_source(where: str, bucket: BucketConfig | None) -> Source:
    """
    Where a backfill's sitemap is fetched from: an ``http(s)://`` URL, or a
    path (``/sitemap.xml``) on the bucket's origin, asked as a fill would
    ask that key.  :raises JobError:
    """
    if where.startswith("/"):
        if bucket is None:
            raise JobError("the bucket is not configured")
        try:
            source = prefetch_source(bucket, split_key(where[1:].encode("utf-8")))
        except BadKey as e:
            raise JobError(f"the sitemap path {where!r} is not a valid key: {e.message}") from None
        if source is None:
            raise JobError(f"the bucket has no origin (nor a proxy or mirror rule) for {where!r}")
        return source
    parts = urlsplit(where)
    if parts.scheme not in ("http", "https") or not parts.hostname or not where.isascii() or _SPACE.search(where):
        raise JobError(f"the sitemap must be an http(s) URL or a path on the origin like '/sitemap.xml', not {where!r}")
    return Source(where.encode("ascii"))


async def fetch_sitemap(
    agents: Agents,
    source: Source,
    cfg: FillConfig,
    clock: IReactorTime,
    out: IO[bytes],
    limit: int = MAX_SITEMAP_BYTES,
) -> int:
    """
    Copy the ``<loc>`` of each URL of the sitemap at ``source`` into ``out``,
    one a line; returns how many.  :raises JobFailed: with what went wrong.
    """
    try:
        response = await ask(agents, b"GET", source, cfg, clock)
    except FillFailed as e:
        raise JobFailed(f"cannot fetch the sitemap {source.url.decode()}: {e.reason} {e.detail}".rstrip()) from None
    if response.code != 200:
        drop(response)
        raise JobFailed(f"the sitemap {source.url.decode()} answered {response.code}, not 200")
    sitemap = _Sitemap(out)
    body = _Body(sitemap.feed, limit, cfg.idle_timeout, clock)
    response.deliverBody(body)
    body.done.addTimeout(cfg.total_timeout, clock)
    try:
        await body.done
    except DeferredTimeout:
        raise JobFailed(f"the sitemap took longer than {cfg.total_timeout}s") from None
    sitemap.feed(b"", last=True)
    return sitemap.locs
