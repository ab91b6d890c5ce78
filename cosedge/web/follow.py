"""
A mirror answer read from a fill's file as the fill writes it
(:mod:`cosedge.fill.partial`): for a client that came after the origin had
answered, fell too far behind the stream, or reached a worker process other
than the one filling the key.  It gets the bytes as they arrive, as the
clients reading the stream do, instead of waiting for the whole object to be
stored.

:class:`Follower` is a push producer on the client's connection: it reads
the next chunk of the file whenever the connection has room and the file has
it; when it has caught up with the fill it looks again every
:data:`POLL` seconds.  The response ends once the range (or the whole
length) is sent.  The fill fails (its name withdrawn with the file still
short), or the file stops growing for ``stall`` seconds: the connection is
closed, so the client sees a short body, never a wrong one — as a client of
the stream would.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.web.server import Request
from zope.interface import implementer

from ..fill.partial import Partial
from .mirror import cut

__all__ = ["POLL", "Follower"]

_log = Logger(namespace="cosedge.web")

#: Seconds between two looks at a file that has nothing new.
POLL = 0.02
#: Bytes read and written at a time (the connection pauses the producer when its buffer is full).
CHUNK = 256 * 1024


@implementer(IPushProducer)
class Follower:
    """Sends bytes ``start`` to ``end`` of a fill under way to one client (see the module's docstring)."""

    def __init__(
        self,
        request: Request,
        partial: Partial,
        start: int,
        end: int,
        clock: IReactorTime,
        stall: float,
        count: Callable[[str], None],
    ) -> None:
        self._request = request
        self._partial = partial
        self._offset = start
        self._end = end
        self._clock = clock
        self._stall = stall
        self._count = count
        self._paused = False
        self._done = False
        self._timer: IDelayedCall | None = None
        self._grew_at = clock.seconds()

    def start(self) -> None:
        """Register with the client's connection and send what there is."""
        self._count("mirror_followed")
        self._request.notifyFinish().addBoth(lambda _: self.stopProducing())
        self._request.registerProducer(self, True)
        self._pump()

    # -- IPushProducer --

    def pauseProducing(self) -> None:
        self._paused = True
        self._cancel_timer()

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        """The client has gone (or the response is over): stop reading."""
        self._end_with(None)

    # -- the rest --

    def _pump(self) -> None:
        self._timer = None
        try:
            self._send()
        except OSError as e:  # the file cannot be read (EIO, say): the client must not wait for ever
            self._fail(f"cannot read the fill's file: {e}")

    def _send(self) -> None:
        partial = self._partial
        while not (self._paused or self._done):
            if self._offset >= self._end:
                self._end_with(self._finish)
                return
            have = min(self._end, partial.size())
            if have > self._offset:
                data = partial.read(self._offset, min(CHUNK, have - self._offset))
                if not data:
                    break
                self._offset += len(data)
                self._grew_at = self._clock.seconds()
                self._request.write(data)  # may pause this producer
                continue
            # Caught up with the fill: is it still under way?  (Its bytes are
            # written before its name is withdrawn, so a withdrawn name and a
            # file still short mean the fill failed.)
            if not partial.published() and partial.size() < self._end:
                self._fail("the fill failed")
                return
            if self._clock.seconds() - self._grew_at > self._stall:
                self._fail(f"no new byte for {self._stall:g}s")
                return
            break
        if not (self._paused or self._done):
            self._timer = self._clock.callLater(POLL, self._pump)

    def _fail(self, why: str) -> None:
        _log.warn(
            "mirror answer of {uri!r} cut short at byte {offset}: {why}",
            uri=self._request.uri,
            offset=self._offset,
            why=why,
        )
        self._end_with(cut)

    def _finish(self, request: Request) -> None:
        request.unregisterProducer()
        request.finish()

    def _end_with(self, ending: Callable[[Request], None] | None) -> None:
        if self._done:
            return
        self._done = True
        self._cancel_timer()
        self._partial.close()
        if ending is not None and not self._request.finished and self._request.channel is not None:
            ending(self._request)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
