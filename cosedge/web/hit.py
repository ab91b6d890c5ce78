"""
Answering a hit: conditionals (RFC 9110), byte ranges (merged and capped,
never more bytes than the object), headers from the stored metadata, and the
body, in one write when it is small, else through a producer or sendfile.
"""

from __future__ import annotations

import functools
import mimetypes
import operator
import os
import re
from email.utils import parsedate_to_datetime
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.python.failure import Failure
from twisted.web.http import datetimeToString
from twisted.web.http_headers import Headers
from twisted.web.server import NOT_DONE_YET, Request

from ..interfaces import IStoredObject
from ..stats import Stats
from .errors import answer_error
from .producers import SMALL_RESPONSE, Sender, drop_short_response
from .sendfile import sendfile_producer

__all__ = ["answer_hit", "if_range", "parse_ranges", "preconditions", "whole_answer_head"]

#: More ranges than this (before merging) and the Range header is ignored.
_MAX_RANGE_SPECS = 1000
#: More disjoint ranges than this (after merging) and the whole object is sent.
_MAX_RANGES = 64
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+\Z")
_BAD_VALUE = re.compile("[\x00-\x08\x0a-\x1f\x7f]")
_PASSED_META = ("content-encoding", "content-disposition", "cache-control", "expires", "vary")
#: Request headers that can change a hit's answer, as ``Headers`` names them (canonical capitalisation).
_CONDITIONAL = frozenset({b"Range", b"If-Match", b"If-None-Match", b"If-Modified-Since", b"If-Unmodified-Since"})
_first = operator.itemgetter(0)
#: What render() returns at once: a body, or NOT_DONE_YET (a tuple: ``bytes | int`` is built anew at each use).
_SYNC = (bytes, int)


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


def _object_headers(headers: Headers, obj: IStoredObject, name: str) -> tuple[int, bytes, int, str]:
    """
    Set what every answer of a hit on ``obj`` carries (ETag, Last-Modified,
    Accept-Ranges, the kept metadata) in ``headers``; returns the object's
    size, ETag, modification time and Content-Type (``name``, the key's
    last segment, guesses the type when the metadata names none).
    """
    meta = obj.meta
    etag_text = meta.get("etag")
    etag = _latin1(f'"{obj.identity}"' if etag_text is None else etag_text)
    last_modified = int(obj.mtime)
    headers.setRawHeaders(b"etag", [etag])
    headers.setRawHeaders(b"last-modified", [_http_date_text(last_modified)])
    headers.setRawHeaders(b"accept-ranges", [b"bytes"])
    for header, value in meta.items():
        if (header in _PASSED_META or header.startswith("x-cos-meta-")) and _safe_header(header, value):
            headers.setRawHeaders(header, [_latin1(value)])
    return obj.size, etag, last_modified, meta.get("content-type") or _guess_type(name)


def whole_answer_head(obj: IStoredObject, name: str) -> bytes:
    """
    The header lines of a 200 answer with the whole of ``obj`` after the
    ones every answer starts with (Server, Date, x-cos-request-id), to the
    blank line: the bytes :func:`answer_hit` makes Twisted write for a plain
    GET, made once for a hot object (:mod:`cosedge.web.quick`).
    """
    headers = Headers()
    size, _, _, content_type = _object_headers(headers, obj, name)
    headers.setRawHeaders(b"content-type", [_latin1(content_type)])
    headers.setRawHeaders(b"content-length", [b"%d" % size])
    lines = [b"%s: %s\r\n" % (header, value) for header, values in headers.getAllRawHeaders() for value in values]
    lines.append(b"\r\n")
    return b"".join(lines)


def answer_hit(request: Request, request_id: str, obj: IStoredObject, name: str, stats: Stats) -> Any:
    """
    Answer a hit on ``obj`` (``name``: the key's last segment, for its
    Content-Type): the render result, or a Deferred of it when the store
    reads over the network.  Closes ``obj`` unless a producer took it.

    The usual hit (a GET of a whole small object, with no conditional and no
    range) is answered here, in this one call; the rest in :func:`_answer_open`.
    """
    try:
        headers = request.responseHeaders  # Request.setHeader is this, one call deeper
        size, etag, last_modified, content_type = _object_headers(headers, obj, name)
        # Most requests carry none of the headers that make a hit's answer
        # differ: one pass over the request's header names then replaces five look-ups.
        plain = _CONDITIONAL.isdisjoint(map(_first, request.requestHeaders.getAllRawHeaders()))
        # An object whose class has read_now (the disk and memory stores')
        # reads a small body at once, without a Deferred.  Looked up on the
        # class, so that a wrapper forwarding attributes keeps its own read().
        read_now = getattr(type(obj), "read_now", None) if plain and 0 < size <= SMALL_RESPONSE else None
        if read_now is not None and request.method != b"HEAD":
            headers.setRawHeaders(b"content-type", [_latin1(content_type)])
            body: bytes = read_now(obj, 0, size)
            obj.close()
            if len(body) != size:  # it shrank: drop the connection (render() sets Content-Length from the body)
                drop_short_response(request)
                return NOT_DONE_YET
            stats.inc("bytes_served", size)
            return body
        result, handed_off = _answer_open(
            request, request_id, obj, stats, (size, etag, last_modified, content_type, plain)
        )
    except BaseException:
        obj.close()
        raise
    if not handed_off:  # else the producer owns and closes it
        if isinstance(result, _SYNC):  # not isinstance(result, Deferred): an ABC's check, slow here
            obj.close()
        else:
            result.addBoth(_closing, obj)
    return result


def _closing(result: object, obj: IStoredObject) -> object:
    obj.close()
    return result


def _small_body(
    data: bytes | list[bytes],
    request: Request,
    parts: list[tuple[bytes, int, int]],
    trailer: bytes,
    length: int,
    served: int,
    stats: Stats,
) -> bytes | int:
    """The small body, checked to be exactly ``length`` bytes (else the connection is dropped)."""
    if isinstance(data, list):
        body = b"".join(prefix + chunk for (prefix, _, _), chunk in zip(parts, data, strict=True)) + trailer
    else:
        body = data
    if len(body) != length:
        drop_short_response(request)
        return NOT_DONE_YET
    stats.inc("bytes_served", served)
    return body


def _answer_open(
    request: Request,
    request_id: str,
    obj: IStoredObject,
    stats: Stats,
    known: tuple[int, bytes, int, str, bool],
) -> tuple[bytes | int | Deferred[bytes | int], bool]:
    """
    Answer a hit that :func:`answer_hit` did not (``known``: what it found,
    its headers set); returns the render result and whether a sender took ``obj``.
    """
    size, etag, last_modified, content_type, plain = known
    headers = request.responseHeaders
    status = None if plain else preconditions(request, etag, last_modified)
    if status == 412:
        message = "At least one of the preconditions you specified did not hold."
        return answer_error(request, request_id, "PreconditionFailed", message), False
    if status == 304:
        # No body and no Content-Length (which would have to be the
        # object's): finish here rather than let render() set it to 0.
        request.setResponseCode(304)
        request.finish()
        return NOT_DONE_YET, False

    ranges = None
    range_header = None if plain else request.getHeader(b"range")
    if range_header is not None and if_range(request, etag, last_modified):
        ranges = parse_ranges(range_header, size)
    if ranges == []:
        request.setHeader(b"content-range", f"bytes */{size}")
        return answer_error(request, request_id, "InvalidRange", "The requested range is not satisfiable."), False

    parts: list[tuple[bytes, int, int]]
    trailer = b""
    boundary = ""
    if ranges is not None and len(ranges) > 1:
        boundary = os.urandom(12).hex()
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
        if length > size:
            # The parts' own headers would make the answer longer than the
            # object: the whole object instead, as nginx does (S11).
            ranges, trailer = None, b""
    if ranges is None:
        headers.setRawHeaders(b"content-type", [_latin1(content_type)])
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
        request.setResponseCode(206)
        request.setHeader(b"content-type", f"multipart/byteranges; boundary={boundary}")
    if request.method == b"HEAD" or length == 0:
        request.setHeader(b"content-length", b"%d" % length)
        return b"", False
    if length <= SMALL_RESPONSE:
        # A small body goes out in one write, without a producer; render()
        # sets Content-Length from it (exactly ``length``, checked here).
        if ranges is None:  # the whole object, the usual case
            read: Deferred[Any] = obj.read(0, size)
        else:
            read = gatherResults([obj.read(start, end - start) for _, start, end in parts])
        served = size if ranges is None else sum(end - start for _, start, end in parts)
        # Read already (the disk store): its value, without a callback (as in resource._render).
        if read.called and not read.paused and not isinstance(read.result, Failure):
            data: Any = read.result  # the disk store has read it already
            if ranges is None and len(data) == length:  # the usual case, inline
                stats.inc("bytes_served", length)
                return data, False
            return _small_body(data, request, parts, trailer, length, served, stats), False
        got: list[Any] = []
        read.addBoth(got.append)
        if got:  # it failed
            got[0].raiseException()
        # A store that reads over the network: answer when the bytes come
        # (append takes them, or the failure, and passes on None).
        later = read.addCallback(lambda _: got[0])
        return later.addCallback(_small_body, request, parts, trailer, length, served, stats), False
    headers.setRawHeaders(b"content-length", [b"%d" % length])
    sender = sendfile_producer(request, obj, parts, trailer, stats)
    (sender or Sender(request, obj, parts, trailer, stats)).start()
    return NOT_DONE_YET, True


def preconditions(request: Request, etag: bytes, last_modified: int) -> int | None:
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


def if_range(request: Request, etag: bytes, last_modified: int) -> bool:
    value = request.getHeader(b"if-range")
    if value is None:
        return True
    if value.startswith(b'"') or value.startswith(b"W/"):
        return value == etag and not etag.startswith(b"W/")
    return _http_date(value) == last_modified
