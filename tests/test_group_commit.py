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
from cosedge.storage.group import BATCH_LIMIT

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


def test_commits_that_wait_go_together_durable_before_any_is_visible(tmp_path: Path, syscalls: list[str]) -> None:
    pool = Pool()
    store = DiskStore(str(tmp_path), pool)
    first = _commit(store, "a/1", b"one")
    assert len(pool.calls) == 1  # the first goes at once, alone
    waiting = [_commit(store, f"a/{n}", b"x%d" % n) for n in range(2, 6)] + [_commit(store, "b/6", b"six")]
    assert len(pool.calls) == 1 and not any(d.called for d in waiting)
    pool.run_one()
    assert result_of(first) is None and _stored(store, "a/1") == b"one"
    assert len(pool.calls) == 1  # the five that waited: one batch
    syscalls.clear()
    pool.run_one()
    assert [result_of(d) for d in waiting] == [None] * 5
    assert [_stored(store, f"a/{n}") for n in range(2, 6)] == [b"x%d" % n for n in range(2, 6)]
    assert _stored(store, "b/6") == b"six"
    assert syscalls[0] == "syncfs" and syscalls.count("syncfs") == 1  # durable, all at once, before any rename
    assert [s for s in syscalls if s.startswith("rename")] == [f"rename {n}" for n in (2, 3, 4, 5, 6)]
    assert syscalls[-2:] == ["fsync dir", "fsync dir"]  # folders a/ and b/, once each, after the renames
    assert "fsync file" not in syscalls
    assert result_of(store.open(BUCKET, ("a", "2"))).meta["etag"] == '"a/2"'
    assert os.listdir(store.tmp_dir) == []


def test_without_syncfs_each_file_is_fsynced(
    tmp_path: Path, syscalls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(disk, "syncfs", lambda fd: syscalls.append("syncfs unavailable") or False)
    pool = Pool()
    store = DiskStore(str(tmp_path), pool)
    first = _commit(store, "k", b"data")
    pool.run_one()  # a lone object: its own fsync (syncfs would also write out whatever else is dirty)
    assert result_of(first) is None and _stored(store, "k") == b"data"
    assert syscalls == ["fsync file", "rename k", "fsync dir"]
    syscalls.clear()
    blocker = _commit(store, "first", b"1")
    two = [_commit(store, "x", b"x"), _commit(store, "y", b"y")]
    pool.run_one()
    syscalls.clear()
    pool.run_one()
    assert result_of(blocker) is None and [result_of(d) for d in two] == [None, None]
    assert syscalls == ["syncfs unavailable", "fsync file", "fsync file", "rename x", "rename y", "fsync dir"]


def test_one_objects_failure_is_its_own(tmp_path: Path, syscalls: list[str]) -> None:
    pool = Pool()
    store = DiskStore(str(tmp_path), pool)
    (tmp_path / BUCKET).mkdir()
    (tmp_path / BUCKET / "file").write_bytes(b"a file, not a folder")
    first = _commit(store, "ok/0", b"zero")
    bad = _commit(store, "file/under", b"cannot be")
    good = _commit(store, "ok/1", b"one")
    pool.run_one()
    pool.run_one()
    assert result_of(first) is None and result_of(good) is None
    failure = result_of(bad)
    assert isinstance(failure, Failure) and failure.check(OSError)
    assert _stored(store, "ok/1") == b"one" and os.listdir(store.tmp_dir) == []


def test_a_failed_syncfs_publishes_none_of_the_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fd: int) -> bool:
        raise OSError(errno.EIO, "syncfs: Input/output error")

    monkeypatch.setattr(disk, "syncfs", broken)
    pool = Pool()
    store = DiskStore(str(tmp_path), pool)
    blocker = _commit(store, "first", b"1")  # alone: fsync'd, stored
    batch = [_commit(store, f"k{n}", b"v") for n in range(3)]
    pool.run_one()
    pool.run_one()
    assert result_of(blocker) is None and _stored(store, "first") == b"1"
    for d in batch:
        failure = result_of(d)
        assert isinstance(failure, Failure) and failure.check(OSError)
    assert all(_stored(store, f"k{n}") is None for n in range(3))
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
    assert isinstance(result_of(doomed), Failure) and not later.called
    pool.run_one()
    assert result_of(later) is None and _stored(store, "b") == b"b" and calls == [1, 1]


def test_a_cancelled_commit_does_not_break_its_batch(tmp_path: Path) -> None:
    pool = Pool()
    store = DiskStore(str(tmp_path), pool)
    first = _commit(store, "a", b"a")
    cancelled = _commit(store, "b", b"b")
    kept = _commit(store, "c", b"c")
    cancelled.cancel()
    failure = result_of(cancelled)
    assert isinstance(failure, Failure) and failure.check(CancelledError)
    pool.run_one()
    pool.run_one()
    assert result_of(first) is None and result_of(kept) is None
    assert _stored(store, "b") == b"b"  # stored all the same: a cancel only stops the wait


def test_batches_are_bounded(tmp_path: Path) -> None:
    pool = Pool()
    store = DiskStore(str(tmp_path), pool)
    commits = [_commit(store, f"k{n}", b"v") for n in range(BATCH_LIMIT + 10)]
    pool.run_one()  # the first, alone
    assert len(pool.calls) == 1
    pool.run_one()  # the next BATCH_LIMIT
    assert sum(d.called for d in commits) == 1 + BATCH_LIMIT and len(pool.calls) == 1
    pool.run_one()
    assert all(result_of(d) is None for d in commits)
    assert not pool.calls


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
