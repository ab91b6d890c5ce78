"""
Hot small objects of the disk store, kept in memory (issue 15).

A hit of a small object costs an ``openat2``, an ``fstat``, a ``pread`` and a
``close`` (about 10 us of a 75 us hit, in process).  :class:`HotFiles` keeps
the bytes and metadata of small objects read lately; a hit of one costs a
single ``lstat`` of its path, whose result must match the file's identity
when it was read — device, inode, modification and change times to the
nanosecond, size — or the entry is dropped and the file opened as usual.

So, unlike nginx's ``open_file_cache`` (trusted for ``open_file_cache_valid``
seconds), there is no window in which a replaced object is served stale: a
fill, refresh or purge by this process or another (a worker, an operator's
``cp``) replaces the file (a new inode) or changes its change time, and the
next hit sees it.  The one change the check cannot see is a rewrite in place
of the same size, metadata and times within the file system's timestamp
granularity; cosedge never writes in place (it renames), and its own
metadata updates drop the entry explicitly.

The path's ``lstat`` follows symlinks in the folders above the file, but
what is served is only ever the file first opened safely beneath the bucket
folder: a path that now leads elsewhere names another inode, and misses.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping

from attrs import field, frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer
from zope.interface import implementer

from ..interfaces import IStoredObject
from .produce import RangeProducer

__all__ = ["HOT_BYTES", "HOT_SIZE", "HotFiles", "HotObject"]

#: Objects this small or smaller are kept (the usual web page, script, style sheet, icon).
HOT_SIZE = 128 * 1024
#: Bytes of them kept per process, at most (the least recently used go first), each counted with
#: its key and metadata and :data:`ENTRY_COST` more for the entry itself.
HOT_BYTES = 32 * 1024 * 1024
#: What an entry costs beyond its bytes, key and metadata (the stat result, tuples, dict slots):
#: measured ~1.8 KiB with typical metadata, of which the metadata is counted apart.
ENTRY_COST = 1024

#: A file's identity: ``(st_dev, st_ino, st_mtime_ns, st_ctime_ns, st_size)``.
Identity = tuple[int, int, int, int, int]


def identity_of(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)


@implementer(IStoredObject)
@frozen
class HotObject:
    """A small object's bytes and metadata, in memory: shared by every hit (nothing to close)."""

    data: bytes
    mtime: float
    meta: Mapping[str, str]
    _stat: os.stat_result
    #: What a server makes of the object once and reuses for every hit, by name (the web layer keeps
    #: its answer's header lines here): it lives and goes with the object.
    derived: dict[str, bytes] = field(factory=dict, eq=False, repr=False)

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def identity(self) -> str:
        st = self._stat
        return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"

    def read_now(self, offset: int, length: int) -> bytes:
        data = self.data
        return data if offset == 0 and length >= len(data) else data[offset : offset + length]  # whole: no copy

    pread = read_now

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        return succeed(self.data[offset : offset + length])

    def produce(self, consumer: IConsumer, start: int, end: int) -> Deferred[int]:
        return RangeProducer(self.read_now, consumer, start, end).start()

    def fileno(self) -> int | None:
        return None

    def close(self) -> None:
        pass


class HotFiles:
    """The hot objects of one store, by ``(bucket, key)``; reactor thread only."""

    def __init__(self, limit: int = HOT_BYTES) -> None:
        self._limit = limit
        self._entries: OrderedDict[tuple[str, str], tuple[Identity, HotObject, int]] = OrderedDict()
        self._bytes = 0

    def get(self, bucket: str, key: str, path: str) -> HotObject | None:
        """The object kept for ``key`` if the file at ``path`` is still the one it was read from."""
        entry = self._entries.get((bucket, key))
        if entry is None:
            return None
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError:
            self.drop(bucket, key)
            return None
        if identity_of(st) != entry[0]:
            self.drop(bucket, key)
            return None
        self._entries.move_to_end((bucket, key))
        return entry[1]

    def keep(self, bucket: str, key: str, fd: int, st: os.stat_result, meta: Mapping[str, str]) -> HotObject | None:
        """Read a small regular file whole and keep it (None: it is not small, or changed while read)."""
        cost = st.st_size + len(bucket) + len(key) + sum(len(k) + len(v) for k, v in meta.items()) + ENTRY_COST
        if st.st_size > HOT_SIZE or cost > self._limit:
            return None
        data = os.pread(fd, st.st_size, 0)
        if len(data) != st.st_size:
            return None
        hot = HotObject(data, st.st_mtime, meta, st)
        self.drop(bucket, key)
        self._entries[(bucket, key)] = (identity_of(st), hot, cost)
        self._bytes += cost
        while self._bytes > self._limit:
            _, (_, _, old) = self._entries.popitem(last=False)
            self._bytes -= old
        return hot

    def drop(self, bucket: str, key: str) -> None:
        entry = self._entries.pop((bucket, key), None)
        if entry is not None:
            self._bytes -= entry[2]
