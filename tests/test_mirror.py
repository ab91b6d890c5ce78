"""
Mirror mode, fail-over between hosts, origin redirects and host probes
(issue 11), in memory: the bucket listener and its filler over fake origins,
one per host, on one clock.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from OpenSSL import SSL
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.web.client import URI, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from zope.interface import implementer

from cosedge.config import BucketConfig
from cosedge.fill.fetch import FillFailed, redirect_target
from cosedge.testing import FakeOrigin
from tests.helpers import BUCKET, Edge, ProcessClaims, StepCooperator, capture_logs, fill_events, raw_request

BODY = bytes(range(256)) * 40  # 10 KiB


@implementer(IAgent)
class Hosts:
    """An agent that routes each request by its host to a fake origin; hosts not listed refuse."""

    def __init__(self, **origins: FakeOrigin) -> None:
        self.origins = {name.replace("_", "."): o for name, o in origins.items()}
        self.agents = {name: RequestTraversalAgent(o) for name, o in self.origins.items()}
        self.asked: list[bytes] = []

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None, bodyProducer: Any = None
    ) -> Deferred[Any]:
        self.asked.append(method + b" " + uri)
        agent = self.agents.get(URI.fromBytes(uri).host.decode())
        if agent is None:
            return fail(ConnectionRefusedError("refused"))
        return agent.request(method, uri, headers, bodyProducer)

    def flush(self) -> None:
        for _ in range(5):
            for agent in self.agents.values():
                agent.flush()


def mirror_edge(cooperator: StepCooperator, agent: Hosts, **rule: object) -> Edge:
    edge = Edge(cooperator)
    table = {"priority": 1, "type": "mirror", "hosts": ["a.test"], **rule}
    edge.config = edge.config.with_bucket(BUCKET, BucketConfig(rules=[table]))  # type: ignore[arg-type]
    edge.agent = agent
    edge.filler = attrs.evolve(edge.filler, agent=agent)
    edge.resource._filler = edge.filler
    return edge


@pytest.fixture
def a() -> FakeOrigin:
    return FakeOrigin()


@pytest.fixture
def b() -> FakeOrigin:
    return FakeOrigin()


def test_a_mirror_miss_is_answered_with_the_object_and_stored(cooperator: StepCooperator, a: FakeOrigin) -> None:
    """The first request gets the bytes themselves (not a 302), with the origin's headers; the next is a hit."""
    a.add("k.jpg", BODY, content_type="image/jpeg", headers={"ETag": '"e1"'})
    hosts = Hosts(a_test=a)
    edge = mirror_edge(cooperator, hosts)
    conn = edge.connect()
    conn.send(raw_request("/k.jpg"))
    hosts.flush()
    response = conn.response()
    assert (response.status, response.body) == (200, BODY)
    assert response.header(b"content-type") == b"image/jpeg" and response.header(b"etag") == b'"e1"'
    assert response.header(b"x-cos-mirror") == b"origin"
    again = edge.request("/k.jpg")
    assert (again.status, again.body, again.header(b"x-cos-mirror")) == (200, BODY, None)
    assert a.gets(b"/k.jpg") == 1
    # Counted by the rule's type, for /metrics (cosedge_fills_by_rule{type="mirror",outcome="stored"}).
    assert edge.stats.events["fills_by_rule_mirror_stored"] == 1 and edge.stats.events["mirror_answers"] == 1


def test_a_herd_shares_one_origin_get_and_each_gets_every_byte(cooperator: StepCooperator, a: FakeOrigin) -> None:
    """Clients that miss together read one fetch; one that hangs up stops nothing."""
    a.add("big.bin", BODY)
    hosts = Hosts(a_test=a)
    edge = mirror_edge(cooperator, hosts)
    conns = [edge.connect() for _ in range(5)]
    for conn in conns:
        conn.send(raw_request("/big.bin"))
    conns[0].transport.loseConnection()  # this client leaves before a byte arrives
    hosts.flush()
    for conn in conns[1:]:
        response = conn.response()
        assert (response.status, response.body) == (200, BODY)
    assert a.gets(b"/big.bin") == 1
    assert edge.request("/big.bin").body == BODY  # stored despite the client that left


def test_a_client_that_comes_after_the_origin_answered_is_served_from_the_store(
    cooperator: StepCooperator, a: FakeOrigin
) -> None:
    """A late joiner cannot read the stream from its start: it gets the stored object when the fill ends."""
    a.add("s.bin", BODY, mode="stall", cut=100)
    hosts = Hosts(a_test=a)
    edge = mirror_edge(cooperator, hosts)
    early = edge.connect()
    early.send(raw_request("/s.bin"))
    hosts.flush()  # headers and 100 bytes; the origin stalls
    late = edge.connect()
    late.send(raw_request("/s.bin"))
    assert late.transport.value() == b""  # waiting
    stalled = a.stalled.pop()
    stalled.write(BODY[100:])
    stalled.finish()
    hosts.flush()
    assert early.response().body == BODY
    response = late.response()
    assert (response.status, response.body) == (200, BODY)
    assert a.gets(b"/s.bin") == 1


def test_origin_failures_before_the_headers_get_cos_answers(cooperator: StepCooperator, a: FakeOrigin) -> None:
    """An origin 404 is NoSuchKey; a 5xx or a refused connection is 424 MirrorFailed; nothing is stored."""
    a.add("e.bin", b"err", status=503)
    hosts = Hosts(a_test=a)
    edge = mirror_edge(cooperator, hosts, standby=["down.test"])
    for key, status, code in (("none.bin", 404, b"NoSuchKey"), ("e.bin", 424, b"MirrorFailed")):
        conn = edge.connect()
        conn.send(raw_request(f"/{key}"))
        hosts.flush()
        response = conn.response()
        assert response.status == status and b"<Code>" + code + b"</Code>" in response.body
    assert hosts.asked.count(b"GET http://down.test/e.bin") == 1  # the 5xx was failed over to the standby
    # The next miss of a remembered 404 is answered without asking anybody.
    assert edge.request("/none.bin").status == 404 and a.gets(b"/none.bin") == 1


def test_a_body_cut_mid_way_closes_the_clients_connection(cooperator: StepCooperator, a: FakeOrigin) -> None:
    a.add("cut.bin", BODY, mode="truncate", cut=1000)
    hosts = Hosts(a_test=a)
    with capture_logs() as events:
        edge = mirror_edge(cooperator, hosts)
        conn = edge.connect()
        conn.send(raw_request("/cut.bin"))
        hosts.flush()
        edge.cooperator.run()
    assert conn.closed and conn.transport.value().endswith(BODY[:1000])  # every byte the origin gave, then EOF
    assert [e["reason"] for e in fill_events(events)] == ["truncated"]
    assert edge.request("/cut.bin").status != 200  # nothing stored


def test_head_gets_the_origins_headers_and_starts_the_copy(cooperator: StepCooperator, a: FakeOrigin) -> None:
    a.add("h.txt", b"hello", content_type="text/plain")
    hosts = Hosts(a_test=a)
    edge = mirror_edge(cooperator, hosts)
    conn = edge.connect()
    conn.send(raw_request("/h.txt", method=b"HEAD"))
    hosts.flush()
    response = conn.response()
    assert (response.status, response.body, response.header(b"content-length")) == (200, b"", b"5")
    assert edge.request("/h.txt").body == b"hello"
    assert a.gets(b"/h.txt") == 1


def test_a_range_on_a_mirror_miss_is_cut_from_the_stream(cooperator: StepCooperator, a: FakeOrigin) -> None:
    a.add("r.bin", BODY)
    hosts = Hosts(a_test=a)
    edge = mirror_edge(cooperator, hosts)
    conn = edge.connect()
    conn.send(raw_request("/r.bin", headers=[("Range", "bytes=100-299")]))
    hosts.flush()
    response = conn.response()
    assert (response.status, response.body) == (206, BODY[100:300])
    assert response.header(b"content-range") == b"bytes 100-299/%d" % len(BODY)
    assert edge.request("/r.bin").body == BODY  # the whole object was stored


def test_a_refused_host_fails_over_is_marked_down_and_probed_before_reuse(
    cooperator: StepCooperator, b: FakeOrigin
) -> None:
    """The first host refuses: the next answers; the down host is skipped until a HEAD probe finds it up."""
    for key in ("1", "2", "3"):
        b.add(key, key.encode())
    hosts = Hosts(b_test=b)
    edge = mirror_edge(cooperator, hosts, hosts=["a.test"], standby=["b.test"], type="proxy")
    edge.filler.health.clock = edge.clock  # the filler's clock: the edge's
    with capture_logs() as events:
        first = edge.request("/1")
        hosts.flush()
    assert first.status == 302
    assert hosts.asked[:2] == [b"GET http://a.test/1", b"GET http://b.test/1"]
    assert edge.request("/1").body == b"1"
    assert any("marked down" in str(e.get("log_format")) for e in events)
    assert edge.stats.events["fills_failed_over"] == 1 and edge.filler.health.down_hosts() == ["http://a.test"]
    assert [e["rule"] for e in fill_events(events)] == ["1:proxy"]  # the fill's log line names its rule
    # While a.test is down every redirect and fetch goes to b.test first.
    assert edge.request("/2").header(b"location") == b"http://b.test/2"
    hosts.flush()
    assert b"GET http://a.test/2" not in hosts.asked
    # After the down time the host is probed with a HEAD, and stays down while the probe fails.
    edge.clock.advance(edge.config.fill.host_down_time + 1)
    assert edge.request("/3").header(b"location") == b"http://b.test/3"
    assert b"HEAD http://a.test/" in hosts.asked and not edge.filler.health.up("http://a.test")
    # Once it answers, the probe brings it back.
    hosts.agents["a.test"] = RequestTraversalAgent(b)
    edge.clock.advance(edge.config.fill.host_down_time + 1)
    edge.filler.health.up("http://a.test")
    hosts.flush()
    assert edge.filler.health.up("http://a.test")


def test_origin_redirects_are_followed_when_the_rule_says_so(
    cooperator: StepCooperator, a: FakeOrigin, b: FakeOrigin
) -> None:
    a.add("moved", status=301, headers={"Location": "http://b.test/new"})
    b.add("new", b"found it")
    hosts = Hosts(a_test=a, b_test=b)
    edge = mirror_edge(cooperator, hosts, follow_redirects=True)
    conn = edge.connect()
    conn.send(raw_request("/moved"))
    hosts.flush()
    assert conn.response().body == b"found it"
    plain = mirror_edge(cooperator, Hosts(a_test=a))
    conn = plain.connect()
    conn.send(raw_request("/moved"))
    plain.agent.flush()
    assert conn.response().status == 424  # a 301 is not the object


def test_a_redirect_target_is_held_to_the_rules_of_hosts() -> None:
    assert redirect_target(b"http://a.test/x/y", b"../z?q=1") == b"http://a.test/z?q=1"
    assert redirect_target(b"http://a.test/x", b"https://B.test:8443/k") == b"https://b.test:8443/k"
    for bad in (b"ftp://a.test/x", b"http://user@a.test/x", b"http://[::1]/x", b"javascript:alert(1)"):
        with pytest.raises(FillFailed) as e:
            redirect_target(b"http://a.test/x", bad)
        assert e.value.reason == "bad-redirect"


def test_headers_reach_the_origin_as_the_rule_says(cooperator: StepCooperator, a: FakeOrigin) -> None:
    a.add("k", b"x")
    hosts = Hosts(a_test=a)
    edge = mirror_edge(
        cooperator,
        hosts,
        host_header="www.example.com",
        headers_pass=["authorization"],
        headers_set={"X-From": "cosedge"},
    )
    conn = edge.connect()
    conn.send(raw_request("/k", headers=[("Authorization", "Bearer t"), ("Cookie", "c=1")]))
    hosts.flush()
    assert conn.response().body == b"x"
    _, _, headers = a.requests[-1]
    assert headers[b"Host"] == [b"www.example.com"] and headers[b"Authorization"] == [b"Bearer t"]
    assert headers[b"X-From"] == [b"cosedge"] and b"Cookie" not in headers


def test_a_client_too_slow_for_the_origin_gets_the_rest_from_the_store(
    cooperator: StepCooperator, a: FakeOrigin
) -> None:
    """
    A client whose connection stays full while more than 8 MiB arrive stops
    holding the stream in memory; once stored, the rest of its body comes
    from the store, and it receives every byte once, in order.
    """
    mib = 1024 * 1024
    body = bytes(range(256)) * (40 * 1024)  # 10 MiB
    a.add("slow.bin", body, mode="stall", cut=mib)
    hosts = Hosts(a_test=a)
    edge = mirror_edge(cooperator, hosts)
    conn = edge.connect()
    conn.send(raw_request("/slow.bin"))
    hosts.flush()  # the headers and the first MiB
    channel = conn.transport.producer
    channel.pauseProducing()  # the client's socket is full from now on
    stalled = a.stalled.pop()
    stalled.write(body[mib : mib + 8 * mib + 1])  # more than 8 MiB behind: the reader lets go of the stream
    stalled.write(body[mib + 8 * mib + 1 :])
    stalled.finish()
    hosts.flush()
    channel.resumeProducing()
    for _ in range(50):  # the store produces the rest in steps (bounded)
        edge.cooperator.run()
        if conn.closed:
            break
    response = conn.response()
    assert (response.status, len(response.body)) == (200, len(body))
    assert response.body == body
    assert a.gets(b"/slow.bin") == 1


def test_a_tls_refusal_fails_over_but_does_not_mark_the_host_down(cooperator: StepCooperator, b: FakeOrigin) -> None:
    """A certificate this rule does not trust is about the rule, not the host: next host, no down mark."""
    b.add("t", b"tls")
    hosts = Hosts(b_test=b)
    refused = hosts.request

    def request(method: bytes, uri: bytes, headers: Headers | None = None, bodyProducer: Any = None) -> Deferred[Any]:
        if b"a.test" in uri:
            hosts.asked.append(method + b" " + uri)
            return fail(
                ResponseNeverReceived([Failure(SSL.Error([("SSL routines", "", "certificate verify failed")]))])
            )
        return refused(method, uri, headers, bodyProducer)

    hosts.request = request  # type: ignore[method-assign]
    edge = mirror_edge(cooperator, hosts, hosts=["a.test"], standby=["b.test"])
    conn = edge.connect()
    conn.send(raw_request("/t"))
    hosts.flush()
    assert conn.response().body == b"tls"
    assert edge.filler.health.down_hosts() == [] and edge.stats.events["fills_failed_over"] == 1


def test_a_mirror_client_of_a_key_another_process_fills_is_served_or_reads_itself(
    cooperator: StepCooperator, a: FakeOrigin
) -> None:
    """
    With workers, the process that did not win a key's claim waits for the
    store; if the winner's fill fails, it reads the origin itself instead of
    waiting out the whole deadline.
    """
    from cosedge.storage.memory import MemoryStore

    held: dict[tuple[str, tuple[str, ...]], int] = {}

    store = MemoryStore()
    edges = []
    for pid in (1, 2):
        hosts = Hosts(a_test=a)
        edge = mirror_edge(cooperator, hosts)
        edge.store = store
        edge.filler = attrs.evolve(edge.filler, store=store, claims=ProcessClaims(held, pid))
        edge.resource._filler = edge.filler
        edge.resource._store = store
        edges.append((edge, hosts, pid))
    (first, first_hosts, _), (second, second_hosts, _) = edges
    a.add("w.bin", BODY, mode="stall", cut=10)
    winner = first.connect()
    winner.send(raw_request("/w.bin"))
    first_hosts.flush()  # the first process holds the claim; its origin stalls
    waiting = second.connect()
    waiting.send(raw_request("/w.bin"))
    second.clock.advance(0.5)
    assert waiting.transport.value() == b""  # waiting for the other process
    a.stalled.pop().transport.loseConnection()  # the first process's fill fails: its claim is released
    first_hosts.flush()
    a.add("w.bin", BODY)
    second.clock.advance(0.1)
    second_hosts.flush()
    response = waiting.response()
    assert (response.status, response.body) == (200, BODY)
