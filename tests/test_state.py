"""
The persisted overlay of live changes (:mod:`cosedge.admin.state`): what it keeps,
how it lands on top of the configuration file, and that saving it is atomic.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from cosedge.admin.state import MemoryStateFile, NotSynced, State, StateFile, state_path
from cosedge.config import BucketConfig, Config, ConfigError, Origin

BUCKET = "example-1250000000"
OTHER = "other-1250000000"


def file_config(**buckets: BucketConfig) -> Config:
    return Config(buckets=buckets or {BUCKET: BucketConfig(origin="127.0.0.1:8081", origin_pull=True)})


def test_no_state_file_means_no_live_changes(tmp_path: Path) -> None:
    """A daemon that never had a live change starts from the file alone."""
    state = StateFile(str(tmp_path / "state.json")).load()
    assert state == State()
    assert state.apply(file_config()) == file_config()


def test_state_lives_where_no_key_reaches(tmp_path: Path) -> None:
    """The state file is under the data directory's internal .cosedge folder."""
    assert state_path(str(tmp_path)) == str(tmp_path / ".cosedge" / "state.json")


def test_saved_state_loads_back_identically(tmp_path: Path) -> None:
    """What is saved is exactly what a restart loads, as readable JSON with a version."""
    path = tmp_path / ".cosedge" / "state.json"
    state = State().with_fields(BUCKET, origin="10.10.10.10:8080").with_added(OTHER, None, False)
    StateFile(str(path)).save(state)
    assert StateFile(str(path)).load() == state
    data = json.loads(path.read_text())
    assert data["version"] == 1
    assert data["buckets"][BUCKET] == {"origin": "10.10.10.10:8080"}
    assert os.stat(path.parent).st_mode & 0o077 == 0


def test_a_failed_save_leaves_the_old_file_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash or error mid-save never leaves a half-written state file behind."""
    path = tmp_path / "state.json"
    first = State().with_fields(BUCKET, origin="10.10.10.10")
    StateFile(str(path)).save(first)
    before = path.read_bytes()

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        StateFile(str(path)).save(first.with_fields(BUCKET, origin="10.10.10.11"))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_save_whose_folder_cannot_be_synced_says_the_file_was_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    When the rename succeeded but the folder's fsync fails, the caller is
    told the new state is in the file (not synced), not that nothing changed.
    """
    path = tmp_path / "state.json"
    StateFile(str(path)).save(State().with_fields(BUCKET, origin="10.10.10.10"))
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    second = State().with_fields(BUCKET, origin="10.10.10.11")
    with pytest.raises(NotSynced) as raised:
        StateFile(str(path)).save(second)
    assert not isinstance(raised.value, OSError)  # never read as "not saved"
    assert raised.value.error.errno == 5
    assert StateFile(str(path)).load() == second


def test_a_damaged_state_file_is_refused_with_its_name(tmp_path: Path) -> None:
    """A state file edited into nonsense stops the start with a message naming it."""
    path = tmp_path / "state.json"
    for text, words in [
        ("{not json", "state.json"),
        ('{"version": 99}', "version 99"),
        ('{"version": 1, "buckets": {"example-1250000000": {"origin": "http://x"}}}', "scheme"),
        ('{"version": 1, "buckets": {"example-1250000000": {"origin_pull": "yes"}}}', "origin_pull"),
        ('{"version": 1, "buckets": {"Bad_Name": {}}}', "Bad_Name"),
        ('{"version": 1, "removed": "x"}', "removed"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError) as e:
            StateFile(str(path)).load()
        assert str(path) in str(e.value) and words in str(e.value)


def test_a_live_field_change_keeps_the_other_fields_from_the_file() -> None:
    """
    Changing only the origin live keeps following the file for origin-pull:
    an operator who later turns origin-pull off in the file gets it off.
    """
    state = State().with_fields(BUCKET, origin="10.10.10.10:8080")
    applied = state.apply(file_config())
    assert applied.buckets[BUCKET] == BucketConfig(origin=Origin("10.10.10.10", 8080), origin_pull=True)
    edited = file_config(**{BUCKET: BucketConfig(origin="127.0.0.1:8081", origin_pull=False)})
    assert state.apply(edited).buckets[BUCKET].origin_pull is False
    assert str(state.apply(edited).buckets[BUCKET].origin) == "10.10.10.10:8080"


def test_added_and_removed_buckets_hold_whatever_the_file_says() -> None:
    """A bucket added live exists without the file; one removed live stays removed."""
    state = State().with_added(OTHER, "10.0.0.1", True).with_removed(BUCKET, in_file=True)
    applied = state.apply(file_config())
    assert list(applied.buckets) == [OTHER]
    assert applied.buckets[OTHER] == BucketConfig(origin="10.0.0.1", origin_pull=True)
    # Adding the removed bucket again forgets the removal.
    again = state.with_added(BUCKET, None, False)
    assert BUCKET not in again.removed
    assert again.apply(file_config()).buckets[BUCKET] == BucketConfig()


def test_changes_to_a_bucket_the_file_dropped_are_ignored_and_reported() -> None:
    """A live origin change does not resurrect a bucket the operator deleted from the file."""
    state = State().with_fields(OTHER, origin="10.0.0.1")
    assert OTHER not in state.apply(file_config()).buckets
    assert state.ignored(file_config()) == [OTHER]


def test_a_live_change_that_no_longer_fits_the_file_is_an_error() -> None:
    """
    Origin-pull turned on live needs an origin; if the file loses the origin
    the combination is refused (the seed's rule), not silently half-applied.
    """
    state = State().with_fields(BUCKET, origin_pull=True)
    with pytest.raises(ConfigError, match="origin_pull cannot be enabled"):
        state.apply(file_config(**{BUCKET: BucketConfig()}))


def test_revert_drops_every_live_change_of_a_bucket() -> None:
    """After revert the file's settings for the bucket apply again."""
    state = State().with_fields(BUCKET, origin="10.0.0.1").with_removed(OTHER, in_file=True)
    assert state.touches(BUCKET) and state.touches(OTHER)
    reverted = state.without(BUCKET).without(OTHER)
    assert reverted == State()
    assert not reverted.touches(BUCKET)


def test_memory_state_file_keeps_state_in_memory() -> None:
    """Services without a data directory keep their live changes in memory."""
    memory = MemoryStateFile()
    memory.save(State().with_fields(BUCKET, origin_pull=False))
    assert memory.load().buckets[BUCKET] == {"origin_pull": False}
