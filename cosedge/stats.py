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
