"""
Mirror mode: a miss answered with the object itself, streamed from the
origin while the fill stores it.

A :class:`MirrorReader` is one client's view of a fill (a
:class:`~cosedge.fill.fetch.Reader`): it turns the origin's accepted headers
into the client's response headers, writes each chunk of the body as it
arrives, and ends the response when the body is whole.  Many clients of one
missing key share the one origin fetch, each reading from the start.

- The origin fails before its headers: the client gets the COS answer for
  it (404 NoSuchKey for an origin 404, 424 MirrorFailed otherwise).
- The origin fails mid-body: the client's connection is closed, so that it
  sees the truncation (the fill stores nothing).
- The client hangs up: its reader stops; the fill goes on for the others
  and the store.
- A client too slow for the origin (more than ``_MAX_BEHIND`` bytes waiting
  in its connection) lets go of the stream at once and reads the rest from
  the fill's file as it grows (:mod:`cosedge.web.follow`), as does a client
  that comes after the origin has answered; where the fill has no such file
  (a small or chunked body), it is served from the store once stored.
- A single ``Range`` gets its bytes from the stream as they pass; a HEAD
  gets the origin's headers and no body (the copy goes on).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from ..fill.fetch import reason_of
from .errors import answer_error

__all__ = ["MirrorReader", "cut"]

_log = Logger(namespace="cosedge.web")
#: Bytes a client may fall behind the origin before it is served from the store instead.
_MAX_BEHIND = 8 * 1024 * 1024
_NOT_FOUND = ("http-404", "http-410")


def _single_range(header: bytes | None, length: int | None) -> tuple[int, int] | None:
    """The one satisfiable ``bytes=a-b`` range of a known length (end exclusive); None: the whole body."""
    if header is None or length is None or length == 0:
        return None
    unit, _, spec = header.partition(b"=")
    if unit.strip().lower() != b"bytes" or b"," in spec:
        return None
    first, dash, last = spec.strip().partition(b"-")
    try:
        if not dash:
            return None
        if not first:  # the last N bytes
            n = int(last)
            return (max(0, length - n), length) if n > 0 else None
        start = int(first)
        end = min(length, int(last) + 1) if last else length
    except ValueError:
        return None
    return (start, end) if 0 <= start < end else None


def cut(request: Request) -> None:
    """
    Close a response's connection without finishing the response, once the
    bytes written so far are sent: its client sees a body shorter than
    declared (or a chunked body without its end), never a whole one.
    """
    transport: Any = None if request.channel is None else request.channel.transport
    if transport is not None:
        transport.loseConnection()


@implementer(IPushProducer)
class MirrorReader:
    """One client reading a fill as it arrives (see the module's docstring)."""

    def __init__(
        self,
        request: Request,
        request_id: str,
        on_late: Callable[[MirrorReader, int], None],
        count: Callable[[str], None],
    ) -> None:
        self._request = request
        self._request_id = request_id
        #: Called with this reader and the body offset it has reached when the rest must come from the store.
        self._on_late = on_late
        self._count = count
        self._head = request.method == b"HEAD"
        self._range: tuple[int, int] | None = None
        self._offset = 0  # position in the origin's body
        self._sent = 0  # body bytes written to the client
        self._gone = False
        self._started = False
        self._paused = False
        self._behind = 0
        request.notifyFinish().addErrback(self._left)

    # -- Reader --

    def response(self, meta: Mapping[str, str], length: int | None) -> None:
        if self.answer_headers(meta, length):
            self._request.registerProducer(self, True)

    def answer_headers(self, meta: Mapping[str, str], length: int | None) -> bool:
        """
        Set the response's status and headers from the origin's; whether a
        body follows (a HEAD is finished here).  What :meth:`response` does
        before it reads the stream, and what a reader fed from a fill's
        file (:mod:`cosedge.web.follow`) starts with.
        """
        if self._gone:
            return False
        self._started = True
        request = self._request
        for name, value in meta.items():
            request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
        request.setHeader(b"x-cos-mirror", b"origin")
        if length is not None:
            request.setHeader(b"accept-ranges", b"bytes")
        self._range = None if self._head else _single_range(request.getHeader(b"range"), length)
        if self._range is not None and length is not None:
            start, end = self._range
            request.setResponseCode(206)
            request.setHeader(b"content-range", b"bytes %d-%d/%d" % (start, end - 1, length))
            request.setHeader(b"content-length", b"%d" % (end - start))
        else:
            request.setResponseCode(200)
            if length is not None:
                request.setHeader(b"content-length", b"%d" % length)
        self._count("mirror_answers")
        if self._head:
            self._gone = True
            request.finish()
            return False
        return True

    def write(self, data: bytes) -> None:
        if self._gone:
            return
        start, self._offset = self._offset, self._offset + len(data)
        if self._range is not None:
            lo, hi = self._range
            data = data[max(0, lo - start) : max(0, min(len(data), hi - start))]
            if not data:
                return
        self._sent += len(data)
        self._request.write(data)
        if self._range is not None and self._offset >= self._range[1]:  # the range is whole
            self._gone = True
            self._request.unregisterProducer()
            self._request.finish()
            return
        if self._paused:
            self._behind += len(data)
            if self._behind > _MAX_BEHIND:
                self._let_go()

    def finished(self, failure: Failure | None) -> None:
        if self._gone:
            return
        if failure is not None:
            reason, detail = reason_of(failure)
            if reason == "joined-late":  # it never read the stream: it may still answer from elsewhere
                self._on_late(self, 0)
            elif self._started:
                _log.warn(
                    "mirror answer of {uri!r} cut short: {reason} ({detail})",
                    uri=self._request.uri,
                    reason=reason,
                    detail=detail,
                )
                self._close()
            else:
                self._answer_failure(reason, detail)
            return
        self._gone = True
        self._request.unregisterProducer()
        self._request.finish()

    # -- IPushProducer: the client's connection says when it is full --

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._behind = 0

    def stopProducing(self) -> None:
        self._left(None)

    # -- the rest --

    @property
    def started(self) -> bool:
        """Whether the response's headers are set (the status line may be out)."""
        return self._started

    @property
    def range(self) -> tuple[int, int] | None:
        """The range being answered (end exclusive), or None for the whole body."""
        return self._range

    def _let_go(self) -> None:
        """
        Too far behind the stream: stop holding it in memory; the rest, from
        the body offset this client has been handed, comes from the fill's
        file as it grows or, failing that, from the store once stored.
        """
        self._gone = True
        self._request.unregisterProducer()
        self._on_late(self, self._sent + (self._range[0] if self._range is not None else 0))

    def _left(self, reason: object) -> None:
        """The client hung up: stop writing; the fill goes on."""
        self._gone = True

    def _close(self) -> None:
        self._gone = True
        cut(self._request)

    def _answer_failure(self, reason: str, detail: str) -> None:
        self._gone = True
        request = self._request
        if request.finished or request.channel is None:
            return
        if reason in _NOT_FOUND:
            body = answer_error(request, self._request_id, "NoSuchKey", "The specified key does not exist.")
        else:
            message = f"Mirroring failed: the origin could not be read ({reason})."
            body = answer_error(request, self._request_id, "MirrorFailed", message)
        self._count(f"mirror_failed_{'not_found' if reason in _NOT_FOUND else 'origin'}")
        if not self._head:
            request.setHeader(b"content-length", b"%d" % len(body))
            request.write(body)
        request.finish()
