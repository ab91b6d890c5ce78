"""
Claims on keys shared by every process of one daemon, so that a key missed
in several worker processes at once is still fetched from its origin once.

A claim is a POSIX byte-range lock (``fcntl(F_SETLK)``) on one byte of one
file, ``<data_dir>/.cosedge/claims``, at an offset derived from the key: no
file per key, nothing to clean up, and the kernel releases every claim of a
process that dies.  Within a process the filler already runs each key once,
so a claim only has to exclude *other* processes, which is exactly what
POSIX locks do.

The lock file is opened once per process and never closed while claims are
held: closing *any* descriptor of it would drop all of the process's locks.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct

__all__ = ["Claims"]

#: ``struct flock`` on 64-bit Linux: type, whence, start, len, pid (and padding).
_FLOCK = "hhqqi4x"
#: Whether this platform's ``struct flock`` has that size (elsewhere :meth:`Claims.holder` names nobody).
_FLOCK_FITS = struct.calcsize(_FLOCK) == 32

#: Offsets stay below 2**62, well inside ``off_t``.
_OFFSET_BITS = 62


def _offset(bucket: str, segments: tuple[str, ...]) -> int:
    digest = hashlib.blake2b("/".join((bucket, *segments)).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> (64 - _OFFSET_BITS)


class Claims:
    """Non-blocking, cross-process claims on ``(bucket, segments)`` keys."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def _file(self) -> int:
        if self._fd is None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return self._fd

    def claim(self, bucket: str, segments: tuple[str, ...]) -> bool:
        """
        Claim a key; False when another process holds it.

        :raises OSError: when the lock file cannot be used.
        """
        try:
            fcntl.lockf(self._file(), fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _offset(bucket, segments))
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise
        return True

    def holder(self, bucket: str, segments: tuple[str, ...]) -> int | None:
        """
        The pid of the *other* process that holds a key's claim (``F_GETLK``),
        or None: nobody, this process, or a platform whose ``struct flock``
        this module does not know.
        """
        if not _FLOCK_FITS:
            return None
        asked = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, _offset(bucket, segments), 1, 0)
        try:
            answer = fcntl.fcntl(self._file(), fcntl.F_GETLK, asked)
        except OSError:
            return None
        kind, _, _, _, pid = struct.unpack(_FLOCK, answer)
        return None if kind == fcntl.F_UNLCK or pid <= 0 else int(pid)

    def release(self, bucket: str, segments: tuple[str, ...]) -> None:
        """Give a claim up (a no-op for a key not claimed)."""
        if self._fd is not None:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, _offset(bucket, segments))

    def close(self) -> None:
        """Release every claim of this process."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
