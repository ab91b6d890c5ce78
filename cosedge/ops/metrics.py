"""
The admin HTTP listener: ``/metrics`` (Prometheus), ``/livez`` and
``/readyz``.

It is a separate listener from the bucket listener on purpose: on the data
port these paths would be object keys.  ``/metrics`` reads the daemon's
counters (:class:`cosedge.stats.Stats`) and its filler at scrape time through
a custom collector, so the hot paths only bump plain counters.  Only
``prometheus_client``'s core and text formats are used; its Twisted module
would install the reactor when imported.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import CollectorRegistry
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from ..interfaces import IObjectStore
from ..stats import FILL_DURATION_BUCKETS

__all__ = [
    "AdminResource",
    "AdminSite",
    "EdgeCollector",
    "Readiness",
    "free_disk_check",
    "make_registry",
    "store_writable_check",
]

_log = Logger(namespace="cosedge.metrics")

#: A readiness check: None when fine, else a short reason for the operator.
Check = Callable[[], str | None]

# (event name in Stats.events, metric name, help)
_COUNTERS = (
    ("hits", "cosedge_hits", "Requests answered from a stored object."),
    ("misses", "cosedge_misses", "Requests for an object the bucket does not hold."),
    ("redirects", "cosedge_redirects", "Misses answered with a 302 to the origin."),
    ("fills_started", "cosedge_fills_started", "Background fills started."),
    ("fills_stored", "cosedge_fills_stored", "Background fills that stored their object."),
    ("bytes_served", "cosedge_served_bytes", "Object bytes sent to clients."),
    ("bytes_pulled", "cosedge_pulled_bytes", "Object bytes copied from origins and stored."),
    (
        "mirror_answers",
        "cosedge_mirror_answers",
        "Misses answered with the object streamed from the origin (mirror rules).",
    ),
    (
        "mirror_via_owner",
        "cosedge_mirror_via_owner",
        "Mirror misses of keys another edge owns, read through that edge ([cluster]).",
    ),
    (
        "mirror_followed",
        "cosedge_mirror_followed",
        "Mirror answers (or their rest) read from a fill's file as it was written: a client that came"
        " late, fell behind, or reached another worker process than the fill's.",
    ),
    ("fills_failed_over", "cosedge_fills_failed_over", "Origin hosts passed over for the next one during a fill."),
    ("fills_handed_over", "cosedge_fills_handed_over", "Fills handed to the key's owner edge ([cluster])."),
    (
        "fills_owner_missed",
        "cosedge_fills_owner_missed",
        "Fills the key's owner edge did not take in time, made here instead ([cluster]).",
    ),
)
_SKIPPED_PREFIX = "fills_skipped_"
#: Stats events ``fills_by_rule_<type>_<outcome>`` (scheduler), as one labelled family.
_BY_RULE_PREFIX = "fills_by_rule_"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("cosedge")
    except Exception:  # not installed (a source checkout on sys.path)
        return "unknown"


class EdgeCollector:
    """
    Turns an :class:`~cosedge.service.EdgeService`'s counters into metric
    families at scrape time.  ``service`` needs ``totals()``,
    ``reactor`` and ``config``.
    """

    def __init__(self, service: Any) -> None:
        self._service = service
        self._version = _version()

    def describe(self) -> list[Metric]:
        # Tell the registry nothing up front: the families are built on
        # every scrape, and their label values change as the daemon runs.
        return []

    def collect(self) -> Iterator[Metric]:
        service = self._service
        totals = service.totals()  # every process of the daemon
        stats = totals.stats

        info = InfoMetricFamily("cosedge", "cosedge build information.")
        info.add_metric([], {"version": self._version})
        yield info

        responses = CounterMetricFamily(
            "cosedge_http_responses", "Responses of the bucket listener, by HTTP status code.", labels=["code"]
        )
        for code, count in sorted(stats.statuses.items()):
            responses.add_metric([str(code)], count)
        yield responses

        for event, name, doc in _COUNTERS:
            yield CounterMetricFamily(name, doc, value=stats.events[event])

        failed = CounterMetricFamily(
            "cosedge_fills_failed", "Background fills that stored nothing, by reason.", labels=["reason"]
        )
        for reason, count in sorted(stats.fill_failures.items()):
            failed.add_metric([reason], count)
        yield failed

        skipped = CounterMetricFamily(
            "cosedge_fills_skipped",
            "Misses that started no fill: the origin's 404 or a recent failure is remembered,"
            " or another process of the daemon is filling or has just stored the key.",
            labels=["reason"],
        )
        for event, count in sorted(stats.events.items()):
            if event.startswith(_SKIPPED_PREFIX):
                skipped.add_metric([event[len(_SKIPPED_PREFIX) :].replace("_", "-")], count)
        yield skipped

        by_rule = CounterMetricFamily(
            "cosedge_fills_by_rule",
            "Fills that ended, by the type of the origin rule that started them and outcome (stored or failed).",
            labels=["type", "outcome"],
        )
        for event, count in sorted(stats.events.items()):
            if event.startswith(_BY_RULE_PREFIX):
                kind, _, outcome = event[len(_BY_RULE_PREFIX) :].partition("_")
                by_rule.add_metric([kind, outcome], count)
        yield by_rule
        yield GaugeMetricFamily(
            "cosedge_origin_hosts_down",
            "Origin hosts passed over after a refusal, a timeout or a 5xx until a probe finds them up"
            " (summed over processes).",
            value=totals.origin_hosts_down,
        )

        requests = CounterMetricFamily(
            "cosedge_requests",
            "Object requests by bucket and outcome: hit (answered locally), redirect, mirror, not-found.",
            labels=["bucket", "outcome"],
        )
        for bucket_outcome, count in sorted(stats.requests.items()):
            bucket, _, outcome = bucket_outcome.partition(" ")
            requests.add_metric([bucket, outcome], count)
        yield requests

        store = CounterMetricFamily(
            "cosedge_store_requests",
            'Requests to the S3 store ([storage] backend = "s3") by operation and outcome'
            " (2xx, 3xx, 4xx, 5xx; error: no answer).",
            labels=["operation", "outcome"],
        )
        latency = SummaryMetricFamily(
            "cosedge_store_request_seconds",
            "Seconds from a request to the S3 store to its answer's headers, by operation.",
            labels=["operation"],
        )
        counts: dict[str, int] = {}
        for operation_outcome, count in sorted(stats.store_requests.items()):
            operation, _, outcome = operation_outcome.partition(" ")
            store.add_metric([operation, outcome], count)
            counts[operation] = counts.get(operation, 0) + count
        for operation, count in sorted(counts.items()):
            latency.add_metric([operation], count, stats.store_seconds.get(operation, 0.0))
        yield store
        yield latency

        yield GaugeMetricFamily("cosedge_fills_in_flight", "Fills running now.", value=totals.fills_running)
        yield GaugeMetricFamily("cosedge_fills_queued", "Fills waiting for a free slot.", value=totals.fills_queued)
        yield GaugeMetricFamily(
            "cosedge_not_found_remembered",
            "Keys whose origin 404 is remembered, so misses on them start no fill.",
            value=totals.not_found_remembered,
        )
        yield GaugeMetricFamily("cosedge_buckets", "Buckets configured.", value=len(service.config.buckets))

        jobs = getattr(service, "jobs", None)
        if jobs is not None:
            yield from _job_families(jobs)

        cumulative = [
            (_bound(b), float(n)) for b, n in zip(FILL_DURATION_BUCKETS, stats.fill_duration_counts, strict=True)
        ]
        cumulative.append(("+Inf", float(stats.fill_duration_count)))
        yield HistogramMetricFamily(
            "cosedge_fill_duration_seconds",
            "Time from start to store of the fills that stored their object.",
            buckets=cumulative,
            sum_value=stats.fill_duration_sum,
        )


def _job_families(jobs: Any) -> Iterator[Metric]:
    """The jobs' families (a :class:`~cosedge.jobs.JobsService`): labels are bounded by kinds, states, reasons."""
    objects = CounterMetricFamily(
        "cosedge_job_objects",
        "Keys that backfill and verify jobs finished since the start, by job kind and outcome"
        " (stored, skipped, elsewhere; same, differs, gone; failed).",
        labels=["kind", "outcome"],
    )
    for (kind, outcome), count in sorted(jobs.objects.items()):
        objects.add_metric([kind, outcome], count)
    yield objects
    failures = CounterMetricFamily(
        "cosedge_job_failures",
        "Keys jobs failed on since the start, by job kind and reason.",
        labels=["kind", "reason"],
    )
    for (kind, reason), count in sorted(jobs.failures.items()):
        failures.add_metric([kind, reason], count)
    yield failures
    size = CounterMetricFamily(
        "cosedge_job_bytes", "Bytes jobs copied (backfill) or checked (verify) since the start.", labels=["kind"]
    )
    for kind, count in sorted(jobs.bytes.items()):
        size.add_metric([kind], count)
    yield size
    states = GaugeMetricFamily("cosedge_jobs", "Jobs listed, by kind and state.", labels=["kind", "state"])
    for (kind, state), count in sorted(jobs.states().items()):
        states.add_metric([kind, state], count)
    yield states


def _bound(value: float) -> str:
    return repr(float(value))


def make_registry(service: Any, *, process: bool = True) -> CollectorRegistry:
    """
    A registry of its own for ``service`` (not prometheus_client's global
    one, so several services can live in one process, as in tests): the
    cosedge collector plus the standard process and platform collectors.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EdgeCollector(service))
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
    return registry


# -- readiness --


def store_writable_check(store: IObjectStore) -> Check:
    """
    Can a fill write?  Asks the store's probe (the disk store writes a byte
    and the metadata attribute through its temporary-file path, at once, and
    throws them away: a file system without user extended attributes fails
    every fill).  A probe that answers later (a network store) is reported
    at the next check; until the first has answered, that is the problem.
    """
    last: list[str | None] = ["store not probed yet"]

    def problem(result: object) -> str | None:
        if isinstance(result, Failure):
            return str(result.value) or result.getErrorMessage()
        return None

    def check() -> str | None:
        outcome: list[object] = []
        store.probe().addBoth(outcome.append).addCallback(lambda _: last.__setitem__(0, problem(outcome[0])))
        return last[0]

    return check


def free_disk_check(data_dir: str, minimum: Callable[[], int], *, _free: Callable[[str], int] | None = None) -> Check:
    """
    Is there at least ``minimum()`` bytes free (for unprivileged users) on the
    data directory's file system?
    """

    def free(path: str) -> int:
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize

    measure = free if _free is None else _free

    def check() -> str | None:
        try:
            available = measure(data_dir)
        except OSError as e:
            return f"cannot measure free disk space of {data_dir}: {e}"
        needed = minimum()
        if available < needed:
            return f"free disk space {available} bytes is below the {needed}-byte minimum on {data_dir}"
        return None

    return check


class Readiness:
    """A list of checks; ready when none reports a problem."""

    def __init__(self, checks: Sequence[Check]) -> None:
        self.checks = list(checks)

    def problems(self) -> list[str]:
        found = []
        for check in self.checks:
            try:
                problem = check()
            except Exception as e:  # a broken check means "not ready", never a 500
                _log.failure("readiness check {check!r} raised", check=check)
                problem = f"readiness check failed: {e}"
            if problem:
                found.append(problem)
        return found


# -- the HTTP side --


class AdminResource(Resource):
    """
    ``/metrics``, ``/livez`` and ``/readyz``; anything else is 404 and any
    method but GET and HEAD is 405.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry, readiness: Readiness) -> None:
        super().__init__()
        self.registry = registry
        self.readiness = readiness

    def render(self, request: Request) -> bytes:
        request.setHeader(b"cache-control", b"no-store")
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD")
            return self._text(request, "method not allowed\n")
        path = request.path.rstrip(b"/") or b"/"
        if path == b"/metrics":
            return self._metrics(request)
        if path == b"/livez":
            return self._text(request, "ok\n")
        if path == b"/readyz":
            problems = self.readiness.problems()
            if problems:
                request.setResponseCode(503)
                return self._text(request, "not ready\n" + "".join(f"- {p}\n" for p in problems))
            return self._text(request, "ready\n")
        request.setResponseCode(404)
        return self._text(request, "not found; try /, /metrics, /livez or /readyz\n")

    def _metrics(self, request: Request) -> bytes:
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        encoder, content_type = choose_encoder(accept)
        body = encoder(self.registry)
        request.setHeader(b"content-type", content_type.encode("latin-1"))
        return body

    @staticmethod
    def _text(request: Request, text: str) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return text.encode("utf-8")


class AdminSite(Site):
    """The admin listener's factory: no access log (probes would flood it)."""

    displayTracebacks = False
    noisy = False

    def log(self, request: Any) -> None:
        pass
