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
place, ``fsync`` the directory.  Leftover temporary files are swept at start.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType

from attrs import define, field
from zope.interface import Attribute, Interface, implementer

from .beneath import Unsupported, open_beneath

__all__ = [
    "DiskStore",
    "IObjectStore",
    "IPendingObject",
    "IStoredObject",
    "META_XATTR",
    "StoreError",
]

META_XATTR = "user.cosedge.meta"
#: Files whose parsed metadata :class:`DiskStore` keeps (reading and parsing
#: the attribute again costs about 7 us per hit).
_META_CACHE_SIZE = 4096
_INTERNAL_DIR = ".cosedge"
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
# Reasons an object is simply not there (or not reachable without leaving
# the bucket): a missing file, a file where a folder is expected, a symlink.
_ABSENT = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EISDIR)
#: Segments that are not one file's name.
_NOT_NAMES = frozenset({"", ".", ".."})


class StoreError(OSError):
    """The store failed for a reason other than a missing object."""


class IStoredObject(Interface):
    """An open, immutable view of one stored object."""

    size = Attribute("Length in bytes, from fstat of the open descriptor.")
    mtime = Attribute("Modification time (POSIX seconds).")
    identity = Attribute("A string that changes whenever the object is replaced.")
    meta = Attribute("Kept origin headers: lowercase name -> value.")

    def read(offset: int, length: int) -> bytes:
        """Read up to ``length`` bytes at ``offset`` (short only at the end)."""

    def fileno() -> int | None:
        """The descriptor, for sendfile; None when there is none."""

    def close() -> None:
        """Release the object."""


class IPendingObject(Interface):
    """An object being written; invisible until :meth:`commit`."""

    size = Attribute("Bytes written so far.")

    def write(data: bytes) -> None:
        """Append bytes.  :raises OSError: on a disk error (ENOSPC …)."""

    def commit(meta: Mapping[str, str], mtime: float | None) -> None:
        """Make the object visible under its key, with ``meta``, atomically."""

    def abort() -> None:
        """Discard it; leaves nothing behind.  Safe to call more than once."""


class IObjectStore(Interface):
    """Where bucket objects are stored."""

    def open(bucket: str, segments: tuple[str, ...]) -> IStoredObject | None:
        """The object, or None if there is none.  :raises StoreError:"""

    def begin(bucket: str, segments: tuple[str, ...]) -> IPendingObject:
        """Start writing an object.  :raises OSError:"""

    def remove(bucket: str, segments: tuple[str, ...]) -> bool:
        """Delete an object; True if there was one."""

    def usage(bucket: str) -> tuple[int, int]:
        """(object count, total bytes) of a bucket."""

    def sweep(owner: int | None = None) -> int:
        """
        Remove leftover temporary files; return how many.  With ``owner``
        (a process id), only those that process was writing.
        """


@implementer(IStoredObject)
@define(eq=False)
class _DiskObject:
    fd: int
    size: int
    mtime: float
    identity: str
    meta: Mapping[str, str]

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def fileno(self) -> int | None:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


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


@implementer(IPendingObject)
@define(eq=False)
class _DiskPending:
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
            os.setxattr(self.fd, META_XATTR, json.dumps(dict(meta), sort_keys=True).encode("utf-8"))
            if mtime is not None:
                os.utime(self.fd, (mtime, mtime))
            os.close(self.fd)
            self.fd = -1
            with _walk(self.store.bucket_path(self.bucket), self.segments[:-1], create=True) as dfd:
                os.rename(self.path, self.segments[-1], dst_dir_fd=dfd)
                self._done = True
                os.fsync(dfd)
        finally:
            self.abort()

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
    """Buckets as folders of plain files under ``data_dir``."""

    data_dir: str
    #: Parsed metadata of files opened lately, by what changes whenever a
    #: file or its attributes do: a replaced object is a new inode, and
    #: writing the file or its extended attribute moves its ctime.
    _meta: dict[tuple[int, ...], Mapping[str, str]] = field(factory=dict, init=False, repr=False)

    @property
    def tmp_dir(self) -> str:
        return os.path.join(self.data_dir, _INTERNAL_DIR, "tmp")

    def bucket_path(self, bucket: str) -> str:
        # Bucket names are validated by the configuration (``[a-z0-9-]``).
        return os.path.join(self.data_dir, bucket)

    def open(self, bucket: str, segments: tuple[str, ...]) -> _DiskObject | None:
        """
        Open an object: one ``openat2`` beneath the bucket folder where the
        kernel allows it (see :mod:`cosedge.storage.beneath`), else a walk of one
        ``openat`` per level; either way no symlink below the bucket folder
        is followed and nothing outside it is reached.
        """
        if not segments:
            return None
        path = "/".join(segments)
        if path.count("/") != len(segments) - 1 or "\0" in path or not _NOT_NAMES.isdisjoint(segments):
            return None  # not plain file names (keys never are): never an object
        root = self.bucket_path(bucket)
        try:
            try:
                fd = open_beneath(root, path, _OPEN_FILE)
            except Unsupported:
                with _walk(root, segments[:-1]) as dfd:
                    fd = os.open(segments[-1], _OPEN_FILE, dir_fd=dfd)
        except OSError as e:
            if e.errno in _ABSENT or e.errno == errno.EXDEV:  # EXDEV: openat2's "that leaves the folder"
                return None
            raise StoreError(e.errno, e.strerror) from e
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                return None
            key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
            meta = self._meta.get(key)
            if meta is None:
                meta = MappingProxyType(_read_meta(fd))  # shared by every open of the file: read-only
                if len(self._meta) >= _META_CACHE_SIZE:
                    self._meta.clear()
                self._meta[key] = meta
        except BaseException:
            os.close(fd)
            raise
        identity = f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"
        return _DiskObject(fd, st.st_size, st.st_mtime, identity, meta)

    def begin(self, bucket: str, segments: tuple[str, ...]) -> _DiskPending:
        try:
            fd, path = tempfile.mkstemp(prefix=f"{os.getpid()}.{bucket}.", suffix=".part", dir=self.tmp_dir)
        except FileNotFoundError:  # made by sweep() at start; removed since
            os.makedirs(self.tmp_dir, exist_ok=True)
            fd, path = tempfile.mkstemp(prefix=f"{os.getpid()}.{bucket}.", suffix=".part", dir=self.tmp_dir)
        return _DiskPending(self, bucket, segments, fd, path)

    def remove(self, bucket: str, segments: tuple[str, ...]) -> bool:
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

    def usage(self, bucket: str) -> tuple[int, int]:
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

    def sweep(self, owner: int | None = None) -> int:
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
