"""
Counters that the web layer and the filler move, and that operators read
(``edge.stats()``, ``/metrics``).
"""

from __future__ import annotations

from collections import Counter

from attrs import define, field

__all__ = ["FILL_DURATION_BUCKETS", "Stats"]

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

    def snapshot(self) -> dict[str, object]:
        """A plain, printable copy of every counter."""
        return {
            **{k: self.events[k] for k in sorted(self.events)},
            "fills_failed_by_reason": dict(sorted(self.fill_failures.items())),
            "responses_by_status": dict(sorted(self.statuses.items())),
        }
