"""
Group commit of small objects on the disk store.

A fill of a small object (its body held in memory) used to be written, made
durable with two ``fsync`` calls (the file, then its folder after the
rename) and published in a call of its own on the thread pool.  With many
small fills at once those ``fsync`` calls are the disk store's main cost
(2,000 fills of 16 KiB: a third of the time, measured with ``fsync`` made a
no-op).  Here the commits that arrive while :data:`CONCURRENT_BATCHES` batches are on
the thread pool wait, and go together as the next batch, in one call on the
pool:

1. each object is written to its temporary file, with its metadata and
   modification time;
2. all of them are made durable at once: one ``syncfs(2)`` of the file
   system (``fsync`` of each file where there is no ``syncfs``, or when the
   batch is small: ``syncfs`` also writes out whatever else is dirty on the
   file system, large fills' temporary files included, which a few objects
   need not wait for);
3. each is renamed into place, then each folder that received one is
   ``fsync``'d once.

Each commit's Deferred fires once its object is durable and visible, as
before: durability per object is unchanged and its cost is shared.  A batch
starts as soon as fewer than :data:`CONCURRENT_BATCHES` run, so a lone commit
waits for no timer and a steady stream of fills hardly waits at all.
One object's failure (a bad path, a full disk) fails only its own commit; a
failed ``syncfs`` fails every commit of the batch, and publishes none of them.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Mapping
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

__all__ = ["BATCH_LIMIT", "CONCURRENT_BATCHES", "SYNCFS_FROM", "GroupCommit", "Small", "syncfs"]

#: Commits in one batch, at most (their bodies are in memory already: this bounds one call on the pool).
BATCH_LIMIT = 128
#: Batches on the pool at once, at most: a commit waits only while this many are under way, so a
#: fill's latency stays near a lone ``fsync`` unless the disk is the bottleneck (one batch at a
#: time made a steady stream of fills wait for each other: a migration replay's repeats were
#: served locally 93-96 % of the time in its first window instead of 99.4 %).
CONCURRENT_BATCHES = 4
#: A batch this large or larger is made durable with one ``syncfs``; a smaller one ``fsync``s each
#: file (``syncfs`` also writes out whatever else is dirty on the file system, which a few objects
#: need not wait for).
SYNCFS_FROM = 8


@frozen
class Small:
    """One small object to store: where, its whole body, its metadata and modification time."""

    bucket: str
    segments: tuple[str, ...]
    data: bytes
    meta: Mapping[str, str]
    mtime: float | None


#: Stores a batch (blocking): one outcome per object, None when it is stored.
StoreBatch = Callable[[list[Small]], list[BaseException | None]]


def _libc_syncfs() -> Callable[[int], int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


_SYNCFS = _libc_syncfs()


def syncfs(fd: int) -> bool:
    """
    Make everything written to ``fd``'s file system durable: False when the
    system has no ``syncfs`` (the caller ``fsync``s each file instead).

    :raises OSError: the file system reported a write error.
    """
    if _SYNCFS is None:
        return False
    if _SYNCFS(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"syncfs: {os.strerror(code)}")
    return True


class GroupCommit:
    """
    Commits of small objects, batched: :meth:`commit` answers with a Deferred
    that fires once the object is durable and visible.  ``store_batch``
    stores a batch (on the pool, through ``run_blocking``).
    """

    def __init__(self, store_batch: StoreBatch, run_blocking: Callable[[Callable[[], Any]], Deferred[Any]]) -> None:
        self._store_batch = store_batch
        self._run_blocking = run_blocking
        self._waiting: list[tuple[Small, Deferred[None]]] = []
        self._running = 0
        #: Batches stored so far, and objects in them (for tests and the curious).
        self.batches = 0
        self.objects = 0

    def commit(self, small: Small) -> Deferred[None]:
        done: Deferred[None] = Deferred()
        self._waiting.append((small, done))
        if self._running < CONCURRENT_BATCHES:
            self._next()
        return done

    def _next(self) -> None:
        batch, self._waiting = self._waiting[:BATCH_LIMIT], self._waiting[BATCH_LIMIT:]
        if not batch:
            return
        self._running += 1
        self.batches += 1
        self.objects += len(batch)
        items = [small for small, _ in batch]
        try:
            stored: Deferred[list[BaseException | None]] = self._run_blocking(lambda: self._store_batch(items))
        except Exception:  # the pool refused it (stopped): these fail, the next batch tries again
            self._stored(Failure(), batch)
            return
        stored.addBoth(self._stored, batch)

    def _stored(self, outcome: list[BaseException | None] | Failure, batch: list[tuple[Small, Deferred[None]]]) -> None:
        for index, (_, done) in enumerate(batch):
            error = outcome if isinstance(outcome, Failure) else outcome[index]
            if done.called:  # cancelled meanwhile: the object is stored (or not) all the same
                continue
            if error is None:
                done.callback(None)
            else:
                done.errback(error)
        self._running -= 1
        self._next()
