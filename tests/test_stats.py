"""Request outcomes per bucket and the most-missed keys (issue 14's migration view and metrics)."""

from __future__ import annotations

from cosedge.stats import MISSED_KEYS, Stats
from tests.helpers import BUCKET, Edge, StepCooperator


def test_each_request_is_counted_by_bucket_and_outcome(cooperator: StepCooperator) -> None:
    edge = Edge(cooperator)
    edge.origin.add("a.jpg", b"a")
    edge.request("/a.jpg")  # a miss: redirected, copied
    edge.flush_origin()
    edge.request("/a.jpg")
    edge.request("/a.jpg")
    edge.request("/../x")  # refused before any bucket work: not an object request
    assert edge.stats.requests == {f"{BUCKET} redirect": 1, f"{BUCKET} hit": 2}
    assert edge.stats.missed_keys == {BUCKET: {"a.jpg": 1}}


def test_the_most_missed_keys_stay_in_bounded_memory_and_merge_across_processes() -> None:
    stats = Stats()
    for n in range(MISSED_KEYS):
        stats.missed("b-1", f"k{n}")
    for _ in range(5):
        stats.missed("b-1", "hot")  # evicts the least-missed key, then counts on
    counts = stats.missed_keys["b-1"]
    assert len(counts) == MISSED_KEYS and counts["hot"] == 6  # over-estimated by at most the evicted count
    other = Stats()
    other.missed("b-1", "hot")
    other.request("b-1", "hit")
    stats.add(other.to_json())
    assert stats.missed_keys["b-1"]["hot"] == 7 and stats.requests["b-1 hit"] == 1
    assert len(stats.missed_keys["b-1"]) == MISSED_KEYS
