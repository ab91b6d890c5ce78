"""
The parts of a store that any store with blocking primitives can share: a
pull producer that reads byte ranges into a consumer, and object writers
(streamed to a file, or held in memory and written in one go) whose blocking
steps run through the store's ``run_blocking``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IConsumer, IProducer, IPullProducer
from zope.interface import implementer

from ..interfaces import IObjectWriter, ShortObject

__all__ = ["CHUNK", "RangeProducer", "SmallWriter", "Writer", "temporary_file"]

#: Bytes read and written at a time.
CHUNK = 64 * 1024

RunBlocking = Callable[[Callable[[], Any]], Deferred[Any]]


def temporary_file(tmp_dir: str, bucket: str) -> tuple[int, str]:
    """
    A new temporary file ``<pid>.<bucket>.<random>.part`` in ``tmp_dir``,
    open for writing (blocking): the name a store's sweep of a process's
    leftovers looks for.  The folder is made again if it has gone since
    the sweep at start made it.
    """
    try:
        return tempfile.mkstemp(prefix=f"{os.getpid()}.{bucket}.", suffix=".part", dir=tmp_dir)
    except FileNotFoundError:
        os.makedirs(tmp_dir, exist_ok=True)
        return tempfile.mkstemp(prefix=f"{os.getpid()}.{bucket}.", suffix=".part", dir=tmp_dir)


@implementer(IPullProducer)
class RangeProducer:
    """
    Writes bytes ``start`` to ``end`` of an object into a consumer, one
    chunk each time the consumer asks for more, so memory stays bounded for
    any size and any reader's speed.  Never writes more than the range; an
    object that turns out shorter fails the Deferred with :class:`ShortObject`.
    """

    def __init__(self, read: Callable[[int, int], bytes], consumer: IConsumer, start: int, end: int) -> None:
        self._read = read
        self._consumer: IConsumer | None = consumer
        self._offset = start
        self._end = end
        self._sent = 0
        self._deferred: Deferred[int] = Deferred(self._cancel)

    def start(self) -> Deferred[int]:
        """Register with the consumer; the Deferred fires with the byte count once the range is written."""
        assert self._consumer is not None
        self._consumer.registerProducer(self, False)
        return self._deferred

    def resumeProducing(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        want = min(CHUNK, self._end - self._offset)
        if want <= 0:
            self._finish(None)
            return
        data = self._read(self._offset, want)
        if len(data) < want:
            self._finish(ShortObject(f"{want - len(data)} byte(s) missing at {self._offset + len(data)}"))
            return
        self._offset += want
        self._sent += want
        consumer.write(data)

    def _cancel(self, d: Deferred[int]) -> None:
        self.stopProducing()

    def stopProducing(self) -> None:
        """The consumer is gone: stop, and fail the Deferred with CancelledError."""
        if self._consumer is not None:
            self._consumer = None
            if not self._deferred.called:
                self._deferred.errback(CancelledError())

    def _finish(self, error: Exception | None) -> None:
        consumer, self._consumer = self._consumer, None
        assert consumer is not None
        consumer.unregisterProducer()
        if error is None:
            self._deferred.callback(self._sent)
        else:
            self._deferred.errback(error)


class _Blocking(Protocol):
    """A store's own blocking writer (a temporary file)."""

    @property
    def size(self) -> int: ...

    @property
    def path(self) -> str | None:
        """The temporary file the bytes go to (None: held in memory)."""

    def write(self, data: bytes) -> None: ...

    def commit(self, meta: Mapping[str, str], mtime: float | None) -> None: ...

    def abort(self) -> None: ...


class _Consumer:
    """The consumer half of a writer: bytes are taken at once, so a producer is never paused."""

    producer: IProducer | None = None

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


@implementer(IObjectWriter)
class Writer(_Consumer):
    """Streams into a store's blocking writer; ``commit`` runs through ``run_blocking``."""

    def __init__(self, pending: _Blocking, run_blocking: RunBlocking) -> None:
        self._pending = pending
        self._run_blocking = run_blocking
        self.spool = pending.path

    @property
    def size(self) -> int:
        return self._pending.size

    def write(self, data: bytes) -> None:
        self._pending.write(data)

    def commit(self, meta: Mapping[str, str], mtime: float | None) -> Deferred[None]:
        pending = self._pending
        return self._run_blocking(lambda: pending.commit(meta, mtime))

    def abort(self) -> None:
        self._pending.abort()


@implementer(IObjectWriter)
class SmallWriter(_Consumer):
    """
    Holds a small body in memory; ``commit`` hands the whole of it to
    ``store_whole`` (write, make durable, publish), whose Deferred fires once
    it is stored.
    """

    def __init__(self, store_whole: Callable[[bytes, Mapping[str, str], float | None], Deferred[None]]) -> None:
        self._store_whole = store_whole
        self._chunks: list[bytes] = []
        self.size = 0
        self.spool = None

    def write(self, data: bytes) -> None:
        self._chunks.append(data)
        self.size += len(data)

    def commit(self, meta: Mapping[str, str], mtime: float | None) -> Deferred[None]:
        data, self._chunks = b"".join(self._chunks), []
        return self._store_whole(data, meta, mtime)

    def abort(self) -> None:
        self._chunks = []
