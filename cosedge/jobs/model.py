"""
One job as operators see it: what it works on, its state, and its counts
(what ``edge.jobs()`` and ``edge.job(id)`` show and the job's file keeps).

A finished key ends with an *outcome*: one of the kind's :data:`OUTCOMES`,
or ``!<reason>`` for a failure (``!http-404``, ``!no-origin``, ...).  A line
of a source that names no key is either *bad* (unparsable, an invalid key:
counted and reported) or *ignored* (a log line that is not a GET answered
200, a blank line, a comment).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any

from attrs import define, field, frozen

__all__ = [
    "ACTIVE",
    "FINAL",
    "KINDS",
    "OUTCOMES",
    "STATES",
    "Item",
    "Job",
    "JobError",
    "JobFailed",
    "clock_text",
]

KINDS = ("backfill", "verify", "refresh")
STATES = ("queued", "running", "paused", "done", "cancelled", "failed")
#: States of a job that has work left (resumed after a restart, unless paused).
ACTIVE = frozenset({"queued", "running", "paused"})
FINAL = frozenset({"done", "cancelled", "failed"})
#: The outcomes of a finished key that are not failures, by kind.
OUTCOMES = {
    # stored: copied now; skipped: stored already (no origin request); elsewhere: another process copies it
    "backfill": ("stored", "skipped", "elsewhere"),
    # same: length and ETag agree; differs: they do not; gone: the origin answers 404 or 410
    "verify": ("same", "differs", "gone"),
    # fresh: the origin's 304 (or checked within revalidate_after); replaced: a new copy stored;
    # origin-gone: the origin answers 404/410 and the copy is kept
    "refresh": ("fresh", "replaced", "origin-gone"),
}
#: Seconds of progress the rate (and so the ETA) is measured over.
_WINDOW = 30


class JobError(ValueError):
    """A job cannot be started or changed as asked (the operator's mistake); nothing changed."""


class JobFailed(Exception):
    """A job cannot go on (its source cannot be read, its bucket is gone): it ends ``failed``."""


@frozen
class Item:
    """One key of a job's source, in source order."""

    #: The key's number among the source's keys (from 0).
    seq: int
    #: Where a reader starts again to give this item first (a file offset, or the listing marker).
    resume: str
    key: str
    segments: tuple[str, ...]
    #: Where a reader starts again to give the item after this one.
    after: str


def clock_text(seconds: float | None) -> str | None:
    """``h:mm:ss`` (None stays None)."""
    if seconds is None:
        return None
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def _when(stamp: float | None) -> str | None:
    return None if stamp is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


@define(eq=False)
class Job:
    """A job's settings, state and counts; :meth:`to_json` is what its file keeps."""

    id: int
    kind: str
    bucket: str
    #: backfill: the source (``keys:/path``, ``log:/path``, ``sitemap:URL``); verify: the key prefix.
    source: str
    #: Who started it (the manhole channel), for the audit lines.
    channel: str
    created: float
    state: str = "queued"
    #: This job's rates (None: ``[jobs]`` rate_objects / rate_bytes).
    rate_objects: float | None = None
    rate_bytes: int | None = None
    #: Keys in the source, once counted (None: not yet).
    total: int | None = None
    #: The sitemap was copied into the job's folder (sitemap sources only).
    fetched: bool = False
    done: int = 0
    bytes: int = 0
    outcomes: Counter[str] = field(factory=Counter)
    failures: Counter[str] = field(factory=Counter)
    #: Lines that name no valid key, by reason (counted once the source is counted).
    bad: Counter[str] = field(factory=Counter)
    ignored: Counter[str] = field(factory=Counter)
    #: Seconds spent running, before the current run.
    seconds: float = 0.0
    started: float | None = None
    ended: float | None = None
    error: str = ""
    #: A verify job's file of differences.
    report: str | None = None
    #: When the current run began (None: not running in this process).
    _run_since: float | None = field(default=None, init=False)
    _samples: deque[tuple[float, int, int]] = field(factory=lambda: deque(maxlen=_WINDOW + 1), init=False)

    # -- progress --

    def run_from(self, now: float) -> None:
        """The job runs from ``now`` on (its rate is measured from here)."""
        self.halt(now)
        self._run_since = now
        self._samples.append((now, self.done, self.bytes))

    def halt(self, now: float) -> None:
        """The job stops running at ``now`` (paused, ended, or the daemon stops); its time is added up."""
        if self._run_since is not None:
            self.seconds += max(0.0, now - self._run_since)
        self._run_since = None
        self._samples.clear()

    def count(self, outcome: str, size: int, now: float) -> None:
        """A key finished with ``outcome`` (``!reason`` for a failure), ``size`` bytes of it."""
        self.done += 1
        self.bytes += size
        if outcome.startswith("!"):
            self.failures[outcome[1:]] += 1
        else:
            self.outcomes[outcome] += 1
        if not self._samples or now - self._samples[-1][0] >= 1.0:
            self._samples.append((now, self.done, self.bytes))

    def elapsed(self, now: float) -> float:
        return self.seconds + (max(0.0, now - self._run_since) if self._run_since is not None else 0.0)

    def rates(self, now: float) -> tuple[float, float]:
        """Objects and bytes a second: over the last half minute while running, else over the whole run."""
        if self._run_since is not None and self._samples:
            since, done, size = self._samples[0]
            span = now - since
            if span <= 0:
                return 0.0, 0.0
            return (self.done - done) / span, (self.bytes - size) / span
        spent = self.elapsed(now)
        return (self.done / spent, self.bytes / spent) if spent > 0 else (0.0, 0.0)

    def eta(self, now: float) -> float | None:
        """Seconds left at the current rate (None: unknown, or not running)."""
        objects, _ = self.rates(now)
        if self.state != "running" or self.total is None or objects <= 0:
            return None
        return max(0, self.total - self.done) / objects

    # -- views --

    def failed_count(self) -> int:
        return sum(self.failures.values())

    def row(self, now: float) -> dict[str, Any]:
        """The job as a row of ``edge.jobs()``."""
        objects, _ = self.rates(now)
        return {
            "id": self.id,
            "kind": self.kind,
            "bucket": self.bucket,
            "source": self.source if self.kind == "backfill" else f"prefix {self.source!r}",
            "state": self.state,
            "done": self.done,
            "total": self.total,
            "bytes": self.bytes,
            "rate": f"{objects:.1f}/s",
            "eta": clock_text(self.eta(now)),
            "outcomes": {k: v for k, v in self.outcomes.items() if v},
            "failures": dict(sorted(self.failures.items())),
            "bad": sum(self.bad.values()),
        }

    def details(self, now: float) -> dict[str, Any]:
        """Everything about the job (``edge.job(id)``)."""
        objects, size = self.rates(now)
        row = self.row(now)
        return {
            **{k: row[k] for k in ("id", "kind", "bucket", "source", "state", "done", "total")},
            "percent": None if not self.total else round(100 * self.done / self.total, 1),
            "bytes": self.bytes,
            "rate": f"{objects:.1f} objects/s, {size:.0f} bytes/s",
            "eta": row["eta"],
            "elapsed": clock_text(self.elapsed(now)),
            "outcomes": row["outcomes"],
            "failures": row["failures"],
            "bad_lines": dict(sorted(self.bad.items())),
            "ignored_lines": dict(sorted(self.ignored.items())),
            "report": self.report,
            "error": self.error or None,
            "channel": self.channel,
            "created": _when(self.created),
            "started": _when(self.started),
            "ended": _when(self.ended),
        }

    def totals(self) -> str:
        """The counts in one line (the audit line at the end)."""
        parts = [f"{self.done}/{'?' if self.total is None else self.total} keys"]
        parts += [f"{k} {v}" for k, v in self.outcomes.items() if v]
        if self.failures:
            parts.append("failed " + ", ".join(f"{k}={v}" for k, v in sorted(self.failures.items())))
        if self.bad:
            parts.append(f"bad lines {sum(self.bad.values())}")
        parts.append(f"{self.bytes} bytes")
        return ", ".join(parts)

    # -- the job's file --

    def to_json(self) -> dict[str, Any]:
        keep = (
            "id kind bucket source channel created state rate_objects rate_bytes total fetched done bytes"
            " seconds started ended error report"
        ).split()
        data: dict[str, Any] = {name: getattr(self, name) for name in keep}
        for name in ("outcomes", "failures", "bad", "ignored"):
            data[name] = dict(getattr(self, name))
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        names = ("outcomes", "failures", "bad", "ignored")
        counters: dict[str, Any] = {name: Counter(data.pop(name, {})) for name in names}
        job = cls(**data, **counters)
        if job.kind not in KINDS or job.state not in STATES:
            raise ValueError(f"unknown kind {job.kind!r} or state {job.state!r}")
        return job
