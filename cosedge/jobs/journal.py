"""
A job's journal: what a restart needs to go on where the job stopped.

An append-only text file, one record a line, tab-separated (keys never hold
a tab or a line break: they are validated like request keys):

``k <seq> <outcome> <bytes> <key>``
    key number ``seq`` of the source finished with ``outcome`` (a failure is
    ``!<reason>``);
``m <seq> <position>``
    a mark: every key before number ``seq`` has finished, and the source is
    read again from ``position`` (a file offset, a listing marker).

Each record is written with one ``write`` to a descriptor opened with
``O_APPEND`` as the key finishes (so a crash of the daemon loses nothing),
and the file is synced in batches (a mark, then an ``fsync`` in the store's
thread pool, about once a second; so a crash of the machine loses at most
the last batch).  A record cut short by a crash is ignored.  Replaying the
journal gives the counts back and the keys already done past the last mark;
those are skipped on resume, so no key is fetched twice because of a restart
(one lost with a crash of the machine is found stored, and skipped without
an origin request).

:class:`AppendFile` also keeps a verify's report of differences.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred, DeferredLock, succeed

from .model import Item, Job

__all__ = ["REPORT_LIMIT", "AppendFile", "DiffReport", "Journal", "Replayed", "replay"]

#: Differences a verify's report lists at most (the job counts them all).
REPORT_LIMIT = 1000

RunBlocking = Callable[[Callable[[], Any]], Deferred[Any]]


@define(eq=False)
class AppendFile:
    """A file written a line at a time (``O_APPEND``) and synced in the store's thread pool."""

    path: str
    run_blocking: RunBlocking
    _fd: int | None = field(default=None, init=False)
    _dirty: bool = field(default=False, init=False)
    _lock: DeferredLock = field(factory=DeferredLock, init=False)

    def open(self) -> None:
        """:raises OSError:"""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
        self._fd = os.open(self.path, flags, 0o600)

    def write(self, line: str) -> None:
        """Append one line (``line`` ends with a newline).  :raises OSError:"""
        if self._fd is None:
            return  # closed: the job has ended
        os.write(self._fd, line.encode("utf-8"))
        self._dirty = True

    def sync(self) -> Deferred[Any]:
        """``fsync`` what was written, after any sync under way; fires when it is done."""
        return self._lock.run(self._sync_now)

    def close(self) -> Deferred[Any]:
        """Sync, then close; fires when closed (with the failure of the ``fsync``, if it failed)."""
        return self._lock.run(self._close_now)

    def _sync_now(self) -> Deferred[Any]:
        if self._fd is None or not self._dirty:
            return succeed(None)
        fd, self._dirty = self._fd, False
        return self.run_blocking(lambda: os.fsync(fd))

    def _close_now(self) -> Deferred[Any]:
        def close(result: object) -> object:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            return result

        return self._sync_now().addBoth(close)


class Journal(AppendFile):
    """A job's journal (see the module's docstring)."""

    def finished(self, item: Item, outcome: str, size: int) -> None:
        self.write(f"k\t{item.seq}\t{outcome}\t{size}\t{item.key}\n")

    def mark(self, seq: int, position: str) -> None:
        self.write(f"m\t{seq}\t{position}\n")


@define(eq=False)
class DiffReport:
    """
    A verify's report: one line per key that differs or is gone (``key``,
    ``differs`` or ``gone``, what differs; tab-separated), the first
    :data:`REPORT_LIMIT` of them.  A key already in it (a job resumed after
    a crash) is not written twice.
    """

    file: AppendFile
    _keys: set[str] = field(factory=set, init=False)

    def open(self, title: str) -> None:
        """:raises OSError:"""
        try:
            with open(self.file.path, "rb") as f:
                for line in f:
                    if not line.startswith(b"#") and len(self._keys) < REPORT_LIMIT:
                        self._keys.add(line.decode("utf-8", "replace").split("\t", 1)[0])
        except FileNotFoundError:
            self.file.open()
            self.file.write(f"# {title}: key, problem, detail (tab-separated; the first {REPORT_LIMIT})\n")
            return
        self.file.open()

    def add(self, key: str, problem: str, detail: str) -> None:
        """:raises OSError:"""
        if key not in self._keys and len(self._keys) < REPORT_LIMIT:
            self._keys.add(key)
            self.file.write(f"{key}\t{problem}\t{detail}\n")


@define
class Replayed:
    """What a journal says: the counts, the last mark, and the keys done past it."""

    done: int = 0
    bytes: int = 0
    outcomes: Counter[str] = field(factory=Counter)
    failures: Counter[str] = field(factory=Counter)
    mark: int = 0
    position: str = ""
    #: Keys finished at or after the mark, by number.
    after: dict[int, str] = field(factory=dict)

    def restore(self, job: Job) -> None:
        """Give ``job`` the counts of its journal."""
        job.done, job.bytes, job.outcomes, job.failures = self.done, self.bytes, self.outcomes, self.failures


def replay(path: str) -> Replayed:
    """Read a journal (none yet: nothing done).  :raises OSError:"""
    found = Replayed()
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return found
    with f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # cut short by a crash: everything before it stands
            fields = raw[:-1].decode("utf-8", "replace").split("\t")
            try:
                if fields[0] == "k" and len(fields) == 5:
                    seq, outcome, size, key = int(fields[1]), fields[2], int(fields[3]), fields[4]
                    found.done += 1
                    found.bytes += size
                    (found.failures if outcome.startswith("!") else found.outcomes)[outcome.lstrip("!")] += 1
                    if seq >= found.mark:
                        found.after[seq] = key
                elif fields[0] == "m" and len(fields) == 3:
                    found.mark, found.position = int(fields[1]), fields[2]
                    found.after = {s: k for s, k in found.after.items() if s >= found.mark}
            except ValueError:
                continue  # not a record this version writes
    return found
