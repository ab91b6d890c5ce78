"""
``[cluster]`` (issue 13): the section, rendezvous ownership, the internal
request's signature, and two edges in memory handing a fill to the key's
owner (one origin GET) or making it themselves when the owner does not take it.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
import pytest
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from zope.interface import implementer

from cosedge.cluster import (
    HEADER,
    MAX_SKEW,
    SCHEME_HEADER,
    Cluster,
    owner_of,
    parse_cluster,
    sign,
    sign_read,
    source_from_json,
    source_to_json,
    verify,
)
from cosedge.config import BucketConfig, ConfigError
from cosedge.origins import Source
from cosedge.testing import FakeOrigin, MemoryStore

from .helpers import BUCKET, HOST, ORIGIN, Edge, StepCooperator, capture_logs, edge_config, raw_request
from .test_mirror import Hosts

# The in-memory transport of treq's RequestTraversalAgent has no abortConnection.
pytestmark = pytest.mark.filterwarnings("ignore:Using readBody with a transport:DeprecationWarning")

A, B, C = "http://127.0.0.1:8080", "http://127.0.0.1:8090", "http://127.0.0.1:8100"
SECRET = b"0123456789abcdef0123456789abcdef"


@pytest.fixture
def secret_file(tmp_path: Path) -> str:
    path = tmp_path / "cluster.secret"
    path.write_bytes(SECRET + b"\n")
    return str(path)


def table(secret: str, **changes: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {"self": A, "peers": [A, B, C], "secret_file": secret}
    settings.update(changes)
    return {k: v for k, v in settings.items() if v is not None}


# -- the section --


def test_the_section_is_read_with_its_secret(secret_file: str) -> None:
    cluster = parse_cluster(table(secret_file, self=A + "/", owner_timeout=0.5))
    assert (cluster.self_url, cluster.peers, cluster.owner_timeout) == (A, (A, B, C), 0.5)
    assert cluster.secret == SECRET  # the trailing newline is not part of it
    assert SECRET.decode() not in repr(cluster)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"self": None}, "[cluster] needs self"),
        ({"self": "http://127.0.0.1:9999"}, "[cluster] peers must include self (http://127.0.0.1:9999)"),
        ({"peers": [A, A]}, "[cluster] peers must not repeat an edge"),
        ({"peers": []}, "[cluster] peers must be a list"),
        ({"peers": [A, "127.0.0.1:8090"]}, "[cluster] peers must be an edge's bucket listener as http://host:port"),
        ({"self": "http://127.0.0.1"}, "[cluster] self must be an edge's bucket listener as http://host:port"),
        ({"peers": [A, "http://u:p@127.0.0.1:8090"]}, "[cluster] peers must be a plain http://host:port URL"),
        ({"owner_timeout": 0}, "[cluster] owner_timeout must be a positive number of seconds"),
        ({"secret_file": ""}, "[cluster] secret_file must be the path"),
        ({"secret_file": "/nonexistent/cluster.secret"}, "[cluster] secret_file: cannot read /nonexistent"),
        ({"peer": [A]}, "[cluster] has unknown setting(s) peer"),
    ],
)
def test_errors_name_the_field(secret_file: str, changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_cluster(table(secret_file, **changes))
    assert str(raised.value).startswith(message), str(raised.value)


def test_a_short_secret_is_refused(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_bytes(b"password\n")
    with pytest.raises(ConfigError, match=r"secret_file: .* holds 8 bytes; a secret is at least 16"):
        parse_cluster(table(str(short)))


# -- ownership --


def test_every_edge_agrees_and_keys_spread_evenly() -> None:
    keys = [f"img/{i}.jpg" for i in range(3000)]
    owners = Counter(owner_of((A, B, C), BUCKET, k) for k in keys)
    assert set(owners) == {A, B, C}
    assert all(800 <= n <= 1200 for n in owners.values()), owners
    # The order peers are listed in does not matter.
    assert all(owner_of((C, A, B), BUCKET, k) == owner_of((A, B, C), BUCKET, k) for k in keys[:300])


def test_membership_changes_move_only_the_keys_of_the_peers_that_changed() -> None:
    keys = [f"k/{i}" for i in range(3000)]
    before = {k: owner_of((A, B, C), BUCKET, k) for k in keys}
    without_c = {k: owner_of((A, B), BUCKET, k) for k in keys}
    assert all(without_c[k] == before[k] for k in keys if before[k] != C)
    d = "http://127.0.0.1:8110"
    with_d = {k: owner_of((A, B, C, d), BUCKET, k) for k in keys}
    moved = [k for k in keys if with_d[k] != before[k]]
    assert all(with_d[k] == d for k in moved)
    assert 500 <= len(moved) <= 1000  # about a quarter


# -- the internal request --


def test_signatures() -> None:
    header = sign(SECRET, 1_000_000, b"/a.jpg", b"{}")
    assert verify(SECRET, header, b"/a.jpg", b"{}", 1_000_000 + MAX_SKEW) is None
    assert (
        verify(SECRET, header, b"/a.jpg", b'{"x":1}', 1_000_000)
        == "a signature that does not match the cluster's secret"
    )
    assert verify(SECRET, header, b"/b.jpg", b"{}", 1_000_000) is not None
    assert verify(b"another secret of 32 bytes......", header, b"/a.jpg", b"{}", 1_000_000) is not None
    assert verify(SECRET, header, b"/a.jpg", b"{}", 1_000_000 + MAX_SKEW + 1) == (
        f"a signature more than {MAX_SKEW}s from our clock"
    )
    assert verify(SECRET, None, b"/a.jpg", b"{}", 0) == "no signature"
    assert verify(SECRET, b"soon abc", b"/a.jpg", b"{}", 0) == "a malformed signature"


def test_a_source_travels_whole() -> None:
    source = Source(
        b"https://www.example.com/a%20b.jpg",
        (b"http://backup.example.com/a%20b.jpg",),
        ((b"Host", b"www.example.com"), (b"X-From", b"cosedge")),
        ca_file="/etc/cosedge/ca.pem",
        server_name=b"www.example.com",
        follow_redirects=True,
        rule="1:proxy",
    )
    assert source_from_json(source_to_json(BUCKET, source)) == (BUCKET, source)
    for bad in (b"[]", b'{"bucket": "b", "url": "file:///etc/passwd", "rule": ""}', b'{"url": "http://x/"}'):
        with pytest.raises(ValueError):
            source_from_json(bad)


# -- two edges in memory --


@attrs.define
class Pair:
    """Edge ``here`` (which does not own ``key``) and the owner edge, over one store and one origin."""

    here: Edge
    owner: Edge
    key: str
    owner_agent: RequestTraversalAgent


def _cluster_config(secret_file: str, self_url: str) -> Any:
    config = edge_config()
    return attrs.evolve(config, extra={"cluster": table(secret_file, self=self_url, peers=[A, B])})


@pytest.fixture
def pair(cooperator: StepCooperator, secret_file: str) -> Pair:
    store = MemoryStore()
    owner = Edge(cooperator, config=_cluster_config(secret_file, B), store=store, gated=True)
    here = Edge(cooperator, config=_cluster_config(secret_file, A), store=store, origin=owner.origin, clock=owner.clock)
    for edge in (owner, here):
        edge.resource._cluster = edge.filler.hand_over = None  # type: ignore[assignment]
    key = next(f"img/{i}.jpg" for i in range(100) if owner_of((A, B), BUCKET, f"img/{i}.jpg") == B)
    owner.origin.add(key, b"x" * 5000)
    owner_agent = RequestTraversalAgent(owner.site.resource)
    for edge, agent in ((owner, owner.agent), (here, owner_agent)):
        cluster = Cluster(lambda e=edge: e.config, agent, edge.clock, edge.stats)
        edge.filler.hand_over = cluster.hand_over
        edge.resource._cluster = cluster
    return Pair(here, owner, key, owner_agent)


def test_a_miss_on_another_edge_is_filled_once_by_the_owner(pair: Pair) -> None:
    for _ in range(3):
        response = pair.here.request(f"/{pair.key}")
        assert response.status == 302
    pair.owner_agent.flush()
    pair.owner.flush_origin()
    assert pair.owner.origin.gets(f"/{pair.key}".encode()) == 1
    assert pair.here.stats.events["fills_handed_over"] >= 1
    assert pair.here.stats.events["fills_started"] == 0  # not one fill here
    assert pair.owner.stats.events["fills_stored"] == 1
    hit = pair.here.request(f"/{pair.key}")
    assert (hit.status, hit.body) == (200, b"x" * 5000)


def test_the_owner_answers_stored_for_a_key_it_holds(pair: Pair) -> None:
    pair.owner.request(f"/{pair.key}")
    pair.owner.flush_origin()
    cluster = pair.here.resource._cluster
    assert cluster is not None
    asked = cluster._ask(B, cluster.settings(), BUCKET, tuple(pair.key.split("/")), Source(b"http://x/"))  # type: ignore[arg-type]
    pair.owner_agent.flush()
    assert _fired(asked) is True
    assert pair.owner.origin.gets(f"/{pair.key}".encode()) == 1


class Hanging:
    """An owner that never answers."""

    def request(self, method: bytes, uri: bytes, headers: Headers, body: Any) -> Deferred[Any]:
        return Deferred()


def test_an_owner_that_does_not_answer_in_time_is_passed_over(pair: Pair) -> None:
    assert pair.here.resource._cluster is not None
    pair.here.resource._cluster._agent = Hanging()  # type: ignore[assignment]
    pair.here.request(f"/{pair.key}")
    assert pair.here.stats.events["fills_started"] == 0
    pair.here.clock.advance(2.0)  # owner_timeout
    assert pair.here.stats.events["fills_owner_missed"] == 1
    pair.here.flush_origin()
    assert pair.here.stats.events["fills_stored"] == 1
    assert pair.here.request(f"/{pair.key}").status == 200


def test_an_owner_that_refuses_is_passed_over(pair: Pair) -> None:
    pair.owner.filler._stopping = True  # answers 503: no fill can start there
    pair.here.request(f"/{pair.key}")
    pair.owner_agent.flush()
    assert pair.here.stats.events["fills_owner_missed"] == 1
    pair.here.flush_origin()
    assert pair.here.stats.events["fills_stored"] == 1
    assert pair.owner.stats.events["fills_started"] == 0


def test_a_key_this_edge_owns_is_filled_here(pair: Pair) -> None:
    mine = next(f"own/{i}" for i in range(100) if owner_of((A, B), BUCKET, f"own/{i}") == A)
    pair.here.origin.add(mine, b"mine")
    pair.here.request(f"/{mine}")
    pair.here.flush_origin()
    assert pair.here.stats.events["fills_stored"] == 1
    assert pair.here.stats.events["fills_handed_over"] == 0


def _post(edge: Edge, key: str, body: bytes, header: bytes | None) -> Any:
    extra = [("Content-Type", "application/json")]
    if header is not None:
        extra.append((HEADER.decode(), header.decode()))
    return edge.send(raw_request(f"/{key}", method=b"POST", host=HOST, headers=extra, body=body))


@pytest.mark.parametrize(
    ("tamper", "status", "code"),
    [
        ("none", 202, None),
        ("signature", 403, "AccessDenied"),
        ("unsigned-bucket", 404, "NoSuchBucket"),
        ("not-json", 400, "InvalidArgument"),
    ],
)
def test_the_owner_checks_each_internal_request(pair: Pair, tamper: str, status: int, code: str | None) -> None:
    body = source_to_json(BUCKET, Source(f"http://{ORIGIN}/{pair.key}".encode()))
    if tamper == "unsigned-bucket":
        body = json.dumps({**json.loads(body), "bucket": "nosuch-1250000000"}).encode()
    elif tamper == "not-json":
        body = b"{"
    uri = f"/{pair.key}".encode()
    header = sign(SECRET, int(pair.owner.clock.seconds()), uri, body)
    if tamper == "signature":
        header = sign(SECRET, int(pair.owner.clock.seconds()), uri, body + b" ")
    response = _post(pair.owner, pair.key, body, header)
    assert response.status == status, response.body
    if code is not None:
        assert response.error_code() == code
        assert pair.owner.stats.events["fills_started"] == 0
    else:
        pair.owner.flush_origin()
        assert pair.owner.stats.events["fills_stored"] == 1


def _fired(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "not fired"
    return results[0]


def test_the_internal_request_is_signed_as_the_owner_checks_it(pair: Pair) -> None:
    """What ``here`` sends verifies on the owner, over the URI and the body it sent."""
    seen: list[tuple[bytes, Headers, bytes]] = []

    class Recording:
        def request(self, method: bytes, uri: bytes, headers: Headers, body: Any) -> Deferred[Any]:
            chunks: list[bytes] = []
            body.startProducing(type("C", (), {"write": chunks.append})())
            seen.append((uri, headers, b"".join(chunks)))
            return Deferred()

    cluster = Cluster(lambda: pair.here.config, Recording(), pair.here.clock, pair.here.stats)  # type: ignore[arg-type]
    assert cluster.hand_over(BUCKET, tuple(pair.key.split("/")), Source(b"http://o/k"), lambda: None)
    assert cluster.hand_over(BUCKET, tuple(pair.key.split("/")), Source(b"http://o/k"), lambda: None)
    assert len(seen) == 1  # one request per key while it is asked
    uri, headers, body = seen[0]
    assert uri == f"{B}/{pair.key}".encode()
    signature = headers.getRawHeaders(HEADER)[0]  # type: ignore[index]
    assert verify(SECRET, signature, uri[len(B) :], body, pair.here.clock.seconds()) is None


def test_the_owners_memory_of_a_404_holds_for_the_other_edges(pair: Pair) -> None:
    """A key the origin answered 404 to the owner is not fetched again by the edge that missed it."""
    missing = next(f"gone/{i}" for i in range(100) if owner_of((A, B), BUCKET, f"gone/{i}") == B)
    pair.owner.request(f"/{missing}")
    pair.owner.flush_origin()
    assert pair.owner.filler.recently_not_found(BUCKET, tuple(missing.split("/")))
    assert pair.here.request(f"/{missing}").status == 302
    pair.owner_agent.flush()
    pair.here.flush_origin()
    assert pair.owner.origin.gets(f"/{missing}".encode()) == 1
    assert pair.here.stats.events["fills_owner_missed"] == 0 and pair.here.stats.events["fills_started"] == 0


# -- mirror misses read through the owner --


@implementer(IAgent)
class Routed:
    """An edge's fill agent: the owner's URL to the owner's listener (in memory), the rest to the origin's hosts."""

    def __init__(self, owner: str, to_owner: RequestTraversalAgent, others: Hosts) -> None:
        self.owner = owner.encode()
        self.to_owner = to_owner
        self.others = others
        self.asked: list[tuple[bytes, Headers]] = []

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None, body: Any = None) -> Deferred[Any]:
        self.asked.append((uri, headers or Headers()))
        agent: Any = self.to_owner if uri.startswith(self.owner) else self.others
        return agent.request(method, uri, headers, body)


@attrs.define
class MirrorPair:
    here: Edge
    owner: Edge
    key: str
    origin: FakeOrigin
    routed: Routed
    to_owner: RequestTraversalAgent
    hosts: Hosts

    def flush(self) -> None:
        for _ in range(5):
            self.to_owner.flush()
            self.hosts.flush()


def _mirror_pair(
    cooperator: StepCooperator,
    secret_file: str,
    here_secret: str | None = None,
    acl: str = "",
    owner_rule: dict[str, Any] | None = None,
    **rule: Any,
) -> MirrorPair:
    store = MemoryStore()
    origin = FakeOrigin()
    hosts = Hosts(a_test=origin)
    mirror = {"priority": 1, "type": "mirror", "hosts": ["a.test"], "headers_pass": ["X-Token", "Cookie"], **rule}
    extra = {"acl": acl} if acl else {}

    def config(self_url: str, secret: str, rules: list[dict[str, Any]]) -> Any:
        return _cluster_config(secret, self_url).with_bucket(BUCKET, BucketConfig(rules=rules, **extra))  # type: ignore[arg-type]

    owner = Edge(cooperator, config=config(B, secret_file, [owner_rule or mirror]), store=store)
    here = Edge(cooperator, config=config(A, here_secret or secret_file, [mirror]), store=store, clock=owner.clock)
    to_owner = RequestTraversalAgent(owner.site.resource)
    routed = Routed(B, to_owner, hosts)
    for edge, agent in ((owner, hosts), (here, routed)):
        edge.filler = attrs.evolve(edge.filler, agent=agent, store=store)
        cluster = Cluster(lambda e=edge: e.config, agent, edge.clock, edge.stats)
        edge.filler.hand_over = cluster.hand_over
        edge.resource._filler = edge.filler
        edge.resource._cluster = cluster
    key = next(f"m/{i}.bin" for i in range(100) if owner_of((A, B), BUCKET, f"m/{i}.bin") == B)
    origin.add(key, BODY, content_type="video/mp4", headers={"ETag": '"o1"'})
    return MirrorPair(here, owner, key, origin, routed, to_owner, hosts)


BODY = bytes(range(256)) * 1200


def test_a_mirror_miss_on_another_edge_is_read_through_the_owner(cooperator: StepCooperator, secret_file: str) -> None:
    """
    The edge that does not own the key answers its client from the owner's
    mirror answer: one origin GET for both edges' clients, the origin's
    headers, the client's passed header reaching the origin through the owner.
    """
    pair = _mirror_pair(cooperator, secret_file)
    pair.origin.add(pair.key, BODY, content_type="video/mp4", headers={"ETag": '"o1"'}, mode="stall", cut=1000)
    here = pair.here.connect()
    here.send(raw_request(f"/{pair.key}", headers=[("X-Token", "t1"), ("Range", "bytes=0-9")]))
    there = pair.owner.connect()
    there.send(raw_request(f"/{pair.key}"))
    pair.flush()  # both edges' clients wait on the origin, which has sent 1,000 bytes
    stalled = pair.origin.stalled.pop()
    assert pair.origin.stalled == []  # one origin GET in flight for both
    stalled.write(BODY[1000:])
    stalled.finish()
    pair.flush()
    response = here.response()
    assert (response.status, response.body) == (206, BODY[:10])
    assert response.header(b"content-type") == b"video/mp4" and response.header(b"etag") == b'"o1"'
    assert there.response().body == BODY
    assert pair.origin.gets(f"/{pair.key}".encode()) == 1
    [(_, _, sent)] = [r for r in pair.origin.requests if r[0] == b"GET"]
    assert sent[b"X-Token"] == [b"t1"] and b"Range" not in sent and HEADER.title() not in sent
    uri, headers = pair.routed.asked[0]
    assert uri == f"{B}/{pair.key}".encode() and headers.getRawHeaders(b"host") == [HOST.encode()]
    assert pair.here.stats.events["mirror_via_owner"] == 1 and pair.owner.stats.events["mirror_via_owner"] == 0
    assert pair.here.request(f"/{pair.key}").body == BODY  # stored (once: the store is shared)


def test_an_owner_that_refuses_the_read_is_passed_over_for_the_origin(
    cooperator: StepCooperator, secret_file: str, tmp_path: Path
) -> None:
    """A secret the owner does not share: it answers 403 (and says why); the edge reads the origin itself."""
    other = tmp_path / "other.secret"
    other.write_bytes(b"another-secret-of-32-bytes-000000\n")
    pair = _mirror_pair(cooperator, secret_file, here_secret=str(other))
    with capture_logs() as events:
        here = pair.here.connect()
        here.send(raw_request(f"/{pair.key}"))
        pair.flush()
        response = here.response()
    assert (response.status, response.body) == (200, BODY)
    assert [u for u, _ in pair.routed.asked] == [f"{B}/{pair.key}".encode(), f"http://a.test/{pair.key}".encode()]
    assert pair.origin.gets(f"/{pair.key}".encode()) == 1  # the owner asked nothing
    assert any("refused a cluster request" in str(e.get("log_format", "")) for e in events)
    assert pair.here.filler.health.down_hosts() == []  # a refusal is the owner's configuration, not its health
    assert pair.here.stats.events["fills_failed_over"] == 0  # no origin host was passed over


@pytest.mark.parametrize("tamper", ["none", "uri", "host", "scheme", "edge", "head", "not-owned", "stale", "unsigned"])
def test_the_owner_checks_each_read_through_it(cooperator: StepCooperator, secret_file: str, tamper: str) -> None:
    """
    A read through the owner is a GET signed over its time, URI, Host, scheme
    and the owner's URL, of a key that edge owns: then a private bucket's
    object is served without the client's signature; anything else is 403.
    """
    pair = _mirror_pair(cooperator, secret_file, acl="private")
    key = pair.key
    if tamper == "not-owned":
        key = next(f"m/{i}.bin" for i in range(100) if owner_of((A, B), BUCKET, f"m/{i}.bin") == A)
        pair.origin.add(key, BODY)
    uri = f"/{key}".encode()
    when = int(pair.owner.clock.seconds()) - (MAX_SKEW + 1 if tamper == "stale" else 0)
    signed = sign_read(
        SECRET,
        when,
        uri + (b"?x" if tamper == "uri" else b""),
        b"other-1250000000.file.myqcloud.com" if tamper == "host" else HOST.encode(),
        b"https" if tamper == "scheme" else b"http",
        (C if tamper == "edge" else B).encode(),
    )
    headers = [] if tamper == "unsigned" else [(HEADER, signed), (SCHEME_HEADER, b"http")]
    conn = pair.owner.connect()
    conn.send(raw_request(uri, method=b"HEAD" if tamper == "head" else b"GET", headers=headers))
    pair.flush()
    response = conn.response()
    if tamper == "none":
        assert (response.status, response.body) == (200, BODY)
    else:
        assert response.status == 403
        assert tamper == "head" or response.error_code() == "AccessDenied"
        assert pair.origin.gets(uri) == 0


def test_an_absolute_form_request_is_read_through_the_owner_in_origin_form(
    cooperator: StepCooperator, secret_file: str
) -> None:
    """``GET http://<bucket host>/<key>`` on an edge: the owner is asked ``/<key>`` with that Host."""
    pair = _mirror_pair(cooperator, secret_file)
    here = pair.here.connect()
    here.send(raw_request(f"http://{HOST}/{pair.key}?v=1", host=None))
    pair.flush()
    assert (here.response().status, here.response().body) == (200, BODY)
    uri, headers = pair.routed.asked[0]
    assert uri == f"{B}/{pair.key}?v=1".encode() and headers.getRawHeaders(b"host") == [HOST.encode()]
    assert pair.origin.gets(f"/{pair.key}".encode()) == 1


def test_a_redirect_from_the_owner_is_not_followed(cooperator: StepCooperator, secret_file: str) -> None:
    """
    An owner whose rule answers 302 (a configuration being rolled out): the
    edge does not follow it with the owner's headers, but asks the origin
    itself, which never sees the cluster's signature.
    """
    owner_rule = {"priority": 1, "type": "proxy", "hosts": ["a.test"]}
    pair = _mirror_pair(cooperator, secret_file, owner_rule=owner_rule, follow_redirects=True)
    here = pair.here.connect()
    here.send(raw_request(f"/{pair.key}", headers=[("Cookie", "c=1")]))
    pair.flush()
    assert (here.response().status, here.response().body) == (200, BODY)
    asked = [u for u, _ in pair.routed.asked]
    assert asked == [f"{B}/{pair.key}".encode(), f"http://a.test/{pair.key}".encode()]
    for _, _, sent in pair.origin.requests:
        assert not any(name.lower() in (HEADER, SCHEME_HEADER) for name in sent)


def test_the_owner_asks_the_origin_with_the_scheme_the_client_used(
    cooperator: StepCooperator, secret_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``protocol = "follow"``: a client over HTTPS on the other edge makes the owner ask over HTTPS too."""
    from twisted.web.server import Request

    pair = _mirror_pair(cooperator, secret_file, protocol="follow")
    secure = {pair.here.site}
    monkeypatch.setattr(Request, "isSecure", lambda self: getattr(self.channel, "site", None) in secure)
    here = pair.here.connect()
    here.send(raw_request(f"/{pair.key}", headers=[("User-Agent", "client/1")]))
    pair.flush()
    assert here.response().body == BODY
    assert f"https://a.test/{pair.key}".encode() in [r.split(b" ")[1] for r in pair.hosts.asked]
    assert not any(b"http://a.test" in r for r in pair.hosts.asked)


def test_an_unreachable_owner_is_passed_over_until_it_is_found_up(cooperator: StepCooperator, secret_file: str) -> None:
    """An owner that refuses connections: the origin is asked at once, and the next misses skip the owner."""
    from twisted.internet.defer import fail
    from twisted.internet.error import ConnectionRefusedError

    pair = _mirror_pair(cooperator, secret_file)

    class Refusing:
        def request(self, *args: Any) -> Deferred[Any]:
            return fail(ConnectionRefusedError("refused"))

        def flush(self) -> None:
            pass

    pair.routed.to_owner = Refusing()  # type: ignore[assignment]
    others = [f"m/{i}.bin" for i in range(100) if owner_of((A, B), BUCKET, f"m/{i}.bin") == B][1:3]
    for key in (pair.key, *others):
        pair.origin.add(key, BODY)
        here = pair.here.connect()
        here.send(raw_request(f"/{key}"))
        pair.hosts.flush()
        assert (here.response().status, here.response().body) == (200, BODY)
    asked = [u for u, _ in pair.routed.asked]
    assert asked[0] == f"{B}/{pair.key}".encode() and all(not u.startswith(B.encode()) for u in asked[1:])
    assert pair.here.filler.health.down_hosts() == [B]
    assert pair.here.stats.events["mirror_via_owner"] == 1


def test_a_target_twisted_sends_otherwise_is_signed_as_sent(cooperator: StepCooperator, secret_file: str) -> None:
    """``/key?`` goes out as ``/key``: the signature covers what the owner receives, so it is not refused."""
    pair = _mirror_pair(cooperator, secret_file)
    with capture_logs() as events:
        here = pair.here.connect()
        here.send(raw_request(f"/{pair.key}?"))
        pair.flush()
        assert (here.response().status, here.response().body) == (200, BODY)
    assert [u for u, _ in pair.routed.asked] == [f"{B}/{pair.key}?".encode()]
    assert not any("refused a cluster request" in str(e.get("log_format", "")) for e in events)
    assert pair.origin.gets(f"/{pair.key}".encode()) == 1 and pair.owner.stats.events["mirror_answers"] == 1
