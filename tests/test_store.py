"""Object stores: the disk layout operators see, atomic publishing, and never leaving the bucket."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from zope.interface.verify import verifyObject

from cosedge.interfaces import IObjectStore, IObjectWriter, IStoredObject
from cosedge.storage.disk import META_XATTR, SMALL_BODY, DiskStore
from cosedge.testing import MemoryStore

from .helpers import result_of

BUCKET = "example-1250000000"


@pytest.fixture
def store(tmp_path: Path) -> DiskStore:
    return DiskStore(str(tmp_path / "data"))


def _tmp_files(store: DiskStore) -> list[str]:
    tmp = Path(store.tmp_dir)
    return sorted(p.name for p in tmp.iterdir()) if tmp.exists() else []


def _put(store: DiskStore, segments: tuple[str, ...], data: bytes, meta: dict[str, str] | None = None) -> None:
    pending = store.begin(BUCKET, segments)
    pending.write(data)
    pending.commit(meta or {}, None)


def test_interfaces(store: DiskStore) -> None:
    """Both stores, their objects and their writers (streamed, small) provide the interfaces the service uses."""
    for any_store in (store, MemoryStore()):
        assert verifyObject(IObjectStore, any_store)
        for length in (None, 1, SMALL_BODY + 1):
            writer = result_of(any_store.writer(BUCKET, ("a",), length))
            assert verifyObject(IObjectWriter, writer)
            writer.write(b"x")
            assert result_of(writer.commit({}, None)) is None
        obj = result_of(any_store.open(BUCKET, ("a",)))
        assert obj is not None and verifyObject(IStoredObject, obj)
        assert result_of(obj.read(0, 1)) == b"x"
        obj.close()


def test_objects_are_plain_files_at_bucket_key(store: DiskStore) -> None:
    """A stored object is the plain file <data_dir>/<bucket>/<key>, folders included."""
    _put(store, ("1.jpg",), b"root")
    _put(store, ("images", "2017", "a b.jpg"), b"nested")
    data = Path(store.data_dir)
    assert (data / BUCKET / "1.jpg").read_bytes() == b"root"
    assert (data / BUCKET / "images" / "2017" / "a b.jpg").read_bytes() == b"nested"
    assert _tmp_files(store) == []


def test_object_and_metadata_appear_together(store: DiskStore) -> None:
    """Until commit nothing is visible under the key; after it, the bytes and the metadata are there at once."""
    pending = store.begin(BUCKET, ("k",))
    pending.write(b"abc")
    pending.write(b"def")
    assert pending.size == 6
    assert result_of(store.open(BUCKET, ("k",))) is None
    assert len(_tmp_files(store)) == 1
    tmp = Path(store.tmp_dir) / _tmp_files(store)[0]
    assert tmp.read_bytes() == b"abcdef"
    pending.commit({"content-type": "text/plain", "etag": '"e"'}, 1445412480.0)
    obj = result_of(store.open(BUCKET, ("k",)))
    assert obj is not None
    try:
        assert result_of(obj.read(0, 100)) == b"abcdef"
        assert result_of(obj.read(2, 2)) == b"cd"
        assert obj.size == 6
        assert dict(obj.meta) == {"content-type": "text/plain", "etag": '"e"'}
        assert obj.mtime == 1445412480.0
        assert (
            obj.fileno() is None
        )  # a small object comes from memory (cosedge.storage.hot); a large one has a descriptor
    finally:
        obj.close()
    path = Path(store.data_dir, BUCKET, "k")
    assert json.loads(os.getxattr(path, META_XATTR)) == {"content-type": "text/plain", "etag": '"e"'}
    assert _tmp_files(store) == []


def test_temporary_files_live_where_no_key_reaches(store: DiskStore) -> None:
    """Temporary files are under <data_dir>/.cosedge/, on the same file system, outside every bucket."""
    pending = store.begin(BUCKET, ("k",))
    tmp = Path(store.tmp_dir)
    assert tmp.parent.name == ".cosedge" and tmp.parent.parent == Path(store.data_dir)
    assert os.stat(tmp).st_dev == os.stat(store.data_dir).st_dev
    pending.abort()


def test_abort_leaves_nothing(store: DiskStore) -> None:
    """Aborting removes the temporary file; aborting twice is harmless; a commit after abort cannot resurrect it."""
    pending = store.begin(BUCKET, ("k",))
    pending.write(b"partial")
    pending.abort()
    pending.abort()
    assert _tmp_files(store) == []
    with pytest.raises((OSError, ValueError)):
        pending.commit({}, None)
    assert _tmp_files(store) == []
    assert result_of(store.open(BUCKET, ("k",))) is None


def test_failed_publish_leaves_nothing(store: DiskStore) -> None:
    """If the object cannot be put in place, the temporary file is removed and the error raised."""
    _put(store, ("a",), b"file")
    pending = store.begin(BUCKET, ("a", "b"))
    pending.write(b"inner")
    with pytest.raises(OSError):
        pending.commit({}, None)
    assert _tmp_files(store) == []
    assert Path(store.data_dir, BUCKET, "a").read_bytes() == b"file"


def test_replacing_an_object_changes_its_identity(store: DiskStore) -> None:
    """A re-published object has a new identity (so its ETag changes), and an open view keeps the old bytes."""
    _put(store, ("k",), b"one")
    old = result_of(store.open(BUCKET, ("k",)))
    assert old is not None
    _put(store, ("k",), b"two!")
    new = result_of(store.open(BUCKET, ("k",)))
    assert new is not None
    try:
        assert old.identity != new.identity
        assert result_of(old.read(0, 10)) == b"one" and old.size == 3
        assert result_of(new.read(0, 10)) == b"two!"
    finally:
        old.close()
        new.close()


def test_missing_and_non_files_are_absent(store: DiskStore) -> None:
    """Missing keys, folders, keys under a file, and the bucket root open as None (never a listing)."""
    _put(store, ("dir", "f"), b"x")
    assert result_of(store.open(BUCKET, ("nope",))) is None
    assert result_of(store.open(BUCKET, ("dir",))) is None
    assert result_of(store.open(BUCKET, ("dir", "f", "g"))) is None
    assert result_of(store.open(BUCKET, ())) is None
    assert result_of(store.open("other-1", ("f",))) is None


def test_symlinks_are_never_followed(store: DiskStore, tmp_path: Path) -> None:
    """A symlink as the object or as any folder on the way is treated as absent (S1)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"SECRET")
    bucket = Path(store.data_dir, BUCKET)
    bucket.mkdir(parents=True)
    (bucket / "link").symlink_to(outside / "secret")
    (bucket / "dirlink").symlink_to(outside)
    (bucket / "real").mkdir()
    (bucket / "real" / "up").symlink_to("..")
    assert result_of(store.open(BUCKET, ("link",))) is None
    assert result_of(store.open(BUCKET, ("dirlink", "secret"))) is None
    assert result_of(store.open(BUCKET, ("real", "up", "link"))) is None


def test_bucket_folder_symlink_is_allowed_by_the_operator(store: DiskStore, tmp_path: Path) -> None:
    """The bucket folder itself may be a symlink the operator made (e.g. to another disk); keys under it still work."""
    elsewhere = tmp_path / "disk2"
    elsewhere.mkdir()
    (elsewhere / "1.jpg").write_bytes(b"img")
    Path(store.data_dir).mkdir(parents=True)
    Path(store.data_dir, BUCKET).symlink_to(elsewhere)
    obj = result_of(store.open(BUCKET, ("1.jpg",)))
    assert obj is not None and result_of(obj.read(0, 10)) == b"img"
    obj.close()


def test_metadata_missing_or_corrupt(store: DiskStore) -> None:
    """A file copied in by hand (no metadata) or with a corrupt attribute is served with empty metadata."""
    bucket = Path(store.data_dir, BUCKET)
    bucket.mkdir(parents=True)
    (bucket / "plain").write_bytes(b"p")
    (bucket / "corrupt").write_bytes(b"c")
    os.setxattr(bucket / "corrupt", META_XATTR, b"{not json")
    (bucket / "list").write_bytes(b"l")
    os.setxattr(bucket / "list", META_XATTR, b"[1, 2]")
    for name in ("plain", "corrupt", "list"):
        obj = result_of(store.open(BUCKET, (name,)))
        assert obj is not None
        assert dict(obj.meta) == {}
        obj.close()


def test_metadata_keys_are_lowercased(store: DiskStore) -> None:
    """Metadata written by another tool with mixed-case names is read back lowercased."""
    bucket = Path(store.data_dir, BUCKET)
    bucket.mkdir(parents=True)
    (bucket / "f").write_bytes(b"f")
    os.setxattr(bucket / "f", META_XATTR, json.dumps({"Content-Type": "text/plain"}).encode())
    obj = result_of(store.open(BUCKET, ("f",)))
    assert obj is not None and dict(obj.meta) == {"content-type": "text/plain"}
    obj.close()


def test_remove(store: DiskStore, tmp_path: Path) -> None:
    """remove() deletes an object (True), not a folder or a missing key (False), and a symlink only as a link."""
    _put(store, ("dir", "f"), b"x")
    assert result_of(store.remove(BUCKET, ("dir", "f"))) is True
    assert result_of(store.open(BUCKET, ("dir", "f"))) is None
    assert result_of(store.remove(BUCKET, ("dir", "f"))) is False
    assert result_of(store.remove(BUCKET, ("dir",))) is False
    assert result_of(store.remove(BUCKET, ())) is False
    outside = tmp_path / "keep"
    outside.write_bytes(b"keep")
    Path(store.data_dir, BUCKET, "link").symlink_to(outside)
    assert result_of(store.remove(BUCKET, ("link",))) is True
    assert outside.read_bytes() == b"keep"


def test_usage_counts_regular_files(store: DiskStore, tmp_path: Path) -> None:
    """usage() counts the bucket's regular files and bytes, not symlinks or temporary files."""
    _put(store, ("a",), b"12345")
    _put(store, ("d", "b"), b"123")
    pending = store.begin(BUCKET, ("pending",))
    pending.write(b"ignored")
    (tmp_path / "big").write_bytes(b"x" * 1000)
    Path(store.data_dir, BUCKET, "link").symlink_to(tmp_path / "big")
    assert result_of(store.usage(BUCKET)) == (2, 8)
    assert result_of(store.usage("empty-1")) == (0, 0)
    pending.abort()


def test_sweep_removes_leftover_temporary_files_only(store: DiskStore) -> None:
    """sweep() removes every temporary file (a crash's leftovers) and nothing else (F13)."""
    _put(store, ("keep",), b"k")
    leftovers = [store.begin(BUCKET, ("x",)) for _ in range(3)]
    for pending in leftovers:
        pending.write(b"half")
    assert len(_tmp_files(store)) == 3
    assert result_of(store.sweep()) == 3
    assert _tmp_files(store) == []
    assert result_of(store.sweep()) == 0
    assert Path(store.data_dir, BUCKET, "keep").read_bytes() == b"k"
    for pending in leftovers:
        pending.abort()  # the descriptors a crashed process would have lost


def test_sweep_on_a_fresh_data_dir(store: DiskStore) -> None:
    """sweep() on a data_dir that does not exist yet creates the internal folder and removes nothing."""
    assert not Path(store.data_dir).exists()
    assert result_of(store.sweep()) == 0
    assert Path(store.tmp_dir).is_dir()


def test_memory_store_disk_limit_and_pending() -> None:
    """The memory store fails writes past its disk limit with ENOSPC and tracks pending objects."""
    store = MemoryStore(disk_limit=10)
    store.put(BUCKET, ("a",), b"123456")
    pending = store.begin(BUCKET, ("b",))
    assert store.pending == [pending]
    pending.write(b"1234")
    with pytest.raises(OSError) as info:
        pending.write(b"5")
    assert info.value.errno == errno.ENOSPC
    pending.abort()
    pending.abort()
    assert store.pending == []
    assert store.get(BUCKET, "b") is None
    other = store.begin(BUCKET, ("c",))
    other.write(b"c")
    other.commit({"etag": '"c"'}, 5.0)
    assert store.pending == []
    assert store.get(BUCKET, "c") == b"c"
    assert result_of(store.usage(BUCKET)) == (2, 7)
    assert result_of(store.sweep()) == 0
    store.begin(BUCKET, ("d",))
    assert result_of(store.sweep()) == 1 and store.pending == []
    assert result_of(store.remove(BUCKET, ("c",))) is True and result_of(store.remove(BUCKET, ("c",))) is False


def test_publishing_never_writes_through_a_symlinked_folder(store: DiskStore, tmp_path: Path) -> None:
    """Publishing under a folder that is a symlink out of the bucket fails cleanly; nothing is written outside."""
    outside = tmp_path / "outside"
    outside.mkdir()
    bucket = Path(store.data_dir, BUCKET)
    bucket.mkdir(parents=True)
    (bucket / "dirlink").symlink_to(outside)
    pending = store.begin(BUCKET, ("dirlink", "x"))
    pending.write(b"payload")
    with pytest.raises(OSError):
        pending.commit({}, None)
    assert list(outside.iterdir()) == []
    assert _tmp_files(store) == []


def test_publishing_onto_a_folder_fails_cleanly(store: DiskStore) -> None:
    """An object cannot replace a folder of the same name; the folder and its contents stay."""
    _put(store, ("a", "inner"), b"i")
    pending = store.begin(BUCKET, ("a",))
    pending.write(b"file")
    with pytest.raises(OSError):
        pending.commit({}, None)
    assert Path(store.data_dir, BUCKET, "a", "inner").read_bytes() == b"i"
    assert _tmp_files(store) == []


def test_special_files_are_not_objects(store: DiskStore) -> None:
    """A named pipe (or other non-regular file) in the bucket is not an object, and opening it never blocks."""
    bucket = Path(store.data_dir, BUCKET)
    bucket.mkdir(parents=True)
    os.mkfifo(bucket / "pipe")
    assert result_of(store.open(BUCKET, ("pipe",))) is None
    assert result_of(store.usage(BUCKET)) == (0, 0)


def test_metadata_is_read_once_per_version_of_a_file(store: DiskStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A file's metadata is parsed once and reused while the file is unchanged;
    a replaced object, and metadata rewritten in place (setfattr), are read
    afresh at the next open.
    """
    _put(store, ("k",), b"one", {"content-type": "text/plain"})
    reads: list[int] = []
    real = os.getxattr

    def counting(*args: object, **kwargs: object) -> bytes:
        reads.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "getxattr", counting)

    def meta() -> dict[str, str]:
        obj = result_of(store.open(BUCKET, ("k",)))
        assert obj is not None
        obj.close()
        return dict(obj.meta)

    assert meta() == {"content-type": "text/plain"}
    assert meta() == {"content-type": "text/plain"}
    assert len(reads) == 1
    _put(store, ("k",), b"two", {"content-type": "image/png"})
    assert meta() == {"content-type": "image/png"}
    assert len(reads) == 2
    path = os.path.join(store.bucket_path(BUCKET), "k")
    os.setxattr(path, META_XATTR, json.dumps({"content-type": "text/html"}).encode())
    assert meta() == {"content-type": "text/html"}
    obj = result_of(store.open(BUCKET, ("k",)))
    assert obj is not None
    with pytest.raises(TypeError):
        obj.meta["content-type"] = "x"  # type: ignore[index]  # shared between opens: read-only
    obj.close()


def test_sweep_of_one_process_leaves_the_others_files(store: DiskStore) -> None:
    """
    Temporary files carry the writing process's id; sweeping one process's
    (a worker that died) leaves every other process's fills alone.
    """
    mine = store.begin(BUCKET, ("mine",))
    theirs = Path(store.tmp_dir) / f"{os.getpid() + 1}.{BUCKET}.x1.part"
    theirs.write_bytes(b"another process's fill")
    assert result_of(store.sweep(owner=os.getpid() + 1)) == 1
    assert not theirs.exists()
    assert _tmp_files(store) == [Path(mine.path).name]
    assert Path(mine.path).name.startswith(f"{os.getpid()}.{BUCKET}.")
    assert result_of(store.sweep()) == 1
    mine.abort()
