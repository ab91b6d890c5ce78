"""
Hot small objects of the disk store (issue 15): a small object read once is
served again from memory after one ``lstat`` of its path, and only while the
file there is the one it was read from (device, inode, times, size): a fill,
a refresh, a purge, another process's write or a symlink swapped in are seen
by the very next open.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from cosedge.storage import disk
from cosedge.storage.disk import DiskStore
from cosedge.storage.hot import ENTRY_COST, HOT_SIZE, HotFiles, HotObject

from .helpers import result_of

BUCKET = "example-1250000000"


@pytest.fixture
def store(tmp_path: Path) -> DiskStore:
    return DiskStore(str(tmp_path))


@pytest.fixture
def opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every file the store opens (its openat2 path)."""
    seen: list[str] = []
    real = disk.open_beneath

    def counted(root: str, path: str, flags: int) -> int:
        seen.append(path)
        return real(root, path, flags)

    monkeypatch.setattr(disk, "open_beneath", counted)
    return seen


def _put(store: DiskStore, key: str, data: bytes, meta: dict[str, str] | None = None) -> None:
    pending = store.begin(BUCKET, tuple(key.split("/")))
    pending.write(data)
    pending.commit(meta or {"etag": '"e"'}, 1e9)


def _get(store: DiskStore, key: str) -> Any:
    return result_of(store.open(BUCKET, tuple(key.split("/"))))


def test_a_small_object_is_opened_once_then_served_from_memory(store: DiskStore, opens: list[str]) -> None:
    _put(store, "a/small.css", b"body { }", {"content-type": "text/css", "etag": '"1"'})
    first, again = _get(store, "a/small.css"), _get(store, "a/small.css")
    assert isinstance(first, HotObject) and again is first
    assert opens == ["a/small.css"]
    assert again.read_now(0, 100) == b"body { }" and result_of(again.read(5, 1)) == b"{"
    assert again.meta["content-type"] == "text/css" and again.size == 8 and again.mtime == 1e9
    assert again.identity == first.identity and again.fileno() is None


def test_every_change_of_the_file_is_seen_by_the_next_open(store: DiskStore, opens: list[str]) -> None:
    _put(store, "k", b"one")
    assert _get(store, "k").read_now(0, 10) == b"one"
    _put(store, "k", b"two")  # a fill or a refresh: a new file renamed over it
    assert _get(store, "k").read_now(0, 10) == b"two"
    assert result_of(store.update_meta(BUCKET, ("k",), {"etag": '"new"'})) is True
    assert _get(store, "k").meta["etag"] == '"new"'
    path = Path(store.data_dir, BUCKET, "k")
    with open(path, "r+b") as f:  # another process writes in place (longer: the size differs)
        f.write(b"three")
    assert _get(store, "k").read_now(0, 10) == b"three"
    assert result_of(store.remove(BUCKET, ("k",))) is True
    assert _get(store, "k") is None
    assert len(opens) == 5  # each change made the next open a real one


def test_a_folder_swapped_for_a_symlink_is_not_followed(store: DiskStore, tmp_path: Path) -> None:
    _put(store, "d/k", b"inside")
    assert _get(store, "d/k").read_now(0, 10) == b"inside"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "k").write_bytes(b"secret")
    bucket = Path(store.data_dir, BUCKET)
    os.rename(bucket / "d", tmp_path / "moved")
    os.symlink(outside, bucket / "d")
    assert _get(store, "d/k") is None  # as without the cache: no symlink below the bucket is followed


def test_large_objects_keep_their_descriptor(store: DiskStore) -> None:
    _put(store, "big", b"x" * (HOT_SIZE + 1))
    big = _get(store, "big")
    try:
        assert not isinstance(big, HotObject) and big.fileno() is not None
    finally:
        big.close()


def test_the_bytes_kept_are_bounded(tmp_path: Path) -> None:
    """Each entry counts its bytes, key, metadata and ENTRY_COST (a bucket of tiny objects is bounded too)."""
    hot = HotFiles(limit=2 * (ENTRY_COST + 5 + 1 + 2) + 10)  # two of the entries below
    path = tmp_path / "f"
    for n, data in enumerate((b"12345", b"67890", b"abcde")):
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY)
        try:
            assert hot.keep("b", f"k{n}", fd, os.fstat(fd), {}) is not None
        finally:
            os.close(fd)
    assert hot.get("b", "k0", str(path)) is None  # the least recently used went
    assert hot.get("b", "k2", str(path)) is not None
    path.write_bytes(b"x" * 1100)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert hot.keep("b", "big", fd, os.fstat(fd), {}) is None  # with its entry, more than the whole bound
    finally:
        os.close(fd)
