"""
Fills under way, readable from their temporary files by every process of
the daemon on this machine, so that a mirror client that comes late (after
the origin has answered), falls behind, or reaches another worker process
than the one filling the key is served the bytes as they arrive instead of
waiting for the whole object to be stored.

A mirror fill with a known length whose bytes go to a local file (the disk
store's temporary file, the S3 store's spool) *publishes* it: the file gets
an extended attribute with the length and the origin's headers, then a
second name, ``<data_dir>/.cosedge/partial/<digest>.<pid>`` (``digest``
from the key, ``pid`` the filling process).  A hard link, not a copy: the
bytes written so far are there at once, and a reader's descriptor keeps
them however the fill ends.  The fill *withdraws* the name once the object
is stored or has failed, so a reader that finds the name gone and the file
short knows the fill failed.

Another process finds the filler's pid from the key's claim
(:meth:`~cosedge.fill.claims.Claims.holder`), so only the fill that holds
the claim now is ever read; a name left by a process that was killed is
removed by the sweeps (the primary's start and stop, and a dead worker's).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from collections.abc import Mapping

from attrs import define, field
from twisted.logger import Logger

__all__ = ["PARTIAL_XATTR", "Partial", "Partials"]

_log = Logger(namespace="cosedge.fill")

#: The extended attribute on a published file: ``{"length": n, "meta": {...}}``.
PARTIAL_XATTR = "user.cosedge.partial"


def _digest(bucket: str, segments: tuple[str, ...]) -> str:
    return hashlib.blake2b("/".join((bucket, *segments)).encode("utf-8"), digest_size=16).hexdigest()


@define(eq=False)
class Partial:
    """A fill under way, opened for reading: its bytes so far, its final length, the origin's headers."""

    fd: int
    length: int
    meta: Mapping[str, str]
    #: The published name; gone once the fill has ended.
    link: str
    _inode: int = field(alias="inode")

    def size(self) -> int:
        """How many bytes the file has now."""
        return os.fstat(self.fd).st_size

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def published(self) -> bool:
        """Whether the fill is still under way (its name still leads to this file)."""
        try:
            return os.stat(self.link).st_ino == self._inode
        except OSError:
            return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@define
class Partials:
    """The folder of published fills (see the module's docstring); every call is a few quick syscalls."""

    directory: str
    pid: int = field(factory=os.getpid)
    _warned: bool = field(default=False, init=False)

    def _name(self, bucket: str, segments: tuple[str, ...], pid: int) -> str:
        return os.path.join(self.directory, f"{_digest(bucket, segments)}.{pid}")

    def publish(
        self, bucket: str, segments: tuple[str, ...], path: str, length: int, meta: Mapping[str, str]
    ) -> str | None:
        """Publish this process's fill writing ``path``; its published name, or None when it cannot be."""
        link = self._name(bucket, segments, self.pid)
        try:
            os.setxattr(path, PARTIAL_XATTR, json.dumps({"length": length, "meta": dict(meta)}).encode("utf-8"))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(link)  # a name a killed process of the same pid left
            try:
                os.link(path, link)
            except FileNotFoundError:
                os.makedirs(self.directory, exist_ok=True)
                os.link(path, link)
        except OSError as e:
            # Only late readers lose: they wait for the stored object instead.
            # Said once (a file system without user attributes, say), then quietly.
            log = _log.debug if self._warned else _log.warn
            self._warned = True
            log(
                "fill {key}: late mirror clients cannot read it as it is written ({error});"
                " they are served once it is stored",
                key="/".join(segments),
                error=e,
            )
            return None
        return link

    @staticmethod
    def withdraw(link: str) -> None:
        """The fill has ended (stored or failed): the name goes, and the attribute with it (the file may be stored)."""
        with contextlib.suppress(OSError):
            os.removexattr(link, PARTIAL_XATTR)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(link)

    def open(self, bucket: str, segments: tuple[str, ...], pid: int) -> Partial | None:
        """Process ``pid``'s fill of the key if it is published, opened; else None."""
        link = self._name(bucket, segments, pid)
        try:
            fd = os.open(link, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR):
                _log.debug("{link}: {error}", link=link, error=e)
            return None
        try:
            described = json.loads(os.getxattr(fd, PARTIAL_XATTR))
            length, meta = described["length"], described["meta"]
            if not isinstance(length, int) or not isinstance(meta, dict):
                raise ValueError("not a partial description")
            return Partial(fd, length, {str(k): str(v) for k, v in meta.items()}, link, os.fstat(fd).st_ino)
        except (OSError, ValueError, KeyError) as e:
            os.close(fd)
            _log.debug("{link}: {error}", link=link, error=e)
            return None

    def sweep(self, owner: int | None = None) -> int:
        """Remove the names of every process's fills (``owner``: only that process's); how many."""
        removed = 0
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return 0
        for name in names:
            if owner is None or name.endswith(f".{owner}"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.directory, name))
                    removed += 1
        return removed
