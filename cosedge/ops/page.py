"""
The migration page: ``GET /`` on the admin listener.

One server-rendered HTML page for people watching a migration, with no
build step and no external asset (inline CSS and inline SVG; no script at
all, and a Content-Security-Policy that allows none), so it works offline.
It reloads itself every :data:`REFRESH` seconds and changes nothing.

Per bucket: the share of requests answered locally over the last hour, one
point a minute (:class:`~cosedge.ops.history.RequestHistory`); objects and
bytes stored (:class:`~cosedge.ops.history.UsageCache`, counted at most
every few minutes); requests by outcome; the origin hosts and whether the
filler has marked them down; the most-missed keys that are still not
stored.  For the daemon: fills by outcome and their latency, and each job
with a progress bar.  Everything that comes from keys, bucket names or hosts
is escaped.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from attrs import frozen
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ..config import BucketConfig, Config
from ..interfaces import IObjectStore, IStoredObject
from ..rules import RuleHost
from ..stats import FILL_DURATION_BUCKETS, Stats, Totals
from .history import Point, RequestHistory, Usage, UsageCache, by_bucket
from .render import PAGE_CSS, bar, chart, count, duration, human_bytes, number, percent, table

__all__ = ["REFRESH", "AdminRoot", "BucketView", "MigrationPage", "PageContext", "origin_hosts"]

_log = Logger(namespace="cosedge.ops")

#: Seconds between the page's reloads.
REFRESH = 10
#: Most-missed keys shown per bucket.
MISSED_SHOWN = 20
#: Seconds a page load waits for a bucket's first count before showing "counting".
USAGE_WAIT = 2.0
#: Seconds before a much-missed key found stored is looked up again.
STORED_RECHECK = 300.0
_OUTCOMES = ("hit", "redirect", "mirror", "not-found")
_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none';"
    " frame-ancestors 'none'"
)


class HealthView(Protocol):
    def down_hosts(self) -> list[str]:
        """Origin hosts marked down, as ``scheme://host[:port]``."""


class FillerView(Protocol):
    @property
    def health(self) -> HealthView: ...


class PageContext(Protocol):
    """What the migration page reads of the daemon (an ``EdgeService``); ``jobs`` is optional."""

    @property
    def config(self) -> Config:
        """The running configuration: buckets are read at every page load."""

    @property
    def store(self) -> IObjectStore:
        """Asked whether a much-missed key is stored by now, and for each bucket's usage."""

    @property
    def filler(self) -> FillerView:
        """Its ``health`` knows which origin hosts are down (in this process)."""

    def totals(self) -> Totals:
        """Counters and fill gauges of every process, read at every page load."""


@frozen
class BucketView:
    """What the page shows of one bucket."""

    name: str
    config: BucketConfig
    #: Requests so far by outcome (since the daemon started).
    outcomes: Mapping[str, int]
    points: Sequence[Point]
    #: (hits, requests) over the last hour, and since the daemon started.
    hour: tuple[int, int]
    ever: tuple[int, int]
    usage: Usage | None
    usage_error: str | None
    #: The most-missed keys not stored, most missed first: (key, misses).
    missed: Sequence[tuple[str, int]]
    #: Seconds since ``usage`` was counted.
    counted_ago: float = 0.0


def origin_hosts(bucket: BucketConfig, down: Iterable[str]) -> list[tuple[str, str, str, bool]]:
    """
    The bucket's origin hosts as ``(scheme://host[:port], role, rule, down)``,
    named as the planner and the filler's health marks name them: each
    rule's hosts and standby hosts (both schemes for a ``follow`` rule), or
    the bucket's ``origin`` when it has no rules.
    """
    marked = set(down)
    groups: list[tuple[tuple[str, ...], str, tuple[RuleHost, ...], str]] = []
    for rule in bucket.rules:
        schemes: tuple[str, ...] = ("http", "https") if rule.protocol == "follow" else (rule.protocol,)
        groups += [(schemes, "host", rule.hosts, rule.label), (schemes, "standby", rule.standby, rule.label)]
    if not bucket.rules and bucket.origin is not None:
        groups.append((("http",), "origin", (RuleHost(bucket.origin.host, bucket.origin.port),), ""))
    rows = []
    for schemes, role, hosts, label in groups:
        for h in hosts:
            bases = [f"{scheme}://{h.netloc(scheme)}" for scheme in schemes]
            weight = f" (weight {h.weight})" if role == "host" and h.weight != 1 else ""
            rows.append((" or ".join(bases), role + weight, label, any(b in marked for b in bases)))
    return rows


def _closed_absent(found: IStoredObject | None) -> bool:
    if found is None:
        return True
    found.close()
    return False


class MigrationPage:
    """Builds the page from the daemon's counters, its store and its jobs."""

    def __init__(self, service: PageContext, clock: Any, history: RequestHistory, usage: UsageCache) -> None:
        self._service = service
        self._clock = clock
        self.history = history
        self.usage = usage
        #: Per bucket, much-missed keys found stored, and when.
        self._stored: dict[str, dict[str, float]] = {}

    def render(self, request: Request) -> int:
        """Answer ``request`` with the page (a Deferred's work: ``NOT_DONE_YET``)."""
        gone: list[object] = []
        request.notifyFinish().addBoth(gone.append)

        def send(text: str | Failure) -> None:
            if gone:
                return
            if isinstance(text, Failure):
                _log.failure("rendering the migration page failed", text)
                request.setResponseCode(500)
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                text = "the page could not be built; see the daemon's log\n"
            else:
                request.setHeader(b"content-type", b"text/html; charset=utf-8")
                request.setHeader(b"content-security-policy", _CSP.encode("ascii"))
                request.setHeader(b"x-content-type-options", b"nosniff")
                request.setHeader(b"referrer-policy", b"no-referrer")
            body = text.encode("utf-8")
            request.setHeader(b"content-length", str(len(body)).encode("ascii"))
            request.write(body)
            request.finish()

        request.setHeader(b"cache-control", b"no-store")
        self.build().addBoth(send)
        return NOT_DONE_YET

    def build(self) -> Deferred[str]:
        """Deferred of the page's HTML."""
        return Deferred.fromCoroutine(self._build())

    async def _build(self) -> str:
        service = self._service
        config = service.config
        totals = service.totals()
        stats = totals.stats
        now = self._clock.seconds()
        counts = by_bucket(stats.requests)
        names = sorted(config.buckets)
        self.usage.forget_others(config.buckets)
        self._stored = {name: keys for name, keys in self._stored.items() if name in config.buckets}
        # Start every slow part at once, then wait for each.
        usages = [self.usage.get(name, USAGE_WAIT) for name in names]
        missed = [Deferred.fromCoroutine(self._not_stored(name, stats.missed_keys.get(name, {}))) for name in names]
        jobs = Deferred.fromCoroutine(self._jobs())
        views = []
        for i, name in enumerate(names):
            usage = await usages[i]
            views.append(
                BucketView(
                    name=name,
                    config=config.buckets[name],
                    outcomes=_outcomes(stats, name),
                    points=self.history.points(name, counts, now),
                    hour=self.history.window_counts(name, counts, now),
                    ever=counts.get(name, (0, 0)),
                    usage=usage,
                    usage_error=self.usage.errors.get(name),
                    missed=await missed[i],
                    counted_ago=0.0 if usage is None else max(0.0, now - usage.counted_at),
                )
            )
        return page(views, totals, service.filler.health.down_hosts(), await jobs, now, self._sampled())

    def _sampled(self) -> str:
        samples = len(self.history.samples)
        if not samples:
            return "not sampled yet"
        return f"{count(samples, 'sample')}, one every {duration(self.history.interval)}"

    async def _not_stored(self, bucket: str, counts: Mapping[str, int]) -> list[tuple[str, int]]:
        """
        The most-missed keys of ``bucket`` that the store still does not hold
        (each one opened and closed).  A key found stored is not opened again
        for :data:`STORED_RECHECK` seconds: once a migration is well under
        way, most of the much-missed keys are stored.
        """
        now = self._clock.seconds()
        known = self._stored.setdefault(bucket, {})
        for key in [k for k, at in known.items() if k not in counts or now - at >= STORED_RECHECK]:
            del known[key]
        ranked = sorted(((k, n) for k, n in counts.items() if k not in known), key=lambda kv: (-kv[1], kv[0]))
        checks = [maybeDeferred(self._service.store.open, bucket, tuple(key.split("/"))) for key, _ in ranked]
        for check in checks:
            check.addCallback(_closed_absent)
        results = await DeferredList(checks, consumeErrors=True)
        absent = []
        for item, (ok, value) in zip(ranked, results, strict=True):
            if ok and not value:
                known[item[0]] = now
            else:  # a key the store cannot even look up is certainly not served locally: shown
                absent.append(item)
        return absent[:MISSED_SHOWN]

    async def _jobs(self) -> list[Mapping[str, Any]] | str | None:
        """The jobs' rows; None when the daemon has no jobs; the error's text if listing them failed."""
        jobs = getattr(self._service, "jobs", None)
        if jobs is None:
            return None
        try:
            rows = await maybeDeferred(jobs.list)
        except Exception as e:
            _log.failure("listing jobs for the migration page failed")
            return f"jobs could not be listed: {e}"
        return [row for row in rows if isinstance(row, Mapping)]


def _outcomes(stats: Stats, bucket: str) -> dict[str, int]:
    prefix = bucket + " "
    found = {outcome: 0 for outcome in _OUTCOMES}
    for name, n in stats.requests.items():
        if name.startswith(prefix):
            outcome = name[len(prefix) :]
            found[outcome] = found.get(outcome, 0) + n
    return found


# -- the HTML --


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def page(
    views: Sequence[BucketView],
    totals: Totals,
    down: Sequence[str],
    jobs: Sequence[Mapping[str, Any]] | str | None,
    now: float,
    sampled: str,
) -> str:
    """The whole page (see the module's docstring)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>cosedge — migration</title>",
        f"<style>{PAGE_CSS}</style></head><body>",
        "<header><h1>cosedge — migration</h1>",
        f'<p class="meta">Updated {_e(stamp)} · reloads every {REFRESH} s · read-only ·'
        f" request history: {_e(sampled)} · "
        '<a href="/metrics">/metrics</a> · <a href="/readyz">/readyz</a></p></header>',
        _summary(views),
        _jobs_section(jobs),
        _fills_section(totals),
        _down_section(views, down, totals.origin_hosts_down),
        *(_bucket_section(i, view, down) for i, view in enumerate(views)),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _usage_cells(view: BucketView) -> list[str]:
    if view.usage is not None:
        exact = f"{view.usage.bytes:,} bytes"
        return [number(view.usage.objects), f'<span title="{exact}">{human_bytes(view.usage.bytes)}</span>']
    if view.usage_error is not None:
        return ['<span class="down">count failed</span>', ""]
    return ['<span class="muted">counting…</span>', ""]


def _summary(views: Sequence[BucketView]) -> str:
    rows = []
    for i, view in enumerate(views):
        rows.append(
            [
                f'<a href="#bucket-{i}">{_e(view.name)}</a>',
                percent(*view.hour),
                number(view.hour[1]),
                percent(*view.ever),
                *_usage_cells(view),
                str(len(view.missed)) + ("+" if len(view.missed) >= MISSED_SHOWN else ""),
            ]
        )
    head = ["Bucket", "Local, last hour", "Requests, last hour", "Local, since start", "Objects", "Bytes", "Missed"]
    body = table(head, rows, numeric={1, 2, 3, 4, 5, 6}, empty="no bucket is configured")
    return f'<section id="buckets"><h2>Buckets</h2>{body}</section>'


def _job_cells(job: Mapping[str, Any]) -> list[str]:
    done, total = job.get("done"), job.get("total")
    failures = job.get("failures")
    if isinstance(failures, Mapping):
        failed = ", ".join(f"{_e(reason)}: {number(n)}" for reason, n in sorted(failures.items())) or "0"
    else:
        failed = _e(failures if failures is not None else 0)
    rate, eta, size = job.get("rate"), job.get("eta"), job.get("bytes")
    return [
        _e(job.get("id", "")),
        _e(job.get("kind", "")),
        _e(job.get("bucket", "")),
        _e(job.get("state", "")),
        bar(done, total, f"job {job.get('id', '')}"),
        human_bytes(size) if isinstance(size, int) else _e(size or ""),
        f"{rate:,.1f}/s" if isinstance(rate, int | float) else _e(rate or "—"),
        duration(eta) if isinstance(eta, int | float) else _e(eta or "—"),
        failed,
    ]


def _jobs_section(jobs: Sequence[Mapping[str, Any]] | str | None) -> str:
    if isinstance(jobs, str):
        body = f'<p class="down">{_e(jobs)}</p>'
    elif not jobs:
        body = '<p class="muted" id="no-jobs">no jobs</p>'
    else:
        head = ["Job", "Kind", "Bucket", "State", "Progress", "Bytes", "Rate", "ETA", "Failures"]
        body = table(head, [_job_cells(job) for job in jobs], numeric={5, 6, 7})
    return f'<section id="jobs"><h2>Jobs</h2>{body}</section>'


def _quantile(stats: Stats, q: float) -> str:
    """The histogram's upper bound below which at least ``q`` of the fills took."""
    if not stats.fill_duration_count:
        return "—"
    wanted = q * stats.fill_duration_count
    for bound, n in zip(FILL_DURATION_BUCKETS, stats.fill_duration_counts, strict=True):
        if n >= wanted:
            return f"≤ {duration(bound)}"
    return f"> {duration(FILL_DURATION_BUCKETS[-1])}"


def _fills_section(totals: Totals) -> str:
    stats = totals.stats
    events = stats.events
    count = stats.fill_duration_count
    mean = duration(stats.fill_duration_sum / count) if count else "—"
    outcome_rows = [
        ["started", number(events["fills_started"])],
        ["stored", number(events["fills_stored"])],
        ["failed", number(events["fills_failed"])],
        *([f"failed: {_e(reason)}", number(n)] for reason, n in sorted(stats.fill_failures.items())),
        *(
            [f"skipped: {_e(name.removeprefix('fills_skipped_').replace('_', '-'))}", number(n)]
            for name, n in sorted(events.items())
            if name.startswith("fills_skipped_")
        ),
        ["hosts passed over", number(events["fills_failed_over"])],
        ["bytes pulled", human_bytes(events["bytes_pulled"])],
    ]
    by_rule = [
        [_e(kind), _e(outcome), number(n)]
        for kind, outcome, n in (
            (*name.removeprefix("fills_by_rule_").partition("_")[::2], n)
            for name, n in sorted(events.items())
            if name.startswith("fills_by_rule_")
        )
    ]
    now_rows = [
        ["running", number(totals.fills_running)],
        ["queued", number(totals.fills_queued)],
        ["404s remembered", number(totals.not_found_remembered)],
        ["mean time to store", mean],
        ["median", _quantile(stats, 0.5)],
        ["95th percentile", _quantile(stats, 0.95)],
    ]
    return (
        '<section id="fills"><h2>Fills</h2><div class="grid">'
        f"<div><h3>By outcome</h3>{table(['Outcome', 'Fills'], outcome_rows, numeric={1})}</div>"
        f"<div><h3>By rule type</h3>"
        f"{table(['Rule type', 'Outcome', 'Fills'], by_rule, numeric={2}, empty='no fill has ended yet')}</div>"
        f"<div><h3>Now and latency</h3>{table(['', ''], now_rows, numeric={1})}</div>"
        "</div></section>"
    )


def _down_section(views: Sequence[BucketView], down: Sequence[str], all_processes: int) -> str:
    configured = {base for view in views for hosts, *_ in origin_hosts(view.config, ()) for base in hosts.split(" or ")}
    others = [host for host in down if host not in configured]
    summary = f"{count(all_processes, 'origin host')} marked down"
    summary += " (all processes)" if all_processes != len(down) else ""
    listed = "".join(f'<li class="down key">{_e(host)}</li>' for host in others)
    more = f"<p>Marked down but not configured here (a redirect's target, say):</p><ul>{listed}</ul>" if others else ""
    state = "down" if all_processes else "up"
    return f'<section id="origins"><h2>Origin health</h2><p class="{state}">{_e(summary)}</p>{more}</section>'


def _hosts_table(view: BucketView, down: Sequence[str]) -> str:
    rows = [
        [
            f'<span class="key">{_e(base)}</span>',
            _e(role),
            _e(rule),
            '<span class="down">down</span>' if is_down else '<span class="up">up</span>',
        ]
        for base, role, rule, is_down in origin_hosts(view.config, down)
    ]
    pull = (
        ""
        if view.config.origin_pull
        else '<p class="muted">origin-pull is off: misses are not pulled from any origin.</p>'
    )
    return pull + table(["Host", "Role", "Rule", "Health"], rows, empty="no origin configured")


def _bucket_section(index: int, view: BucketView, down: Sequence[str]) -> str:
    usage = view.usage
    if usage is not None:
        age = "just now" if view.counted_ago < 1 else f"{duration(view.counted_ago)} ago"
        stored = f"{count(usage.objects, 'object')}, {human_bytes(usage.bytes)} (counted {age})"
    elif view.usage_error is not None:
        stored = f'<span class="down">could not be counted: {_e(view.usage_error)}</span>'
    else:
        stored = '<span class="muted">being counted</span>'
    outcome_rows = [[_e(outcome), number(n)] for outcome, n in view.outcomes.items()]
    missed_rows = [[f'<span class="key">{_e(key)}</span>', number(n)] for key, n in view.missed]
    return (
        f'<section class="bucket" id="bucket-{index}" data-bucket="{_e(view.name)}">'
        f"<h2>{_e(view.name)}</h2>"
        f'<p><span class="share">{percent(*view.hour)}</span> of {count(view.hour[1], "request")} answered locally'
        f" over the last hour · stored: {stored}</p>"
        f"{chart(view.name, view.points)}"
        '<div class="grid">'
        f"<div><h3>Requests since start</h3>{table(['Outcome', 'Requests'], outcome_rows, numeric={1})}</div>"
        f"<div><h3>Origin hosts</h3>{_hosts_table(view, down)}</div>"
        "</div>"
        f"<h3>Most-missed keys not stored yet</h3>"
        f"{table(['Key', 'Misses'], missed_rows, numeric={1}, empty='none: every much-missed key is stored')}"
        "</section>"
    )


# -- the resource --


class AdminRoot(Resource):
    """
    The admin listener's resource: ``GET /`` (and ``HEAD /``) is the
    migration page, everything else is ``admin``'s (``/metrics``,
    ``/livez``, ``/readyz``, and 405 for any method but GET and HEAD).
    """

    isLeaf = True

    def __init__(self, admin: Resource, page: MigrationPage) -> None:
        super().__init__()
        self.admin = admin
        self.page = page

    def render(self, request: Request) -> bytes | int:
        if request.path == b"/" and request.method in (b"GET", b"HEAD"):
            return self.page.render(request)
        result: bytes | int = self.admin.render(request)
        return result
