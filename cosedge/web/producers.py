"""
Sending a large response body: the object produces each byte range into a
:class:`Sender`, which passes the bytes on to the request (with the part
headers of a multipart answer) and counts them.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IConsumer, IProducer, IPullProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from ..interfaces import IStoredObject, ShortObject
from ..stats import Stats
from ..storage.produce import CHUNK

__all__ = ["SMALL_RESPONSE", "Sender", "drop_short_response"]

_log = Logger(namespace="cosedge.web")

#: A response body this long or shorter is sent in one write, without a producer.
SMALL_RESPONSE = 64 * 1024


def drop_short_response(request: Request) -> None:
    """
    The object turned out shorter than its length: drop the connection, so
    the client cannot take a short body for a whole one.
    """
    _log.warn("object shrank while being served; dropping the connection")
    request.channel.transport.abortConnection()  # type: ignore[union-attr]


@implementer(IPullProducer, IConsumer)
class Sender:
    """
    Sends byte ranges of an open object.  Registered once with the request
    as its producer, it asks the object to produce each range into it in
    turn (:meth:`IStoredObject.produce`), writing a part's header before its
    first bytes and the closing boundary at the end.  The object's producer
    reads only when the request asks for more, so memory stays bounded for
    any object size or client speed; never more is sent than the ranges say,
    and an object that turns out shorter drops the connection.

    An object whose producer is a streaming one (a network store's, which
    writes as the bytes arrive) makes the Sender one too: the client
    connection's pauses and resumes then go through to it.

    An object whose class has ``read_now`` (see :mod:`cosedge.web.hit`) is
    read here instead, a chunk at each request for more, just as its
    producer would (the same chunks, the same calls of ``resumeProducing``)
    but without a producer and a Deferred for each range.
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
        self._prefix = b""
        self._inner: IProducer | None = None
        self._channel: Any = None
        self._read_now: Any = getattr(type(obj), "read_now", None)
        #: The rest of the range being read by ``read_now``: ``[_offset, _end)``.
        self._offset = self._end = 0
        #: Registered with the request as a streaming producer (the object's producer is one).
        self._streaming = False

    def start(self) -> None:
        request = self._request
        assert request is not None
        # The channel the producer is registered with; a request forgets it
        # when its connection is lost, before telling us.
        self._channel = request.channel
        request.notifyFinish().addErrback(self._lost)
        request.registerProducer(self, False)
        self._next_part()

    # -- the request's producer --

    def resumeProducing(self) -> None:
        request = self._request
        if request is None:
            return
        read_now = self._read_now
        if read_now is None:
            if self._inner is not None:
                self._inner.resumeProducing()  # type: ignore[attr-defined]
            return
        want = min(CHUNK, self._end - self._offset)
        if want <= 0:  # the range is sent: the next, or the end (on a call of its own, as a producer ends)
            self._next_part()
            return
        data: bytes = read_now(self._obj, self._offset, want)
        if len(data) < want:
            self._done(request)
            drop_short_response(request)
            return
        self._offset += want
        self.write(data)

    def stopProducing(self) -> None:
        if self._request is not None:
            self._request = None
            self._stop_inner()
            self._obj.close()

    # -- the object's consumer --

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        self._inner = producer
        request = self._request
        if streaming and not self._streaming and request is not None:
            # A streaming producer (a network store's, writing as the bytes
            # arrive) is paused and resumed by the transport through us;
            # driven as a pull producer, HTTPChannel's cooperator would call
            # it in a busy loop while it waits for the network.
            self._streaming = True
            request.unregisterProducer()
            request.registerProducer(self, True)

    def pauseProducing(self) -> None:
        """The client's transport is full (once a streaming producer has made us one)."""
        if self._inner is not None:
            self._inner.pauseProducing()  # type: ignore[attr-defined]

    def unregisterProducer(self) -> None:
        self._inner = None

    def write(self, data: bytes) -> None:
        request = self._request
        if request is None:
            return
        out, self._prefix = self._prefix + data if self._prefix else data, b""
        self._stats.inc("bytes_served", len(data))
        request.write(out)

    # -- internals --

    def _next_part(self, _sent: object = None) -> None:
        """Produce the next part, or end the response (also the callback of a part's Deferred)."""
        request = self._request
        if request is None:
            return
        if self._index == len(self._parts):
            if self._trailer:
                request.write(self._trailer)
            self._done(request)
            request.finish()
            return
        self._prefix, start, end = self._parts[self._index]
        self._index += 1
        if self._read_now is not None:  # read by resumeProducing
            self._offset, self._end = start, end
        else:
            self._obj.produce(self, start, end).addCallbacks(self._next_part, self._part_failed)

    def _part_failed(self, failure: Failure) -> None:
        request = self._request
        if failure.check(CancelledError) or request is None:
            return
        self._done(request)
        if failure.check(ShortObject):
            drop_short_response(request)
        else:
            _log.failure("reading an object failed while it was being served", failure)
            request.channel.transport.abortConnection()  # type: ignore[union-attr]

    def _lost(self, reason: object) -> None:
        """The client went away mid-response: release the object and unregister."""
        if self._request is not None:
            self._request = None
            self._stop_inner()
            self._obj.close()
            if self._channel is not None:
                self._channel.unregisterProducer()

    def _stop_inner(self) -> None:
        inner, self._inner = self._inner, None
        if inner is not None:
            inner.stopProducing()

    def _done(self, request: Request) -> None:
        self._request = None
        self._obj.close()
        request.unregisterProducer()
