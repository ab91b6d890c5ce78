"""
Stale-while-revalidate (issue 14): a bucket's ``revalidate_after`` makes a
hit on a copy older than that serve the copy at once and check it with the
origin in the background, once per key.
"""

from __future__ import annotations

from cosedge.config import BucketConfig
from tests.helpers import BUCKET, ORIGIN, Edge, StepCooperator


def stale_edge(cooperator: StepCooperator) -> Edge:
    edge = Edge(cooperator, gated=True)  # origin requests wait for flush_origin()
    bucket = BucketConfig(origin=ORIGIN, origin_pull=True, revalidate_after=60)
    edge.config = edge.config.with_bucket(BUCKET, bucket)
    return edge


def conditional_gets(edge: Edge, path: bytes) -> list[dict[bytes, list[bytes]]]:
    return [h for m, p, h in edge.origin.requests if m == b"GET" and p == path and b"If-None-Match" in h]


def test_a_stale_hit_is_served_at_once_and_revalidated_once_in_the_background(cooperator: StepCooperator) -> None:
    edge = stale_edge(cooperator)
    edge.origin.add("page.html", b"old page", headers={"ETag": '"1"'})
    assert edge.request("/page.html").status == 302
    edge.flush_origin()
    assert edge.request("/page.html").body == b"old page"
    assert conditional_gets(edge, b"/page.html") == []  # fresh: nobody asked
    edge.clock.advance(61)
    edge.origin.add("page.html", b"new page", headers={"ETag": '"2"'})
    first, second = edge.request("/page.html"), edge.request("/page.html")
    assert first.body == second.body == b"old page"  # served at once, not waiting for the origin
    edge.flush_origin()
    assert [h[b"If-None-Match"] for h in conditional_gets(edge, b"/page.html")] == [[b'"1"']]  # one check
    assert edge.request("/page.html").body == b"new page"  # the changed copy replaced the old one
    assert edge.stats.events["revalidations"] >= 1


def test_a_not_modified_copy_is_fresh_again_and_a_gone_origin_keeps_it(cooperator: StepCooperator) -> None:
    edge = stale_edge(cooperator)
    edge.origin.add("a.txt", b"same", headers={"ETag": '"s"'})
    edge.request("/a.txt")
    edge.flush_origin()
    edge.clock.advance(61)
    edge.origin.add("a.txt", b"", status=304, headers={"ETag": '"s"'})
    assert edge.request("/a.txt").body == b"same"
    edge.flush_origin()
    assert edge.stats.events["fills_not_modified"] == 1
    edge.clock.advance(30)  # checked 30 s ago: fresh
    assert edge.request("/a.txt").body == b"same"
    edge.flush_origin()
    assert len(conditional_gets(edge, b"/a.txt")) == 1
    edge.clock.advance(61)
    del edge.origin.objects["a.txt"]
    assert edge.request("/a.txt").body == b"same"
    edge.flush_origin()
    assert edge.request("/a.txt").body == b"same"  # the old server is going away: the copy is kept
    assert edge.stats.fill_failures["origin-gone"] == 1
