"""
An object store in memory: the test double shipped with cosedge (as
``treq.testing`` ships its fakes), and the model of what a store must do.
"""

from __future__ import annotations

import builtins
import errno
import os
from collections.abc import Mapping

from attrs import define, field
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IConsumer
from zope.interface import implementer

from ..interfaces import IObjectStore, IObjectWriter, IStoredObject, StoredEntry
from .produce import RangeProducer, Writer

__all__ = ["MemoryStore"]


@implementer(IStoredObject)
@define(eq=False)
class _MemoryObject:
    data: bytes
    mtime: float
    identity: str
    meta: Mapping[str, str]
    closed: bool = False

    @property
    def size(self) -> int:
        return len(self.data)

    def pread(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]

    #: ``read`` at once, without a Deferred: what the hit path reads with
    #: (:mod:`cosedge.web.hit`, :class:`~cosedge.web.producers.Sender`).
    read_now = pread

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        return succeed(self.data[offset : offset + length])

    def produce(self, consumer: IConsumer, start: int, end: int) -> Deferred[int]:
        return RangeProducer(self.pread, consumer, start, end).start()

    def fileno(self) -> int | None:
        return None

    def close(self) -> None:
        self.closed = True


@define(eq=False)
class _MemoryPending:
    store: MemoryStore
    bucket: str
    segments: tuple[str, ...]
    buffer: bytearray = field(factory=bytearray)
    done: bool = False
    path: str | None = None  # in memory: no file

    @property
    def size(self) -> int:
        return len(self.buffer)

    def write(self, data: bytes) -> None:
        limit = self.store.disk_limit
        if limit is not None and self.store.used + len(self.buffer) + len(data) > limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.buffer += data

    def commit(self, meta: Mapping[str, str], mtime: float | None) -> None:
        self.store.put(self.bucket, self.segments, bytes(self.buffer), dict(meta), mtime or 0.0)
        self.abort()

    def abort(self) -> None:
        if not self.done:
            self.done = True
            self.store.pending.remove(self)


@implementer(IObjectStore)
@define(eq=False)
class MemoryStore:
    """
    An :class:`~cosedge.storage.disk.IObjectStore` in memory.

    :ivar pending: objects being written (a clean miss leaves none).
    :ivar disk_limit: total bytes after which writes fail with ENOSPC.
    """

    objects: dict[tuple[str, tuple[str, ...]], _MemoryObject] = field(factory=dict)
    pending: list[_MemoryPending] = field(factory=list)
    disk_limit: int | None = None
    _version: int = 0

    @property
    def used(self) -> int:
        return sum(o.size for o in self.objects.values())

    def put(
        self,
        bucket: str,
        segments: tuple[str, ...],
        data: bytes,
        meta: Mapping[str, str] | None = None,
        mtime: float = 0.0,
    ) -> None:
        """Store an object directly."""
        self._version += 1
        self.objects[(bucket, segments)] = _MemoryObject(data, mtime, f"m{self._version}", dict(meta or {}))

    def get(self, bucket: str, key: str) -> bytes | None:
        """The stored bytes of ``bucket``/``key``, or None."""
        obj = self.objects.get((bucket, tuple(key.split("/"))))
        return None if obj is None else obj.data

    def open(self, bucket: str, segments: tuple[str, ...]) -> Deferred[IStoredObject | None]:
        obj = self.objects.get((bucket, segments))
        if obj is None:
            return succeed(None)
        return succeed(_MemoryObject(obj.data, obj.mtime, obj.identity, obj.meta))

    def writer(self, bucket: str, segments: tuple[str, ...], length: int | None = None) -> Deferred[IObjectWriter]:
        return succeed(Writer(self.begin(bucket, segments), maybeDeferred))

    def begin(self, bucket: str, segments: tuple[str, ...]) -> _MemoryPending:
        """Start writing an object, blocking-style (what :meth:`writer` wraps)."""
        pending = _MemoryPending(self, bucket, segments)
        self.pending.append(pending)
        return pending

    def remove(self, bucket: str, segments: tuple[str, ...]) -> Deferred[bool]:
        return succeed(self.objects.pop((bucket, segments), None) is not None)

    def update_meta(self, bucket: str, segments: tuple[str, ...], changes: Mapping[str, str]) -> Deferred[bool]:
        obj = self.objects.get((bucket, segments))
        if obj is None:
            return succeed(False)
        obj.meta = {**obj.meta, **changes}
        return succeed(True)

    def list(
        self, bucket: str, prefix: str = "", marker: str = "", limit: int = 1000
    ) -> Deferred[builtins.list[StoredEntry]]:
        entries = sorted(
            (
                StoredEntry("/".join(segments), obj.size, obj.mtime, obj.meta.get("etag") or f'"{obj.identity}"')
                for (name, segments), obj in self.objects.items()
                if name == bucket
            ),
            key=lambda e: e.key,
        )
        return succeed([e for e in entries if e.key.startswith(prefix) and e.key > marker][:limit])

    def usage(self, bucket: str) -> Deferred[tuple[int, int]]:
        sizes = [o.size for (b, _), o in self.objects.items() if b == bucket]
        return succeed((len(sizes), sum(sizes)))

    def probe(self) -> Deferred[None]:
        if self.disk_limit is not None and self.used >= self.disk_limit:
            return fail(OSError(errno.ENOSPC, "No space left on device"))
        return succeed(None)

    def sweep(self, owner: int | None = None) -> Deferred[int]:
        if owner is not None and owner != os.getpid():
            return succeed(0)  # everything pending here is this process's
        count = len(self.pending)
        for p in list(self.pending):
            p.abort()
        return succeed(count)
