"""
Recently opened small objects of the S3 store, kept for a short, explicit
validity (``[storage] cache_validity``, as nginx's ``open_file_cache_valid``):
a hot object's hits within it need no request to the store.  Only objects
that came whole with their open (at most the first read's size) are kept,
up to ``cache_bytes`` in all, the least recently used dropped first.  This
store's own writes, purges and metadata changes drop a key at once; another
edge's are seen once the validity has passed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

from attrs import frozen
from twisted.internet.interfaces import IReactorTime

from .s3_objects import Ranged, S3Object

__all__ = ["RecentObjects"]


@frozen
class _Kept:
    at: float
    ranged: Ranged
    size: int
    mtime: float
    etag: str
    meta: Mapping[str, str]
    body: bytes


class RecentObjects:
    """Small objects by (store bucket, key), each for ``validity`` seconds after the store answered."""

    def __init__(self, clock: IReactorTime, validity: float, max_bytes: int) -> None:
        self._clock = clock
        self.validity = validity
        self.max_bytes = max_bytes
        self._kept: OrderedDict[tuple[str, str], _Kept] = OrderedDict()
        self._bytes = 0

    def get(self, where: tuple[str, str]) -> S3Object | None:
        """A new open object of ``where`` when one is kept and still valid; None otherwise."""
        kept = self._kept.get(where)
        if kept is None:
            return None
        if self._clock.seconds() - kept.at >= self.validity:
            self.drop(where)
            return None
        self._kept.move_to_end(where)
        return S3Object(kept.ranged, kept.size, kept.mtime, kept.etag, kept.meta, kept.body)

    def put(self, where: tuple[str, str], obj: S3Object) -> None:
        """Keep ``obj`` if it is whole in memory and fits (the store has just answered for it)."""
        if self.validity <= 0 or obj.size != len(obj.prefix) or obj.size > self.max_bytes:
            return
        self.drop(where)
        self._kept[where] = _Kept(
            self._clock.seconds(), obj._ranged, obj.size, obj.mtime, obj.etag, obj.meta, obj.prefix
        )
        self._bytes += obj.size
        while self._bytes > self.max_bytes:
            _, oldest = self._kept.popitem(last=False)
            self._bytes -= oldest.size

    def drop(self, where: tuple[str, str]) -> None:
        """Forget ``where`` (this store has written, removed or changed it)."""
        kept = self._kept.pop(where, None)
        if kept is not None:
            self._bytes -= kept.size

    def __len__(self) -> int:
        return len(self._kept)
