"""
The quick path (issue 15): a plain keep-alive GET of a small object held in
memory, or of a missing one the bucket redirects, is answered without
Twisted's request machinery, with the very bytes, counters, fill and
access-log line the usual way gives; anything else takes the usual way from
its first byte.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet.interfaces import ISSLTransport
from zope.interface import directlyProvides

from cosedge.config import BucketConfig
from cosedge.storage.disk import DiskStore
from cosedge.web.channel import EdgeSite
from cosedge.web.quick import QuickGet, parse_quick_get

from .helpers import BUCKET, HOST, Connection, Edge, RawResponse, StepCooperator, edge_config, parse_response

BODY = bytes(range(256)) * 4
META = {"content-type": "text/css", "etag": '"v1"', "x-cos-meta-team": "web", "cache-control": "max-age=60"}


def head(target: str = "/site/a.css", extra: bytes = b"", host: bytes = HOST.encode()) -> bytes:
    return b"GET " + target.encode() + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + extra + b"\r\n"


def put(store: DiskStore, key: str, data: bytes, meta: dict[str, str] | None = None) -> None:
    pending = store.begin(BUCKET, tuple(key.split("/")))
    pending.write(data)
    pending.commit(dict(META if meta is None else meta), 1_600_000_000.0)


@attrs.define
class Quick:
    """A disk-store edge whose quick answers are counted (``site.quick_answer`` wrapped)."""

    edge: Edge
    store: DiskStore
    answered: list[bytes] = attrs.Factory(list)

    def connect(self) -> Connection:
        return self.edge.connect()

    def exchange(self, conn: Connection, *pieces: bytes) -> list[RawResponse]:
        """Send ``pieces`` as separate reads; the answers written since, parsed one by one."""
        conn.transport.clear()
        for piece in pieces:
            conn.send(piece)
        self.edge.cooperator.run()
        return split_answers(conn.transport.value())


def split_answers(data: bytes) -> list[RawResponse]:
    """Answers one after the other, each framed by its Content-Length (a 304 by its head; a HEAD's only alone)."""
    answers = []
    while data:
        one = parse_response(data)
        end = data.index(b"\r\n\r\n") + 4 + (one.length if one.status != 304 else 0)
        answers.append(parse_response(data[:end]))
        data = data[end:]
    return answers


@pytest.fixture
def quick(cooperator: StepCooperator, tmp_path: Path) -> Quick:
    data = tmp_path / "data"
    store = DiskStore(str(data))
    edge = Edge(cooperator, config=edge_config(data_dir=str(data)), store=store)
    put(store, "site/a.css", BODY)
    q = Quick(edge, store)
    count_quick(edge.site, q.answered)
    return q


def count_quick(site: EdgeSite, answered: list[bytes]) -> None:
    """Note in ``answered`` the target of each request the quick path answers."""
    real = site.quick_answer
    assert real is not None

    def counted(get: QuickGet, secure: bool) -> Any:
        answer = real(get, secure)
        if answer is not None:
            answered.append(get.uri)
        return answer

    site.quick_answer = counted


def without_ids(answer: RawResponse) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    return answer.status, [(n, v) for n, v in answer.headers if n != b"x-cos-request-id"], answer.body


def test_the_second_plain_get_is_quick_and_answered_byte_for_byte_the_same(quick: Quick) -> None:
    conn = quick.connect()
    [first] = quick.exchange(conn, head())  # opens the file: the usual way, which keeps it in memory
    [second] = quick.exchange(conn, head())
    assert quick.answered == [b"/site/a.css"]
    assert first.status == 200 and first.body == BODY
    assert without_ids(second) == without_ids(first)
    assert [n for n, _ in second.headers][:3] == [b"server", b"date", b"x-cos-request-id"]
    assert second.header(b"x-cos-meta-team") == b"web" and second.header(b"cache-control") == b"max-age=60"
    assert first.header(b"x-cos-request-id") != second.header(b"x-cos-request-id")
    stats = quick.edge.stats
    assert stats.events["hits"] == 2 and stats.events["bytes_served"] == 2 * len(BODY)
    assert stats.statuses[200] == 2 and stats.requests[f"{BUCKET} hit"] == 2
    assert not conn.closed


def test_the_quick_answer_is_the_usual_one_for_a_100k_object_and_a_guessed_type(quick: Quick) -> None:
    big = bytes(range(256)) * 400
    put(quick.store, "img/big.bin", big, {})
    conn = quick.connect()
    [first] = quick.exchange(conn, head("/img/big.bin"))
    [second] = quick.exchange(conn, head("/img/big.bin"))
    assert quick.answered == [b"/img/big.bin"]
    assert without_ids(second) == without_ids(first) and second.body == big
    assert second.header(b"content-type") == b"application/octet-stream"


def test_the_access_log_line_is_the_same(quick: Quick, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    edge = quick.edge
    site = EdgeSite(edge.resource, edge.stats, str(log), edge.clock, 60)
    site.doStart()
    edge.site = site
    conn = quick.connect()
    extra = b'User-Agent: curl/8 "q"\r\nReferer: http://example.com/\r\n'
    quick.exchange(conn, head(extra=extra))
    count_quick(site, quick.answered)
    quick.exchange(conn, head(extra=extra))
    site.doStop()
    first, second = log.read_text().splitlines()
    assert quick.answered == [b"/site/a.css"]
    assert first == second
    assert '"GET /site/a.css HTTP/1.1" 200 1024 "http://example.com/" "curl/8 \\"q\\""' in first


def test_a_replaced_object_is_served_new_at_once(quick: Quick) -> None:
    conn = quick.connect()
    quick.exchange(conn, head(), head())
    put(quick.store, "site/a.css", b"body { color: red }", {"content-type": "text/css", "etag": '"v2"'})
    [answer] = quick.exchange(conn, head())
    assert answer.body == b"body { color: red }" and answer.header(b"etag") == b'"v2"'
    [again] = quick.exchange(conn, head())
    assert again.body == b"body { color: red }" and quick.answered.count(b"/site/a.css") == 2
    quick.store.remove(BUCKET, ("site", "a.css"))
    [gone] = quick.exchange(conn, head())
    assert gone.status == 302 and quick.answered.count(b"/site/a.css") == 3  # a miss now, redirected


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        (b"Range: bytes=0-9\r\n", 206),
        (b'If-None-Match: "v1"\r\n', 304),
        (b"If-Modified-Since: Fri, 01 Jan 2100 00:00:00 GMT\r\n", 304),
        (b'If-Match: "other"\r\n', 412),
    ],
)
def test_what_can_make_the_answer_differ_goes_the_usual_way(quick: Quick, extra: bytes, status: int) -> None:
    conn = quick.connect()
    quick.exchange(conn, head())
    [answer] = quick.exchange(conn, head(extra=extra))
    assert answer.status == status
    assert quick.answered == []


def test_connection_close_head_and_http_1_0_go_the_usual_way(quick: Quick) -> None:
    conn = quick.connect()
    quick.exchange(conn, head())
    [h] = quick.exchange(conn, b"HEAD /site/a.css HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\n\r\n")
    assert h.status == 200 and h.length == len(BODY) and h.body == b""
    [closing] = quick.exchange(conn, head(extra=b"Connection: close\r\n"))
    assert closing.body == BODY and conn.closed
    conn = quick.connect()
    conn.send(b"GET /site/a.css HTTP/1.0\r\nHost: " + HOST.encode() + b"\r\n\r\n")
    quick.edge.cooperator.run()
    old = conn.transport.value()
    assert old.startswith(b"HTTP/1.0 200 OK\r\n") and old.endswith(b"\r\n\r\n" + BODY) and conn.closed
    assert quick.answered == []


def test_split_and_pipelined_requests_are_answered_in_order_then_quick_again(quick: Quick) -> None:
    put(quick.store, "b.txt", b"bee", {})
    conn = quick.connect()
    quick.exchange(conn, head(), head("/b.txt"))  # both kept in memory
    quick.answered.clear()
    one = head()
    split = quick.exchange(conn, one[:20], one[20:])  # a head in two reads
    assert [a.body for a in split] == [BODY] and quick.answered == []
    # Two requests and the start of a third in one read; the rest of the third later.
    third = head("/b.txt")
    answers = quick.exchange(conn, head() + head("/b.txt") + third[:7], third[7:])
    assert [a.body for a in answers] == [BODY, b"bee", b"bee"] and quick.answered == []
    assert [a.body for a in quick.exchange(conn, head("/b.txt"))] == [b"bee"]
    assert quick.answered == [b"/b.txt"]  # Twisted's parser holds nothing again: quick
    assert quick.edge.stats.events["hits"] == 2 + 1 + 3 + 1
    # A byte left in Twisted's parser belongs to the next request, which is then not a GET at all.
    answers = quick.exchange(conn, head() + b"X", head("/b.txt"))
    assert [a.status for a in answers] == [200, 405] and quick.answered == [b"/b.txt"]


def test_a_private_bucket_is_never_answered_quick(cooperator: StepCooperator, tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = DiskStore(str(data))
    config = edge_config(data_dir=str(data))
    config = attrs.evolve(config, buckets={BUCKET: attrs.evolve(config.buckets[BUCKET], acl="private")})
    edge = Edge(cooperator, config=config, store=store)
    put(store, "site/a.css", BODY)
    store.open(BUCKET, ("site", "a.css"))  # held in memory now (a signed read would do it)
    assert store.hot(BUCKET, ("site", "a.css")) is not None
    conn = edge.connect()
    for _ in range(3):
        conn.send(head())
        edge.cooperator.run()
    answers = split_answers(conn.transport.value())
    assert [a.status for a in answers] == [403, 403, 403] and all(BODY not in a.raw for a in answers)


def test_a_revalidating_bucket_is_never_answered_quick(quick: Quick) -> None:
    config = quick.edge.config
    bucket = BucketConfig(origin=config.buckets[BUCKET].origin, origin_pull=True, revalidate_after=60)
    quick.edge.config = attrs.evolve(config, buckets={**config.buckets, BUCKET: bucket})
    conn = quick.connect()
    answers = quick.exchange(conn, head()) + quick.exchange(conn, head())
    assert [a.body for a in answers] == [BODY, BODY] and quick.answered == []


@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        (b"GET /site/a.css HTTP/1.1\r\nHost : " + HOST.encode() + b"\r\n\r\n", 400),  # space before the colon
        (b"GET /site/a.css HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\nBroken\r\n\r\n", 400),
        (b"GET /site/a.css HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\nHost: other\r\n\r\n", 404),
        (b"GET /%zz HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\n\r\n", 400),
        (b"GET /site/a.css HTTP/1.1\r\nHost: nobody.example\r\n\r\n", 404),
        (b"GET /site/a.css HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\nX-A: 1\r\n folded\r\n\r\n", 200),
    ],
)
def test_a_bad_or_unusual_request_gets_the_usual_answer(quick: Quick, request_head: bytes, status: int) -> None:
    """Twisted's channel judges what the quick path does not take: a 400, an unknown bucket, a folded header."""
    conn = quick.connect()
    quick.exchange(conn, head())
    answer = quick.exchange(conn, request_head)[0]
    assert answer.status == status and (BODY in answer.raw) == (status == 200)
    assert quick.answered == []


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n", QuickGet(b"/a", {b"host": b"h"})),
        (
            b"GET /a/b%20c HTTP/1.1\r\nhost:h:8080\r\nConnection: Keep-Alive\r\nUser-Agent: x y\r\nReferer: r\r\n\r\n",
            QuickGet(
                b"/a/b%20c", {b"host": b"h:8080", b"connection": b"Keep-Alive", b"user-agent": b"x y", b"referer": b"r"}
            ),
        ),
        (b"HEAD /a HTTP/1.1\r\nHost: h\r\n\r\n", None),
        (b"GET /a HTTP/1.0\r\nHost: h\r\n\r\n", None),
        (b"GET http://h/a HTTP/1.1\r\nHost: h\r\n\r\n", None),
        (b"GET /a HTTP/1.1\r\n\r\n", None),  # no Host
        (b"GET /a HTTP/1.1\r\nHost: h\r\n", None),  # not the whole head
        (b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n", None),  # pipelined
        (b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nxyz", None),  # more after it
        (b"GET /a HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", None),
        (b"GET /a HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n", None),
        (b"GET /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n", None),
        (b"GET /a HTTP/1.1\r\nHost: h\r\nX-Cosedge-Cluster: 1\r\n\r\n", None),
        (b"GET /a HTTP/1.1\r\nHost: h\r\nIf-Range: x\r\n\r\n", None),
        (b"GET /a HTTP/1.1\r\nHost: h\r\nX: \x01\r\n\r\n", None),  # a control character
        (b"GET /a HTTP/1.1\r\nHost: h\r\n" + b"X: y\r\n" * 65 + b"\r\n", None),  # repeated (and too many)
        (b"GET /a HTTP/1.1\r\nHost: h\r\nX: " + b"y" * 9000 + b"\r\n\r\n", None),  # too long
        (b"GET /a b HTTP/1.1\r\nHost: h\r\n\r\n", None),
    ],
)
def test_what_is_a_quick_get(data: bytes, expected: QuickGet | None) -> None:
    assert parse_quick_get(data) == expected


def test_a_redirected_miss_is_quick_and_the_same_answer(quick: Quick) -> None:
    """A 302 and its fill, quick, are the usual way's: headers, counters, the missed key, one fill."""
    conn = quick.connect()
    one, two = head("/new/one.js"), head("/new/two.js")
    [usual] = quick.exchange(conn, one[:10], one[10:])
    [fast] = quick.exchange(conn, two)
    assert quick.answered == [b"/new/two.js"]
    assert usual.status == fast.status == 302
    strip = [(n, v.replace(b"one", b"two")) for n, v in without_ids(usual)[1]]
    assert strip == without_ids(fast)[1]
    assert fast.header(b"location") == b"http://10.10.10.10:8080/new/two.js"
    assert fast.header(b"cache-control") == b"no-store" and fast.length == 0 and fast.body == b""
    stats = quick.edge.stats
    assert stats.events["misses"] == stats.events["redirects"] == 2 and stats.statuses[302] == 2
    assert stats.requests[f"{BUCKET} redirect"] == 2
    assert stats.missed_keys[BUCKET] == {"new/one.js": 1, "new/two.js": 1}
    [again] = quick.exchange(conn, two)
    assert again.status == 302
    quick.edge.flush_origin()
    assert quick.edge.origin.gets(b"/new/one.js") == quick.edge.origin.gets(b"/new/two.js") == 1
    assert not conn.closed


def test_a_miss_that_is_not_a_redirect_goes_the_usual_way(quick: Quick) -> None:
    """No origin pull (404), an object too big to hold in memory (a hit read from the file)."""
    conn = quick.connect()
    [none] = quick.exchange(conn, head("/x.bin", host=b"nopull-1250000000.file.myqcloud.com"))
    assert none.status == 404 and b"NoSuchKey" in none.body
    big = b"z" * (200 * 1024)
    put(quick.store, "big.bin", big, {})
    [hit] = quick.exchange(conn, head("/big.bin"))
    [hit2] = quick.exchange(conn, head("/big.bin"))
    assert hit.body == hit2.body == big
    assert quick.answered == [] and quick.edge.stats.events["misses"] == 1


def test_a_mirror_miss_goes_the_usual_way(quick: Quick) -> None:
    table = {"priority": 1, "type": "mirror", "hosts": ["10.10.10.10:8080"]}
    quick.edge.config = quick.edge.config.with_bucket(BUCKET, BucketConfig(rules=[table]))  # type: ignore[arg-type]
    quick.edge.origin.add("m.bin", b"from the origin")
    conn = quick.connect()
    [answer] = quick.exchange(conn, head("/m.bin"))
    assert answer.status == 200 and answer.body == b"from the origin" and answer.header(b"x-cos-mirror")
    assert quick.answered == [] and quick.edge.origin.gets(b"/m.bin") == 1


def test_a_miss_over_https_is_redirected_to_https_by_a_follow_rule(quick: Quick) -> None:
    table = {"priority": 1, "type": "proxy", "protocol": "follow", "hosts": ["10.10.10.10"]}
    quick.edge.config = quick.edge.config.with_bucket(BUCKET, BucketConfig(rules=[table]))  # type: ignore[arg-type]
    conn = quick.connect()
    directlyProvides(conn.transport, ISSLTransport)
    [secure] = quick.exchange(conn, head("/s.js"))
    plain = quick.connect()
    [clear] = quick.exchange(plain, head("/s.js"))
    assert quick.answered == [b"/s.js", b"/s.js"]
    assert secure.header(b"location") == b"https://10.10.10.10/s.js"
    assert clear.header(b"location") == b"http://10.10.10.10/s.js"
