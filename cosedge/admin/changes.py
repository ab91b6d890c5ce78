"""
What a live change or a reload changed, as operators name it, and the audit
line that records it (one structured event per change in the
``cosedge.audit`` log namespace: what, from, to, through which channel).
"""

from __future__ import annotations

import json

from attrs import fields, frozen
from twisted.logger import Logger

from ..config import BUCKET_FIELDS, BucketConfig, Config, plain

__all__ = ["Change", "audit", "audit_unchanged", "diff_configs", "show"]

_audit = Logger(namespace="cosedge.audit")


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
        if self.what == "rules":
            return f"rules of {self.subject}: {_rules_delta(self.old, self.new)}"
        return f"{self.what} of {self.subject}: {show(self.old)} -> {show(self.new)}"


def _rules_delta(old: object, new: object) -> str:
    """What changed between two lists of rule tables, rule by rule (by priority)."""
    before = {t["priority"]: t for t in (old if isinstance(old, list) else []) if isinstance(t, dict)}
    after = {t["priority"]: t for t in (new if isinstance(new, list) else []) if isinstance(t, dict)}
    parts = []
    for priority in sorted(before.keys() | after.keys()):
        a, b = before.get(priority), after.get(priority)
        if a is None:
            parts.append(f"rule {priority} added {json.dumps(b, ensure_ascii=False)}")
        elif b is None:
            parts.append(f"rule {priority} removed (was {json.dumps(a, ensure_ascii=False)})")
        elif a != b:
            parts.append(f"rule {priority} {json.dumps(a, ensure_ascii=False)} -> {json.dumps(b, ensure_ascii=False)}")
    return "; ".join(parts) or "(unchanged)"


def show(value: object) -> str:
    """A configuration value as a change line (and ``edge.changes()``) shows it."""
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple | list) and not value:
        return "(none)"
    if isinstance(value, list):  # rules, as their tables: the whole of them, for the audit trail
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, tuple):
        return ", ".join(map(str, value))
    return str(value)


def _describe(bucket: BucketConfig) -> str:
    values = {name: plain(getattr(bucket, name)) for name in BUCKET_FIELDS}
    defaults = {name: plain(getattr(BucketConfig(), name)) for name in ("acl", "revalidate_after")}
    said = {name: value for name, value in values.items() if value != () and defaults.get(name, ()) != value}
    return " ".join(f"{name}={show(value)}" for name, value in said.items())  # no rules, the default acl: not said


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
        for setting in BUCKET_FIELDS:
            a_value, b_value = getattr(a, setting), getattr(b, setting)
            if a_value != b_value:
                changes.append(Change(setting, name, plain(a_value), plain(b_value)))
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
        old=show(change.old),
        new=show(change.new),
        channel=channel,
    )


def audit_unchanged(channel: str) -> None:
    """Log the audit line of live changes saved that leave the running configuration the same."""
    _audit.info(
        "audit: live changes saved via {channel}; the running configuration is the same",
        audit=True,
        channel=channel,
    )
