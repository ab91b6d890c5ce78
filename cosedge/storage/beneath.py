"""
Open a file beneath a folder in one system call, following no symlink.

Linux 5.6 added ``openat2(2)``, whose ``RESOLVE_BENEATH`` and
``RESOLVE_NO_SYMLINKS`` flags make the kernel itself refuse any path that
would leave the starting folder or pass through a symlink (``..`` past the
start fails with ``EXDEV``, a symlink at any level with ``ELOOP``).  That is
what :class:`cosedge.storage.disk.DiskStore` otherwise does by hand, one ``openat``
per folder level; here it is one call.

Python has no binding for it (up to 3.13), so it goes through libc's
``syscall`` with ctypes.  Where the kernel or a seccomp filter refuses the
call (``ENOSYS``, ``EPERM``, ``E2BIG``, ``EINVAL``), or the kernel asks for
a retry (``EAGAIN``, ``EINTR``), :class:`Unsupported` tells the caller to
take its portable path instead.  A refusal of a kind that cannot change
while the process runs (no such call, a filter refusing the very first call)
switches the fast path off for good, so a refused call is paid once.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from collections.abc import Callable

__all__ = ["Unsupported", "available", "open_beneath"]

#: The number of ``openat2`` on every architecture Linux numbers alike (all since 5.1, but alpha).
_NR_OPENAT2 = 437
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
# The starting folder: followed if it is a symlink (an operator may link a
# bucket folder to another disk); O_PATH since only lookups go through it.
# As in any path lookup, the folders need search (x) permission, not read.
_OPEN_ROOT = getattr(os, "O_PATH", 0) | os.O_DIRECTORY | os.O_CLOEXEC
#: The kernel or a filter refuses the call itself: use the portable path.
_REFUSED = frozenset({errno.ENOSYS, errno.EPERM, errno.E2BIG, errno.EINVAL})
#: Worth another try, by the portable path.
_RETRY = frozenset({errno.EAGAIN, errno.EINTR})


class Unsupported(Exception):
    """``openat2`` cannot answer this call; take the portable path."""


class _OpenHow(ctypes.Structure):
    """``struct open_how`` of ``<linux/openat2.h>``."""

    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_Syscall = Callable[[int, int, bytes, object, int], int]


def _load() -> _Syscall | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        syscall = libc.syscall
    except (OSError, AttributeError):
        return None
    syscall.restype = ctypes.c_long
    syscall.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t)
    return syscall  # type: ignore[no-any-return]


class _State:
    """Whether ``openat2`` is to be tried, and whether it has ever worked."""

    syscall: _Syscall | None = _load()
    worked = False
    hows: dict[int, tuple[object, int, _OpenHow]] = {}


def available() -> bool:
    """True while :func:`open_beneath` may use ``openat2`` (False once refused for good)."""
    return _State.syscall is not None


def _how(flags: int) -> tuple[object, int, _OpenHow]:
    """A reference to the ``open_how`` for ``flags``, its size, and the struct itself (kept alive)."""
    how = _State.hows.get(flags)
    if how is None:
        value = _OpenHow(flags, 0, _RESOLVE)
        how = _State.hows[flags] = (ctypes.byref(value), ctypes.sizeof(value), value)
    return how


def open_beneath(root: str, path: str, flags: int) -> int:
    """
    Open ``path`` (``/``-separated, relative) beneath the folder ``root``
    and return the descriptor.  ``root`` itself is followed if it is a
    symlink; no symlink (nor ``/proc`` magic link) below it is, and no
    ``..`` can climb above it.

    :raises OSError: the kernel's answer: ``ENOENT``, ``ENOTDIR``, ``ELOOP``
        (a symlink on the way), ``EXDEV`` (an escape), ``EACCES``, …
    :raises Unsupported: ``openat2`` cannot answer; nothing was opened.
    """
    syscall = _State.syscall
    if syscall is None:
        raise Unsupported()
    how, size, _ = _how(flags)
    name = os.fsencode(path)
    dir_fd = os.open(root, _OPEN_ROOT)
    try:
        fd = syscall(_NR_OPENAT2, dir_fd, name, how, size)
        if fd < 0:
            err = ctypes.get_errno()
    finally:
        os.close(dir_fd)
    if fd >= 0:
        _State.worked = True
        return fd
    if err in _REFUSED:
        if err in (errno.ENOSYS, errno.E2BIG) or not _State.worked:
            _State.syscall = None  # refused for good: never try again
        raise Unsupported(err)
    if err in _RETRY:
        raise Unsupported(err)
    raise OSError(err, os.strerror(err), path)
