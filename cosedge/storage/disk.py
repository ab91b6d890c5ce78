"""
Object stores: where bucket objects live.

:class:`DiskStore` keeps every object as a plain file at
``<data_dir>/<bucket>/<key>`` so an operator can see and copy them.  Its own
files live under ``<data_dir>/.cosedge/`` — a name no bucket and no key can
reach — on the same file system, so that publishing a finished object is one
``rename``.

Metadata (the origin's Content-Type, ETag, …) is kept in an extended
attribute of the object file itself, written to the temporary file before the
rename: object and metadata become visible together, atomically, and a file
an operator copies in by hand is served with headers derived from the file.

Publishing order, which survives a crash at any point: write the temporary
file, ``fsync`` it, set its metadata and modification time, ``rename`` it into
place, ``fsync`` the directory.  Small objects are published in batches
(:mod:`cosedge.storage.group`): written with their metadata, made durable
together, renamed, their folders ``fsync``'d.  Leftover temporary files are
swept at start.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import stat
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any, TypeVar

from attrs import define, field
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IConsumer
from twisted.python.failure import Failure
from zope.interface import implementer

from ..interfaces import IObjectStore, IObjectWriter, IStoredObject, StoredEntry, StoreError
from .beneath import Unsupported, open_beneath
from .group import SYNCFS_FROM, GroupCommit, Small, syncfs
from .hot import HotFiles, HotObject
from .produce import RangeProducer, SmallWriter, Writer, temporary_file

__all__ = ["DiskStore", "META_XATTR", "SMALL_BODY"]

#: A body declared (Content-Length) this small or smaller is received in
#: memory and written, made durable and published in one go in the thread
#: pool: no file is created before the body is whole, and no disk write runs
#: on the reactor thread.  Memory: at most one such body per running fill.
SMALL_BODY = 256 * 1024

_T = TypeVar("_T")

META_XATTR = "user.cosedge.meta"
#: Files whose parsed metadata :class:`DiskStore` keeps (reading and parsing
#: the attribute again costs about 7 us per hit).
_META_CACHE_SIZE = 4096
#: Bucket folders :class:`DiskStore` remembers the path of, at most.
_MAX_ROOTS = 1024
_INTERNAL_DIR = ".cosedge"
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
# Reasons an object is simply not there (or not reachable without leaving
# the bucket): a missing file, a file where a folder is expected, a symlink.
_ABSENT = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EISDIR)
#: Segments that are not one file's name.
_NOT_NAMES = frozenset({"", ".", ".."})


@implementer(IStoredObject)
@define(eq=False)
class _DiskObject:
    fd: int
    size: int
    mtime: float
    _stat: os.stat_result = field(alias="stat", repr=False)
    meta: Mapping[str, str]

    @property
    def identity(self) -> str:
        """From the inode, modification time and size (made only when asked: most objects have an ETag)."""
        st = self._stat
        return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"

    def pread(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``, read now."""
        return os.pread(self.fd, length, offset)

    #: ``read`` at once, without a Deferred: what the hit path reads with
    #: (:mod:`cosedge.web.hit`, :class:`~cosedge.web.producers.Sender`).
    read_now = pread

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        return succeed(os.pread(self.fd, length, offset))

    def produce(self, consumer: IConsumer, start: int, end: int) -> Deferred[int]:
        return RangeProducer(self.pread, consumer, start, end).start()

    def fileno(self) -> int | None:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _file_path(segments: tuple[str, ...]) -> str | None:
    """The key's path below its bucket folder, or None for what is never an object (not plain file names)."""
    if not segments:
        return None
    path = "/".join(segments)
    if path.count("/") != len(segments) - 1 or "\0" in path or not _NOT_NAMES.isdisjoint(segments):
        return None
    return path


def _etag_of(path: str, st: os.stat_result) -> str:
    """The ETag a GET of the file at ``path`` answers with: the origin's, else one made from the file."""
    try:
        fd = os.open(path, _OPEN_FILE)
    except OSError:
        return ""
    try:
        etag = _read_meta(fd).get("etag")
    finally:
        os.close(fd)
    return etag or f'"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"'


def _read_meta(fd: int) -> dict[str, str]:
    try:
        raw = os.getxattr(fd, META_XATTR)
    except OSError:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        return {}
    if not isinstance(meta, dict):
        return {}
    return {str(k).lower(): str(v) for k, v in meta.items()}


@contextmanager
def _walk(root: str, segments: tuple[str, ...], create: bool = False) -> Iterator[int]:
    """
    Yield a descriptor of the folder ``root/segments...``, opening each level
    relative to the previous one without following symlinks, so that nothing
    outside ``root`` is ever reached.  With ``create``, missing folders are made.
    """
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        if not create:
            raise
        os.makedirs(root, exist_ok=True)
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for segment in segments:
            try:
                nfd = os.open(segment, _OPEN_DIR, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(segment, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                nfd = os.open(segment, _OPEN_DIR, dir_fd=fd)
            os.close(fd)
            fd = nfd
        yield fd
    finally:
        os.close(fd)


@define(eq=False)
class _DiskPending:
    """A file being written in the temporary folder (blocking calls: the thread pool's work)."""

    store: DiskStore
    bucket: str
    segments: tuple[str, ...]
    fd: int
    path: str
    size: int = 0
    _done: bool = field(default=False, alias="_done")

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
            self.size += written

    def commit(self, meta: Mapping[str, str], mtime: float | None) -> None:
        try:
            os.fsync(self.fd)
            self.describe(meta, mtime)
            self.publish(sync=True)
        finally:
            self.abort()

    def describe(self, meta: Mapping[str, str], mtime: float | None) -> None:
        """Set the file's metadata attribute and modification time."""
        os.setxattr(self.fd, META_XATTR, json.dumps(dict(meta), sort_keys=True).encode("utf-8"))
        if mtime is not None:
            os.utime(self.fd, (mtime, mtime))

    def publish(self, sync: bool) -> None:
        """Close the file and rename it into place (``sync``: then ``fsync`` its folder)."""
        os.close(self.fd)
        self.fd = -1
        with _walk(self.store.bucket_path(self.bucket), self.segments[:-1], create=True) as dfd:
            os.rename(self.path, self.segments[-1], dst_dir_fd=dfd)
            self._done = True
            if sync:
                os.fsync(dfd)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not self._done:
            self._done = True
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


@implementer(IObjectStore)
@define(eq=False)
class DiskStore:
    """
    Buckets as folders of plain files under ``data_dir``.

    The :class:`~cosedge.interfaces.IObjectStore` methods answer with
    Deferreds; opening and reading run at once, on the reactor thread (a hit
    costs no hand-off), and the blocking steps of a write (creating,
    ``fsync``, ``rename``) go through ``run_blocking``, which the daemon
    points at its thread pool.  The methods below them, ``open_file``,
    ``begin`` and the rest, are this store's own, blocking.
    """

    data_dir: str
    #: Runs a blocking call and returns a Deferred of its result: the
    #: daemon's thread pool, or (the default, for tests) at once.
    run_blocking: Callable[[Callable[[], Any]], Deferred[Any]] = field(default=maybeDeferred, repr=False)
    #: Parsed metadata of files opened lately, by what changes whenever a
    #: file or its attributes do: a replaced object is a new inode, and
    #: writing the file or its extended attribute moves its ctime.
    _meta: dict[tuple[int, ...], Mapping[str, str]] = field(factory=dict, init=False, repr=False)
    #: Each bucket's folder, by bucket name (names come from the configuration, not from clients).
    _roots: dict[str, str] = field(factory=dict, init=False, repr=False)
    #: Small objects' commits, batched (see :mod:`cosedge.storage.group`).
    _group: GroupCommit = field(init=False, repr=False)
    #: Small objects read lately, served again after one ``lstat`` (see :mod:`cosedge.storage.hot`).
    _hot: HotFiles = field(factory=HotFiles, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        # Through the attribute at each batch: tests point run_blocking elsewhere after construction.
        self._group = GroupCommit(self.store_batch, lambda work: self.run_blocking(work))

    @property
    def tmp_dir(self) -> str:
        return os.path.join(self.data_dir, _INTERNAL_DIR, "tmp")

    def bucket_path(self, bucket: str) -> str:
        # Bucket names are validated by the configuration (``[a-z0-9-]``).
        return os.path.join(self.data_dir, bucket)

    def _root(self, bucket: str) -> str:
        """:meth:`bucket_path`, remembered for :meth:`open`."""
        if len(self._roots) >= _MAX_ROOTS:
            self._roots.clear()
        root = self._roots[bucket] = self.bucket_path(bucket)
        return root

    # -- IObjectStore --

    def open(self, bucket: str, segments: tuple[str, ...]) -> Deferred[IStoredObject | None]:
        """
        Open an object: one ``openat2`` beneath the bucket folder where the
        kernel allows it (see :mod:`cosedge.storage.beneath`), else a walk of one
        ``openat`` per level; either way no symlink below the bucket folder
        is followed and nothing outside it is reached.  At once: the
        Deferred has fired when it is returned.
        """
        path = _file_path(segments)
        if path is None:
            return succeed(None)
        root = self._roots.get(bucket) or self._root(bucket)
        hot = self._hot.get(bucket, path, f"{root}/{path}")
        if hot is not None:
            return succeed(hot)
        try:
            try:
                fd = open_beneath(root, path, _OPEN_FILE)
            except Unsupported:
                with _walk(root, segments[:-1]) as dfd:
                    fd = os.open(segments[-1], _OPEN_FILE, dir_fd=dfd)
        except OSError as e:
            if e.errno in _ABSENT or e.errno == errno.EXDEV:  # EXDEV: openat2's "that leaves the folder"
                return succeed(None)
            error = StoreError(e.errno, e.strerror)
            error.__cause__ = e
            return fail(error)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                return succeed(None)
            key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
            meta = self._meta.get(key)
            if meta is None:
                meta = MappingProxyType(_read_meta(fd))  # shared by every open of the file: read-only
                if len(self._meta) >= _META_CACHE_SIZE:
                    self._meta.clear()
                self._meta[key] = meta
            hot = self._hot.keep(bucket, path, fd, st, meta)
        except BaseException:
            os.close(fd)
            raise
        if hot is not None:
            os.close(fd)
            return succeed(hot)
        return succeed(_DiskObject(fd, st.st_size, st.st_mtime, st, meta))

    def hot(self, bucket: str, segments: tuple[str, ...]) -> HotObject | None:
        """
        The object at ``segments`` if it is held in memory and its file is
        still the one it was read from (one ``lstat``), else None: then
        :meth:`open` says whether there is one.  Never any other I/O.
        """
        path = _file_path(segments)
        if path is None:
            return None
        return self._hot.get(bucket, path, f"{self._roots.get(bucket) or self._root(bucket)}/{path}")

    def absent(self, bucket: str, segments: tuple[str, ...]) -> bool:
        """
        True when there is surely no object at ``segments`` (one ``lstat``
        finds no file there: :meth:`open` finds none either), False when
        :meth:`open` must say.  Never any other I/O, and no descriptor: a
        process out of descriptors still learns a key is absent here, where
        :meth:`open` would fail.
        """
        path = _file_path(segments)
        if path is None:
            return True
        try:
            os.stat(f"{self._roots.get(bucket) or self._root(bucket)}/{path}", follow_symlinks=False)
        except OSError as e:
            return e.errno in (errno.ENOENT, errno.ENOTDIR)
        return False

    def writer(self, bucket: str, segments: tuple[str, ...], length: int | None = None) -> Deferred[IObjectWriter]:
        if length is not None and length <= SMALL_BODY:
            commit = self._group.commit
            return succeed(SmallWriter(lambda data, meta, mtime: commit(Small(bucket, segments, data, meta, mtime))))
        return self.run_blocking(lambda: Writer(self.begin(bucket, segments), self.run_blocking))

    def remove(self, bucket: str, segments: tuple[str, ...]) -> Deferred[bool]:
        removed = maybeDeferred(self.remove_file, bucket, segments)
        self._hot.drop(bucket, "/".join(segments))
        return removed

    def update_meta(self, bucket: str, segments: tuple[str, ...], changes: Mapping[str, str]) -> Deferred[bool]:
        key = "/".join(segments)
        self._hot.drop(bucket, key)

        def updated(result: _T) -> _T:
            # Opened meanwhile: the old attribute, maybe within one tick of the file system's clock.
            self._hot.drop(bucket, key)
            self._meta.clear()
            return result

        return self.run_blocking(lambda: self.update_meta_file(bucket, segments, changes)).addBoth(updated)

    def update_meta_file(self, bucket: str, segments: tuple[str, ...], changes: Mapping[str, str]) -> bool:
        """Merge ``changes`` into an object's metadata attribute and make it durable; False if not stored."""
        if not segments:
            return False
        try:
            with _walk(self.bucket_path(bucket), segments[:-1]) as dfd:
                fd = os.open(segments[-1], _OPEN_FILE, dir_fd=dfd)
        except OSError as e:
            if e.errno in _ABSENT:
                return False
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return False
            meta = {**_read_meta(fd), **changes}
            os.setxattr(fd, META_XATTR, json.dumps(meta, sort_keys=True).encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def list(
        self, bucket: str, prefix: str = "", marker: str = "", limit: int = 1000
    ) -> Deferred[builtins.list[StoredEntry]]:
        return self.run_blocking(lambda: self.list_files(bucket, prefix, marker, limit))

    def usage(self, bucket: str) -> Deferred[tuple[int, int]]:
        return self.run_blocking(lambda: self.count_files(bucket))

    def probe(self) -> Deferred[None]:
        # At once, as readiness has always been checked: a file, written and removed.
        return maybeDeferred(self.check_writable)

    def sweep(self, owner: int | None = None) -> Deferred[int]:
        return maybeDeferred(self.sweep_files, owner)

    # -- the disk's own, blocking --

    def store_batch(self, batch: builtins.list[Small]) -> builtins.list[BaseException | None]:
        """
        Write, make durable and publish small objects together (see
        :mod:`cosedge.storage.group`): each one's outcome, None when stored.
        """
        outcomes: builtins.list[BaseException | None] = [None] * len(batch)
        written: builtins.list[tuple[int, _DiskPending]] = []
        for index, small in enumerate(batch):
            pending = None
            try:
                pending = self.begin(small.bucket, small.segments)
                pending.write(small.data)
                pending.describe(small.meta, small.mtime)
                written.append((index, pending))
            except BaseException as e:
                outcomes[index] = e
                if pending is not None:
                    pending.abort()
        try:
            if written and (len(written) < SYNCFS_FROM or not syncfs(written[0][1].fd)):
                for _, pending in written:
                    os.fsync(pending.fd)
        except BaseException as e:
            for index, pending in written:
                pending.abort()
                outcomes[index] = e
            return outcomes
        folders: dict[tuple[str, tuple[str, ...]], builtins.list[int]] = {}
        for index, pending in written:
            try:
                pending.publish(sync=False)
                folders.setdefault((pending.bucket, pending.segments[:-1]), []).append(index)
            except BaseException as e:
                outcomes[index] = e
            finally:
                pending.abort()
        for (bucket, folder), indexes in folders.items():
            try:
                with _walk(self.bucket_path(bucket), folder) as dfd:
                    os.fsync(dfd)
            except OSError as e:
                for index in indexes:
                    outcomes[index] = e
        return outcomes

    def open_file(self, bucket: str, segments: tuple[str, ...]) -> _DiskObject | None:
        """:meth:`open`, blocking: the object or None.  :raises StoreError:"""
        got: builtins.list[Any] = []
        self.open(bucket, segments).addBoth(got.append)
        if isinstance(got[0], Failure):
            got[0].raiseException()
        return got[0]  # type: ignore[no-any-return]

    def begin(self, bucket: str, segments: tuple[str, ...]) -> _DiskPending:
        fd, path = temporary_file(self.tmp_dir, bucket)
        return _DiskPending(self, bucket, segments, fd, path)

    def remove_file(self, bucket: str, segments: tuple[str, ...]) -> bool:
        """Delete an object's file; True if there was one."""
        if not segments:
            return False
        try:
            with _walk(self.bucket_path(bucket), segments[:-1]) as dfd:
                st = os.stat(segments[-1], dir_fd=dfd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    return False
                os.unlink(segments[-1], dir_fd=dfd)
                os.fsync(dfd)
        except OSError as e:
            if e.errno in _ABSENT:
                return False
            raise
        return True

    def count_files(self, bucket: str) -> tuple[int, int]:
        """(object count, total bytes) of a bucket."""
        count = total = 0
        for dirpath, _dirs, files in os.walk(self.bucket_path(bucket)):
            for name in files:
                try:
                    st = os.lstat(os.path.join(dirpath, name))
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    count += 1
                    total += st.st_size
        return count, total

    def list_files(self, bucket: str, prefix: str, marker: str, limit: int) -> builtins.list[StoredEntry]:
        """
        Up to ``limit`` objects whose keys start with ``prefix`` and sort
        after ``marker``, in key order.  Only the folder the prefix names is
        walked; symlinks and special files are not objects.
        """
        root = self.bucket_path(bucket)
        folder = prefix.rpartition("/")[0]
        segments = tuple(folder.split("/")) if folder else ()
        if not _NOT_NAMES.isdisjoint(segments):
            return []
        found: builtins.list[tuple[str, str, os.stat_result]] = []
        for dirpath, _dirs, files in os.walk(os.path.join(root, *segments)):
            rel = os.path.relpath(dirpath, root)
            base = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            for name in files:
                key = base + name
                if not key.startswith(prefix) or key <= marker:
                    continue
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    found.append((key, path, st))
        found.sort(key=lambda e: e[0])
        # The ETag (one read of the metadata) only for the objects returned.
        return [StoredEntry(key, st.st_size, st.st_mtime, _etag_of(path, st)) for key, path, st in found[:limit]]

    def check_writable(self) -> None:
        """
        Write a byte through the temporary-file path, with the metadata
        attribute, and throw it away.  :raises StoreError: saying what is
        wrong (a file system without user extended attributes fails every fill).
        """
        try:
            pending = self.begin(".readyz", ("probe",))
        except OSError as e:
            raise StoreError(f"data directory not writable: {e}") from e
        try:
            try:
                pending.write(b"ok")
            except OSError as e:
                raise StoreError(f"data directory not writable: {e}") from e
            try:
                os.setxattr(pending.fd, META_XATTR, b"{}")
            except OSError as e:
                message = f"data directory has no user extended attributes (object metadata needs them): {e}"
                raise StoreError(message) from e
        finally:
            pending.abort()

    def sweep_files(self, owner: int | None = None) -> int:
        """Remove leftover temporary files; return how many (``owner``: only that process's)."""
        # Temporary files are named "<pid>.<bucket>.<random>.part".
        os.makedirs(self.tmp_dir, exist_ok=True)
        removed = 0
        for entry in os.scandir(self.tmp_dir):
            if owner is not None and not entry.name.startswith(f"{owner}."):
                continue
            try:
                os.unlink(entry.path)
                removed += 1
            except OSError:
                pass
        return removed
