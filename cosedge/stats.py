"""
Counters that the web layer and the filler move, and that operators read
(``edge.stats()``, ``/metrics``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from attrs import define, field

__all__ = ["FILL_DURATION_BUCKETS", "Stats", "Totals"]

#: Upper bounds (seconds) of the fill-duration histogram.
FILL_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


#: Keys remembered per bucket by :meth:`Stats.missed` (a space-saving top-k: bounded memory).
MISSED_KEYS = 100


def _keep_top(counts: dict[str, int], limit: int) -> dict[str, int]:
    if len(counts) <= limit:
        return counts
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:limit])


@define(eq=False)
class Stats:
    """
    Plain counters.  ``events`` holds hits, misses, redirects, fills started
    and stored, bytes served and pulled, …; ``fill_failures`` counts failed
    fills by reason; ``statuses`` counts responses by HTTP status.
    """

    events: Counter[str] = field(factory=Counter)
    fill_failures: Counter[str] = field(factory=Counter)
    statuses: Counter[int] = field(factory=Counter)
    #: Cumulative histogram of fill durations: one count per bucket bound,
    #: plus the total count and sum, Prometheus style.
    fill_duration_counts: list[int] = field(factory=lambda: [0] * len(FILL_DURATION_BUCKETS))
    fill_duration_sum: float = 0.0
    fill_duration_count: int = 0
    #: Requests by ``"<bucket> <outcome>"`` (hit, redirect, mirror, not-found): bounded by the buckets.
    requests: Counter[str] = field(factory=Counter)
    #: Per bucket, the most-missed keys and how often (an over-estimate by at most the smallest count).
    missed_keys: dict[str, dict[str, int]] = field(factory=dict)
    #: Requests to a network store by ``"<operation> <outcome>"``, and their seconds by operation.
    store_requests: Counter[str] = field(factory=Counter)
    store_seconds: dict[str, float] = field(factory=dict)

    def store_request(self, operation: str, outcome: str, seconds: float) -> None:
        """Count one request to the store (``outcome``: ``2xx`` … ``5xx``, or ``error``: no answer)."""
        self.store_requests[f"{operation} {outcome}"] += 1
        self.store_seconds[operation] = self.store_seconds.get(operation, 0.0) + seconds

    def request(self, bucket: str, outcome: str) -> None:
        self.requests[f"{bucket} {outcome}"] += 1

    def hit(self, bucket: str) -> None:
        """Count a hit in ``bucket`` (however it is answered)."""
        self.events["hits"] += 1
        self.requests[f"{bucket} hit"] += 1

    def redirected(self, bucket: str, key: str) -> None:
        """Count a miss of ``key`` answered with a redirect to the origin (its ``misses`` counted apart)."""
        self.requests[f"{bucket} redirect"] += 1
        self.missed(bucket, key)
        self.events["redirects"] += 1

    def missed(self, bucket: str, key: str) -> None:
        """Count a miss of ``key`` (space-saving: a new key takes the place of the least-missed one)."""
        counts = self.missed_keys.setdefault(bucket, {})
        if key in counts or len(counts) < MISSED_KEYS:
            counts[key] = counts.get(key, 0) + 1
            return
        least = min(counts, key=counts.__getitem__)
        counts[key] = counts.pop(least) + 1

    def inc(self, name: str, n: int = 1) -> None:
        self.events[name] += n

    def fill_failed(self, reason: str) -> None:
        self.events["fills_failed"] += 1
        self.fill_failures[reason] += 1

    def observe_fill(self, seconds: float) -> None:
        self.fill_duration_sum += seconds
        self.fill_duration_count += 1
        for i, bound in enumerate(FILL_DURATION_BUCKETS):
            if seconds <= bound:
                self.fill_duration_counts[i] += 1

    def to_json(self) -> dict[str, Any]:
        """Every counter as JSON-ready data, for :meth:`add` in another process."""
        return {
            "events": dict(self.events),
            "fill_failures": dict(self.fill_failures),
            "statuses": {str(code): n for code, n in self.statuses.items()},
            "fill_duration_counts": list(self.fill_duration_counts),
            "fill_duration_sum": self.fill_duration_sum,
            "fill_duration_count": self.fill_duration_count,
            "requests": dict(self.requests),
            "missed_keys": {bucket: dict(counts) for bucket, counts in self.missed_keys.items()},
            "store_requests": dict(self.store_requests),
            "store_seconds": dict(self.store_seconds),
        }

    def add(self, data: Mapping[str, Any]) -> None:
        """Add the counters of :meth:`to_json` data (another process's) to these."""
        self.events.update(data["events"])
        self.fill_failures.update(data["fill_failures"])
        self.statuses.update({int(code): n for code, n in data["statuses"].items()})
        self.fill_duration_counts = [
            a + b for a, b in zip(self.fill_duration_counts, data["fill_duration_counts"], strict=True)
        ]
        self.fill_duration_sum += data["fill_duration_sum"]
        self.fill_duration_count += data["fill_duration_count"]
        self.requests.update(data.get("requests", {}))
        self.store_requests.update(data.get("store_requests", {}))
        for operation, seconds in data.get("store_seconds", {}).items():
            self.store_seconds[operation] = self.store_seconds.get(operation, 0.0) + seconds
        for bucket, counts in data.get("missed_keys", {}).items():
            mine = self.missed_keys.setdefault(bucket, {})
            for key, n in counts.items():
                mine[key] = mine.get(key, 0) + n
            self.missed_keys[bucket] = _keep_top(mine, MISSED_KEYS)

    def snapshot(self) -> dict[str, object]:
        """A plain, printable copy of every counter."""
        return {
            **{k: self.events[k] for k in sorted(self.events)},
            "fills_failed_by_reason": dict(sorted(self.fill_failures.items())),
            "responses_by_status": dict(sorted(self.statuses.items())),
        }


@define
class Totals:
    """A daemon's counters summed over its processes, with its fill gauges."""

    stats: Stats
    fills_running: int = 0
    fills_queued: int = 0
    not_found_remembered: int = 0
    #: Origin hosts passed over until a probe finds them up, summed over the processes.
    origin_hosts_down: int = 0
