"""
Live administration: the ``edge`` façade, persisted live changes, SIGHUP
reloads and the ``[manhole]`` section.

An operator changes the running daemon through :class:`Edge`, an object in
the namespace of the manhole shell (SSH or telnet, see :mod:`cosedge.manhole`).
Every change is validated by the same rules as the TOML file, saved
atomically to the state file (:mod:`cosedge.state`) *before* it is applied,
then swapped in whole with :meth:`EdgeService.replace_config`, so it applies to
the very next request and survives a restart.  A change that cannot be saved
is not applied.  Each change is logged as one structured audit line (what,
from, to, through which channel) in the ``cosedge.audit`` log namespace.

SIGHUP re-reads the TOML file and the state file the same way; a bad file is
rejected with a log line and the running configuration stays.

``python -m cosedge.admin hash-password [USER]`` prints a line for the telnet
password file.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, TypeVar, overload
from urllib.parse import quote

from attrs import evolve, fields, frozen
from twisted.application.service import MultiService, Service
from twisted.internet import threads
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import origins
from .config import BucketConfig, Config, ConfigError, Origin, load_config, parse_origin, validate_bucket_name
from .keys import BadKey, split_key
from .settle import settled
from .state import MemoryStateFile, NotSynced, State, StateFile, state_path
from .storage.disk import DiskStore

__all__ = [
    "AdminError",
    "Change",
    "Edge",
    "LiveConfig",
    "ManholeSettings",
    "attach",
    "check_config",
    "diff_configs",
    "hash_password",
    "parse_manhole",
    "read_password_file",
    "verify_password",
]

_log = Logger()
_audit = Logger(namespace="cosedge.audit")
_T = TypeVar("_T")

#: Runs a blocking function off the reactor thread: a Deferred of its result.
InThread = Callable[[Callable[[], Any]], "Deferred[Any]"]


class AdminError(ValueError):
    """An administrative command was refused; nothing was changed."""


# ---------------------------------------------------------------------------
# Output that reads well in the shell (and is still plain data for scripts).


class Message(str):
    """A result line; shown without quotes in the shell."""

    def __repr__(self) -> str:
        return str(self)


class Table(list[dict[str, Any]]):
    """Rows of a report (plain dicts); shown as an aligned table in the shell."""

    def __repr__(self) -> str:
        if not self:
            return "(none)"
        columns = list(self[0])
        cells = [[_cell(row.get(c)) for c in columns] for row in self]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
        return "\n".join(lines)


class Report(dict[str, Any]):
    """Named values (a plain dict); shown one per line in the shell."""

    def __repr__(self) -> str:
        width = max((len(k) for k in self), default=0)
        return "\n".join(f"{k.ljust(width)}  {_cell(v)}" for k, v in self.items())


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
    return str(value)


# ---------------------------------------------------------------------------
# Changes and the audit log.


@frozen
class Change:
    """One effective change of the running configuration."""

    what: str
    subject: str
    old: object
    new: object

    def __str__(self) -> str:
        if self.what == "bucket" and self.old is None:
            return f"bucket {self.subject} added: {self.new}"
        if self.what == "bucket" and self.new is None:
            return f"bucket {self.subject} removed (was {self.old})"
        return f"{self.what} of {self.subject}: {_show(self.old)} -> {_show(self.new)}"


def _show(value: object) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ", ".join(map(str, value))
    return str(value)


def _describe(bucket: BucketConfig) -> str:
    origin = str(bucket.origin) if bucket.origin is not None else "(none)"
    return f"origin={origin} origin_pull={'on' if bucket.origin_pull else 'off'}"


def diff_configs(old: Config, new: Config) -> list[Change]:
    """What differs between two configurations, as operators name it."""
    changes: list[Change] = []
    for name in sorted(set(old.buckets) | set(new.buckets)):
        a, b = old.buckets.get(name), new.buckets.get(name)
        if a == b:
            continue
        if a is None or b is None:
            changes.append(Change("bucket", name, a and _describe(a), b and _describe(b)))
            continue
        if a.origin != b.origin:
            changes.append(Change("origin", name, a.origin and str(a.origin), b.origin and str(b.origin)))
        if a.origin_pull != b.origin_pull:
            changes.append(Change("origin_pull", name, a.origin_pull, b.origin_pull))
    if old.server.domains != new.server.domains:
        changes.append(Change("domains", "server", old.server.domains, new.server.domains))
    for f in fields(type(old.fill)):
        a_value, b_value = getattr(old.fill, f.name), getattr(new.fill, f.name)
        if a_value != b_value:
            changes.append(Change(f.name, "fill", a_value, b_value))
    return changes


def audit(channel: str, change: Change) -> None:
    """Log one structured audit line for ``change``."""
    _audit.info(
        "audit: {change} via {channel}",
        audit=True,
        change=str(change),
        what=change.what,
        subject=change.subject,
        old=_show(change.old),
        new=_show(change.new),
        channel=channel,
    )


# ---------------------------------------------------------------------------
# The live configuration: file + overlay, changed atomically.

#: Server settings bound when the daemon starts (listeners, store, access
#: log): a reload keeps the running values and says a restart is needed (as
#: it does for [manhole], [admin] listen and [log]: see LiveConfig._fixed_of).
_FIXED_SERVER = ("listen", "data_dir", "access_log", "request_timeout", "workers")


class LiveConfig(Service):
    """
    Owns the running configuration as *file* + *live changes*: applies the
    state overlay at start-up, makes every live change (validate, save,
    apply, audit), reloads on SIGHUP.  A child service of the
    :class:`~cosedge.service.EdgeService`, named ``"admin"``.
    """

    name = "admin"

    def __init__(
        self, service: Any, state_file: StateFile | MemoryStateFile, *, _in_thread: InThread | None = None
    ) -> None:
        self.service = service
        self.state_file = state_file
        #: Runs disk walks (``edge.buckets(usage=True)``) off the reactor
        #: thread: the reactor's thread pool unless a test gives another.
        self._in_thread: InThread = _in_thread or self._in_reactor_pool
        #: One walk at a time: they hold a thread of the pool the fills use.
        self._walks = DeferredSemaphore(1)
        #: The configuration as the file (and the command line) give it.
        self.base: Config = service.config
        # What the *file* says of the settings bound at start, for the next
        # reload to tell an edit of them: the running configuration would
        # not do, as the command line (--listen) overrides the file.
        try:
            from_file = load_config(service.config_path)
        except ConfigError:
            from_file = service.config  # changed since the start; a reload says so
        self._file_fixed = self._fixed_of(from_file)
        self.state: State = state_file.load()
        self._previous_handler: Any = None
        #: Set by :meth:`change` when the last change was applied but its
        #: save could not be synced to disk (what to tell the operator).
        self.unsynced: str | None = None
        effective = self.state.apply(self.base)
        for name in self.state.ignored(self.base):
            _log.warn("live changes to bucket {bucket} ignored: the configuration no longer defines it", bucket=name)
        changes = diff_configs(self.base, effective)
        if changes:
            _log.info(
                "applied {count} live change(s) from {path}: {changes}",
                count=len(changes),
                path=state_file.path,
                changes="; ".join(map(str, changes)),
            )
        service.replace_config(effective)

    @staticmethod
    def _fixed_of(config: Config) -> dict[str, object]:
        """The settings bound at start, by the name a restart warning gives them."""
        from . import ops

        fixed: dict[str, object] = {n: getattr(config.server, n) for n in _FIXED_SERVER}
        fixed["manhole"] = config.extra.get("manhole")
        # The admin listener and the JSON log file are opened at start; the
        # rest of [admin] (min_free_bytes) is read live.
        try:
            admin = ops.parse_admin(config.extra)
            log = ops.parse_log(config.extra) or ops.LogConfig()
        except ConfigError:  # checked before a reload applies anything
            return fixed
        fixed["[admin] listen"] = None if admin is None else admin.listen
        for name in ("json_file", "json_rotate_bytes", "json_keep"):
            fixed[f"[log] {name}"] = getattr(log, name)
        return fixed

    def _in_reactor_pool(self, f: Callable[[], _T]) -> Deferred[_T]:
        reactor = self.service.reactor
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f)

    def usage(self, names: list[str]) -> Deferred[list[tuple[int, int]]]:
        """(objects, bytes) of each bucket in ``names``, counted in a thread, one walk at a time."""
        store = self.service.store

        async def walk() -> list[tuple[int, int]]:
            return [await store.usage(name) for name in names]

        # A Deferred of its own: the one run() returns is paused on the
        # store's, which the shell would show as already fired.
        d: Deferred[list[tuple[int, int]]] = Deferred()
        self._walks.run(lambda: Deferred.fromCoroutine(walk())).chainDeferred(d)
        return d

    def edge(self, channel: str) -> Edge:
        """The façade for one shell session (``channel`` goes into audit lines)."""
        return Edge(self, channel)

    @property
    def config(self) -> Config:
        current: Config = self.service.config
        return current

    def change(self, channel: str, new_state: State) -> list[Change]:
        """
        Make the live change that leads to ``new_state``: validate, save,
        apply, audit.

        :raises AdminError: when it is invalid or cannot be saved; then
            nothing changed.  A change saved but not synced to disk (the
            file was replaced, its folder's ``fsync`` failed) is applied
            with a warning, kept in :attr:`unsynced` for the caller to show.
        """
        self.unsynced = None
        if new_state == self.state:
            return []
        try:
            effective = new_state.apply(self.base)
        except ConfigError as e:
            raise AdminError(f"{e}; nothing changed") from None
        try:
            self.state_file.save(new_state)
        except NotSynced as e:
            # The file already holds the new state: not applying it would
            # leave the daemon at odds with what a restart loads.
            _log.warn(
                "live change via {channel} saved to {path} but not synced to disk ({error});"
                " applied, but a crash of the machine may undo it",
                channel=channel,
                path=self.state_file.path,
                error=e.error,
            )
            self.unsynced = f"saved, but not synced to disk ({e.error}): a crash of the machine may undo it"
        except OSError as e:
            _log.error(
                "live change via {channel} not saved to {path}: {error}",
                channel=channel,
                path=self.state_file.path,
                error=e,
            )
            raise AdminError(f"could not save the change to {self.state_file.path} ({e}); nothing changed") from None
        self.state = new_state
        old = self.service.replace_config(effective)
        changes = diff_configs(old, effective)
        for change in changes:
            audit(channel, change)
        if not changes:
            _audit.info(
                "audit: live changes saved via {channel}; the running configuration is the same",
                audit=True,
                channel=channel,
            )
        return changes

    def reload(self, channel: str) -> list[Change]:
        """
        Re-read the TOML file and the state file and apply them.

        :raises AdminError: when either is invalid; the running configuration
            stays (and the rejection is logged).
        """
        path = self.service.config_path
        try:
            loaded = load_config(path)
            if "manhole" in loaded.extra:
                parse_manhole(loaded.extra["manhole"], loaded.server.data_dir)
            from . import ops

            ops.check_config(loaded)  # [admin] and [log], which ops reads live
            state = self.state_file.load()
            running = self.config
            # The other optional sections follow the file; the manhole's
            # listeners are bound at start, so its section stays as running.
            extra = {k: v for k, v in loaded.extra.items() if k != "manhole"}
            if "manhole" in running.extra:
                extra["manhole"] = running.extra["manhole"]
            base = evolve(
                loaded,
                server=evolve(loaded.server, **{n: getattr(running.server, n) for n in _FIXED_SERVER}),
                extra=extra,
            )
            effective = state.apply(base)
        except ConfigError as e:
            _log.error(
                "reload via {channel} rejected, keeping the running configuration: {error}",
                channel=channel,
                error=str(e),
            )
            raise AdminError(f"reload rejected, the running configuration stays: {e}") from None
        fixed = self._fixed_of(loaded)
        needs = [n for n in {**self._file_fixed, **fixed} if fixed.get(n) != self._file_fixed.get(n)]
        if needs:
            _log.warn(
                "{file}: {settings} changed; that takes effect only after a restart",
                file=path or "embedded default config",
                settings=", ".join(needs),
            )
        self._file_fixed = fixed
        for name in state.ignored(base):
            _log.warn("live changes to bucket {bucket} ignored: the configuration no longer defines it", bucket=name)
        self.base, self.state = base, state
        old = self.service.replace_config(effective)
        changes = diff_configs(old, effective)
        for change in changes:
            audit(channel, change)
        _log.info(
            "configuration reloaded from {file} via {channel}: {count} change(s)",
            file=path or "embedded default config",
            channel=channel,
            count=len(changes),
        )
        return changes

    # -- SIGHUP --

    def startService(self) -> None:
        super().startService()
        reactor = self.service.reactor
        if IReactorThreads.providedBy(reactor) and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGHUP, self._on_hangup)

    def stopService(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
            self._previous_handler = None
        super().stopService()

    def _on_hangup(self, signum: int, frame: object) -> None:
        # A signal handler runs between two bytecodes of whatever the main
        # thread was doing: hand the work to the reactor.
        self.service.reactor.callFromThread(self._reload_on_hangup)

    def _reload_on_hangup(self) -> None:
        self.service.reopen_logs()  # logrotate's postrotate: a new access-log file
        try:
            self.reload("sighup")
        except AdminError:
            pass  # already logged


# ---------------------------------------------------------------------------
# The façade.


class Edge:
    """
    Administer this cosedge daemon live.  Changes are validated by the same
    rules as the configuration file, saved to the state file under the data
    directory (so a restart keeps them), applied to the very next request,
    and logged as audit lines.  A refused change raises an error and changes
    nothing.

    Buckets and origins (the console's "Basic Configuration"):

      edge.buckets()                       buckets, origin, origin-pull on/off
      edge.buckets(usage=True)             ... with object count and bytes
                                           (walks the bucket folders in a
                                           thread: a Deferred, shown when
                                           it fires; slow for big buckets)
      edge.set_origin(bucket, address)     'abc.example.com', 'abc.example.com:8080',
                                           '10.10.10.10' or '10.10.10.10:8080';
                                           never 'http://...', a path or a blank
      edge.enable_origin_pull(bucket)      refused while the bucket has no origin
      edge.disable_origin_pull(bucket)
      edge.add_bucket(name, origin=None, origin_pull=False)
      edge.remove_bucket(name)             the bucket's files stay on disk
      edge.changes()                       live changes on top of the file
      edge.revert(bucket)                  drop a bucket's live changes: the
                                           configuration file rules again
      edge.reload()                        re-read the configuration file (as SIGHUP)

    Objects and fills:

      edge.fills()                         fills running and queued
      edge.stats()                         hits, misses, redirects, fills, bytes
      edge.processes()                     this daemon's processes ([server] workers)
      edge.purge(bucket, key)              delete one stored object
      edge.prefetch(bucket, key)           copy one object from the origin now;
                                           returns a Deferred (the shell shows
                                           its result when it fires)

    Keys are plain object keys such as '1.jpg' or 'img/a b.jpg' (not
    percent-encoded).  From a script, one command per ssh call prints its
    result and exits 0, or 1 when refused:
    ssh -p 2222 admin@127.0.0.1 "edge.disable_origin_pull('example-1250000000')"
    """

    def __init__(self, live: LiveConfig, channel: str) -> None:
        self._live = live
        self._channel = channel

    def __repr__(self) -> str:
        return "<edge: administer this cosedge daemon; help(edge) lists the commands>"

    # -- buckets and origins --

    @overload
    def buckets(self, usage: Literal[False] = False) -> Table: ...

    @overload
    def buckets(self, usage: Literal[True]) -> Deferred[Table]: ...

    @overload
    def buckets(self, usage: bool) -> Table | Deferred[Table]: ...

    def buckets(self, usage: bool = False) -> Table | Deferred[Table]:
        """
        Each bucket with its origin and whether origin-pull is on.  With
        ``usage=True`` also the number of stored objects and their bytes:
        this walks each bucket's folder (slow for big buckets) in a thread,
        so it returns a Deferred, which the shell prints when it fires.
        """
        rows = Table()
        for name, bucket in self._live.config.buckets.items():
            rows.append(
                {
                    "bucket": name,
                    "origin": str(bucket.origin) if bucket.origin is not None else None,
                    "origin_pull": bucket.origin_pull,
                    "live": "changed" if self._live.state.touches(name) else "",
                }
            )
        if not usage:
            return rows

        def counted(usages: list[tuple[int, int]]) -> Table:
            for row, (objects, size) in zip(rows, usages, strict=True):
                row["objects"], row["bytes"] = objects, size
            return rows

        return self._live.usage([row["bucket"] for row in rows]).addCallback(counted)

    def set_origin(self, bucket: str, address: str) -> Message:
        """
        Set the origin address of ``bucket``: a domain name or an IPv4
        address, optionally with ``:port`` (``'abc.example.com'``,
        ``'10.10.10.10:8080'``).  No ``http://``, path, query or blanks.
        """
        name = self._bucket(bucket)
        origin = self._origin(address, "set_origin")
        return self._change(self._live.state.with_fields(name, origin=str(origin)), f"origin of {name}")

    def enable_origin_pull(self, bucket: str) -> Message:
        """
        Turn origin-pull on for ``bucket``: a miss is redirected to the origin
        and copied into the bucket.  Refused while the bucket has no origin
        address (set one with ``edge.set_origin`` first).
        """
        name = self._bucket(bucket)
        if self._live.config.buckets[name].origin is None:
            raise AdminError(
                f"bucket {name} has no origin address; set one with edge.set_origin({name!r}, 'abc.example.com')"
                " first (origin-pull cannot be enabled without it); nothing changed"
            )
        return self._change(self._live.state.with_fields(name, origin_pull=True), f"origin_pull of {name}")

    def disable_origin_pull(self, bucket: str) -> Message:
        """Turn origin-pull off for ``bucket``: a miss answers 404 NoSuchKey."""
        name = self._bucket(bucket)
        return self._change(self._live.state.with_fields(name, origin_pull=False), f"origin_pull of {name}")

    def add_bucket(self, name: str, origin: str | None = None, origin_pull: bool = False) -> Message:
        """
        Add a bucket (``'<name>-<appid>'``, e.g. ``'example-1250000000'``),
        optionally with its origin and origin-pull on.
        """
        try:
            validate_bucket_name(name)
        except ConfigError as e:
            raise AdminError(f"add_bucket: {e}; nothing changed") from None
        if name in self._live.config.buckets:
            raise AdminError(f"bucket {name} already exists; nothing changed")
        if not isinstance(origin_pull, bool):
            raise AdminError(f"add_bucket: origin_pull must be True or False, not {origin_pull!r}; nothing changed")
        parsed = None if origin is None else self._origin(origin, "add_bucket")
        if origin_pull and parsed is None:
            raise AdminError(
                "add_bucket: origin_pull cannot be enabled without an origin address; give origin=...; nothing changed"
            )
        state = self._live.state.with_added(name, None if parsed is None else str(parsed), origin_pull)
        return self._change(state, f"bucket {name}")

    def remove_bucket(self, name: str) -> Message:
        """
        Remove a bucket from service: its requests answer 404 NoSuchBucket.
        The objects stay on disk; adding the bucket again serves them again.
        """
        name = self._bucket(name)
        state = self._live.state.with_removed(name, in_file=name in self._live.base.buckets)
        folder = os.path.join(self._live.config.server.data_dir, name)
        return self._change(state, f"bucket {name}", f"its files stay in {folder}")

    def changes(self) -> Table:
        """The live changes kept on top of the configuration file."""
        rows = Table()
        for name, entry in self._live.state.buckets.items():
            row = {"bucket": name, "change": "added" if entry.get("added") else "changed"}
            for key in ("origin", "origin_pull"):
                row[key] = _show(entry[key]) if key in entry else "(file)"
            rows.append(row)
        rows += [
            {"bucket": name, "change": "removed", "origin": "", "origin_pull": ""}
            for name in sorted(self._live.state.removed)
        ]
        return rows

    def revert(self, bucket: str) -> Message:
        """Drop every live change of ``bucket``: the configuration file rules again."""
        if not isinstance(bucket, str) or not self._live.state.touches(bucket):
            raise AdminError(f"bucket {bucket!r} has no live changes; nothing changed")
        return self._change(self._live.state.without(bucket), f"bucket {bucket}", "the file's settings apply")

    def reload(self) -> Message:
        """Re-read the configuration file and the state file (what SIGHUP does)."""
        changes = self._live.reload(self._channel)
        return Message("\n".join(map(str, changes)) if changes else "reloaded: no change")

    # -- objects and fills --

    def fills(self) -> Table:
        """
        Fills running and queued: bucket, key, state, bytes so far, expected,
        age (s); with workers, also the process (0 is this one; a worker's as
        of its last report, at most a second old).
        """
        columns = ("bucket", "key", "state", "bytes", "expected", "age", "process")
        return Table({k: f[k] for k in columns if k in f} for f in self._live.service.in_flight())

    def processes(self) -> Table:
        """
        The daemon's processes: 0 is this one (the primary), then each worker
        with its pid, whether it serves, its uptime (s) and how many times it
        was started again after dying.
        """
        service = self._live.service
        rows = [{"process": 0, "pid": os.getpid(), "serving": True, "uptime": None, "restarts": 0}]
        if service.workers is not None:
            rows += service.workers.processes()
        return Table(rows)

    def stats(self) -> Report:
        """Counters since start: hits, misses, redirects, fills by outcome and reason, bytes."""
        totals = self._live.service.totals()  # every process of the daemon
        report = Report(totals.stats.snapshot())
        report["fills_running"] = totals.fills_running
        report["fills_queued"] = totals.fills_queued
        return report

    def purge(self, bucket: str, key: str) -> Message | Deferred[Message]:
        """
        Delete the stored object ``key`` from ``bucket`` (the next request is
        a miss, pulled again when origin-pull is on).
        """
        name = self._bucket(bucket)
        segments = self._key(key)
        try:
            removed = settled(self._live.service.store.remove(name, segments))
        except OSError as e:
            raise AdminError(f"could not purge {name}/{key}: {e}") from None
        if isinstance(removed, Deferred):  # a store that answers later

            def refused(failure: Failure) -> Message:
                failure.trap(OSError)
                raise AdminError(f"could not purge {name}/{key}: {failure.value}")

            return removed.addCallbacks(lambda r: self._purged(name, segments, r), refused)
        return self._purged(name, segments, removed)

    def _purged(self, name: str, segments: tuple[str, ...], removed: bool) -> Message:
        self._live.service.forget(name, segments)
        if not removed:
            return Message(f"{name}/{'/'.join(segments)} is not stored; nothing purged")
        audit(self._channel, Change("object", f"{name}/{'/'.join(segments)}", "stored", "purged"))
        return Message(f"purged {name}/{'/'.join(segments)}")

    def prefetch(self, bucket: str, key: str) -> Deferred[Any]:
        """
        Copy ``key`` from the bucket's origin into ``bucket`` now (again, if it
        is stored).  Returns a Deferred that fires with the outcome.
        """
        name = self._bucket(bucket)
        segments = self._key(key)
        bucket_config = self._live.config.buckets[name]
        source = origins.prefetch_source(bucket_config, segments)
        if source is None or bucket_config.origin is None:
            raise AdminError(f"bucket {name} has no origin address; set one with edge.set_origin first")
        _log.info(
            "prefetch {bucket}/{key} from {origin} via {channel}",
            bucket=name,
            key="/".join(segments),
            origin=str(bucket_config.origin),
            channel=self._channel,
        )
        d: Deferred[Any] = self._live.service.filler.fill(name, segments, source, force=True)
        return d

    # -- helpers --

    def _bucket(self, bucket: object) -> str:
        known = self._live.config.buckets
        if not isinstance(bucket, str) or bucket not in known:
            names = ", ".join(known) or "none"
            raise AdminError(f"no bucket named {bucket!r} (buckets: {names}); nothing changed")
        return bucket

    @staticmethod
    def _origin(address: object, call: str) -> Origin:
        try:
            return parse_origin(address)
        except ConfigError as e:
            raise AdminError(f"{call} refused: origin address {e}; nothing changed") from None

    @staticmethod
    def _key(key: object) -> tuple[str, ...]:
        if not isinstance(key, str) or not key.strip("/"):
            raise AdminError(f"expected an object key like '1.jpg', not {key!r}")
        try:
            segments = split_key(quote(key.removeprefix("/"), safe="/").encode("ascii"))
        except BadKey as e:
            raise AdminError(f"invalid key {key!r}: {e.message}") from None
        return segments

    def _change(self, state: State, subject: str, note: str = "") -> Message:
        before = self._live.state
        changes = self._live.change(self._channel, state)
        if state == before:
            return Message(f"{subject}: unchanged")
        if not changes:
            text = f"{subject}: live change saved; the running configuration is the same"
        else:
            text = "\n".join(map(str, changes))
            if note:
                text += f" ({note})"
        if self._live.unsynced:
            text += f"\nwarning: {self._live.unsynced}"
        return Message(text)


# ---------------------------------------------------------------------------
# The [manhole] section.

_MANHOLE_KEYS = ("ssh", "ssh_authorized_keys", "ssh_host_key", "telnet", "telnet_passwords")


@frozen
class ManholeSettings:
    """The validated ``[manhole]`` section."""

    #: Endpoint string of the SSH listener, or None.
    ssh: str | None
    #: authorized_keys file for SSH logins (any user name; keys decide).
    ssh_authorized_keys: str | None
    #: Where the SSH host key is kept (generated on first start).
    ssh_host_key: str
    #: Endpoint string of the telnet listener (``unix:`` or loopback ``tcp:``), or None.
    telnet: str | None
    #: File of hashed passwords for telnet logins (required on TCP).
    telnet_passwords: str | None


def _string(table: Mapping[str, Any], key: str) -> str | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"[manhole] {key} must be a non-empty string, not {value!r}")
    return value


def telnet_endpoint_parts(description: str) -> tuple[str, dict[str, Any]]:
    """
    Split a telnet endpoint string into ``("tcp", {port, interface, backlog})``
    or ``("unix", {address, backlog, lockfile})``.

    :raises ConfigError: for anything but a UNIX socket or a loopback TCP port.
    """
    from twisted.internet.endpoints import _parseServer

    kind = description.partition(":")[0].strip().lower()
    if kind not in ("tcp", "unix"):
        raise ConfigError(
            f"[manhole] telnet {description!r}: only 'unix:PATH' or 'tcp:PORT:interface=127.0.0.1' are allowed"
        )
    try:
        name, args, kw = _parseServer(description, None)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"[manhole] telnet {description!r} is not a valid endpoint: {e}") from None
    if name == "UNIX":
        if "mode=" in description and kw["mode"] != 0o600:
            raise ConfigError(
                f"[manhole] telnet {description!r}: a telnet UNIX socket always has mode 600; leave mode out"
            )
        return "unix", {"address": args[0], "backlog": kw["backlog"], "lockfile": kw["wantPID"]}
    interface = kw["interface"]
    try:
        loopback = ipaddress.ip_address(interface).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        where = f"interface {interface!r}" if interface else "all interfaces (no interface= given)"
        raise ConfigError(
            f"[manhole] telnet {description!r}: refusing to listen for telnet on {where}: telnet is unencrypted."
            " Use a loopback interface (tcp:2323:interface=127.0.0.1), a unix: socket, or ssh for remote access"
        )
    return "tcp", {"port": args[0], "interface": interface, "backlog": kw["backlog"]}


def parse_manhole(table: object, data_dir: str) -> ManholeSettings:
    """
    Validate the ``[manhole]`` section (endpoints and which files go with
    them; the files themselves are checked by :func:`check_manhole_files`).

    :raises ConfigError: naming the field.
    """
    if not isinstance(table, Mapping):
        raise ConfigError("[manhole] must be a table")
    unknown = sorted(set(table) - set(_MANHOLE_KEYS))
    if unknown:
        raise ConfigError(f"[manhole] has unknown setting(s) {', '.join(unknown)}; known: {', '.join(_MANHOLE_KEYS)}")
    values = {k: _string(table, k) for k in _MANHOLE_KEYS}
    ssh, telnet = values["ssh"], values["telnet"]
    if ssh is None and telnet is None:
        raise ConfigError("[manhole] sets neither ssh nor telnet; give an endpoint, or remove the section")
    if ssh is None:
        for key in ("ssh_authorized_keys", "ssh_host_key"):
            if values[key] is not None:
                raise ConfigError(f"[manhole] {key} is set but ssh is not")
    else:
        from twisted.internet.endpoints import serverFromString
        from twisted.internet.testing import MemoryReactor

        try:
            serverFromString(MemoryReactor(), ssh)
        except Exception as e:  # the parsers raise all sorts
            raise ConfigError(f"[manhole] ssh {ssh!r} is not a valid endpoint: {e}") from None
        if values["ssh_authorized_keys"] is None:
            raise ConfigError("[manhole] ssh needs ssh_authorized_keys (an authorized_keys file of who may log in)")
    if telnet is None:
        if values["telnet_passwords"] is not None:
            raise ConfigError("[manhole] telnet_passwords is set but telnet is not")
    else:
        kind, _ = telnet_endpoint_parts(telnet)
        if kind == "tcp" and values["telnet_passwords"] is None:
            raise ConfigError(
                "[manhole] telnet on TCP needs telnet_passwords (a file of lines made by"
                " 'python -m cosedge.admin hash-password USER')"
            )
    host_key = values["ssh_host_key"] or os.path.join(data_dir, ".cosedge", "ssh_host_ed25519_key")
    return ManholeSettings(ssh, values["ssh_authorized_keys"], host_key, telnet, values["telnet_passwords"])


def read_authorized_keys(path: str) -> list[Any]:
    """
    The public keys of an authorized_keys file (``ssh-ed25519 AAAA… comment``
    lines; lines with options are not supported and are skipped).

    :raises ConfigError: when the file cannot be read.
    """
    from twisted.conch.ssh.keys import BadKeyError, Key

    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ConfigError(f"[manhole] ssh_authorized_keys {path}: cannot read: {e}") from None
    found = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith(b"#"):
            try:
                found.append(Key.fromString(line))
            except (BadKeyError, ValueError, IndexError, binascii.Error):
                continue
    return found


def check_manhole_files(settings: ManholeSettings) -> None:
    """
    Check the files the manhole needs: the authorized_keys file has at least
    one key, an existing host key loads, the password file parses.

    :raises ConfigError: naming the field and the file.
    """
    if settings.ssh_authorized_keys is not None and not read_authorized_keys(settings.ssh_authorized_keys):
        raise ConfigError(
            f"[manhole] ssh_authorized_keys {settings.ssh_authorized_keys}: no usable public key"
            " (expected lines like 'ssh-ed25519 AAAA... comment')"
        )
    if settings.ssh is not None and os.path.exists(settings.ssh_host_key):
        from twisted.conch.ssh.keys import Key

        try:
            key = Key.fromFile(settings.ssh_host_key)
        except Exception as e:  # BadKeyError, OSError, ValueError …
            raise ConfigError(f"[manhole] ssh_host_key {settings.ssh_host_key}: cannot load: {e}") from None
        if key.isPublic():
            raise ConfigError(f"[manhole] ssh_host_key {settings.ssh_host_key}: is a public key, not a private one")
    if settings.telnet_passwords is not None:
        try:
            users = read_password_file(settings.telnet_passwords)
        except ConfigError as e:
            raise ConfigError(f"[manhole] telnet_passwords {e}") from None
        if not users:
            raise ConfigError(
                f"[manhole] telnet_passwords {settings.telnet_passwords}: no users; add lines made by"
                " 'python -m cosedge.admin hash-password USER'"
            )


def _state_file(service: Any) -> StateFile | MemoryStateFile:
    store = service.store
    if isinstance(store, DiskStore):
        return StateFile(state_path(store.data_dir))
    return MemoryStateFile()


def check_config(config: Config) -> None:
    """
    Everything this module checks before the daemon starts: the
    ``[manhole]`` section and its files, and that the saved live changes
    still fit the configuration.  ``twistd cosedge`` calls it so that a bad
    setting stops the daemon with one clear message.

    :raises ConfigError:
    """
    if "manhole" in config.extra:
        check_manhole_files(parse_manhole(config.extra["manhole"], config.server.data_dir))
    StateFile(state_path(config.server.data_dir)).load().apply(config)


def attach(service: Any) -> None:
    """
    Wire live administration into ``service`` (called by ``build_service``):
    apply the saved live changes on top of the file, handle SIGHUP, and
    start the manhole listeners configured in ``[manhole]``.

    :raises ConfigError: for a bad ``[manhole]`` section or state file.
    """
    settings = None
    if "manhole" in service.config.extra:
        settings = parse_manhole(service.config.extra["manhole"], service.config.server.data_dir)
        check_manhole_files(settings)
    live = LiveConfig(service, _state_file(service))
    live.setServiceParent(service)
    if settings is not None:
        from .manhole import manhole_service  # installs the reactor: only now

        shells: MultiService = manhole_service(settings, lambda channel: {"edge": live.edge(channel)}, service.reactor)
        shells.setServiceParent(service)


# ---------------------------------------------------------------------------
# Telnet passwords.
#
# One line per user:  USER:scrypt$N$R$P$SALT$HASH
# with SALT and HASH in unpadded URL-safe base64, HASH = hashlib.scrypt(
# password, salt=SALT, n=N, r=R, p=P, dklen=32).  Blank lines and lines
# starting with '#' are ignored.

_USER = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_SCRYPT = (2**14, 8, 1)
_MAXMEM = 64 * 1024 * 1024


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """The ``scrypt$…`` hash of ``password`` (a fresh random salt unless given)."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    n, r, p = _SCRYPT
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=32, maxmem=_MAXMEM)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def _parse_hash(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("expected scrypt$N$R$P$SALT$HASH")
    n, r, p = (int(x) for x in parts[1:4])
    if n < 2 or n & (n - 1) or n > 2**20 or not 1 <= r <= 32 or not 1 <= p <= 16:
        raise ValueError("scrypt parameters out of range")
    salt, digest = _unb64(parts[4]), _unb64(parts[5])
    if len(salt) < 8 or len(digest) < 16:
        raise ValueError("salt or hash too short")
    return n, r, p, salt, digest


def verify_password(encoded: str, password: str) -> bool:
    """Whether ``password`` matches ``encoded`` (constant-time comparison)."""
    try:
        n, r, p, salt, digest = _parse_hash(encoded)
    except ValueError:
        return False
    computed = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=len(digest), maxmem=_MAXMEM)
    return hmac.compare_digest(computed, digest)


def read_password_file(path: str) -> dict[str, str]:
    """
    ``{user: hash}`` from a password file.

    :raises ConfigError: naming the file and line when it is malformed.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    users: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, encoded = line.partition(":")
        try:
            if not sep or not _USER.match(user):
                raise ValueError("expected USER:scrypt$N$R$P$SALT$HASH")
            _parse_hash(encoded)
        except (ValueError, binascii.Error) as e:
            raise ConfigError(f"{path} line {number}: {e}") from None
        users[user] = encoded
    return users


def _read_new_password(stream_is_tty: bool) -> str:
    if not stream_is_tty:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != first:
        raise SystemExit("the passwords differ")
    return first


def main(argv: Iterable[str] | None = None) -> int:
    """``python -m cosedge.admin hash-password [USER]``: print a password-file line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "hash-password" or len(args) > 2:
        print(
            "usage: python -m cosedge.admin hash-password [USER]\n"
            "  reads the password (twice on a terminal, once from a pipe) and prints\n"
            "  the line to add to the [manhole] telnet_passwords file",
            file=sys.stderr,
        )
        return 2
    user = args[1] if len(args) == 2 else "admin"
    if not _USER.match(user):
        print(f"invalid user name {user!r}: letters, digits, '.', '_', '-'", file=sys.stderr)
        return 2
    password = _read_new_password(sys.stdin.isatty())
    if not password:
        print("refusing an empty password", file=sys.stderr)
        return 2
    print(f"{user}:{hash_password(password)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
