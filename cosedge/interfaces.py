"""
The seams of the data path, as zope interfaces.

A store is asynchronous throughout: every call returns a Deferred, so a store
that talks to a network (an S3 gateway) implements the same interface as the
disk store.  The disk store answers with Deferreds that have already fired,
and the hit path then answers at once, in the same turn of the reactor (the
txacme ``ICertificateStore`` pattern).

Nothing outside :mod:`cosedge.storage` knows which store it has: web, fill and
admin code use these interfaces only.
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer
from zope.interface import Attribute, Interface

__all__ = [
    "IObjectStore",
    "IObjectWriter",
    "IStoredObject",
    "ShortObject",
    "StoreError",
    "StoredEntry",
]


class StoreError(OSError):
    """The store failed for a reason other than a missing object."""


class ShortObject(Exception):
    """An object turned out shorter than its size while it was being read."""


class IStoredObject(Interface):
    """An open, immutable view of one stored object."""

    size = Attribute("Length in bytes (for the disk store: fstat of the open descriptor).")
    mtime = Attribute("Modification time (POSIX seconds).")
    identity = Attribute("A string that changes whenever the object is replaced.")
    meta = Attribute("Kept origin headers: lowercase name -> value.")

    def read(offset: int, length: int) -> Deferred[bytes]:
        """
        Deferred of up to ``length`` bytes at ``offset`` (short only at the
        end of the object).  Meant for small bodies; use :meth:`produce` for
        large ones.
        """

    def produce(consumer: IConsumer, start: int, end: int) -> Deferred[int]:
        """
        Write bytes ``start`` to ``end`` (exclusive) into ``consumer``,
        registered with it as a producer so that the consumer's back-pressure
        holds the reading.  Deferred of the byte count; fails with
        :class:`ShortObject` if the object turns out shorter, and with
        ``CancelledError`` if the consumer stops it.
        """

    # Not part of the interface, an optional fast path: an object whose class
    # has ``read_now(offset, length) -> bytes`` (the disk and memory stores'
    # ``pread``) is read at once by the hit path, without a Deferred; a
    # network store's objects leave it out and are read through ``read``.

    def fileno() -> int | None:
        """A descriptor ``sendfile`` can read the object from; None when there is none."""

    def close() -> None:
        """Release the object."""


class IObjectWriter(IConsumer):  # type: ignore[misc]
    """
    An object being written; invisible until :meth:`commit`.  As a consumer
    it takes bytes with ``write`` and holds back a registered producer (the
    origin's response) when it cannot keep up.
    """

    size = Attribute("Bytes written so far.")
    spool = Attribute(
        "The local file that holds the bytes written so far, in order, readable as it grows"
        " by this machine's other processes (see :mod:`cosedge.fill.partial`); None when there is none."
    )

    def commit(meta: Mapping[str, str], mtime: float | None) -> Deferred[None]:
        """Deferred that fires once the object is visible under its key with ``meta``, atomically."""

    def abort() -> None:
        """Discard it; leaves nothing behind.  Safe to call more than once, and after a failed commit."""


class IObjectStore(Interface):
    """
    Where bucket objects are stored.  Every method returns a Deferred.

    Not part of the interface, an optional hook: a store that makes requests
    over the network has ``observe_requests(observer)``, and calls
    ``observer(operation, outcome, seconds)`` for each (the daemon's metrics).
    """

    def open(bucket: str, segments: tuple[str, ...]) -> Deferred[IStoredObject | None]:
        """Deferred of the :class:`IStoredObject`, or of None if there is none; fails with :class:`StoreError`."""

    def writer(bucket: str, segments: tuple[str, ...], length: int | None = None) -> Deferred[IObjectWriter]:
        """
        Deferred of an :class:`IObjectWriter` for a new version of the object
        (``length``: the size, when known; a store may hold a small object in
        memory and write it in one go).  Fails with ``OSError``.
        """

    def remove(bucket: str, segments: tuple[str, ...]) -> Deferred[bool]:
        """Deferred of True if an object was deleted, False if there was none."""

    def update_meta(bucket: str, segments: tuple[str, ...], changes: Mapping[str, str]) -> Deferred[bool]:
        """
        Merge ``changes`` into a stored object's metadata, durably (a
        revalidation's new check time); the bytes stay.  Deferred of False
        when there is no such object.
        """

    def list(
        bucket: str, prefix: str = "", marker: str = "", limit: int = 1000
    ) -> Deferred[builtins.list[StoredEntry]]:
        """
        Deferred of up to ``limit`` :class:`StoredEntry` values whose keys
        start with ``prefix`` and sort after ``marker``, in key order.
        """

    def usage(bucket: str) -> Deferred[tuple[int, int]]:
        """Deferred of (object count, total bytes) of a bucket."""

    def probe() -> Deferred[None]:
        """Deferred that fails, saying why, when the store cannot store objects now."""

    def sweep(owner: int | None = None) -> Deferred[int]:
        """
        Remove leftover temporary objects; Deferred of how many.  With
        ``owner`` (a process id), only those that process was writing.
        """


@frozen
class StoredEntry:
    """One object of a listing."""

    key: str
    size: int
    mtime: float
    #: The ETag a GET of the object answers with (quoted), or "" when the store does not say.
    etag: str = ""
