"""
The bucket listener: one leaf resource that routes by Host, validates the key
before any file-system call, serves hits from one open descriptor (ranges and
conditionals included), answers misses with a 302 to the origin and starts the
background fill, and answers everything else with a COS-style XML error.

``twisted.web.static.File`` is deliberately not used: it renders directory
listings, answers 500 on NUL bytes and amplifies multi-range requests.
"""

from __future__ import annotations

import errno
import functools
import itertools
import mimetypes
import operator
import os
import re
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import Any
from xml.sax.saxutils import escape

from twisted.internet.interfaces import IAddress, IDelayedCall, IPullProducer, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, datetimeToString
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from ..config import Config
from ..fill.scheduler import Filler
from ..keys import BadKey, encode_key, encode_query, parse_target
from ..stats import Stats
from ..storage.disk import IObjectStore, IStoredObject, StoreError
from .sendfile import sendfile_producer

__all__ = ["EdgeResource", "EdgeSite", "error_body", "parse_ranges"]

_log = Logger(namespace="cosedge.web")

_STATUS = {
    "AccessDenied": 403,
    "InternalError": 500,
    "InvalidArgument": 400,
    "InvalidRange": 416,
    "InvalidURI": 400,
    "KeyTooLong": 400,
    "MethodNotAllowed": 405,
    "NoSuchBucket": 404,
    "NoSuchKey": 404,
    "PreconditionFailed": 412,
    "ServiceUnavailable": 503,
    "EntityTooLarge": 413,
}
_SERVED_METHODS = (b"GET", b"HEAD")
_CHUNK = 64 * 1024
#: Larger request bodies (or chunked ones) are refused with 413.
_MAX_REQUEST_BODY = 64 * 1024
#: More ranges than this (before merging) and the Range header is ignored.
_MAX_RANGE_SPECS = 1000
#: More disjoint ranges than this (after merging) and the whole object is sent.
_MAX_RANGES = 64
_SERVER = b"cosedge"
#: Headers set from an object, removed again when the answer is an error.
_OBJECT_HEADERS = (
    b"etag",
    b"last-modified",
    b"accept-ranges",
    b"content-encoding",
    b"content-disposition",
    b"cache-control",
    b"expires",
)
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+\Z")
_BAD_VALUE = re.compile("[\x00-\x08\x0a-\x1f\x7f]")
_PASSED_META = ("content-encoding", "content-disposition", "cache-control", "expires")
#: Request headers that can change a hit's answer, as ``Headers`` names them (canonical capitalisation).
_CONDITIONAL = frozenset({b"Range", b"If-Match", b"If-None-Match", b"If-Modified-Since", b"If-Unmodified-Since"})
_first = operator.itemgetter(0)
#: Host headers whose bucket is remembered, at most.
_MAX_HOSTS = 1024


def error_body(code: str, message: str, request_id: str) -> bytes:
    """A COS-style XML error document."""
    return (
        "<?xml version='1.0' encoding='utf-8' ?>\n"
        f"<Error><Code>{code}</Code><Message>{escape(message)}</Message>"
        f"<RequestId>{request_id}</RequestId></Error>\n"
    ).encode()


def parse_ranges(header: bytes, size: int) -> list[tuple[int, int]] | None:
    """
    Parse a ``Range`` header against an object of ``size`` bytes.

    Returns None when the header is to be ignored (another unit, a syntax
    error, too many ranges: the whole object is sent), an empty list when no
    range is satisfiable (416), else the satisfiable ranges as sorted,
    merged, inclusive ``(first, last)`` pairs — never more bytes than the
    object holds.
    """
    unit, eq, spec = header.partition(b"=")
    if not eq or unit.strip().lower() != b"bytes":
        return None
    specs = [s.strip() for s in spec.split(b",")]
    if len(specs) > _MAX_RANGE_SPECS:
        return None
    ranges = []
    for s in specs:
        if not s:
            continue
        first, dash, last = s.partition(b"-")
        first, last = first.strip(), last.strip()
        if not dash or len(first) > 20 or len(last) > 20:
            return None
        if not first:  # suffix: the last N bytes
            if not last.isdigit():
                return None
            n = int(last)
            if n > 0 and size > 0:
                ranges.append((max(0, size - n), size - 1))
            continue
        if not first.isdigit() or (last and not last.isdigit()):
            return None
        start = int(first)
        end = int(last) if last else size - 1
        if last and end < start:  # "N-" past the end is unsatisfiable (416), not a syntax error
            return None
        if start < size:
            ranges.append((start, min(end, size - 1)))
    if not ranges:
        return [] if any(specs) else None
    ranges.sort()
    merged = [ranges[0]]
    for start, end in ranges[1:]:
        last_start, last_end = merged[-1]
        if start <= last_end + 1:
            merged[-1] = (last_start, max(last_end, end))
        else:
            merged.append((start, end))
    if len(merged) > _MAX_RANGES:
        return None
    return merged


@functools.lru_cache(maxsize=4096)
def _http_date_text(seconds: int) -> bytes:
    """An HTTP date for Last-Modified (cached: objects keep their time)."""
    text: bytes = datetimeToString(seconds)
    return text


def _guess_type(name: str) -> str:
    """
    ``mimetypes``' type for a file name, else application/octet-stream.
    Cached by what the guess depends on: the name's last two suffixes, and
    whether anything but dots comes before them (``splitext`` keeps leading
    dots with the stem).  A name with ``:`` is parsed as a URL by
    ``guess_type`` (``data:…``), so it is not cached.
    """
    last = name.rfind(".")
    if last < 0 or ":" in name:
        return mimetypes.guess_type(name, strict=False)[0] or "application/octet-stream"
    second = name.rfind(".", 0, last)
    cut = second if second >= 0 else last
    stem = name[:cut]
    return _guess_type_of(("x" if stem.strip(".") else stem) + name[cut:])


@functools.lru_cache(maxsize=1024)
def _guess_type_of(name: str) -> str:
    return mimetypes.guess_type(name, strict=False)[0] or "application/octet-stream"


def _safe_header(name: str, value: str) -> bool:
    """A stored header that can be sent as it is: a token name, no control characters."""
    return bool(_TOKEN.match(name)) and not _BAD_VALUE.search(value)


def _http_date(value: bytes | None) -> float | None:
    if value is None:
        return None
    try:
        return parsedate_to_datetime(value.decode("latin-1")).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _latin1(value: str) -> bytes:
    """
    A kept header value as bytes again.  Fills store the origin's header
    bytes decoded as Latin-1, so encoding them back gives exactly what the
    origin sent (a ``str`` given to ``setHeader`` would be re-encoded as
    UTF-8); metadata written by another tool may hold any text.
    """
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8")


def _etag_list(value: bytes) -> list[bytes]:
    return [t.strip() for t in value.split(b",") if t.strip()]


def _weak_match(a: bytes, b: bytes) -> bool:
    return a.removeprefix(b"W/") == b.removeprefix(b"W/")


def _drop_short_response(request: Request) -> None:
    """
    The object turned out shorter than its ``fstat`` length: drop the
    connection, so the client cannot take a short body for a whole one.
    """
    _log.warn("object shrank while being served; dropping the connection")
    request.channel.transport.abortConnection()  # type: ignore[union-attr]


@implementer(IPullProducer)
class _Sender:
    """
    Sends byte ranges of an open object, one chunk each time the transport
    asks for more, so memory stays bounded for any object size or client
    speed.  Never sends more than the ranges say; if the file turns out
    shorter than its ``fstat`` length, the connection is dropped so the
    client cannot mistake a short body for a whole one.
    """

    def __init__(
        self, request: Request, obj: IStoredObject, parts: list[tuple[bytes, int, int]], trailer: bytes, stats: Stats
    ) -> None:
        self._request: Request | None = request
        self._obj = obj
        self._parts = parts
        self._trailer = trailer
        self._stats = stats
        self._index = 0
        self._offset = parts[0][1] if parts else 0
        self._prefix_sent = False
        self._channel: Any = None

    def start(self) -> None:
        request = self._request
        assert request is not None
        # The channel the producer is registered with; a request forgets it
        # when its connection is lost, before telling us.
        self._channel = request.channel
        request.notifyFinish().addErrback(self._lost)
        request.registerProducer(self, False)

    def _lost(self, reason: object) -> None:
        """The client went away mid-response: release the object and unregister."""
        if self._request is not None:
            self._request = None
            self._obj.close()
            if self._channel is not None:
                self._channel.unregisterProducer()

    def resumeProducing(self) -> None:
        request = self._request
        if request is None:
            return
        if self._index == len(self._parts):
            if self._trailer:
                request.write(self._trailer)
            self._done(request)
            request.finish()
            return
        prefix, _start, end = self._parts[self._index]
        out = b""
        if not self._prefix_sent:
            out, self._prefix_sent = prefix, True
        want = min(_CHUNK, end - self._offset)
        data = self._obj.read(self._offset, want) if want else b""
        if len(data) < want:
            self._done(request)
            _drop_short_response(request)
            return
        self._offset += len(data)
        self._stats.inc("bytes_served", len(data))
        if self._offset >= end:
            self._index += 1
            self._prefix_sent = False
            if self._index < len(self._parts):
                self._offset = self._parts[self._index][1]
        request.write(out + data)

    def stopProducing(self) -> None:
        if self._request is not None:
            self._request = None
            self._obj.close()

    def _done(self, request: Request) -> None:
        self._request = None
        self._obj.close()
        request.unregisterProducer()


class EdgeResource(Resource):
    """The whole bucket listener, as one leaf resource."""

    isLeaf = True

    def __init__(self, config: Callable[[], Config], store: IObjectStore, filler: Filler, stats: Stats) -> None:
        super().__init__()
        self._config = config
        self._store = store
        self._filler = filler
        self._stats = stats
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(6).hex()
        self._hosts_config: Config | None = None
        self._hosts: dict[bytes, str | None] = {}

    def render(self, request: Request) -> bytes | int:  # type: ignore[override]
        request_id = f"{self._id_prefix}-{next(self._ids):x}"
        # Server and Date come from _EdgeRequest.process, before anything can fail.
        request.setHeader(b"x-cos-request-id", request_id.encode("ascii"))
        try:
            return self._render(request, request_id)
        except Exception:
            _log.failure("internal error serving {uri!r}", uri=request.uri)
            return self._error(
                request, request_id, "InternalError", "We encountered an internal error. Please try again."
            )

    def _error(self, request: Request, request_id: str, code: str, message: str) -> bytes:
        request.setResponseCode(_STATUS[code])
        headers = request.responseHeaders
        for name, _ in list(headers.getAllRawHeaders()):  # an object's headers do not describe an error
            if name.lower() in _OBJECT_HEADERS or name.lower().startswith(b"x-cos-meta-"):
                headers.removeHeader(name)
        request.setHeader(b"content-type", b"application/xml")
        body = error_body(code, message, request_id)
        if request.method == b"HEAD":  # the headers of the GET answer, no body
            request.setHeader(b"content-length", b"%d" % len(body))
            return b""
        return body

    def _render(self, request: Request, request_id: str) -> bytes | int:
        try:
            target = parse_target(request.uri)
        except BadKey as e:
            return self._error(request, request_id, e.code, e.message)
        config = self._config()
        bucket_name = self._bucket_for(request, target.authority, config)
        bucket = config.buckets.get(bucket_name) if bucket_name else None
        if bucket is None or bucket_name is None:
            return self._error(request, request_id, "NoSuchBucket", "The specified bucket does not exist.")
        if request.method not in _SERVED_METHODS:
            request.setHeader(b"allow", b"GET, HEAD")
            return self._error(
                request, request_id, "MethodNotAllowed", "The specified method is not allowed against this resource."
            )
        if not target.segments:
            return self._error(
                request, request_id, "AccessDenied", "Listing a bucket is not served here; request an object key."
            )
        try:
            obj = self._store.open(bucket_name, target.segments)
        except StoreError as e:
            _log.warn("cannot open {bucket}/{key}: {error}", bucket=bucket_name, key=target.key, error=e)
            if e.errno in (errno.EACCES, errno.EPERM):
                return self._error(request, request_id, "AccessDenied", "The object cannot be read.")
            return self._error(request, request_id, "ServiceUnavailable", "Please reduce your request rate.")
        if obj is not None:
            self._stats.inc("hits")
            return self._serve(request, request_id, obj, target.segments[-1])
        self._stats.inc("misses")
        if not bucket.origin_pull or bucket.origin is None:
            return self._error(request, request_id, "NoSuchKey", "The specified key does not exist.")
        location = b"http://" + bucket.origin.netloc + b"/" + encode_key(target.segments)
        if target.query is not None:
            location += b"?" + encode_query(target.query)
        request.setResponseCode(302)
        request.setHeader(b"location", location)
        request.setHeader(b"cache-control", b"no-store")
        self._stats.inc("redirects")
        if request.method == b"GET":
            self._filler.start(bucket_name, target.segments, bucket.origin)
        return b""

    def _bucket_for(self, request: Request, authority: bytes | None, config: Config) -> str | None:
        if authority is not None:
            host = authority
        else:
            hosts = request.requestHeaders.getRawHeaders(b"host") or []
            if len(hosts) != 1:
                return None
            host = hosts[0]
        # The answer depends only on the host and the configured domains:
        # remembered per configuration (replaced whole on any change).
        if config is not self._hosts_config:
            self._hosts_config, self._hosts = config, {}
        try:
            return self._hosts[host]
        except KeyError:
            pass
        bucket = self._bucket_of(host, config.server.domains)
        if len(self._hosts) >= _MAX_HOSTS:  # hosts are the client's choice: stay bounded
            self._hosts.clear()
        self._hosts[host] = bucket
        return bucket

    @staticmethod
    def _bucket_of(host: bytes, domains: tuple[str, ...]) -> str | None:
        name, _, port = host.rpartition(b":")
        if name and port.isdigit():
            host = name
        try:
            text = host.decode("ascii").lower().rstrip(".")
        except UnicodeDecodeError:
            return None
        for domain in domains:
            bucket, dot, rest = text.partition(".")
            if dot and rest == domain:
                return bucket
        return None

    def _serve(self, request: Request, request_id: str, obj: IStoredObject, name: str) -> bytes | int:
        handed_off = False
        try:
            result, handed_off = self._serve_open(request, request_id, obj, name)
        finally:
            if not handed_off:  # else the sender owns and closes it
                obj.close()
        return result

    def _serve_open(self, request: Request, request_id: str, obj: IStoredObject, name: str) -> tuple[bytes | int, bool]:
        """Answer a hit; returns the render result and whether a sender took ``obj``."""
        meta = obj.meta
        size: int = obj.size
        etag = _latin1(meta.get("etag", f'"{obj.identity}"'))
        last_modified = int(obj.mtime)
        content_type = meta.get("content-type") or _guess_type(name)
        request.setHeader(b"etag", etag)
        request.setHeader(b"last-modified", _http_date_text(last_modified))
        request.setHeader(b"accept-ranges", b"bytes")
        for header, value in meta.items():
            if (header in _PASSED_META or header.startswith("x-cos-meta-")) and _safe_header(header, value):
                request.setHeader(header, _latin1(value))

        # Most requests carry none of the headers below: one pass over the
        # request's header names then replaces five look-ups.
        plain = _CONDITIONAL.isdisjoint(map(_first, request.requestHeaders.getAllRawHeaders()))
        status = None if plain else self._preconditions(request, etag, last_modified)
        if status == 412:
            message = "At least one of the preconditions you specified did not hold."
            return self._error(request, request_id, "PreconditionFailed", message), False
        if status == 304:
            # No body and no Content-Length (which would have to be the
            # object's): finish here rather than let render() set it to 0.
            request.setResponseCode(304)
            request.finish()
            return NOT_DONE_YET, False

        ranges = None
        range_header = None if plain else request.getHeader(b"range")
        if range_header is not None and self._if_range(request, etag, last_modified):
            ranges = parse_ranges(range_header, size)
        if ranges == []:
            request.setHeader(b"content-range", f"bytes */{size}")
            return self._error(request, request_id, "InvalidRange", "The requested range is not satisfiable."), False

        parts: list[tuple[bytes, int, int]]
        trailer = b""
        if ranges is None:
            request.setHeader(b"content-type", _latin1(content_type))
            parts = [(b"", 0, size)]
            length = size
        elif len(ranges) == 1:
            first, last = ranges[0]
            request.setResponseCode(206)
            request.setHeader(b"content-type", _latin1(content_type))
            request.setHeader(b"content-range", f"bytes {first}-{last}/{size}")
            parts = [(b"", first, last + 1)]
            length = last + 1 - first
        else:
            boundary = os.urandom(12).hex()
            request.setResponseCode(206)
            request.setHeader(b"content-type", f"multipart/byteranges; boundary={boundary}")
            parts = [
                (
                    _latin1(
                        f"\r\n--{boundary}\r\nContent-Type: {content_type}\r\n"
                        f"Content-Range: bytes {first}-{last}/{size}\r\n\r\n"
                    ),
                    first,
                    last + 1,
                )
                for first, last in ranges
            ]
            trailer = f"\r\n--{boundary}--\r\n".encode("latin-1")
            length = sum(len(p) + end - start for p, start, end in parts) + len(trailer)
        if request.method == b"HEAD" or length == 0:
            request.setHeader(b"content-length", b"%d" % length)
            return b"", False
        if length <= _CHUNK:
            # A small body goes out in one write, without a producer; render()
            # sets Content-Length from it (exactly ``length``, checked here).
            if ranges is None:  # the whole object, the usual case
                body, served = obj.read(0, size), size
            else:
                body = b"".join(prefix + obj.read(start, end - start) for prefix, start, end in parts) + trailer
                served = sum(end - start for _, start, end in parts)
            if len(body) != length:
                _drop_short_response(request)
                return NOT_DONE_YET, False
            self._stats.inc("bytes_served", served)
            return body, False
        request.setHeader(b"content-length", b"%d" % length)
        sender = sendfile_producer(request, obj, parts, trailer, self._stats)
        (sender or _Sender(request, obj, parts, trailer, self._stats)).start()
        return NOT_DONE_YET, True

    @staticmethod
    def _preconditions(request: Request, etag: bytes, last_modified: int) -> int | None:
        """RFC 9110 section 13.2.2 evaluation order; 412, 304 or None."""
        if_match = request.getHeader(b"if-match")
        if if_match is not None:
            tags = _etag_list(if_match)
            if b"*" not in tags and (etag.startswith(b"W/") or etag not in tags):
                return 412
        else:
            since = _http_date(request.getHeader(b"if-unmodified-since"))
            if since is not None and last_modified > since:
                return 412
        if_none_match = request.getHeader(b"if-none-match")
        if if_none_match is not None:
            tags = _etag_list(if_none_match)
            if b"*" in tags or any(_weak_match(etag, t) for t in tags):
                return 304
        else:
            since = _http_date(request.getHeader(b"if-modified-since"))
            if since is not None and last_modified <= since:
                return 304
        return None

    @staticmethod
    def _if_range(request: Request, etag: bytes, last_modified: int) -> bool:
        value = request.getHeader(b"if-range")
        if value is None:
            return True
        if value.startswith(b'"') or value.startswith(b"W/"):
            return value == etag and not etag.startswith(b"W/")
        return _http_date(value) == last_modified


class _EdgeChannel(HTTPChannel):
    """
    An HTTP/1.1 channel with a deadline for each request's headers.

    Twisted's idle timeout restarts on every byte, so a client trickling its
    headers one byte at a time would hold a connection for ever.  Here the
    headers of each request must be complete within ``header_deadline``
    seconds of the connection opening or of the previous response ending.

    That deadline replaces Twisted's idle timeout (which :class:`EdgeSite`
    turns off): wherever the idle timer runs, the deadline is armed too and
    fires no later, and while a response is being produced both are off.
    One timer is kept per connection and moved by ``reset`` for each request
    (cheap for a later time), not cancelled and made again: the headers
    having arrived only marks it paused, and if it fires while paused it
    does nothing and is made again at the end of that response.
    """

    header_deadline: float = 60.0
    _deadline: IDelayedCall | None = None
    #: Headers are complete and the response is not done: the deadline does not apply.
    _paused = False
    _refused = False
    _host: IAddress | None = None
    _peer: IAddress | None = None

    def getHost(self) -> IAddress:
        """The local address, asked of the transport once: every request reads it, and it never changes."""
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def getPeer(self) -> IAddress:
        """The client's address, asked of the transport once."""
        if self._peer is None:
            self._peer = super().getPeer()
        return self._peer

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm()

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        """
        Twisted's, writing the same bytes, but as one piece: the transport
        checks and buffers each piece of a sequence (some forty here).
        """
        if not isinstance(headers, Headers):
            super().writeHeaders(version, code, reason, headers)
            return
        head = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                head += (name, b": ", value, b"\r\n")
        head.append(b"\r\n")
        self.transport.write(b"".join(head))  # type: ignore[union-attr]

    def allHeadersReceived(self) -> None:
        # GET and HEAD carry no body worth reading, and Twisted would spool a
        # large one to a temporary file: refuse before reading any of it.
        if self.length is None or self.length > _MAX_REQUEST_BODY:
            # The deadline stays armed: it closes (and in the end aborts) a
            # client that does not read the answer or close.
            self._refused = True
            body = error_body("EntityTooLarge", "Request bodies are not accepted here.", os.urandom(6).hex())
            self.transport.write(  # type: ignore[union-attr]
                b"HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\n"
                b"Content-Type: application/xml\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            self.loseConnection()
            return
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        self._paused = True  # the deadline covers a (small) body too
        super().allContentReceived()

    def dataReceived(self, data: bytes) -> None:
        if not self._refused:
            super().dataReceived(data)

    def requestDone(self, request: Request) -> None:
        # Armed before the channel parses any pipelined request it buffered,
        # whose complete headers then disarm it again.
        if self.persistent:
            self._arm()
        super().requestDone(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._disarm()
        super().connectionLost(reason)

    def _arm(self) -> None:
        """Start the headers' deadline from now."""
        self._paused = False
        deadline = self._deadline
        if deadline is not None and deadline.active():
            deadline.reset(self.header_deadline)
        else:
            self._deadline = self.callLater(self.header_deadline, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self._paused:  # a response is under way; the next _arm starts a new deadline
            return
        # Twisted's own timeout path: close, and abort a client that lingers.
        self.timeoutConnection()

    def timeoutConnection(self) -> None:
        self._disarm()  # whichever timer fired first, the connection closes once
        super().timeoutConnection()


class _EdgeRequest(Request):
    """
    A request to the bucket listener: Twisted's ``server.Request`` but for
    :meth:`process`, which does less per request.
    """

    def process(self) -> None:
        """
        Render the site's one leaf resource.  Unlike Twisted's: Server is set
        once, to ours; Date is formatted once a second; there is no resource
        traversal (so ``prepath`` is empty and ``postpath`` is not computed);
        and the ``*`` target (``OPTIONS *``, ``GET *``) reaches the resource,
        which answers it with its own error rather than Twisted's page.
        """
        site: EdgeSite = self.channel.site  # type: ignore[attr-defined]
        self.site = site
        self.setHeader(b"server", _SERVER)
        self.setHeader(b"date", site.http_date())
        self.prepath = []
        self.sitepath: list[bytes] = []
        try:
            self.render(site.resource)
        except BaseException:
            self.processingFailed(Failure())


class EdgeSite(Site):
    """
    The bucket listener's factory: serves one leaf resource with
    :class:`_EdgeRequest`, counts responses by status and writes the access
    log in combined log format to standard output, a file, or nowhere.
    """

    displayTracebacks = False
    requestFactory = _EdgeRequest

    def __init__(
        self, resource: Resource, stats: Stats, access_log: str, reactor: IReactorTime, timeout: float
    ) -> None:
        if not resource.isLeaf:
            raise TypeError("EdgeSite serves one leaf resource; it does no traversal")
        super().__init__(resource, timeout=timeout, reactor=reactor)
        self._stats = stats
        self._access_log = access_log
        self._date_second = -1
        self._date = b""

    def http_date(self) -> bytes:
        """The current time for a Date header, from the reactor's clock, formatted once a second."""
        second = int(self.reactor.seconds())
        if second != self._date_second:
            self._date = datetimeToString(second)
            self._date_second = second
        return self._date

    def protocol(self) -> _EdgeChannel:  # type: ignore[override]
        """Build this site's channels, with the header deadline set."""
        channel = _EdgeChannel()
        channel.header_deadline = self.timeOut or _EdgeChannel.header_deadline
        return channel

    def buildProtocol(self, addr: IAddress) -> _EdgeChannel:  # type: ignore[override]
        """A channel whose header deadline stands in for Twisted's idle timeout (off: one timer, not two)."""
        channel: _EdgeChannel = super().buildProtocol(addr)  # type: ignore[assignment]
        channel.timeOut = None
        return channel

    def startFactory(self) -> None:
        super().startFactory()
        if self._access_log == "-":
            self._logFile = open(os.dup(1), "w", 1, encoding="utf-8", newline="\n")
        elif self._access_log:
            self._logFile = self._openLogFile(os.path.abspath(self._access_log))
        else:
            self._logFile = None

    def log(self, request: Any) -> None:
        self._stats.statuses[request.code] += 1
        super().log(request)

    def _openLogFile(self, path: str) -> Any:  # type: ignore[override]
        """
        The access-log file, in append mode, written a line at a time: the
        lines of several processes (``workers``) never overwrite or split
        each other.  Rotation is logrotate's, with a SIGHUP to reopen; not
        the 1 MB self-rotation of Twisted's ``LogFile`` that ``Site`` uses,
        which several processes would each do on their own.
        """
        return open(path, "a", 1, encoding="utf-8", newline="\n")

    def reopen_access_log(self) -> None:
        """
        Open the access-log file by its name again, so that lines go to a new
        file once logrotate has moved the old one away (``-`` and off are
        left as they are).  If it cannot be opened, logging goes on to the
        old file and a warning says why.
        """
        if not self._access_log or self._access_log == "-" or self._logFile is None:
            return
        try:
            new = self._openLogFile(os.path.abspath(self._access_log))
        except OSError as e:
            _log.warn("access log {path} not reopened: {error}", path=self._access_log, error=e)
            return
        old, self._logFile = self._logFile, new
        old.close()
