"""
Group commit of small objects on the disk store (issue 15): commits that
arrive while a batch is on the thread pool go together as the next batch;
every object is durable (one ``syncfs``, or an ``fsync`` each) before any of
the batch is renamed into place, each folder is ``fsync``'d once after, and
each commit fires once its own object is visible.  One object's failure is
its own; a failed ``syncfs`` publishes nothing.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure

from cosedge.storage import disk, group
from cosedge.storage.disk import DiskStore
from cosedge.storage.group import BATCH_LIMIT, CONCURRENT_BATCHES, SYNCFS_FROM

from .helpers import result_of

BUCKET = "example-1250000000"


class Pool:
    """The thread pool, run when the test says (one call at a time, in order)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, Deferred[Any]]] = []

    def __call__(self, work: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((work, d))
        return d

    def run_one(self) -> None:
        work, d = self.calls.pop(0)
        try:
            result = work()
        except Exception:
            d.errback(Failure())
        else:
            d.callback(result)


@pytest.fixture
def syscalls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The durability calls and renames of the disk store, in order."""
    seen: list[str] = []
    real_rename, real_fsync = os.rename, os.fsync

    def rename(src: Any, dst: Any, **kw: Any) -> None:
        seen.append(f"rename {dst}")
        real_rename(src, dst, **kw)

    def fsync(fd: int) -> None:
        seen.append("fsync dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync file")
        real_fsync(fd)

    def syncfs(fd: int) -> bool:
        seen.append("syncfs")
        real_fsync(fd)
        return True

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(disk, "syncfs", syncfs)
    return seen


def _commit(store: DiskStore, key: str, data: bytes, meta: dict[str, str] | None = None) -> Deferred[None]:
    writer = result_of(store.writer(BUCKET, tuple(key.split("/")), len(data)))
    writer.write(data)
    return writer.commit(meta or {"etag": f'"{key}"'}, 1e9)  # type: ignore[no-any-return]


def _stored(store: DiskStore, key: str) -> bytes | None:
    found = result_of(store.open(BUCKET, tuple(key.split("/"))))
    if found is None:
        return None
    try:
        return result_of(found.read(0, found.size))  # type: ignore[no-any-return]
    finally:
        found.close()


def _busy(store: DiskStore, pool: Pool) -> list[Deferred[None]]:
    """Occupy every batch slot with a lone commit (each on the pool at once); their Deferreds."""
    lone = [_commit(store, f"busy/{n}", b"b") for n in range(CONCURRENT_BATCHES)]
    assert len(pool.calls) == CONCURRENT_BATCHES
    return lone


def test_commits_that_wait_go_together_durable_before_any_is_visible(tmp_path: Path, syscalls: list[str]) -> None:
    pool = Pool()
    store = DiskStore(str(tmp_path), pool)
    lone = _busy(store, pool)  # a commit with a free slot goes at once, alone
    keys = [f"a/{n}" for n in range(SYNCFS_FROM)] + ["b/z"]
    waiting = [_commit(store, key, key.encode()) for key in keys]
    assert len(pool.calls) == CONCURRENT_BATCHES and not any(d.called for d in waiting)
    syscalls.clear()
    pool.run_one()  # one lone commit ends: the ones that waited go, as one batch
    assert result_of(lone[0]) is None and _stored(store, "busy/0") == b"b"
    assert syscalls == ["fsync file", "rename 0", "fsync dir"]  # a lone object: its own fsync
    assert len(pool.calls) == CONCURRENT_BATCHES
    while len(pool.calls) > 1:
        pool.run_one()
    syscalls.clear()
    pool.run_one()
    assert [result_of(d) for d in waiting] == [None] * len(keys)
    assert [_stored(store, key) for key in keys] == [key.encode() for key in keys]
    assert syscalls[0] == "syncfs" and syscalls.count("syncfs") == 1  # durable, all at once, before any rename
    assert [s for s in syscalls if s.startswith("rename")] == [f"rename {k.rpartition('/')[2]}" for k in keys]
    assert syscalls[-2:] == ["fsync dir", "fsync dir"]  # folders a/ and b/, once each, after the renames
    assert "fsync file" not in syscalls
    assert result_of(store.open(BUCKET, ("a", "2"))).meta["etag"] == '"a/2"'
    assert os.listdir(store.tmp_dir) == [] and not pool.calls


def test_without_syncfs_each_file_is_fsynced(
    tmp_path: Path, syscalls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(disk, "syncfs", lambda fd: syscalls.append("syncfs unavailable") or False)
    pool = Pool()
    store = DiskStore(str(tmp_path), pool)
    _busy(store, pool)
    batch = [_commit(store, f"k{n}", b"v") for n in range(SYNCFS_FROM)]
    while len(pool.calls) > 1:
        pool.run_one()
    syscalls.clear()
    pool.run_one()
    assert [result_of(d) for d in batch] == [None] * SYNCFS_FROM
    assert syscalls == [
        "syncfs unavailable",
        *["fsync file"] * SYNCFS_FROM,
        *[f"rename k{n}" for n in range(SYNCFS_FROM)],
        "fsync dir",
    ]


def test_one_objects_failure_is_its_own(tmp_path: Path, syscalls: list[str]) -> None:
    pool = Pool()
    store = DiskStore(str(tmp_path), pool)
    (tmp_path / BUCKET).mkdir()
    (tmp_path / BUCKET / "file").write_bytes(b"a file, not a folder")
    _busy(store, pool)
    bad = _commit(store, "file/under", b"cannot be")
    good = _commit(store, "ok/1", b"one")
    while pool.calls:
        pool.run_one()
    assert result_of(good) is None
    failure = result_of(bad)
    assert isinstance(failure, Failure) and failure.check(OSError)
    assert _stored(store, "ok/1") == b"one" and os.listdir(store.tmp_dir) == []


def test_a_failed_syncfs_publishes_none_of_the_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fd: int) -> bool:
        raise OSError(errno.EIO, "syncfs: Input/output error")

    monkeypatch.setattr(disk, "syncfs", broken)
    pool = Pool()
    store = DiskStore(str(tmp_path), pool)
    lone = _busy(store, pool)  # alone: fsync'd, stored
    batch = [_commit(store, f"k{n}", b"v") for n in range(SYNCFS_FROM)]
    while pool.calls:
        pool.run_one()
    assert [result_of(d) for d in lone] == [None] * CONCURRENT_BATCHES
    for d in batch:
        failure = result_of(d)
        assert isinstance(failure, Failure) and failure.check(OSError)
    assert all(_stored(store, f"k{n}") is None for n in range(SYNCFS_FROM))
    assert os.listdir(store.tmp_dir) == []


def test_a_batch_that_raises_fails_its_commits_and_the_next_batch_still_runs(tmp_path: Path) -> None:
    pool = Pool()
    store = DiskStore(str(tmp_path), pool)
    calls: list[int] = []

    def store_batch(batch: list[group.Small]) -> list[BaseException | None]:
        calls.append(len(batch))
        if len(calls) == 1:
            raise MemoryError("out of memory")
        return store.store_batch(batch)

    commits = group.GroupCommit(store_batch, pool)
    doomed = commits.commit(group.Small(BUCKET, ("a",), b"a", {}, None))
    later = commits.commit(group.Small(BUCKET, ("b",), b"b", {}, None))
    pool.run_one()
    assert isinstance(result_of(doomed), Failure)
    pool.run_one()
    assert result_of(later) is None and _stored(store, "b") == b"b" and calls == [1, 1]


def test_a_cancelled_commit_does_not_break_its_batch(tmp_path: Path) -> None:
    pool = Pool()
    store = DiskStore(str(tmp_path), pool)
    _busy(store, pool)
    cancelled = _commit(store, "b", b"b")
    kept = _commit(store, "c", b"c")
    cancelled.cancel()
    failure = result_of(cancelled)
    assert isinstance(failure, Failure) and failure.check(CancelledError)
    while pool.calls:
        pool.run_one()
    assert result_of(kept) is None
    assert _stored(store, "b") == b"b"  # stored all the same: a cancel only stops the wait


def test_batches_are_bounded(tmp_path: Path) -> None:
    pool = Pool()
    store = DiskStore(str(tmp_path), pool)
    lone = _busy(store, pool)
    commits = [_commit(store, f"k{n}", b"v") for n in range(BATCH_LIMIT + 10)]
    pool.run_one()  # a slot frees: the next BATCH_LIMIT go as one batch
    assert len(pool.calls) == CONCURRENT_BATCHES
    pool.run_one()  # another: the other 10
    while pool.calls:
        pool.run_one()
    assert all(result_of(d) is None for d in lone + commits)
    assert (
        store._group.batches == CONCURRENT_BATCHES + 2 and store._group.objects == CONCURRENT_BATCHES + BATCH_LIMIT + 10
    )


def test_the_real_syncfs(tmp_path: Path) -> None:
    if group._SYNCFS is None:
        pytest.skip("this C library has no syncfs (each file is fsync'd instead)")
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        assert group.syncfs(fd) is True
    finally:
        os.close(fd)
    with pytest.raises(OSError, match="syncfs: Bad file descriptor"):
        group.syncfs(-1)


def test_a_pool_that_refuses_a_batch_fails_it_and_the_next_one_goes(tmp_path: Path) -> None:
    store = DiskStore(str(tmp_path))
    refusals = [RuntimeError("the thread pool is stopped")]

    def run_blocking(work: Any) -> Deferred[Any]:
        if refusals:
            raise refusals.pop()
        return Deferred.fromCoroutine(_now(work))

    async def _now(work: Any) -> Any:
        return work()

    commits = group.GroupCommit(store.store_batch, run_blocking)
    refused = commits.commit(group.Small(BUCKET, ("a",), b"a", {}, None))
    failure = result_of(refused)
    assert isinstance(failure, Failure) and failure.check(RuntimeError)
    assert result_of(commits.commit(group.Small(BUCKET, ("b",), b"b", {}, None))) is None
    assert _stored(store, "b") == b"b"
