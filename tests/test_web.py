"""
The bucket listener, byte for byte: hits (headers, ranges, conditionals),
misses (302 + one fill), routing, methods, hostile input (S1-S7) and errors.

Requests are written to an ``EdgeSite`` as raw bytes and the response is
parsed from the exact bytes the server wrote; no reactor is involved.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from attrs import define, field
from twisted.internet.defer import fail
from twisted.web.http import datetimeToString

from cosedge.config import BucketConfig
from cosedge.interfaces import StoreError
from cosedge.storage.disk import DiskStore
from cosedge.testing import MemoryStore
from cosedge.web.channel import EdgeSite
from cosedge.web.errors import error_body
from cosedge.web.hit import parse_ranges

from .helpers import (
    BUCKET,
    DOMAIN,
    HOST,
    NOPULL,
    ORIGIN,
    Edge,
    RawResponse,
    StepCooperator,
    capture_logs,
    edge_config,
    parse_response,
    raw_request,
)

BODY = bytes(range(256)) * 40  # 10240 bytes, every offset distinguishable
MTIME = 1_500_000_000.0
META = {
    "content-type": "image/jpeg",
    "etag": '"d41d8cd98f00b204e9800998ecf8427e"',
    "last-modified": datetimeToString(int(MTIME)).decode(),
    "cache-control": "max-age=3600",
    "content-encoding": "identity",
    "content-disposition": 'attachment; filename="1.jpg"',
    "expires": "Thu, 01 Dec 2030 16:00:00 GMT",
    "x-cos-meta-author": "alice",
}
ETAG = META["etag"].encode()


@define(eq=False)
class RecordingStore(MemoryStore):
    """A memory store that records every open and the objects it handed out."""

    opened: list[tuple[str, tuple[str, ...]]] = field(factory=list)
    handles: list[Any] = field(factory=list)

    def open(self, bucket: str, segments: tuple[str, ...]) -> Any:
        self.opened.append((bucket, segments))

        def record(obj: Any) -> Any:
            if obj is not None:
                self.handles.append(obj)
            return obj

        return super().open(bucket, segments).addCallback(record)


@pytest.fixture
def edge(cooperator: StepCooperator) -> Edge:
    edge = Edge(cooperator, store=RecordingStore())
    assert isinstance(edge.store, MemoryStore)
    edge.store.put(BUCKET, ("1.jpg",), BODY, META, MTIME)
    return edge


@pytest.fixture
def gated(cooperator: StepCooperator) -> Edge:
    return Edge(cooperator, gated=True)


@pytest.fixture
def disk_edge(cooperator: StepCooperator, tmp_path: Path) -> Edge:
    data = tmp_path / "data"
    return Edge(cooperator, config=edge_config(data_dir=str(data)), store=DiskStore(str(data)))


def assert_error(response: RawResponse, status: int, code: str) -> None:
    """A COS XML error with a request id that matches the header."""
    assert response.status == status, response.raw
    assert response.error_code() == code
    request_id = response.header(b"x-cos-request-id")
    assert request_id
    assert b"<RequestId>" + request_id + b"</RequestId>" in response.body
    assert response.length == len(response.body)


def multipart_parts(response: RawResponse) -> list[tuple[bytes, bytes]]:
    """(Content-Range, body) of each part of a multipart/byteranges body."""
    content_type = response.header(b"content-type")
    assert content_type is not None and content_type.startswith(b"multipart/byteranges; boundary=")
    boundary = b"--" + content_type.split(b"boundary=", 1)[1]
    chunks = response.body.split(b"\r\n" + boundary)
    assert chunks[0] == b"" and chunks[-1] == b"--\r\n"
    parts = []
    for chunk in chunks[1:-1]:
        head, _, data = chunk.partition(b"\r\n\r\n")
        headers = dict(line.split(b": ", 1) for line in head.strip().split(b"\r\n"))
        parts.append((headers[b"Content-Range"], data))
    return parts


# -- hits ---------------------------------------------------------------------


def test_hit_serves_bytes_and_stored_headers(edge: Edge) -> None:
    """A stored object is served whole with the headers kept from its origin."""
    response = edge.request("/1.jpg")
    assert response.status == 200
    assert response.body == BODY
    assert response.length == len(BODY)
    assert response.header(b"content-type") == b"image/jpeg"
    assert response.header(b"etag") == ETAG
    assert response.header(b"last-modified") == datetimeToString(int(MTIME))
    assert response.header(b"cache-control") == b"max-age=3600"
    assert response.header(b"content-encoding") == b"identity"
    assert response.header(b"content-disposition") == b'attachment; filename="1.jpg"'
    assert response.header(b"expires") == b"Thu, 01 Dec 2030 16:00:00 GMT"
    assert response.header(b"x-cos-meta-author") == b"alice"
    assert response.header(b"accept-ranges") == b"bytes"
    assert response.header(b"x-cos-request-id")
    assert response.header(b"location") is None
    assert edge.stats.events["hits"] == 1
    assert edge.stats.events["bytes_served"] == len(BODY)
    assert edge.stats.statuses[200] == 1


def test_hit_without_metadata(edge: Edge) -> None:
    """A file without kept headers gets a type from its name and an ETag that tracks its identity."""
    assert isinstance(edge.store, MemoryStore)
    edge.store.put(BUCKET, ("docs", "a.html"), b"<p>hi</p>", None, 1000.0)
    edge.store.put(BUCKET, ("blob",), b"x", None, 1000.0)
    first = edge.request("/docs/a.html")
    assert first.status == 200 and first.body == b"<p>hi</p>"
    assert first.header(b"content-type") == b"text/html"
    etag = first.header(b"etag")
    assert etag is not None and etag.startswith(b'"') and etag.endswith(b'"')
    assert edge.request("/blob").header(b"content-type") == b"application/octet-stream"
    edge.store.put(BUCKET, ("docs", "a.html"), b"<p>new</p>", None, 1000.0)
    assert edge.request("/docs/a.html").header(b"etag") != etag


def test_head_hit_has_headers_and_no_body(edge: Edge) -> None:
    """HEAD answers the same headers as GET, Content-Length included, with no body bytes."""
    response = edge.request("/1.jpg", method=b"HEAD")
    assert response.status == 200
    assert response.body == b""
    assert response.length == len(BODY)
    assert response.header(b"etag") == ETAG
    assert response.header(b"content-type") == b"image/jpeg"
    assert edge.stats.events["fills_started"] == 0


def test_zero_byte_object(edge: Edge) -> None:
    """A 0-byte object is a valid object: 200 with Content-Length: 0 (F15)."""
    assert isinstance(edge.store, MemoryStore)
    edge.store.put(BUCKET, ("empty.txt",), b"", {"content-type": "text/plain"}, MTIME)
    response = edge.request("/empty.txt")
    assert response.status == 200
    assert response.length == 0
    assert response.body == b""
    assert response.header(b"content-type") == b"text/plain"
    ranged = edge.request("/empty.txt", headers=[("Range", "bytes=0-")])
    assert_error(ranged, 416, "InvalidRange")
    assert ranged.header(b"content-range") == b"bytes */0"


def test_bucket_root_is_not_listed(edge: Edge) -> None:
    """The bucket root is never a listing."""
    response = edge.request("/")
    assert_error(response, 403, "AccessDenied")
    assert b"1.jpg" not in response.body


def test_keys_in_folders_and_encoded_names(edge: Edge) -> None:
    """Keys with folders, spaces and UTF-8 are found under their decoded names."""
    assert isinstance(edge.store, MemoryStore)
    edge.store.put(BUCKET, ("a b", "\u4e2d.txt"), b"zh", None, MTIME)
    response = edge.request("/a%20b/%E4%B8%AD.txt?ignored=1")
    assert response.status == 200 and response.body == b"zh"


# -- ranges (S6) ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "first", "last"),
    [
        ("bytes=0-0", 0, 0),
        ("bytes=2-5", 2, 5),
        ("bytes=10000-", 10000, 10239),
        ("bytes=-10", 10230, 10239),
        ("bytes=-999999", 0, 10239),
        ("bytes=100-999999", 100, 10239),
        ("bytes=0-99999999999999999999", 0, 10239),
        ("bytes=0-1,2-3", 0, 3),
        ("bytes=5-10,0-7", 0, 10),
        ("bytes=0-10,3-4", 0, 10),
        ("bytes=20000-,5-6", 5, 6),
        ("Bytes = 2-5", 2, 5),
        ("bytes=2-5,", 2, 5),
    ],
)
def test_single_range(edge: Edge, header: str, first: int, last: int) -> None:
    """One satisfiable range (after merging and capping) is a 206 with exactly those bytes."""
    response = edge.request("/1.jpg", headers=[("Range", header)])
    assert response.status == 206, response.raw[:300]
    assert response.header(b"content-range") == f"bytes {first}-{last}/{len(BODY)}".encode()
    assert response.body == BODY[first : last + 1]
    assert response.length == last + 1 - first
    assert response.header(b"content-type") == b"image/jpeg"


def test_multiple_ranges(edge: Edge) -> None:
    """Disjoint ranges come back as multipart/byteranges, sorted and merged, length exact."""
    response = edge.request("/1.jpg", headers=[("Range", "bytes=500-599,0-9,5-19,-5")])
    assert response.status == 206
    assert response.length == len(response.body)
    parts = multipart_parts(response)
    n = len(BODY)
    assert parts == [
        (b"bytes 0-19/%d" % n, BODY[0:20]),
        (b"bytes 500-599/%d" % n, BODY[500:600]),
        (b"bytes %d-%d/%d" % (n - 5, n - 1, n), BODY[-5:]),
    ]


def test_range_amplification_is_capped(edge: Edge) -> None:
    """200 copies of 'bytes=0-' never send more bytes than the object holds (S6)."""
    response = edge.request("/1.jpg", headers=[("Range", "bytes=" + ",".join(["0-"] * 200))])
    assert response.status == 206
    assert response.body == BODY
    assert len(response.body) <= len(BODY)
    overlapping = ",".join(f"{i}-{i + 5000}" for i in range(0, 200))
    response = edge.request("/1.jpg", headers=[("Range", "bytes=" + overlapping)])
    assert response.status == 206
    assert response.body == BODY[: 199 + 5001]


def test_too_many_ranges_send_the_whole_object_once(edge: Edge) -> None:
    """Hundreds of tiny disjoint ranges (or thousands of specs) get one plain 200, not a huge multipart."""
    tiny = ",".join(f"{i}-{i}" for i in range(0, 2000, 2))
    response = edge.request("/1.jpg", headers=[("Range", "bytes=" + tiny)])
    assert response.status == 200 and response.body == BODY
    many = ",".join(["0-0"] * 1500)
    response = edge.request("/1.jpg", headers=[("Range", "bytes=" + many)])
    assert response.status == 200 and response.body == BODY


@pytest.mark.parametrize(
    "header",
    ["bytes=10240-", "bytes=99999-100000", "bytes=18446744073709551616-", "bytes=-0", "bytes=10240-,20000-30000"],
)
def test_unsatisfiable_range_is_416(edge: Edge, header: str) -> None:
    """A range that starts past the end is 416 with 'Content-Range: bytes */N'."""
    response = edge.request("/1.jpg", headers=[("Range", header)])
    assert_error(response, 416, "InvalidRange")
    assert response.header(b"content-range") == f"bytes */{len(BODY)}".encode()
    assert BODY[:16] not in response.body


@pytest.mark.parametrize(
    "header",
    [
        "items=0-1",
        "bytes",
        "bytes=",
        "bytes=abc",
        "bytes=5-2",
        "bytes=1-2-3",
        "bytes=--1",
        "bytes= -",
        "bytes=0x10-0x20",
        "bytes=999999999999999999999-",
        "bytes=0-999999999999999999999",
        "bytes=+1-2",
        "bytes=\u0661-\u0662",
    ],
)
def test_malformed_range_is_ignored(edge: Edge, header: str) -> None:
    """A Range header that does not parse is ignored: the whole object, 200."""
    response = edge.request("/1.jpg", headers=[("Range", header)])
    assert response.status == 200
    assert response.body == BODY
    assert response.header(b"content-range") is None


def test_head_with_range(edge: Edge) -> None:
    """HEAD with a Range reports the part's headers without sending it."""
    response = edge.request("/1.jpg", method=b"HEAD", headers=[("Range", "bytes=0-9")])
    assert response.status == 206
    assert response.length == 10
    assert response.body == b""


def test_parse_ranges_directly() -> None:
    """parse_ranges merges adjacent and overlapping ranges, caps at the size, and never exceeds it."""
    assert parse_ranges(b"bytes=0-0,1-1,2-2", 10) == [(0, 2)]
    assert parse_ranges(b"bytes=0-0,2-2", 10) == [(0, 0), (2, 2)]
    assert parse_ranges(b"bytes=-20", 10) == [(0, 9)]
    assert parse_ranges(b"bytes=8-100", 10) == [(8, 9)]
    assert parse_ranges(b"bytes=10-", 10) == []
    assert parse_ranges(b"bytes=0-", 0) == []
    assert parse_ranges(b"bytes=-1", 0) == []
    assert parse_ranges(b"bytes=1-0", 10) is None
    assert parse_ranges(b"pages=1-2", 10) is None
    assert parse_ranges(b"bytes=" + b",".join([b"0-"] * 1001), 10) is None
    for spec in (b"0-", b"0-9", b"-10", b"5-"):
        ranges = parse_ranges(b"bytes=" + b",".join([spec] * 200), 10)
        assert ranges is not None and sum(last + 1 - first for first, last in ranges) <= 10


# -- conditionals ----------------------------------------------------------------


def _date(offset: int) -> str:
    return bytes(datetimeToString(int(MTIME) + offset)).decode()


@pytest.mark.parametrize(
    "headers",
    [
        [("If-None-Match", META["etag"])],
        [("If-None-Match", "W/" + META["etag"])],
        [("If-None-Match", '"other", ' + META["etag"])],
        [("If-None-Match", "*")],
        [("If-Modified-Since", _date(0))],
        [("If-Modified-Since", _date(3600))],
        [("If-None-Match", META["etag"]), ("If-Modified-Since", _date(-3600))],
    ],
)
def test_not_modified(edge: Edge, headers: list[tuple[str, str]]) -> None:
    """A matching If-None-Match, or If-Modified-Since not before the object, is 304 with no body."""
    response = edge.request("/1.jpg", headers=headers)
    assert response.status == 304
    assert response.body == b""
    assert response.header(b"etag") == ETAG
    assert edge.stats.events["bytes_served"] == 0


@pytest.mark.parametrize(
    "headers",
    [
        [("If-None-Match", '"other"')],
        [("If-Modified-Since", _date(-1))],
        [("If-Modified-Since", "not a date")],
        [("If-None-Match", '"other"'), ("If-Modified-Since", _date(3600))],  # If-None-Match wins
        [("If-Match", META["etag"])],
        [("If-Match", '"x", ' + META["etag"])],
        [("If-Match", "*")],
        [("If-Unmodified-Since", _date(0))],
        [("If-Unmodified-Since", _date(10))],
        [("If-Unmodified-Since", "garbage")],
    ],
)
def test_conditions_that_hold_serve_the_object(edge: Edge, headers: list[tuple[str, str]]) -> None:
    """Conditions that do not apply, or hold, give the plain 200."""
    response = edge.request("/1.jpg", headers=headers)
    assert response.status == 200
    assert response.body == BODY


@pytest.mark.parametrize(
    "headers",
    [
        [("If-Match", '"other"')],
        [("If-Match", "W/" + META["etag"])],  # If-Match uses the strong comparison
        [("If-Unmodified-Since", _date(-1))],
        [("If-Match", '"other"'), ("If-Unmodified-Since", _date(3600))],
        [("If-Match", '"other"'), ("Range", "bytes=0-1")],
    ],
)
def test_precondition_failed(edge: Edge, headers: list[tuple[str, str]]) -> None:
    """A failing If-Match or If-Unmodified-Since is 412 PreconditionFailed, no object bytes."""
    response = edge.request("/1.jpg", headers=headers)
    assert_error(response, 412, "PreconditionFailed")
    assert BODY[:16] not in response.body


@pytest.mark.parametrize(
    ("if_range", "status"),
    [
        (META["etag"], 206),
        ('"stale"', 200),
        ("W/" + META["etag"], 200),
        (_date(0), 206),
        (_date(-60), 200),
        ("nonsense", 200),
    ],
)
def test_if_range(edge: Edge, if_range: str, status: int) -> None:
    """If-Range sends the part only when the validator still matches; otherwise the whole object."""
    response = edge.request("/1.jpg", headers=[("Range", "bytes=0-9"), ("If-Range", if_range)])
    assert response.status == status
    assert response.body == (BODY[:10] if status == 206 else BODY)


# -- misses ------------------------------------------------------------------------


def test_seed_example_miss_then_hit(edge: Edge) -> None:
    """The seed's walk-through: first request 302 to the origin, the copy lands, the second is a hit."""
    image = os.urandom(5000)
    edge.origin.add("2.jpg", image, content_type="image/jpeg", headers={"ETag": '"v1"'})
    first = edge.request("/2.jpg")
    assert first.status == 302
    assert first.header(b"location") == f"http://{ORIGIN}/2.jpg".encode()
    assert first.header(b"cache-control") == b"no-store"
    assert first.body == b""
    edge.flush_origin()
    assert edge.origin.gets(b"/2.jpg") == 1
    second = edge.request("/2.jpg")
    assert second.status == 200
    assert second.body == image
    assert second.header(b"content-type") == b"image/jpeg"
    assert second.header(b"etag") == b'"v1"'
    assert edge.origin.gets(b"/2.jpg") == 1
    assert edge.stats.events["misses"] == 1 and edge.stats.events["hits"] == 1
    assert edge.stats.events["redirects"] == 1 and edge.stats.events["fills_stored"] == 1


@pytest.mark.parametrize(
    ("target", "location"),
    [
        ("/a%20b/c.txt", "/a%20b/c.txt"),
        ("/a b", None),  # not a valid request line: Twisted refuses it
        ("/%E4%B8%AD%E6%96%87.png?x=1", "/%E4%B8%AD%E6%96%87.png?x=1"),
        ("/k?x=1%202&y=%0D%0ALocation:%20evil", "/k?x=1%202&y=%0D%0ALocation:%20evil"),
        ('/k?y=<">&z=%zz&w=%e9', "/k?y=%3C%22%3E&z=%25zz&w=%e9"),
        ("/k?a=b|c^d`e{f}", "/k?a=b%7Cc%5Ed%60e%7Bf%7D"),
        ("/k?", "/k?"),
        ("/q%3Fx%23y", "/q%3Fx%23y"),
        ("/100%25", "/100%25"),
        ("/a%2fb", "/a/b"),
        ("/~user/a+b=c", "/~user/a+b=c"),
    ],
)
def test_redirect_location_is_exact(gated: Edge, target: str, location: str | None) -> None:
    """The Location is the configured origin plus the percent-encoded key and re-encoded query, once (S4)."""
    response = gated.request(target)
    if location is None:
        assert response.status == 400
        return
    assert response.status == 302, response.raw
    assert response.all(b"location") == [f"http://{ORIGIN}{location}".encode()]
    value = response.header(b"location")
    assert value is not None and all(33 <= c < 127 for c in value)
    assert response.header(b"cache-control") == b"no-store"
    assert response.length == 0


def test_fill_fetches_the_key_without_the_query(gated: Edge) -> None:
    """The background fill asks the origin for the key alone, whatever the client's query."""
    gated.origin.add("a b/\u4e2d.jpg", b"data")
    response = gated.request("/a%20b/%E4%B8%AD.jpg?x=1&y=2")
    assert response.status == 302
    gated.flush_origin()
    paths = [path for method, path, _ in gated.origin.requests if method == b"GET"]
    assert paths == [b"/a%20b/%E4%B8%AD.jpg"]
    assert isinstance(gated.store, MemoryStore)
    assert gated.store.get(BUCKET, "a b/\u4e2d.jpg") == b"data"


def test_get_miss_starts_exactly_one_fill_while_it_runs(gated: Edge) -> None:
    """Misses on a key whose fill is running all get 302, and only one fill and one origin GET happen."""
    gated.origin.add("big.bin", b"z" * 1000)
    for _ in range(5):
        assert gated.request("/big.bin").status == 302
    assert gated.stats.events["fills_started"] == 1
    assert len(gated.filler.in_flight()) == 1
    gated.flush_origin()
    assert gated.origin.gets(b"/big.bin") == 1
    assert gated.request("/big.bin").status == 200


def test_head_miss_redirects_and_starts_the_fill(gated: Edge) -> None:
    """HEAD on a missing object is a 302 and, since issue 11, starts the fill a GET would (coscmd HEADs first)."""
    gated.origin.add("1.jpg", b"head first")
    response = gated.request("/1.jpg", method=b"HEAD")
    assert response.status == 302
    assert response.header(b"location") == f"http://{ORIGIN}/1.jpg".encode()
    assert [f["key"] for f in gated.filler.in_flight()] == ["1.jpg"]
    assert gated.stats.events["fills_started"] == 1
    gated.flush_origin()
    assert gated.request("/1.jpg").body == b"head first"


def test_range_miss_fills_the_whole_object(gated: Edge) -> None:
    """A Range GET on a missing object redirects, and the fill fetches the whole object, not the range."""
    gated.origin.add("v.mp4", BODY, content_type="video/mp4")
    response = gated.request("/v.mp4", headers=[("Range", "bytes=0-99")])
    assert response.status == 302
    assert len(gated.agent.held) == 1
    gated.flush_origin()
    (_, _, headers) = gated.origin.requests[0]
    assert b"range" not in {k.lower() for k in headers}
    assert isinstance(gated.store, MemoryStore)
    assert gated.store.get(BUCKET, "v.mp4") == BODY


def test_origin_pull_off_is_no_such_key(gated: Edge) -> None:
    """Without origin-pull (or without an origin) a miss is 404 NoSuchKey and nothing is fetched."""
    response = gated.request("/1.jpg", host=f"{NOPULL}.{DOMAIN}")
    assert_error(response, 404, "NoSuchKey")
    assert response.header(b"location") is None
    gated.config = gated.config.with_bucket(NOPULL, BucketConfig(origin="abc.example.com", origin_pull=False))
    assert_error(gated.request("/1.jpg", host=f"{NOPULL}.{DOMAIN}"), 404, "NoSuchKey")
    assert gated.agent.held == [] and gated.stats.events["fills_started"] == 0


def test_config_change_applies_to_the_next_request(gated: Edge) -> None:
    """Turning origin-pull on or changing the origin takes effect on the very next request."""
    host = f"{NOPULL}.{DOMAIN}"
    assert gated.request("/x", host=host).status == 404
    gated.config = gated.config.with_bucket(NOPULL, BucketConfig(origin="abc.example.com:8080", origin_pull=True))
    response = gated.request("/x", host=host)
    assert response.status == 302
    assert response.header(b"location") == b"http://abc.example.com:8080/x"


# -- routing and open redirects (S5) ------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [HOST, HOST.upper(), HOST + ":8080", HOST + ".", "Example-1250000000.File.MyQcloud.com:80"],
)
def test_host_forms_that_reach_the_bucket(edge: Edge, host: str) -> None:
    """The bucket Host matches case-insensitively, with a port or a trailing dot."""
    assert edge.request("/1.jpg", host=host).status == 200


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        f"unknown-1250000000.{DOMAIN}",
        DOMAIN,
        f"x.{HOST}",
        f"{HOST}.evil.example",
        f"{BUCKET}.file.myqcloud.co",
        "",
        "10.0.0.1",
        "[::1]:8080",
        f"{BUCKET}.{DOMAIN}:80:80",
    ],
)
def test_unknown_host_is_no_such_bucket(edge: Edge, host: str) -> None:
    """Any Host that is not <configured bucket>.<configured domain> is 404 NoSuchBucket."""
    response = edge.request("/1.jpg", host=host)
    assert_error(response, 404, "NoSuchBucket")
    assert response.header(b"location") is None
    assert BODY[:16] not in response.body


def test_missing_or_repeated_host_is_no_such_bucket(edge: Edge) -> None:
    """No Host header, or two of them, never picks a bucket."""
    assert_error(edge.request("/1.jpg", host=None), 404, "NoSuchBucket")
    twice = edge.request("/1.jpg", headers=[("Host", HOST)])
    assert_error(twice, 404, "NoSuchBucket")


def test_protocol_relative_target_never_redirects_elsewhere(gated: Edge) -> None:
    """'//evil.example/x' is refused as a key; no Location ever points anywhere but the origin (S5)."""
    response = gated.request("//evil.example/x")
    assert_error(response, 400, "InvalidURI")
    assert response.header(b"location") is None


def test_absolute_form_target(gated: Edge) -> None:
    """An absolute-form target routes by its own authority, and the Location still comes from config (S5)."""
    evil = gated.request("http://evil.example/x")
    assert_error(evil, 404, "NoSuchBucket")
    assert evil.header(b"location") is None
    ours = gated.request(f"http://{HOST}/x?q=1", host="evil.example")
    assert ours.status == 302
    assert ours.header(b"location") == f"http://{ORIGIN}/x?q=1".encode()


# -- methods ----------------------------------------------------------------------


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"PROPFIND", b"TRACE"])
def test_other_methods_not_allowed(gated: Edge, method: bytes) -> None:
    """Methods other than GET and HEAD are 405 with Allow, and change nothing."""
    assert isinstance(gated.store, MemoryStore)
    gated.store.put(BUCKET, ("1.jpg",), BODY, META, MTIME)
    for target in ("/1.jpg", "/missing"):
        response = gated.request(target, method=method, body=b"abc")
        assert_error(response, 405, "MethodNotAllowed")
        assert response.header(b"allow") == b"GET, HEAD"
    assert gated.store.get(BUCKET, "1.jpg") == BODY
    assert gated.agent.held == []


# -- hostile keys (S1-S3) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "code"),
    [
        ("/../etc/passwd", "InvalidURI"),
        ("/%2e%2e/etc/passwd", "InvalidURI"),
        ("/..%2fetc%2fpasswd", "InvalidURI"),
        ("/..%5c..%5cetc", "InvalidURI"),
        ("/%252e%252e/etc/passwd", "InvalidURI"),
        ("/a%00.jpg", "InvalidURI"),
        ("/a%0d%0aSet-Cookie:%20x=1", "InvalidURI"),
        ("/.cosedge/tmp/x.part", "InvalidURI"),
        ("/a%zz", "InvalidURI"),
        ("/%ff", "InvalidURI"),
        ("/" + "k" * 851, "KeyTooLong"),
        ("/" + "/".join(["d" * 100] * 9), "KeyTooLong"),
        ("/" + "s" * 256, "KeyTooLong"),
    ],
)
def test_bad_keys_refused_before_any_store_access(cooperator: StepCooperator, target: str, code: str) -> None:
    """Traversal, NUL/control bytes, internal names and over-long keys are 400 and never reach the store."""
    store = RecordingStore()
    edge = Edge(cooperator, store=store, gated=True)
    for method in (b"GET", b"HEAD"):
        response = edge.request(target, method=method)
        assert response.status == 400
        if method == b"GET":
            assert_error(response, 400, code)
        assert response.header(b"location") is None
    assert store.opened == []
    assert edge.agent.held == []


def test_asterisk_target_is_not_served(gated: Edge) -> None:
    """'GET *' never reaches a bucket (cosedge answers it with InvalidURI) and is not a 5xx."""
    response = gated.request("*")
    assert 400 <= response.status < 500
    assert gated.stats.events["misses"] == 0 and gated.stats.events["hits"] == 0


def test_no_input_produces_a_500(gated: Edge) -> None:
    """A batch of odd targets and headers never yields a 5xx or a traceback."""
    targets = [
        "/", "/%", "/%%", "/%2", "/a/b/c/../d", "/a;b", "/a?b?c", "/a#b", "/a?%00", "/a?%",
        "/\xc3\xa9", "/%c3%a9/%f0%9f%98%80", "/a\\b", "/~", "/.", "/...", "/..../", "/a/%2e/b",
        "http://", "http:///x", "https://" + HOST + "/x", "HTTP://" + HOST, "/x?" + "q" * 5000,
        "/" + "%41" * 900, "/CON", "/nul", "/a:b", "/a|b", "/%7f",
    ]  # fmt: skip
    headers_list = [
        [],
        [("Range", "bytes=-")],
        [("Range", "bytes=0-" + "9" * 100)],
        [("If-Modified-Since", "Mon, 99 Foo 99999 99:99:99 GMT")],
        [("If-None-Match", "")],
        [("If-Range", "")],
    ]
    for target in targets:
        for headers in headers_list:
            response = gated.request(target, headers=headers)
            assert response.status < 500, (target, headers, response.raw[:300])
            location = response.header(b"location")
            if location is not None:
                assert location.startswith(f"http://{ORIGIN}/".encode())


def test_error_bodies_are_cos_xml_with_unique_request_ids(edge: Edge) -> None:
    """Each error is a COS-style XML document whose RequestId matches its x-cos-request-id header."""
    ids = set()
    for target, host in [("/../x", HOST), ("/x", "evil.example"), ("/x", f"{NOPULL}.{DOMAIN}")]:
        response = edge.request(target, host=host)
        request_id = response.header(b"x-cos-request-id")
        assert request_id is not None
        ids.add(request_id)
        assert response.body == error_body(
            response.error_code(), _message(response.body), request_id.decode(), _resource(response.body)
        )
    assert len(ids) == 3


def _resource(body: bytes) -> str:
    return body.split(b"<Resource>", 1)[1].split(b"</Resource>", 1)[0].decode()


def _message(body: bytes) -> str:
    from xml.sax.saxutils import unescape

    return str(unescape(body.split(b"<Message>", 1)[1].split(b"</Message>", 1)[0].decode()))


def test_error_body_escapes_its_message() -> None:
    """The XML error body escapes the message, so it stays well-formed."""
    from xml.etree import ElementTree

    body = error_body("InvalidURI", "a <b> & 'c'", "r-1")
    root = ElementTree.fromstring(body)
    assert root.findtext("Code") == "InvalidURI"
    assert root.findtext("Message") == "a <b> & 'c'"
    assert root.findtext("RequestId") == "r-1" == root.findtext("TraceId")
    assert root.findtext("Resource") == "/"  # never empty: the COS SDKs read it


# -- the disk store behind the listener (S1, S7) ----------------------------------------


def _disk_object(edge: Edge, key: str, data: bytes) -> Path:
    path = Path(edge.config.server.data_dir, BUCKET, *key.split("/"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def secret(tmp_path: Path) -> Iterator[Path]:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_bytes(b"root:SECRET")
    yield outside


def test_disk_hit(disk_edge: Edge) -> None:
    """A file an operator copied into the bucket folder is served as is."""
    _disk_object(disk_edge, "img/1.jpg", BODY)
    response = disk_edge.request("/img/1.jpg", headers=[("Range", "bytes=1-2")])
    assert response.status == 206 and response.body == BODY[1:3]
    assert disk_edge.request("/img/1.jpg").body == BODY


def test_symlinks_out_of_the_bucket_are_never_followed(disk_edge: Edge, secret: Path) -> None:
    """A symlink in the bucket (file or folder) pointing outside is treated as absent (S1)."""
    bucket = Path(disk_edge.config.server.data_dir, BUCKET)
    bucket.mkdir(parents=True)
    (bucket / "link").symlink_to(secret / "passwd")
    (bucket / "dir").symlink_to(secret)
    nopull = Path(disk_edge.config.server.data_dir, NOPULL)
    nopull.mkdir(parents=True)
    (nopull / "link").symlink_to(secret / "passwd")
    for host, target in [(f"{NOPULL}.{DOMAIN}", "/link"), (HOST, "/link"), (HOST, "/dir/passwd")]:
        response = disk_edge.request(target, host=host)
        assert b"SECRET" not in response.raw
        assert response.status in (302, 404), response.raw
    assert (secret / "passwd").read_bytes() == b"root:SECRET"


def test_fill_replaces_a_symlink_not_its_target(disk_edge: Edge, secret: Path) -> None:
    """A fill onto a key that is a symlink replaces the link itself; the file outside is untouched."""
    bucket = Path(disk_edge.config.server.data_dir, BUCKET)
    bucket.mkdir(parents=True)
    (bucket / "link").symlink_to(secret / "passwd")
    disk_edge.origin.add("link", b"from origin")
    assert disk_edge.request("/link").status == 302
    disk_edge.flush_origin()
    assert (secret / "passwd").read_bytes() == b"root:SECRET"
    assert not (bucket / "link").is_symlink()
    assert disk_edge.request("/link").body == b"from origin"


def test_folder_is_not_an_object(disk_edge: Edge) -> None:
    """A key naming a folder is not served (no listing); it is an ordinary miss."""
    _disk_object(disk_edge, "folder/a.txt", b"a")
    response = disk_edge.request("/folder", host=f"{NOPULL}.{DOMAIN}")
    assert_error(response, 404, "NoSuchKey")
    response = disk_edge.request("/folder")
    assert response.status == 302
    assert b"a.txt" not in response.raw


def test_file_shrinking_while_served_never_sends_more_than_content_length(disk_edge: Edge) -> None:
    """If the file shrinks mid-response, fewer bytes than Content-Length go out and the connection drops (S7)."""
    data = BODY * 20  # 204800 bytes: several 64 KiB chunks
    path = _disk_object(disk_edge, "big.bin", data)
    conn = disk_edge.connect()
    conn.send(raw_request("/big.bin"))
    disk_edge.cooperator.step()  # the headers and the first chunk go out
    os.truncate(path, 100_000)
    with capture_logs() as events:
        response = conn.response()
    assert response.status == 200
    assert response.length == len(data)
    assert 0 < len(response.body) < response.length
    assert data.startswith(response.body)
    assert conn.aborted
    assert any("shrank" in e.get("log_format", "") for e in events)


def test_file_emptied_before_the_first_byte(disk_edge: Edge) -> None:
    """If a large file is emptied before anything is sent, the connection drops without a body (S7)."""
    path = _disk_object(disk_edge, "gone.bin", BODY * 20)  # large: sent by a producer, not read at once
    conn = disk_edge.connect()
    conn.send(raw_request("/gone.bin"))
    os.truncate(path, 0)
    disk_edge.cooperator.run()
    assert conn.aborted
    head, _, body = conn.transport.value().partition(b"\r\n\r\n")
    assert body == b""


def test_file_growing_while_served_sends_exactly_content_length(disk_edge: Edge) -> None:
    """If the file grows mid-response, exactly the fstat length is sent (S7)."""
    path = _disk_object(disk_edge, "grow.bin", BODY * 20)
    conn = disk_edge.connect()
    conn.send(raw_request("/grow.bin"))
    with path.open("ab") as f:
        f.write(b"EXTRA" * 10000)
    response = conn.response()
    assert response.status == 200
    assert response.body == BODY * 20
    assert conn.closed and not conn.aborted


def test_file_replaced_while_served_keeps_the_old_bytes(disk_edge: Edge) -> None:
    """Replacing the file (rename over it) mid-response still sends the original object, whole (S7)."""
    path = _disk_object(disk_edge, "r.bin", BODY * 20)
    conn = disk_edge.connect()
    conn.send(raw_request("/r.bin"))
    replacement = path.with_name("r.new")
    replacement.write_bytes(b"N" * 50)
    replacement.replace(path)
    response = conn.response()
    assert response.body == BODY * 20


def test_client_disconnect_mid_response_releases_the_object(edge: Edge) -> None:
    """A client that goes away mid-response stops the sending and closes the object."""
    assert isinstance(edge.store, RecordingStore)
    edge.store.put(BUCKET, ("huge",), b"h" * (1024 * 1024), None, MTIME)
    conn = edge.connect()
    conn.send(raw_request("/huge"))
    edge.cooperator.step()
    conn.transport.loseConnection()
    edge.cooperator.run()
    assert 0 < len(conn.transport.value()) < 1024 * 1024
    assert [h.closed for h in edge.store.handles] == [True]


def test_every_opened_object_is_closed(edge: Edge) -> None:
    """Whatever the answer (200, HEAD, 206, multipart, 304, 412, 416), the object is closed afterwards."""
    assert isinstance(edge.store, RecordingStore)
    cases: list[tuple[bytes, list[tuple[str, str]]]] = [
        (b"GET", []),
        (b"HEAD", []),
        (b"GET", [("Range", "bytes=0-9")]),
        (b"GET", [("Range", "bytes=0-9,20-29")]),
        (b"GET", [("If-None-Match", "*")]),
        (b"GET", [("If-Match", '"nope"')]),
        (b"GET", [("Range", "bytes=99999-")]),
    ]
    for method, headers in cases:
        edge.request("/1.jpg", method=method, headers=headers)
    assert len(edge.store.handles) == len(cases)
    assert all(h.closed for h in edge.store.handles)


def test_statuses_are_counted(edge: Edge) -> None:
    """The site counts responses by status for operators."""
    edge.request("/1.jpg")
    edge.request("/1.jpg", headers=[("Range", "bytes=0-0")])
    edge.request("/missing")
    edge.request("/x", host="evil.example")
    assert edge.stats.statuses == {200: 1, 206: 1, 302: 1, 404: 1}


def test_fill_survives_the_client_disconnecting(gated: Edge) -> None:
    """The client whose miss started a fill may go away; the fill still stores the whole object (F9)."""
    gated.origin.add("video.mp4", BODY, content_type="video/mp4")
    conn = gated.connect()
    conn.send(raw_request("/video.mp4"))
    conn.transport.loseConnection()
    gated.flush_origin()
    assert isinstance(gated.store, MemoryStore)
    assert gated.store.get(BUCKET, "video.mp4") == BODY


def test_remembered_404_still_redirects(edge: Edge) -> None:
    """A key the origin lacks keeps getting 302s (the origin answers the client), without refetching."""
    for _ in range(3):
        response = edge.request("/missing.jpg")
        assert response.status == 302
        assert response.header(b"location") == f"http://{ORIGIN}/missing.jpg".encode()
    assert edge.origin.gets(b"/missing.jpg") == 1
    assert edge.stats.events["fills_skipped_not_found"] == 2


def test_hits_served_while_the_disk_is_full(cooperator: StepCooperator) -> None:
    """When fills fail for lack of space, stored objects are still served (F12)."""
    store = MemoryStore(disk_limit=len(BODY) + 10)
    edge = Edge(cooperator, store=store)
    store.put(BUCKET, ("1.jpg",), BODY, META, MTIME)
    edge.origin.add("new.bin", b"n" * 100)
    with capture_logs() as events:
        assert edge.request("/new.bin").status == 302
    assert edge.stats.fill_failures == {"disk-full": 1}
    assert [e["reason"] for e in events if "reason" in e] == ["disk-full"]
    assert store.pending == []
    assert edge.request("/1.jpg").body == BODY


def test_access_log_in_combined_format(cooperator: StepCooperator, tmp_path: Path) -> None:
    """With access_log set to a path, each request is one combined-log-format line in that file."""
    edge = Edge(cooperator)
    log = tmp_path / "access.log"
    site = EdgeSite(edge.resource, edge.stats, str(log), edge.clock, 60)
    site.doStart()
    edge.site = site
    edge.request("/some%20key?q=1", headers=[("User-Agent", "curl/8.0"), ("Referer", "http://r.example/")])
    site.doStop()
    lines = log.read_text().splitlines()
    assert len(lines) == 1
    assert re.fullmatch(
        r'\S+ - - \[[^]]+\] "GET /some%20key\?q=1 HTTP/1.1" 302 - "http://r.example/" "curl/8.0"', lines[0]
    ), lines[0]


def test_access_log_is_reopened_after_rotation(cooperator: StepCooperator, tmp_path: Path) -> None:
    """
    After logrotate moves the access log away, reopening it (what SIGHUP
    does) sends the next lines to a new file by the configured name; a name
    that cannot be opened keeps logging to the old file.
    """
    edge = Edge(cooperator)
    log = tmp_path / "access.log"
    site = EdgeSite(edge.resource, edge.stats, str(log), edge.clock, 60)
    site.doStart()
    edge.site = site
    edge.request("/before-rotation")
    rotated = tmp_path / "access.log.1"
    log.rename(rotated)
    site.reopen_access_log()
    edge.request("/after-rotation")
    log.rename(tmp_path / "access.log.2")
    log.mkdir()  # a name that cannot be opened as a file now
    site.reopen_access_log()
    edge.request("/still-logged")
    site.doStop()
    assert "/before-rotation" in rotated.read_text() and "/after-rotation" not in rotated.read_text()
    second = (tmp_path / "access.log.2").read_text()
    assert "/after-rotation" in second and "/still-logged" in second


def test_access_log_lines_of_several_processes_all_land_whole(cooperator: StepCooperator, tmp_path: Path) -> None:
    """
    Two sites writing one access log (two worker processes) append whole
    lines that never overwrite each other, and the file is never rotated
    by the daemon itself, however long it grows (that is logrotate's job).
    """
    log = tmp_path / "access.log"
    edges = [Edge(cooperator), Edge(cooperator)]
    for edge in edges:
        edge.site = EdgeSite(edge.resource, edge.stats, str(log), edge.clock, 60)
        edge.site.doStart()
    long_key = "k" * 900
    for n in range(1200):  # over 1 MB of lines
        edges[n % 2].request(f"/{long_key}?n={n}")
    for edge in edges:
        edge.site.doStop()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["access.log"]
    lines = log.read_text().splitlines()
    assert log.stat().st_size > 1_000_000
    assert sorted(int(re.search(r"\?n=(\d+) ", line).group(1)) for line in lines) == list(range(1200))  # type: ignore[union-attr]


def test_access_log_to_standard_output(cooperator: StepCooperator, capfd: pytest.CaptureFixture[str]) -> None:
    """With access_log = "-", the combined-log line goes to standard output."""
    edge = Edge(cooperator)
    site = EdgeSite(edge.resource, edge.stats, "-", edge.clock, 60)
    site.doStart()
    edge.site = site
    edge.request("/stdout-key")
    site.doStop()
    out = capfd.readouterr().out
    assert '"GET /stdout-key HTTP/1.1" 302 -' in out


class _FailingStore(MemoryStore):
    error: Exception = StoreError(13, "Permission denied")

    def open(self, bucket: str, segments: tuple[str, ...]) -> Any:
        return fail(self.error)


def test_unreadable_object_is_access_denied(cooperator: StepCooperator) -> None:
    """An object the store cannot open (permissions, I/O error) is 403 AccessDenied, not a 500."""
    edge = Edge(cooperator, store=_FailingStore(), gated=True)
    with capture_logs() as events:
        response = edge.request("/1.jpg")
    assert_error(response, 403, "AccessDenied")
    assert edge.agent.held == []  # not treated as a miss
    assert any("cannot open" in e.get("log_format", "") for e in events)


def test_unexpected_error_is_a_plain_cos_error(cooperator: StepCooperator, logged_failures: list[Any]) -> None:
    """Even a bug inside the listener answers a COS XML InternalError without a traceback, and logs it."""
    store = _FailingStore()
    store.error = RuntimeError("boom")
    edge = Edge(cooperator, store=store)
    response = edge.request("/1.jpg")
    assert_error(response, 500, "InternalError")
    assert b"boom" not in response.raw and b"Traceback" not in response.raw
    assert len(logged_failures) == 1
    logged_failures.clear()


def test_non_ascii_host_is_no_such_bucket(edge: Edge) -> None:
    """A Host header with non-ASCII bytes never matches a bucket."""
    response = edge.request("/1.jpg", host=b"example-1250000000.file.myqcloud.com\xff")
    assert_error(response, 404, "NoSuchBucket")


def _split_responses(data: bytes, methods: list[bytes]) -> list[RawResponse]:
    responses = []
    for method in methods:
        head, _, rest = data.partition(b"\r\n\r\n")
        response = parse_response(head + b"\r\n\r\n")
        n = 0 if method == b"HEAD" or response.status in (304,) else response.length
        response.body, data = rest[:n], rest[n:]
        responses.append(response)
    assert data == b""
    return responses


def test_pipelined_requests_are_answered_in_order(edge: Edge) -> None:
    """Several requests on one connection each get exactly their own bytes, in order."""
    assert isinstance(edge.store, MemoryStore)
    big = os.urandom(150_000)
    edge.store.put(BUCKET, ("big",), big, None, MTIME)
    requests = [
        (b"GET", "/big", []),
        (b"GET", "/1.jpg", [("Range", "bytes=0-9")]),
        (b"HEAD", "/big", []),
        (b"GET", "/missing", []),
        (b"GET", "/1.jpg", [("If-None-Match", META["etag"])]),
        (b"GET", "/1.jpg", []),
    ]
    conn = edge.connect()
    for method, target, headers in requests:
        request = raw_request(target, method=method, headers=headers)
        conn.send(request.replace(b"Connection: close\r\n", b""))
    edge.cooperator.run()
    responses = _split_responses(conn.transport.value(), [m for m, _, _ in requests])
    assert [r.status for r in responses] == [200, 206, 200, 302, 304, 200]
    assert responses[0].body == big
    assert responses[1].body == BODY[:10]
    assert responses[2].length == len(big)
    assert responses[5].body == BODY


def test_large_multipart_ranges_across_chunks(edge: Edge) -> None:
    """Ranges larger than the send chunk come back whole and exact in a multipart body."""
    assert isinstance(edge.store, MemoryStore)
    big = os.urandom(300_000)
    edge.store.put(BUCKET, ("big",), big, None, MTIME)
    response = edge.request("/big", headers=[("Range", "bytes=0-70000,100000-231071,-1")])
    assert response.length == len(response.body)
    assert multipart_parts(response) == [
        (b"bytes 0-70000/300000", big[:70001]),
        (b"bytes 100000-231071/300000", big[100000:231072]),
        (b"bytes 299999-299999/300000", big[-1:]),
    ]


def test_kept_headers_are_served_as_the_origin_sent_them(edge: Edge) -> None:
    """Non-ASCII bytes in kept origin headers come back byte for byte, not re-encoded."""
    edge.origin.add(
        "caf\u00e9.txt",
        b"x",
        headers={"Content-Disposition": 'attachment; filename="caf\u00e9.txt"', "X-Cos-Meta-Name": "\u4e2d"},
    )
    assert edge.request("/caf%C3%A9.txt").status == 302
    edge.flush_origin()
    response = edge.request("/caf%C3%A9.txt")
    assert response.status == 200
    assert response.header(b"content-disposition") == 'attachment; filename="caf\u00e9.txt"'.encode()
    assert response.header(b"x-cos-meta-name") == "\u4e2d".encode()


def test_metadata_from_another_tool_never_breaks_serving(edge: Edge) -> None:
    """Metadata holding any text (not Latin-1) is still served, never a 500."""
    assert isinstance(edge.store, MemoryStore)
    # Long enough that two one-byte parts with their headers are shorter than the object (else: 200, S11).
    body = b"0123456789" * 100
    edge.store.put(BUCKET, ("t",), body, {"etag": '"\u4e2d"', "content-type": "text/plain; x=\u4e2d"}, MTIME)
    response = edge.request("/t")
    assert response.status == 200
    assert response.header(b"etag") == '"\u4e2d"'.encode()
    multi = edge.request("/t", headers=[("Range", "bytes=0-0,5-5")])
    assert multi.status == 206 and len(multipart_parts(multi)) == 2


def test_head_error_has_the_get_headers_and_no_body(edge: Edge) -> None:
    """
    HEAD on an error (here the bucket root, 403 AccessDenied) answers the
    status and headers GET would, Content-Length included, without a body,
    and without Twisted's warning about a HEAD body being dropped.
    """
    get = edge.request("/")
    with capture_logs() as events:
        head = edge.request("/", method=b"HEAD")
    assert (get.status, head.status) == (403, 403)
    assert head.header(b"content-length") == b"%d" % len(get.body)
    assert head.body == b""
    assert not [e for e in events if "HEAD" in e.get("log_format", "")]


def test_small_and_large_bodies_are_byte_exact(disk_edge: Edge) -> None:
    """
    Objects just under, at and over the one-write size limit are served
    whole, as are ranges that cross it: the small-body path and the
    producer path agree byte for byte.
    """
    from cosedge.web.producers import SMALL_RESPONSE as _CHUNK

    for size in (_CHUNK - 1, _CHUNK, _CHUNK + 1, 3 * _CHUNK + 7):
        data = bytes(i % 251 for i in range(size))
        _disk_object(disk_edge, f"s{size}.bin", data)
        response = disk_edge.request(f"/s{size}.bin")
        assert response.status == 200 and response.body == data
        ranged = disk_edge.request(f"/s{size}.bin", headers=[("Range", f"bytes=1-{size - 2}")])
        assert ranged.status == 206 and ranged.body == data[1 : size - 1]


def test_large_or_chunked_request_bodies_are_refused_before_reading(edge: Edge) -> None:
    """
    A request announcing a body over 64 KiB, or a chunked one, is answered
    413 EntityTooLarge at once and the connection closed: the body is never
    read or spooled to disk (S8).
    """
    for extra in ([("Content-Length", "100000000000")], [("Transfer-Encoding", "chunked")]):
        conn = edge.connect()
        conn.transport.clearBuffer = None  # keep what was written
        conn.send(raw_request("/1.jpg", method=b"POST", headers=extra))
        answer = conn.transport.value()
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:100]
        assert b"<Code>EntityTooLarge</Code>" in answer
        assert conn.transport.disconnecting
    small = edge.request("/1.jpg", method=b"POST", body=b"x" * 10)
    assert small.status == 405 and small.error_code() == "MethodNotAllowed"


@define(eq=False)
class _ShortReads:
    """A stored object whose reads come back one byte short, as if it shrank after fstat."""

    inner: Any

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def read(self, offset: int, length: int) -> Any:
        return self.inner.read(offset, length).addCallback(lambda data: bytes(data)[:-1])

    def close(self) -> None:
        self.inner.close()


def test_object_shrinking_under_the_one_write_path_releases_it(edge: Edge, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    If a small object reads short (it shrank after fstat), the connection is
    dropped and the object is still released: no descriptor leaks (S7).
    """
    assert isinstance(edge.store, RecordingStore)
    real_open = RecordingStore.open

    def shrinking_open(self: RecordingStore, bucket: str, segments: tuple[str, ...]) -> Any:
        return real_open(self, bucket, segments).addCallback(lambda obj: None if obj is None else _ShortReads(obj))

    monkeypatch.setattr(RecordingStore, "open", shrinking_open)
    conn = edge.connect()
    with capture_logs():
        conn.send(raw_request("/1.jpg"))
    assert conn.aborted
    assert edge.store.handles and all(h.closed for h in edge.store.handles)


def test_overflowing_dates_are_ignored_not_a_500(edge: Edge) -> None:
    """A date whose zone offset overflows is not a date: ignored, never a 500 (If-Modified-Since, If-Range)."""
    bad = "Mon, 01 Jan 2000 00:00:00 +99999999999999999999"
    assert edge.request("/1.jpg", headers=[("If-Modified-Since", bad)]).status == 200
    assert edge.request("/1.jpg", headers=[("If-Range", bad), ("Range", "bytes=0-9")]).status == 200


def test_errors_do_not_carry_the_objects_headers(edge: Edge) -> None:
    """
    A 416 or 412 about an object is an XML error: it does not carry the
    object's Content-Encoding, Content-Disposition, Cache-Control or
    x-cos-meta-* headers, which would make clients decode or cache the error.
    """
    assert isinstance(edge.store, MemoryStore)
    meta = {
        "content-encoding": "gzip",
        "content-disposition": "attachment",
        "cache-control": "max-age=3600",
        "x-cos-meta-owner": "alice",
        "etag": '"abc"',
    }
    edge.store.put(BUCKET, ("z.gz",), b"0123456789", meta, MTIME)
    assert edge.request("/z.gz").header(b"content-encoding") == b"gzip"
    for response in (
        edge.request("/z.gz", headers=[("Range", "bytes=5000-")]),
        edge.request("/z.gz", headers=[("If-Match", '"other"')]),
    ):
        assert response.status in (412, 416)
        assert response.header(b"content-type") == b"application/xml"
        for name in (b"content-encoding", b"content-disposition", b"cache-control", b"x-cos-meta-owner"):
            assert response.header(name) is None, name


def test_unsendable_stored_header_names_and_values_are_skipped(edge: Edge) -> None:
    """
    Metadata written by another tool with a header name or value that HTTP
    cannot carry is left out; the object is still served (never a 500).
    """
    assert isinstance(edge.store, MemoryStore)
    meta = {
        "x-cos-meta-a\r\nset-cookie: evil": "1",
        "x-cos-meta-é": "2",
        "x-cos-meta-nul": "a\x00b",
        "x-cos-meta-ok": "fine",
    }
    edge.store.put(BUCKET, ("m.bin",), b"data", meta, MTIME)
    response = edge.request("/m.bin")
    assert response.status == 200 and response.body == b"data"
    assert response.header(b"x-cos-meta-ok") == b"fine"
    assert response.header(b"set-cookie") is None
    assert response.header(b"x-cos-meta-nul") is None


def test_not_modified_has_no_content_length_of_zero(edge: Edge) -> None:
    """A 304 for a non-empty object does not claim Content-Length: 0 (RFC 9110 8.6)."""
    response = edge.request("/1.jpg", headers=[("If-None-Match", ETAG.decode())])
    assert response.status == 304
    assert response.header(b"content-length") in (None, b"%d" % len(BODY))
    assert response.body == b""


def test_store_errors_other_than_permission_are_503(edge: Edge, monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of descriptors (EMFILE) is a temporary 503, not 403 AccessDenied; permission denied stays 403."""
    import errno

    for code, status in ((errno.EMFILE, 503), (errno.EACCES, 403)):

        def failing_open(self: Any, bucket: str, segments: tuple[str, ...], code: int = code) -> Any:
            return fail(StoreError(code, os.strerror(code)))

        monkeypatch.setattr(RecordingStore, "open", failing_open)
        with capture_logs():
            assert edge.request("/1.jpg").status == status
