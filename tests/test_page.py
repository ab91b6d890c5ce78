"""
The migration page (``GET /`` on the admin listener) and the Grafana
dashboard, without a reactor: the page rendered from a whole service on a
memory clock with known counters (escaping, the chart's points, the
most-missed keys filtered to those not stored, hosts down, jobs, the usage
cache, read-only), and every metric the dashboard's queries name checked
against what cosedge exports.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from attrs import define
from twisted.internet.defer import Deferred, fail, succeed

from cosedge.config import BucketConfig
from cosedge.ops.history import Point, RequestHistory, UsageCache
from cosedge.ops.metrics import make_registry
from cosedge.ops.page import MISSED_SHOWN, STORED_RECHECK, BucketView, page
from cosedge.ops.render import bar, chart, duration
from cosedge.service import EdgeService
from cosedge.stats import Stats, Totals
from cosedge.testing import MemoryStore

from .helpers import BUCKET, NOPULL, result_of
from .test_ops import ops_of, scrape, service_with

RULED = "ruled-1250000000"
DASHBOARD = Path(__file__).resolve().parents[1] / "etc" / "grafana" / "cosedge.json"
HOSTILE = "<script>alert('x')</script>&\"quoted\""


@pytest.fixture
def service() -> Iterator[EdgeService]:
    """A whole service with [admin], started (so the request counters are sampled), on a memory clock."""
    built = service_with({"admin": {}})
    built.startService()
    yield built
    built.stopService()


def get_page(service: EdgeService) -> str:
    code, headers, body = scrape(ops_of(service).resource, "/")
    assert code == 200
    assert headers["content-type"] == "text/html; charset=utf-8"
    return body


def requests(service: EdgeService, bucket: str, hits: int, others: int, outcome: str = "redirect") -> None:
    for _ in range(hits):
        service.stats.request(bucket, "hit")
    for _ in range(others):
        service.stats.request(bucket, outcome)


def section(body: str, bucket: str) -> str:
    """The part of the page about one bucket."""
    start = body.index(f'data-bucket="{bucket}"')
    end = body.find('<section class="bucket"', start)
    return body[start : end if end != -1 else len(body)]


# -- the page --


def test_page_is_self_contained_and_refreshes(service: EdgeService) -> None:
    """One HTML document: no script, no external asset, a policy that forbids both, a reload every 10 s."""
    code, headers, body = scrape(ops_of(service).resource, "/")
    assert code == 200 and body.startswith("<!DOCTYPE html>")
    assert '<meta http-equiv="refresh" content="10">' in body
    assert "<script" not in body.lower()
    for asset in ("src=", "<link", "@import", "url(", 'href="http', "href='http", "//fonts"):
        assert asset not in body, asset
    assert "script-src" not in headers["content-security-policy"]
    assert headers["content-security-policy"].startswith("default-src 'none'")
    assert headers["cache-control"] == "no-store"
    assert body.count('<section class="bucket"') == 2  # both configured buckets
    assert f"<h2>{BUCKET}</h2>" in body and f"<h2>{NOPULL}</h2>" in body
    assert 'id="no-jobs"' in body


def test_page_is_read_only(service: EdgeService) -> None:
    """Only GET and HEAD: any other method is 405 and changes nothing; the other admin paths still answer."""
    resource = ops_of(service).resource
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        code, headers, _ = scrape(resource, "/", method=method)
        assert (code, headers["allow"]) == (405, "GET, HEAD"), method
    code, headers, body = scrape(resource, "/", method="HEAD")
    assert code == 200 and body == "" and int(headers["content-length"]) > 1000
    assert scrape(resource, "/livez")[:3:2] == (200, "ok\n")
    assert scrape(resource, "/metrics")[0] == 200
    assert scrape(resource, "/1.jpg")[0] == 404


def test_hostile_keys_bucket_names_and_hosts_are_escaped(service: EdgeService) -> None:
    """Keys, bucket names and hosts are user input: shown as text, never as markup."""
    service.stats.missed(BUCKET, HOSTILE)
    service.filler.health.down(f"http://{HOSTILE}", None, "test")  # type: ignore[arg-type]
    body = get_page(service)
    assert HOSTILE not in body
    escaped = "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;&quot;quoted&quot;"
    assert body.count(escaped) == 2  # the key, and the host marked down
    # A bucket name cannot be hostile in a valid configuration; the page escapes it anyway.
    view = BucketView(HOSTILE, BucketConfig(), {"hit": 1}, [Point(0, 1.0, 1)], (1, 1), (1, 1), None, None, [])
    html = page([view], Totals(Stats()), [], None, 0.0, "")
    assert HOSTILE not in html and html.count(escaped) >= 4  # heading, link, data attribute, chart title


def test_chart_has_one_point_per_minute_of_the_last_hour(service: EdgeService) -> None:
    """
    The counters are sampled once a minute; each point is that minute's
    share of hits; a minute without requests breaks the line; the minute
    still running is a hollow point; at most an hour is kept.
    """
    history = ops_of(service).history
    clock = service.reactor
    assert len(history.samples) == 1  # taken at start
    requests(service, BUCKET, 3, 1)  # minute 1: 75 %
    clock.advance(60)
    requests(service, BUCKET, 1, 1, "mirror")  # minute 2: 50 %
    clock.advance(60)
    clock.advance(60)  # minute 3: no requests
    requests(service, BUCKET, 0, 2, "not-found")  # minute 4: 0 %
    clock.advance(60)
    requests(service, BUCKET, 1, 0)  # the running minute: 100 % so far
    clock.advance(30)
    body = section(get_page(service), BUCKET)
    assert 'data-points="4"' in body
    titles = re.findall(r"<circle[^>]*><title>([^<]*)</title>", body)
    assert titles == [
        "3 min 30 s ago: 75.0% of 4 requests answered locally",
        "2 min 30 s ago: 50.0% of 2 requests answered locally",
        "30 s ago: 0.0% of 2 requests answered locally",
        "this minute so far: 100.0% of 1 request answered locally",
    ]
    assert body.count('class="dot partial"') == 1
    assert body.count("<polyline") == 2  # broken by the quiet minute
    assert '<span class="share">55.6%</span> of 9 requests' in body  # 5 hits of 9 this hour
    points = history.points(BUCKET, {BUCKET: (5, 9)}, clock.seconds())
    assert [p.share for p in points] == [0.75, 0.5, None, 0.0, 1.0]
    assert [p.ago for p in points] == [210, 150, 90, 30, 0]

    clock.pump([60] * 120)  # two hours later
    assert len(history.samples) == 61
    points = history.points(BUCKET, {BUCKET: (5, 9)}, clock.seconds())
    assert len(points) == 60 and all(p.share is None for p in points)
    assert "no requests in the last hour yet" in section(get_page(service), BUCKET)


def test_sampling_runs_only_with_the_admin_listener_and_stops_with_the_service() -> None:
    """The page's sampler starts and stops with the service, and only when [admin] is configured."""
    with_admin = service_with({"admin": {}})
    with_admin.startService()
    with_admin.reactor.pump([60, 60])
    history = ops_of(with_admin).history
    assert len(history.samples) == 3
    with_admin.stopService()
    with_admin.reactor.advance(600)
    assert len(history.samples) == 3
    without = service_with({})
    without.startService()
    without.reactor.advance(600)
    assert len(ops_of(without).history.samples) == 0
    without.stopService()


def test_a_failing_counter_read_keeps_the_sampler_going(logged_failures: list[dict[str, Any]]) -> None:
    """One bad read is logged and skipped; the next minute is sampled again."""
    reads: Iterator[dict[str, int] | None] = iter([None, {f"{BUCKET} hit": 2}])

    def read() -> dict[str, int]:
        value = next(reads)
        if value is None:
            raise ValueError("boom")
        return value

    service = service_with({})
    history = RequestHistory(service.reactor, read)
    history.start()
    service.reactor.advance(60)
    history.stop()
    assert [counts for _, counts in history.samples] == [{BUCKET: (2, 2)}]
    assert len(logged_failures) == 1
    logged_failures.clear()


def test_most_missed_keys_are_those_not_stored_yet(service: EdgeService, monkeypatch: pytest.MonkeyPatch) -> None:
    """Much-missed keys that have been stored since drop off the list (each check closes what it opened)."""
    store = service.store
    assert isinstance(store, MemoryStore)
    for key, misses in (("a/1.jpg", 5), ("b.jpg", 9), ("c.jpg", 2)):
        for _ in range(misses):
            service.stats.missed(BUCKET, key)
    store.put(BUCKET, ("b.jpg",), b"stored meanwhile")
    opened: list[Any] = []
    real_open = MemoryStore.open

    def seen(found: Any) -> Any:
        opened.append(found)
        return found

    def open_(self: MemoryStore, bucket: str, segments: tuple[str, ...]) -> Deferred[Any]:
        return real_open(self, bucket, segments).addCallback(seen)

    monkeypatch.setattr(MemoryStore, "open", open_)
    body = section(get_page(service), BUCKET)
    keys = re.findall(r'<td><span class="key">([^<]*)</span></td><td class="n">(\d+)</td>', body)
    assert keys == [("a/1.jpg", "5"), ("c.jpg", "2")]
    assert [o is None or o.closed for o in opened] == [True, True, True]
    opened.clear()
    get_page(service)  # a key found stored is not looked up again for a while
    assert opened == [None, None]
    service.reactor.advance(STORED_RECHECK)
    opened.clear()
    get_page(service)
    assert len(opened) == 3

    for i in range(40):  # bounded: the most-missed first
        service.stats.missed(BUCKET, f"many/{i:02}.jpg")
    keys = re.findall(r'<td><span class="key">([^<]*)</span></td><td class="n">', section(get_page(service), BUCKET))
    assert len(keys) == MISSED_SHOWN and keys[:2] == ["a/1.jpg", "c.jpg"]


def test_origin_hosts_and_their_health(service: EdgeService) -> None:
    """Each rule's hosts and standby hosts (or the bucket's origin) with up/down; unknown down hosts listed too."""
    rules = [
        {"priority": 1, "hosts": ["www.example.com", {"host": "img2.example.com:8080", "weight": 3}]},
        {"priority": 2, "type": "mirror", "protocol": "follow", "hosts": ["m.example.com"], "standby": ["s.example"]},
    ]
    service.replace_config(service.config.with_bucket(RULED, BucketConfig(rules=rules)))  # type: ignore[arg-type]
    health = service.filler.health
    health.down("http://img2.example.com:8080", None, "test")  # type: ignore[arg-type]
    health.down("https://s.example", None, "test")  # type: ignore[arg-type]
    health.down("http://elsewhere.example:81", None, "test")  # type: ignore[arg-type]
    body = get_page(service)
    hosts = re.findall(
        r'<tr><td><span class="key">([^<]*)</span></td><td>([^<]*)</td><td>([^<]*)</td><td><span class="(up|down)">',
        section(body, RULED),
    )
    assert hosts == [
        ("http://www.example.com", "host", "1:proxy", "up"),
        ("http://img2.example.com:8080", "host (weight 3)", "1:proxy", "down"),
        ("http://m.example.com or https://m.example.com", "host", "2:mirror", "up"),
        ("http://s.example or https://s.example", "standby", "2:mirror", "down"),
    ]
    assert "http://10.10.10.10:8080" in section(body, BUCKET) and "origin-pull is off" in section(body, NOPULL)
    origins = body[body.index('id="origins"') :]
    assert '<p class="down">3 origin hosts marked down</p>' in origins
    assert re.findall(r'<li class="down key">([^<]*)</li>', origins) == ["http://elsewhere.example:81"]


def test_usage_is_counted_at_most_every_few_minutes(service: EdgeService) -> None:
    """Objects and bytes come from a cached count: page loads do not walk the bucket again until it is stale."""
    store = service.store
    assert isinstance(store, MemoryStore)
    store.put(BUCKET, ("x.jpg",), b"12345")
    usage = ops_of(service).page.usage
    assert "1 object, 5 B (counted just now)" in section(get_page(service), BUCKET)
    first = usage.counts_started
    store.put(BUCKET, ("y.jpg",), b"123")
    service.reactor.advance(120)
    assert "1 object, 5 B (counted 2 min ago)" in section(get_page(service), BUCKET)
    assert usage.counts_started == first
    service.reactor.advance(usage.max_age)
    get_page(service)  # starts the new count, shows the last one meanwhile
    assert "2 objects, 8 B" in section(get_page(service), BUCKET)


@define
class CountingStore:
    """A store whose only part is its usage count."""

    usage: Callable[[str], Deferred[tuple[int, int]]]


def test_usage_count_waits_briefly_then_shows_counting() -> None:
    """A slow first count: a page load waits a little, then says it is counting; a failed count says why."""
    service = service_with({})
    pending: Deferred[tuple[int, int]] = Deferred()
    store = CountingStore(lambda bucket: pending)
    cache = UsageCache(store, service.reactor, max_age=300)  # type: ignore[arg-type]
    waiting = cache.get(BUCKET, wait=2.0)
    assert not waiting.called
    service.reactor.advance(2.0)
    assert result_of(waiting) is None
    second = cache.get(BUCKET, wait=2.0)  # the next page load waits for the same count
    pending.callback((3, 30))
    assert result_of(second).objects == 3 and cache.counts_started == 1
    assert result_of(cache.get(BUCKET)).objects == 3
    store.usage = lambda bucket: fail(OSError("disk gone"))
    service.reactor.advance(300)
    assert result_of(cache.get(BUCKET)).objects == 3 and cache.errors == {BUCKET: "disk gone"}
    store.usage = lambda bucket: succeed((4, 40))
    assert result_of(cache.get(BUCKET)).objects == 3  # a failed count is retried after max_age
    service.reactor.advance(300)
    assert result_of(cache.get(BUCKET)).objects == 4 and cache.errors == {}


class FakeJobs:
    def __init__(self, rows: list[dict[str, Any]] | None = None) -> None:
        self.rows = rows or []

    def list(self) -> list[dict[str, Any]]:
        if not self.rows:
            raise RuntimeError("journal unreadable")
        return self.rows


def test_jobs_with_progress_bars(service: EdgeService, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each job is a row with a progress bar from done/total; an unknown total gives a grey bar."""
    rows = [
        {"id": 1, "kind": "backfill", "bucket": BUCKET, "state": "running", "done": 420, "total": 1000,
         "bytes": 5 * 2**20, "rate": "12.5/s", "eta": "0:00:46", "failures": {"http-404": 3}},
        {"id": 2, "kind": "verify", "bucket": HOSTILE, "state": "queued", "done": 0, "total": None,
         "bytes": 0, "rate": 0.0, "eta": None, "failures": 0},
    ]  # fmt: skip
    monkeypatch.setattr(service, "jobs", FakeJobs(rows), raising=False)
    jobs = get_page(service).split('id="jobs"')[1].split("</section>")[0]
    assert 'aria-valuemax="1000" aria-valuenow="420"><span style="width:42.0%">' in jobs
    assert "420 / 1,000 (42%)" in jobs and "5.0 MiB" in jobs and "12.5/s" in jobs and "0:00:46" in jobs
    assert "http-404: 3" in jobs
    assert 'class="bar unknown"' in jobs and "total not known yet" in jobs
    assert HOSTILE not in jobs and "no jobs" not in jobs


def test_jobs_that_cannot_be_listed_say_so(
    service: EdgeService, monkeypatch: pytest.MonkeyPatch, logged_failures: list[dict[str, Any]]
) -> None:
    monkeypatch.setattr(service, "jobs", FakeJobs(), raising=False)
    assert "jobs could not be listed: journal unreadable" in get_page(service)
    assert len(logged_failures) == 1
    logged_failures.clear()


def test_fills_by_outcome_and_latency(service: EdgeService) -> None:
    stats = service.stats
    stats.inc("fills_started", 4)
    stats.inc("fills_stored", 3)
    stats.inc("fills_by_rule_proxy_stored", 3)
    stats.fill_failed("http-404")
    stats.inc("fills_skipped_not_found", 2)
    for seconds in (0.2, 0.3, 7.0):
        stats.observe_fill(seconds)
    fills = get_page(service).split('id="fills"')[1].split("</section>")[0]
    cells = re.findall(r"<tr><td>([^<]*)</td>(?:<td>([^<]*)</td>)?<td class=\"n\">([^<]*)</td></tr>", fills)
    found = {(name + (" " + middle if middle else "")): value for name, middle, value in cells}
    assert found["started"] == "4" and found["stored"] == "3" and found["failed: http-404"] == "1"
    assert found["skipped: not-found"] == "2" and found["proxy stored"] == "3"
    assert found["mean time to store"] == "2.5 s"
    assert found["median"] == "≤ 500 ms" and found["95th percentile"] == "≤ 10 s"


def test_render_helpers() -> None:
    assert duration(0.25) == "250 ms" and duration(60) == "1 min" and duration(200) == "3 min 20 s"
    assert duration(7260) == "2 h 1 min"
    assert 'aria-valuenow="7"' in bar(7, 7, "x") and "(100%)" in bar(9, 7, "x")
    empty = chart("b", [])
    assert 'data-points="0"' in empty and "no requests in the last hour yet" in empty


# -- the Grafana dashboard --

_FUNCTION = re.compile(r"\b[a-zA-Z_][a-zA-Z0-9_]*\s*\(")
_IDENTIFIER = re.compile(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or", "unless"}


def _walk(node: object) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (labels, functions, keywords and variables left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", "{}", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "[]", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # dashboard variables
    text = _FUNCTION.sub("(", text)
    text = re.sub(r"\b\d+(\.\d+)?(e[+-]?\d+)?\b", " ", text)
    return {name for name in _IDENTIFIER.findall(text) if name not in _KEYWORDS}


def dashboard_queries() -> list[str]:
    model = json.loads(DASHBOARD.read_text())
    queries = [node["expr"] for node in _walk(model["panels"]) if isinstance(node.get("expr"), str)]
    for variable in model["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", variable["definition"])
            assert match, variable["definition"]
            queries.append(match.group(1))
    return queries


def exported_names() -> set[str]:
    """Every sample name cosedge's registry can export (a counter family's _total, a histogram's _bucket, …)."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}
    suffixes |= {"info": ("_info",), "summary": ("_sum", "_count"), "gaugehistogram": ("_bucket", "_gsum", "_gcount")}
    names = set()
    service = service_with({"admin": {}})
    for family in make_registry(service).collect():
        names.add(family.name)
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ()))
        names.update(sample.name for sample in family.samples)
    return names


def test_metric_name_extraction() -> None:
    expr = (
        'sum by (bucket) (rate(cosedge_requests_total{outcome="hit", bucket=~"$bucket"}[$__rate_interval]))'
        " / ignoring(x) histogram_quantile(0.95, sum by (le) (rate(cosedge_fill_duration_seconds_bucket[5m])))"
        " > bool 1e3 or vector(0)"
    )
    assert metric_names(expr) == {"cosedge_requests_total", "cosedge_fill_duration_seconds_bucket"}


def test_dashboard_refers_only_to_exported_metrics() -> None:
    """Every metric name in the dashboard's PromQL is one cosedge exports, and every query names one."""
    exported = exported_names()
    queries = dashboard_queries()
    assert len(queries) >= 10
    used: set[str] = set()
    for query in queries:
        names = metric_names(query)
        assert names, f"no metric in {query!r}"
        assert names <= exported, f"{sorted(names - exported)} in {query!r} are not exported"
        used |= names
    for needed in (
        "cosedge_requests_total",
        "cosedge_fills_stored_total",
        "cosedge_fills_failed_total",
        "cosedge_fills_by_rule_total",
        "cosedge_fill_duration_seconds_bucket",
        "cosedge_origin_hosts_down",
        "cosedge_fills_failed_over_total",
        "cosedge_job_objects_total",
        "cosedge_jobs",
    ):
        assert needed in used, needed


def test_dashboard_is_a_grafana_model() -> None:
    """Unique panel ids and positions; every query goes to the chosen Prometheus data source."""
    model = json.loads(DASHBOARD.read_text())
    assert model["uid"] == "cosedge" and model["schemaVersion"] >= 36
    panels = list(_walk(model["panels"]))
    with_ids = [p for p in panels if "gridPos" in p]
    assert len({p["id"] for p in with_ids}) == len(with_ids)
    for panel in with_ids:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"], panel["title"]
    assert [v["name"] for v in model["templating"]["list"]][:1] == ["datasource"]
