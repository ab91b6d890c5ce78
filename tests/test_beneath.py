"""
Opening objects beneath a bucket folder with ``openat2`` (one system call),
and the portable walk it falls back to: the two must give the same answers,
and neither may follow a symlink below the bucket folder or leave it.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cosedge.interfaces import StoreError
from cosedge.storage import beneath
from cosedge.storage.beneath import Unsupported, open_beneath
from cosedge.storage.disk import DiskStore

from .helpers import result_of, value_of

BUCKET = "example-1250000000"
FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK

needs_openat2 = pytest.mark.skipif(not beneath.available(), reason="this kernel refuses openat2")


@pytest.fixture(params=["openat2", "walk"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test once with openat2 (where the kernel has it) and once with the forced fallback walk."""
    if request.param == "openat2":
        if not beneath.available():
            pytest.skip("this kernel refuses openat2")
    else:
        monkeypatch.setattr(beneath._State, "syscall", None)
    return str(request.param)


@pytest.fixture
def layout(tmp_path: Path) -> Iterator[tuple[DiskStore, Path]]:
    """
    A data folder with a bucket holding plain objects, and next to it a
    folder of secrets that symlinks inside the bucket point at.
    """
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"SECRET")
    (outside / "dir").mkdir()
    (outside / "dir" / "secret").write_bytes(b"SECRET2")
    data = tmp_path / "data"
    (data / BUCKET / "a" / "b").mkdir(parents=True)
    (data / BUCKET / "top").write_bytes(b"top")
    (data / BUCKET / "a" / "mid").write_bytes(b"mid")
    (data / BUCKET / "a" / "b" / "deep").write_bytes(b"deep")
    (data / "neighbour").write_bytes(b"NEIGHBOUR")
    bucket = data / BUCKET
    (bucket / "file-link").symlink_to(outside / "secret")
    (bucket / "inner-file-link").symlink_to("top")  # even a link to a sibling inside is not followed
    (bucket / "dir-link").symlink_to(outside / "dir")
    (bucket / "inner-dir-link").symlink_to("a")
    (bucket / "a" / "up").symlink_to("..")
    (bucket / "a" / "b" / "deep-link").symlink_to(outside / "secret")
    (bucket / "a" / "b" / "rel-out").symlink_to("../../../outside/secret")
    (bucket / "proc-link").symlink_to("/proc/self/root/etc/hostname")
    os.mkfifo(bucket / "pipe")
    yield DiskStore(str(data)), outside


def _read(store: DiskStore, *segments: str) -> bytes | None:
    obj = result_of(store.open(BUCKET, segments))
    if obj is None:
        return None
    try:
        return result_of(obj.read(0, 100))
    finally:
        obj.close()


@pytest.mark.parametrize(
    "segments",
    [
        ("file-link",),
        ("inner-file-link",),
        ("dir-link", "secret"),
        ("inner-dir-link", "mid"),
        ("a", "up", "top"),
        ("a", "up", "file-link"),
        ("a", "b", "deep-link"),
        ("a", "b", "rel-out"),
        ("proc-link",),
    ],
)
def test_a_symlink_at_any_level_is_never_followed(
    layout: tuple[DiskStore, Path], mode: str, segments: tuple[str, ...]
) -> None:
    """A symlink as the object or as any folder on the way is absent, wherever it points (S1)."""
    store, _ = layout
    assert result_of(store.open(BUCKET, segments)) is None


@pytest.mark.parametrize(
    "segments",
    [
        ("..", "neighbour"),
        ("a", "..", "..", "neighbour"),
        ("a/../..", "neighbour"),
        ("", "top"),
        (".", "top"),
        ("a\0b",),
        ("top\0",),
    ],
)
def test_dot_dot_and_odd_segments_never_escape(
    layout: tuple[DiskStore, Path], mode: str, segments: tuple[str, ...]
) -> None:
    """Segments that are not plain names ('..', '.', empty, with '/' or NUL) open nothing, least of all a neighbour."""
    store, _ = layout
    assert result_of(store.open(BUCKET, segments)) is None


def test_plain_objects_open_at_every_depth(layout: tuple[DiskStore, Path], mode: str) -> None:
    """Objects at the bucket's top and in nested folders are read as stored; folders and pipes are not objects."""
    store, _ = layout
    assert _read(store, "top") == b"top"
    assert _read(store, "a", "mid") == b"mid"
    assert _read(store, "a", "b", "deep") == b"deep"
    assert _read(store, "a") is None
    assert _read(store, "a", "b") is None
    assert _read(store, "pipe") is None
    assert _read(store, "missing") is None
    assert _read(store, "top", "under-a-file") is None
    assert result_of(store.open("missing-bucket", ("top",))) is None


def test_bucket_folder_symlink_is_followed(tmp_path: Path, mode: str) -> None:
    """The bucket folder itself may be an operator's symlink (to another disk): objects under it are served."""
    elsewhere = tmp_path / "disk2"
    (elsewhere / "d").mkdir(parents=True)
    (elsewhere / "d" / "1.jpg").write_bytes(b"img")
    data = tmp_path / "data"
    data.mkdir()
    (data / BUCKET).symlink_to(elsewhere)
    store = DiskStore(str(data))
    assert _read(store, "d", "1.jpg") == b"img"


def test_store_errors_other_than_absence_are_raised(layout: tuple[DiskStore, Path], mode: str) -> None:
    """A bucket path that is too long to open is a StoreError (503 upstream), not an absent object."""
    store, _ = layout
    long_store = DiskStore(store.data_dir + "/" + "x" * 5000)
    with pytest.raises(StoreError) as info:
        value_of(long_store.open(BUCKET, ("top",)))
    assert info.value.errno == errno.ENAMETOOLONG


def _answers(store: DiskStore, cases: list[tuple[str, ...]]) -> list[bytes | None]:
    return [_read(store, *segments) for segments in cases]


@needs_openat2
def test_both_paths_give_the_same_answers(layout: tuple[DiskStore, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """For every kind of key in a bucket, openat2 and the fallback walk open exactly the same objects."""
    store, _ = layout
    bucket = Path(store.data_dir, BUCKET)
    cases = [tuple(p.relative_to(bucket).parts) for p in sorted(bucket.rglob("*"))]
    cases += [("missing",), ("a", "missing"), ("top", "x"), ("a", "up"), ("a", "up", "a", "mid")]
    with_openat2 = _answers(store, cases)
    monkeypatch.setattr(beneath._State, "syscall", None)
    with_walk = _answers(store, cases)
    assert with_openat2 == with_walk
    assert with_openat2.count(b"deep") == 1 and b"SECRET" not in with_openat2


@needs_openat2
def test_open_beneath_reports_the_kernels_reason(layout: tuple[DiskStore, Path]) -> None:
    """open_beneath itself: ELOOP for a symlink on the way, EXDEV for climbing out, ENOENT for nothing there."""
    store, _ = layout
    root = str(Path(store.data_dir, BUCKET))
    fd = open_beneath(root, "a/b/deep", FLAGS)
    try:
        assert os.pread(fd, 10, 0) == b"deep"
    finally:
        os.close(fd)
    for path, code in [
        ("file-link", errno.ELOOP),
        ("dir-link/secret", errno.ELOOP),
        ("../neighbour", errno.EXDEV),
        ("a/../../neighbour", errno.EXDEV),
        (str(Path(store.data_dir, "neighbour")), errno.EXDEV),  # an absolute path
        ("nothing", errno.ENOENT),
    ]:
        with pytest.raises(OSError) as info:
            open_beneath(root, path, FLAGS)
        assert info.value.errno == code, path


def _refusing(code: int, calls: list[int]) -> Callable[[int, int, bytes, object, int], int]:
    def syscall(number: int, dir_fd: int, path: bytes, how: object, size: int) -> int:
        calls.append(number)
        ctypes.set_errno(code)
        return -1

    return syscall


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.E2BIG, errno.EPERM, errno.EINVAL])
def test_a_refused_first_call_falls_back_for_good(
    layout: tuple[DiskStore, Path], monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """
    When the kernel or a seccomp filter refuses openat2 from the start, the
    object is still served (by the walk) and openat2 is not tried again.
    """
    store, _ = layout
    calls: list[int] = []
    monkeypatch.setattr(beneath._State, "syscall", _refusing(code, calls))
    monkeypatch.setattr(beneath._State, "worked", False)
    assert _read(store, "a", "mid") == b"mid"
    assert _read(store, "a", "b", "deep") == b"deep"
    assert _read(store, "file-link") is None
    assert len(calls) == 1
    assert not beneath.available()


@pytest.mark.parametrize("code", [errno.EPERM, errno.EAGAIN, errno.EINTR])
def test_a_refusal_after_openat2_worked_falls_back_for_that_call(
    layout: tuple[DiskStore, Path], monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """
    Once openat2 has worked, a refusal or a 'try again' (EAGAIN: a rename
    raced the lookup) is answered by the walk for that call only; openat2
    stays in use.
    """
    store, _ = layout
    calls: list[int] = []
    monkeypatch.setattr(beneath._State, "syscall", _refusing(code, calls))
    monkeypatch.setattr(beneath._State, "worked", True)
    assert _read(store, "a", "mid") == b"mid"
    assert _read(store, "dir-link", "secret") is None
    assert len(calls) == 2
    assert beneath.available()
    with pytest.raises(Unsupported):
        open_beneath(str(Path(store.data_dir, BUCKET)), "top", FLAGS)


@needs_openat2
def test_openat2_is_used_when_the_kernel_has_it(
    layout: tuple[DiskStore, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a kernel with openat2 every object is opened by it: the walk is not taken."""
    store, _ = layout

    def no_walk(*args: object, **kwargs: object) -> None:
        raise AssertionError("the fallback walk was used")

    monkeypatch.setattr("cosedge.storage.disk._walk", no_walk)
    assert _read(store, "a", "b", "deep") == b"deep"
    assert _read(store, "a", "b", "deep-link") is None
