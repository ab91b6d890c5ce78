"""
The ``edge`` façade: the object an operator types into in the manhole shell
(``edge.set_origin(...)``, ``edge.stats()``, ...); the origin-rule commands
are in :mod:`cosedge.admin.rules` and the plain values the commands return
in :mod:`cosedge.admin.values`.

Every change goes through the live configuration
(:class:`~cosedge.admin.live.LiveConfig`), which validates, saves, applies
and audits it; this module only names the commands and checks their
arguments.
"""

from __future__ import annotations

import os
from typing import Any, Literal, overload
from urllib.parse import quote

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from .. import origins
from ..config import BUCKET_FIELDS, BucketConfig, ConfigError, Origin, parse_origin, plain, validate_bucket_name
from ..keys import BadKey, split_key
from ..settle import settled
from .changes import Change, audit, show
from .context import LiveAdmin
from .errors import AdminError
from .jobs import JobCommands
from .rules import RuleCommands
from .state import State
from .values import Message, Report, Table

__all__ = ["Edge", "LiveAdmin", "Message", "Prefetched", "Report", "Table"]

_log = Logger(namespace="cosedge.admin")


@frozen
class Prefetched:
    """The outcome of ``edge.prefetch``: the fill's, and the URL it copied from (the first one tried)."""

    bucket: str
    key: str
    stored: bool
    #: "stored", or why not (a fill failure reason, or "elsewhere").
    reason: str
    size: int
    source: str


#: The bucket settings as ``edge.buckets()`` and ``edge.changes()`` show them: rules last, by their number.
#: Shown by edge.buckets() only once some bucket sets them (most daemons never do).
_RARE = ("acl", "revalidate_after")
_SETTINGS = tuple(f for f in BUCKET_FIELDS if f not in ("rules", *_RARE))


def _shown(setting: str, value: object) -> str:
    """A live change as ``edge.changes()`` shows it: rules by their number."""
    if setting == "rules" and isinstance(value, list):
        return f"{len(value)} rule{'' if len(value) == 1 else 's'}"
    return show(value)


class Edge(RuleCommands, JobCommands):
    """
    Administer this cosedge daemon live.  Changes are validated by the same
    rules as the configuration file, saved to the state file under the data
    directory (so a restart keeps them), applied to the very next request,
    and logged as audit lines.  A refused change raises an error and changes
    nothing.

    Buckets and origins (the console's "Basic Configuration"):

      edge.buckets()                       buckets, origin, origin-pull on/off, rules
      edge.buckets(usage=True)             ... with object count and bytes
                                           (walks the bucket folders in a
                                           thread: a Deferred, shown when
                                           it fires; slow for big buckets)
      edge.set_origin(bucket, address)     'abc.example.com', 'abc.example.com:8080',
                                           '10.10.10.10' or '10.10.10.10:8080';
                                           never 'http://...', a path or a blank
      edge.enable_origin_pull(bucket)      refused while the bucket has neither
                                           an origin nor rules
      edge.disable_origin_pull(bucket)     COS's status switch: every rule off
      edge.add_bucket(name, origin=None, origin_pull=False)
      edge.remove_bucket(name)             the bucket's files stay on disk
      edge.changes()                       live changes on top of the file
      edge.revert(bucket)                  drop a bucket's live changes: the
                                           configuration file rules again
      edge.reload()                        re-read the configuration file (as SIGHUP)

    Origin rules (COS's "Origin-pull" rules; a bucket with rules pulls by
    them alone, its origin then serves no miss):

      edge.rules(bucket)                   the rules: priority, type, prefix,
                                           suffix, hosts, standby, protocol, ...
      edge.set_rules(bucket, rules)        rules: a list of tables with the keys
                                           of the configuration file, e.g.
                                           [{'priority': 1, 'type': 'mirror',
                                             'hosts': ['www.example.com']}];
                                           [] removes them all
      edge.add_rule(bucket, rule)          one table; refused if its priority
                                           is taken
      edge.remove_rule(bucket, priority)
      edge.rules_xml(bucket)               the rules as COS <OriginConfiguration>
                                           XML (GET Bucket origin's body)
      edge.set_rules_xml(bucket, xml)      load such XML (PUT Bucket origin's
                                           body); what cosedge does not support
                                           is refused by name

    Objects and fills:

      edge.fills()                         fills running and queued
      edge.stats()                         hits, misses, redirects, fills, bytes
      edge.processes()                     this daemon's processes ([server] workers)
      edge.purge(bucket, key)              delete one stored object
      edge.prefetch(bucket, key)           copy one object now from where a miss
                                           would (its proxy/mirror rule, or the
                                           origin);
                                           returns a Deferred (the shell shows
                                           its result, and the URL, when it fires)

    Jobs (in the background; a restart of the daemon resumes them):

      edge.backfill(bucket, source)        copy the keys of 'keys:/path' (one a
                                           line), 'log:/path' (an access log's
                                           GETs answered 200) or 'sitemap:URL'
                                           not stored yet; rate_objects=,
                                           rate_bytes= limit it
      edge.verify(bucket, prefix='')       HEAD each stored object at the origin:
                                           differences and keys gone, in a report
      edge.refresh(bucket, prefix='')      re-check each copy (conditional GET):
                                           304 fresh, 200 replaced, 404 kept
      edge.jobs()                          every job: state, done/total, rate, ETA
      edge.job(id)                         one job in full
      edge.pause(id), edge.resume(id), edge.cancel(id)
      edge.watch(id)                       a progress bar until the job ends
                                           (Ctrl-C: stop watching; the job goes on)

    Keys are plain object keys such as '1.jpg' or 'img/a b.jpg' (not
    percent-encoded).  From a script, one command per ssh call prints its
    result and exits 0, or 1 when refused:
    ssh -p 2222 admin@127.0.0.1 "edge.disable_origin_pull('example-1250000000')"
    """

    def __init__(self, live: LiveAdmin, channel: str) -> None:
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
        Each bucket with its origin, whether origin-pull is on and its number
        of rules.  With ``usage=True`` also the number of stored objects and
        their bytes: this walks each bucket's folder (slow for big buckets)
        in a thread, so it returns a Deferred, which the shell prints when
        it fires.
        """
        rows = Table()
        # The rarer settings' columns only once a bucket sets them.
        buckets = self._live.config.buckets.values()
        rare = [f for f in _RARE if any(getattr(b, f) != getattr(BucketConfig(), f) for b in buckets)]
        for name, bucket in self._live.config.buckets.items():
            rows.append(
                {
                    "bucket": name,
                    **{setting: plain(getattr(bucket, setting)) for setting in _SETTINGS},
                    "live": "changed" if self._live.state.touches(name) else "",
                    "rules": len(bucket.rules),
                    **{f: plain(getattr(bucket, f)) for f in rare},
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
        Turn origin-pull on for ``bucket``: a miss follows its rules (or,
        without rules, is redirected to the origin and copied into the
        bucket).  Refused while the bucket has neither an origin address nor
        rules (``edge.set_origin`` or ``edge.set_rules`` first).
        """
        name = self._bucket(bucket)
        config = self._live.config.buckets[name]
        if config.origin is None and not config.rules:
            raise AdminError(
                f"bucket {name} has no origin address and no rules; set one with"
                f" edge.set_origin({name!r}, 'abc.example.com') or edge.set_rules({name!r}, [...])"
                " first (origin-pull cannot be enabled without them); nothing changed"
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
            for key in (*_SETTINGS, "rules"):
                row[key] = _shown(key, entry[key]) if key in entry else "(file)"
            rows.append(row)
        rows += [
            {"bucket": name, "change": "removed", **dict.fromkeys((*_SETTINGS, "rules"), "")}
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
        age (s), the origin rule and URL; with workers, also the process (0 is this one; a worker's as
        of its last report, at most a second old).
        """
        columns = ("bucket", "key", "state", "bytes", "expected", "age", "rule", "url", "process")
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

    def prefetch(self, bucket: str, key: str) -> Deferred[Prefetched]:
        """
        Copy ``key`` into ``bucket`` now (again, if it is stored) from where
        a miss would: the proxy or mirror rule that matches the key, or the
        bucket's origin; origin-pull on or not.  Returns a Deferred that
        fires with the outcome and the URL copied from.
        """
        name = self._bucket(bucket)
        segments = self._key(key)
        bucket_config = self._live.config.buckets[name]
        source = origins.prefetch_source(bucket_config, segments)
        if source is None:
            rule = origins.matching_rule(bucket_config, "/".join(segments))
            where = f"{name}/{'/'.join(segments)}"
            if rule is not None:
                raise AdminError(
                    f"cannot prefetch {where}: its rule (priority {rule.priority}) is a redirect rule,"
                    " which copies nothing"
                )
            raise AdminError(
                f"cannot prefetch {where}: bucket {name} has no origin address and no rule for this key;"
                " set one with edge.set_origin or edge.add_rule first"
            )
        url = source.url.decode("ascii")
        _log.info(
            "prefetch {bucket}/{key} from {url} via {channel}",
            bucket=name,
            key="/".join(segments),
            url=url,
            channel=self._channel,
        )
        d: Deferred[Any] = self._live.service.filler.fill(name, segments, source, force=True)
        return d.addCallback(
            lambda result: Prefetched(result.bucket, result.key, result.stored, result.reason, result.size, url)
        )

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
