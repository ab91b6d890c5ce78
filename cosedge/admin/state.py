"""
The persisted overlay of live changes.

An operator's live changes (``edge.set_origin`` and friends in the manhole)
are kept apart from the TOML file, in a small JSON state file under the data
directory (``<data_dir>/.cosedge/state.json``, where no bucket and no key can
reach).  At start-up and on every reload the overlay is applied on top of the
file, so a restart keeps the changes and a SIGHUP after editing the file keeps
them too.

The overlay records only what an operator changed, field by field, so a
later edit of the file to another field of the same bucket still takes
effect.  Per bucket it may hold:

- ``origin`` (a string, or null for "no origin"), ``origin_pull``
  (true/false) and/or ``rules`` (the list of rule tables,
  :func:`cosedge.rules.rule_table`): the fields set live;
- ``added: true``: the bucket was added live, so it exists even when the file
  does not define it, and takes none of its settings from the file;

and ``removed`` lists buckets removed live, which stay removed even though the
file defines them.  ``edge.revert(bucket)`` drops a bucket's entries so the
file rules again.

The file is replaced atomically (temporary file, ``fsync``, ``rename``,
``fsync`` of the folder): a crash mid-save leaves either the old or the new
file, never a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

from attrs import define, evolve, field, frozen

from ..config import BUCKET_FIELDS, BucketConfig, Config, ConfigError, parse_origin, validate_bucket_name
from ..rules import parse_rules, rule_table

__all__ = ["STATE_FILE_NAME", "MemoryStateFile", "NotSynced", "State", "StateFile", "state_path"]

#: Where the state file lives, relative to the data directory.
STATE_FILE_NAME = os.path.join(".cosedge", "state.json")
_VERSION = 1
_FIELDS = frozenset({*BUCKET_FIELDS, "added"})


def state_path(data_dir: str) -> str:
    """The state file of a data directory."""
    return os.path.join(data_dir, STATE_FILE_NAME)


def _freeze_buckets(value: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Mapping[str, Any]]:
    return {name: dict(sorted(entry.items())) for name, entry in sorted(value.items())}


def _names(value: Iterable[str]) -> frozenset[str]:
    return frozenset(value)


@frozen
class State:
    """
    The live changes: per-bucket field overrides and removed buckets.  A
    value; every change builds a new one.
    """

    buckets: Mapping[str, Mapping[str, Any]] = field(factory=dict, converter=_freeze_buckets)
    removed: frozenset[str] = field(default=frozenset(), converter=_names)

    # -- building changes --

    def with_fields(self, name: str, **fields: Any) -> State:
        """Override some fields of bucket ``name`` (it stays in the overlay)."""
        entry = {**self.buckets.get(name, {}), **fields}
        return evolve(self, buckets={**self.buckets, name: entry})

    def without_fields(self, name: str, *fields: str) -> State:
        """Bucket ``name`` with ``fields`` following the file again (an entry left empty goes)."""
        entry = {k: v for k, v in self.buckets.get(name, {}).items() if k not in fields}
        buckets = {k: v for k, v in self.buckets.items() if k != name}
        return evolve(self, buckets={**buckets, name: entry} if entry else buckets)

    def with_added(self, name: str, origin: str | None, origin_pull: bool) -> State:
        """
        Bucket ``name`` added live, whatever the file says.  Without an
        origin, origin-pull (off) is not recorded: it was no choice, and
        rules given later turn it on.
        """
        entry: dict[str, Any] = {"added": True, "origin": origin}
        if origin is not None or origin_pull:
            entry["origin_pull"] = origin_pull
        return State({**self.buckets, name: entry}, self.removed - {name})

    def with_removed(self, name: str, *, in_file: bool) -> State:
        """Bucket ``name`` removed live (remembered only when the file defines it)."""
        buckets = {k: v for k, v in self.buckets.items() if k != name}
        removed = self.removed | {name} if in_file else self.removed - {name}
        return State(buckets, removed)

    def without(self, name: str) -> State:
        """Forget every live change of bucket ``name``: the file rules again."""
        return State({k: v for k, v in self.buckets.items() if k != name}, self.removed - {name})

    def touches(self, name: str) -> bool:
        """Whether the overlay changes bucket ``name``."""
        return name in self.buckets or name in self.removed

    # -- applying --

    def apply(self, config: Config) -> Config:
        """
        The configuration with these changes on top.

        :raises ConfigError: when a change does not fit the file any more (say
            the overlay enables origin-pull and the file no longer gives the
            bucket an origin).
        """
        buckets = {k: v for k, v in config.buckets.items() if k not in self.removed}
        for name, entry in self.buckets.items():
            base = BucketConfig() if entry.get("added") else buckets.get(name)
            if base is None:  # a change to a bucket the file no longer defines
                continue
            settings = {f: entry[f] if f in entry else getattr(base, f) for f in BUCKET_FIELDS}
            if "rules" in entry and "origin_pull" not in entry and settings["origin"] is None and not entry["rules"]:
                # The rules were all removed live and nothing is left to pull
                # from: origin-pull goes off with them (the switch was not set).
                settings["origin_pull"] = False
            try:
                buckets[name] = BucketConfig(**settings)
            except ConfigError as e:
                raise ConfigError(f"live change to bucket {name} no longer fits the configuration: {e}") from None
        return evolve(config, buckets=buckets)

    def ignored(self, config: Config) -> list[str]:
        """Buckets with live field changes that the file no longer defines."""
        return [n for n, e in self.buckets.items() if n not in config.buckets and not e.get("added")]

    # -- JSON --

    def to_json(self) -> dict[str, Any]:
        return {"version": _VERSION, "buckets": dict(self.buckets), "removed": sorted(self.removed)}

    @classmethod
    def from_json(cls, data: object) -> State:
        """:raises ConfigError: saying what is wrong."""
        if not isinstance(data, dict):
            raise ConfigError("must be a JSON object")
        if data.get("version") != _VERSION:
            raise ConfigError(f"has version {data.get('version')!r}; this cosedge reads version {_VERSION}")
        raw_buckets = data.get("buckets", {})
        raw_removed = data.get("removed", [])
        if not isinstance(raw_buckets, dict):
            raise ConfigError("'buckets' must be an object")
        if not isinstance(raw_removed, list) or not all(isinstance(n, str) for n in raw_removed):
            raise ConfigError("'removed' must be a list of bucket names")
        buckets: dict[str, dict[str, Any]] = {}
        for name, entry in raw_buckets.items():
            validate_bucket_name(name)
            if not isinstance(entry, dict) or not set(entry) <= _FIELDS:
                raise ConfigError(f"bucket {name}: expected an object with only {', '.join(sorted(_FIELDS))}")
            if "origin" in entry and entry["origin"] is not None:
                try:
                    entry["origin"] = str(parse_origin(entry["origin"]))
                except ConfigError as e:
                    raise ConfigError(f"bucket {name}: origin {e}") from None
            if "rules" in entry:
                try:
                    entry["rules"] = [rule_table(r) for r in parse_rules(entry["rules"])]
                except ConfigError as e:
                    text = str(e) if str(e).startswith("rules") else f"rules: {e}"
                    raise ConfigError(f"bucket {name}: {text}") from None
            for flag in ("origin_pull", "added"):
                if flag in entry and not isinstance(entry[flag], bool):
                    raise ConfigError(f"bucket {name}: {flag} must be true or false")
            buckets[name] = entry
        for name in raw_removed:
            validate_bucket_name(name)
        return cls(buckets, frozenset(raw_removed))


class NotSynced(Exception):
    """
    The state file was replaced, but its folder could not be synced to disk:
    the new state is in effect (a reader sees it), but a crash of the machine
    may bring the old file back.
    """

    def __init__(self, path: str, error: OSError) -> None:
        super().__init__(f"{path} was replaced but its folder could not be synced to disk: {error}")
        self.path = path
        self.error = error


@define(eq=False)
class StateFile:
    """The state file on disk."""

    path: str

    def load(self) -> State:
        """
        The saved state; an empty one when there is no file yet.

        :raises ConfigError: naming the file when it cannot be read or parsed.
        """
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return State()
        except OSError as e:
            raise ConfigError(f"state file {self.path}: cannot read: {e}") from None
        try:
            return State.from_json(json.loads(raw))
        except ValueError as e:  # ConfigError and JSON errors alike
            raise ConfigError(
                f"state file {self.path}: {e} (it holds the live changes made in the manhole;"
                " fix or remove it to start from the configuration file alone)"
            ) from None

    def save(self, state: State) -> None:
        """
        Replace the file atomically with ``state``.

        :raises OSError: when it cannot be saved; the old file is then intact.
        :raises NotSynced: when the file was replaced (so ``state`` is what
            the file now holds) but the folder's ``fsync`` failed.
        """
        data = (json.dumps(state.to_json(), indent=2, sort_keys=True) + "\n").encode("utf-8")
        unsynced = write_atomically(self.path, data)
        if unsynced is not None:
            raise NotSynced(self.path, unsynced) from unsynced


def write_atomically(path: str, data: bytes) -> OSError | None:
    """
    Replace ``path`` with ``data`` so that a crash leaves the old file or
    the new one, never a mix: a new temporary file in the same folder
    (created exclusively, mode 0600, never through a symbolic link), its
    ``fsync``, a ``rename`` over ``path``, then an ``fsync`` of the folder.

    :raises OSError: when it fails before the rename; the old file is intact.
    :returns: the error of the folder's ``fsync``, if it failed (the file was
        replaced all the same), else None.
    """
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    try:
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        return e
    return None


@define(eq=False)
class MemoryStateFile:
    """A state "file" in memory, for services without a data directory (tests)."""

    state: State = field(factory=State)
    path: str = "<memory>"

    def load(self) -> State:
        return self.state

    def save(self, state: State) -> None:
        self.state = state
