"""
The S3 store (issue 13) against a fake S3 served in memory: a twisted.web
resource behind ``RequestTraversalAgent`` that checks each request's SigV4
signature with botocore, keeps objects with their headers, and answers
ranges, conditionals, copies and ListObjectsV2 pages (in S3's key order, or
in SeaweedFS's folder-first order).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from json import loads
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit
from xml.sax.saxutils import escape

import pytest
from botocore.auth import S3SigV4Auth  # type: ignore[import-untyped]
from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
from botocore.credentials import Credentials  # type: ignore[import-untyped]
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock, Cooperator
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface.verify import verifyObject

from cosedge.config import ConfigError, parse_config
from cosedge.interfaces import IObjectStore, IObjectWriter, IStoredObject, ShortObject, StoreError
from cosedge.service import build_service
from cosedge.storage.s3 import MISS_CACHE, MISS_MEMORY, S3Store, check_config, open_s3_store
from cosedge.storage.s3_cache import RecentObjects
from cosedge.storage.s3_http import RangeStream, S3Client
from cosedge.storage.s3_objects import META_HEADER, PREFIX

from .helpers import capture_logs, result_of

BUCKET = "example-1250000000"
KEYS = ("AKIDEXAMPLE", "s3-secret-never-logged")
NS = "http://s3.amazonaws.com/doc/2006-03-01/"


def _folder_first(key: str) -> list[str]:
    """SeaweedFS's listing order: folder by folder, each folder's names in order (``a/`` before ``a-b``)."""
    return key.split("/")


class FakeS3(Resource):
    """An S3 endpoint in memory: buckets of objects (bytes, stored headers, ETag)."""

    isLeaf = True

    def __init__(self, seaweed_order: bool = False) -> None:
        super().__init__()
        self.buckets: dict[str, dict[str, tuple[bytes, dict[str, str], str]]] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.page_size = 1000
        self.seaweed_order = seaweed_order
        #: status to answer the next request of a method with (then forgotten).
        self.fail_next: dict[str, int] = {}
        self.bad_etag = False
        #: Conditional PUTs to answer 409 ConditionalRequestConflict (as AWS S3 does during another one).
        self.conflicts = 0

    def _signature_ok(self, request: Request, headers: dict[str, str]) -> bool:
        match = re.fullmatch(
            r"AWS4-HMAC-SHA256 Credential=(\w+)/\d{8}/us-east-1/s3/aws4_request, "
            r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})",
            headers.get("authorization", ""),
        )
        if match is None or match.group(1) != KEYS[0]:
            return False
        signed = {name: headers[name] for name in match.group(2).split(";")}
        aws = AWSRequest(method=request.method.decode(), url=f"http://{headers['host']}{request.uri.decode()}")
        for name, value in signed.items():
            aws.headers[name] = value
        aws.context["timestamp"] = signed["x-amz-date"]
        signer = S3SigV4Auth(Credentials(*KEYS), "s3", "us-east-1")
        string_to_sign = signer.string_to_sign(aws, signer.canonical_request(aws))
        return bool(signer.signature(string_to_sign, aws) == match.group(3))

    def render(self, request: Request) -> bytes:
        method = request.method.decode()
        headers = {k.decode().lower(): v[-1].decode("latin-1") for k, v in request.requestHeaders.getAllRawHeaders()}
        url = urlsplit(request.uri.decode())
        host = headers["host"]
        bucket, _, key = url.path.lstrip("/").partition("/")
        if host.count(".") > 1:  # virtual-hosted: <bucket>.s3.test:8333
            bucket, key = host.split(".")[0], url.path.lstrip("/")
        key = unquote(key)
        self.requests.append((method, f"{bucket}/{key}", headers))
        if not self._signature_ok(request, headers) or headers.get("x-amz-content-sha256") != "UNSIGNED-PAYLOAD":
            return self._error(request, 403, "SignatureDoesNotMatch")
        if method in self.fail_next:
            return self._error(request, self.fail_next.pop(method), "InternalError")
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        if not bucket:
            return b"<ListAllMyBucketsResult/>"
        if bucket not in self.buckets:
            if method == "PUT" and not key:
                self.buckets[bucket] = {}
                return b""
            return self._error(request, 404, "NoSuchBucket")
        objects = self.buckets[bucket]
        if key and ("uploads" in query or "uploadId" in query):
            return self._upload(request, method, objects, key, headers, query)
        if not key:
            return self._list(objects, query) if method == "GET" else b""
        if method == "PUT":
            return self._put(request, objects, key, headers)
        if method == "DELETE":
            objects.pop(key, None)
            request.setResponseCode(204)
            return b""
        if key not in objects:
            return self._error(request, 404, "NoSuchKey")
        return self._get(request, objects[key], headers)

    def _upload(
        self,
        request: Request,
        method: str,
        objects: dict[str, Any],
        key: str,
        headers: dict[str, str],
        query: dict[str, str],
    ) -> bytes:
        """A multipart upload's request (see tests/test_s3_multipart.py); this fake has none."""
        return self._error(request, 501, "NotImplemented")

    def _error(self, request: Request, status: int, code: str) -> bytes:
        request.setResponseCode(status)
        return f"<Error><Code>{code}</Code><Message>fake</Message></Error>".encode()

    def _put(self, request: Request, objects: dict[str, Any], key: str, headers: dict[str, str]) -> bytes:
        kept = {k: v for k, v in headers.items() if k.startswith("x-amz-meta-") or k == "content-type"}
        if "x-amz-copy-source" in headers:
            source = unquote(headers["x-amz-copy-source"]).split("/", 2)[2]
            data, _, etag = objects[source]
            if headers.get("x-amz-copy-source-if-match", etag) != etag:
                return self._error(request, 412, "PreconditionFailed")
            objects[key] = (data, kept, etag)
            return b"<CopyObjectResult/>"
        assert request.content is not None
        data = request.content.read()
        assert headers["content-length"] == str(len(data)) and "transfer-encoding" not in headers
        if headers.get("if-none-match") == "*":
            if self.conflicts:
                self.conflicts -= 1
                return self._error(request, 409, "ConditionalRequestConflict")
            if key in objects:
                return self._error(request, 412, "PreconditionFailed")
        if headers["content-md5"] != base64.b64encode(hashlib.md5(data).digest()).decode():
            return self._error(request, 400, "BadDigest")
        etag = '"' + ("0" * 32 if self.bad_etag else hashlib.md5(data).hexdigest()) + '"'
        objects[key] = (data, kept, etag)
        request.setHeader(b"etag", etag.encode())
        return b""

    def _get(self, request: Request, stored: tuple[bytes, dict[str, str], str], headers: dict[str, str]) -> bytes:
        data, kept, etag = stored
        if headers.get("if-match", etag) != etag:
            return self._error(request, 412, "PreconditionFailed")
        for name, value in kept.items():
            request.setHeader(name.encode(), value.encode("latin-1"))
        request.setHeader(b"etag", etag.encode())
        request.setHeader(b"last-modified", b"Tue, 01 Dec 2026 11:00:00 GMT")
        wanted = re.fullmatch(r"bytes=(\d+)-(\d+)", headers.get("range", ""))
        if wanted is None:
            return data
        first, last = int(wanted.group(1)), min(int(wanted.group(2)), len(data) - 1)
        if first > last:
            request.setHeader(b"content-range", b"bytes */%d" % len(data))
            return self._error(request, 416, "InvalidRange")
        request.setResponseCode(206)
        request.setHeader(b"content-range", b"bytes %d-%d/%d" % (first, last, len(data)))
        return data[first : last + 1]

    def _list(self, objects: dict[str, Any], query: dict[str, str]) -> bytes:
        prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
        entries: dict[str, str | None] = {}
        for key in objects:
            cut = key.find(delimiter, len(prefix)) if delimiter else -1
            if key.startswith(prefix):
                entries[key[: cut + 1] if cut >= 0 else key] = None if cut >= 0 else key
        order = sorted(entries, key=_folder_first if self.seaweed_order else None)
        after = query.get("continuation-token") or query.get("start-after", "")
        if after:
            order = [e for e in order if (_folder_first(e) > _folder_first(after) if self.seaweed_order else e > after)]
        page, rest = order[: self.page_size], order[self.page_size :]
        body = [f'<ListBucketResult xmlns="{NS}"><IsTruncated>{str(bool(rest)).lower()}</IsTruncated>']
        if rest:
            body.append(f"<NextContinuationToken>{escape(page[-1])}</NextContinuationToken>")
        for entry in page:
            if entries[entry] is None:
                body.append(f"<CommonPrefixes><Prefix>{escape(entry)}</Prefix></CommonPrefixes>")
            else:
                data, _, etag = objects[entry]
                body.append(
                    f"<Contents><Key>{escape(entry)}</Key><LastModified>2026-12-01T11:00:00.000Z</LastModified>"
                    f"<ETag>{escape(etag)}</ETag><Size>{len(data)}</Size></Contents>"
                )
        return "".join([*body, "</ListBucketResult>"]).encode()


class Harness:
    """An S3 store on a fake S3, with the clock and cooperator its PUT bodies are produced on."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        bucket: str = "",
        addressing: str = "path",
        cache: float = 0.0,
        fake_s3: type[FakeS3] = FakeS3,
        multipart: tuple[int, int] = (64 * 1024 * 1024, 16 * 1024 * 1024),
        **fake: Any,
    ) -> None:
        self.fake = fake_s3(**fake)
        self.fake.buckets[bucket or BUCKET] = {}
        self.clock = Clock()
        self.agent = RequestTraversalAgent(self.fake)
        client = S3Client(self.agent, self.clock, "http://s3.test:8333", "us-east-1", KEYS, addressing)
        cooperator = Cooperator(scheduler=lambda f: self.clock.callLater(0, f))
        recent = RecentObjects(self.clock, cache, 1024 * 1024)
        self.store = S3Store(
            client,
            self.clock,
            str(tmp_path / "tmp"),
            bucket=bucket,
            cooperator=cooperator,
            recent=recent,
            multipart=multipart,
        )
        self.objects = self.fake.buckets[bucket or BUCKET]
        self.base = f"{BUCKET}/" if bucket else ""

    def pump(self) -> None:
        self.clock.advance(0)
        self.agent.flush()

    def run(self, d: Deferred[Any]) -> Any:
        """Pump the fake connections and the cooperator until ``d`` has fired; its result."""
        for _ in range(1000):
            if d.called:
                break
            self.pump()
        result = result_of(d)
        if isinstance(result, Failure):
            result.raiseException()
        return result

    def put(self, key: str, data: bytes, meta: dict[str, str] | None = None, mtime: float | None = 1e9) -> None:
        writer = self.run(self.store.writer(BUCKET, tuple(key.split("/")), len(data)))
        writer.write(data)
        self.run(writer.commit(meta or {}, mtime))

    def open(self, key: str) -> Any:
        return self.run(self.store.open(BUCKET, tuple(key.split("/"))))

    def keys(self, prefix: str = "", marker: str = "", limit: int = 1000) -> list[str]:
        return [e.key for e in self.run(self.store.list(BUCKET, prefix, marker, limit))]


@pytest.fixture
def s3(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


class PushConsumer:
    """A consumer of a streaming producer, as a client's connection is (the test pauses and resumes it)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.writes = 0
        self.producer: Any = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming is True
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.data += data
        self.writes += 1


def _tmp_files(tmp_path: Path) -> list[str]:
    return sorted(os.listdir(tmp_path / "tmp")) if (tmp_path / "tmp").exists() else []


def test_interfaces(s3: Harness) -> None:
    """The store, its objects and its writers (in memory, in a temporary file) provide the interfaces."""
    assert verifyObject(IObjectStore, s3.store)
    for length in (None, 1, 300_000):
        writer = s3.run(s3.store.writer(BUCKET, ("a",), length))
        assert verifyObject(IObjectWriter, writer)
        writer.write(b"x")
        assert s3.run(writer.commit({}, None)) is None
    obj = s3.open("a")
    assert verifyObject(IStoredObject, obj)
    assert s3.run(obj.read(0, 1)) == b"x" and obj.fileno() is None
    assert not hasattr(type(obj), "read_now")  # a network store's objects are read through read()
    obj.close()


@pytest.mark.parametrize("size", [0, 5, PREFIX, PREFIX + 1, 300_000])
def test_bytes_and_metadata_round_trip(s3: Harness, tmp_path: Path, size: int) -> None:
    """Bytes, every kept header (exactly, non-ASCII included), the check time and mtime come back."""
    data = os.urandom(size)
    meta = {
        "content-type": "text/plain; charset=utf-8",
        "etag": '"origin-etag"',
        "last-modified": "Wed, 21 Oct 2015 07:28:00 GMT",
        "content-disposition": 'attachment; filename="caf\xe9  menu.pdf"',
        "x-cos-meta-plain": "a value",
        "x-cos-meta-spaced": "two  spaces",
        "x-cos-meta-cosedge": "a name of ours",
        "cosedge-checked": "1700000000",
    }
    s3.put("dir/k.bin", data, meta, 1445412480.0)
    obj = s3.open("dir/k.bin")
    assert (obj.size, obj.mtime, dict(obj.meta)) == (size, 1445412480.0, meta)
    assert obj.identity == hashlib.md5(data).hexdigest()
    assert s3.run(obj.read(0, size + 10)) == data
    assert s3.run(obj.read(size // 2, 100)) == data[size // 2 : size // 2 + 100]
    _, stored, _ = s3.objects["dir/k.bin"]
    assert stored["x-amz-meta-plain"] == "a value" and stored["content-type"] == meta["content-type"]
    assert "x-amz-meta-spaced" not in stored and loads(stored[META_HEADER])["meta"]["x-cos-meta-spaced"]
    assert _tmp_files(tmp_path) == []


def test_requests_are_signed_unsigned_payload_with_a_length(s3: Harness) -> None:
    """Every request passes the fake's botocore signature check; a PUT says UNSIGNED-PAYLOAD, its length and MD5."""
    s3.put("sp ace/ü+%41?#.txt", b"odd key")
    assert s3.run(s3.open("sp ace/ü+%41?#.txt").read(0, 7)) == b"odd key"
    method, where, headers = next(r for r in s3.fake.requests if r[0] == "PUT")
    assert where == f"{BUCKET}/sp ace/ü+%41?#.txt"
    assert headers["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD" and headers["content-length"] == "7"
    assert KEYS[1] not in repr(s3.fake.requests)


def test_virtual_addressing_and_one_store_bucket(tmp_path: Path) -> None:
    """``addressing = "virtual"`` names the bucket in the Host; ``bucket`` keeps each bucket under a prefix."""
    s3 = Harness(tmp_path, bucket="shared", addressing="virtual")
    s3.put("k", b"v")
    assert list(s3.objects) == [f"{BUCKET}/k"]
    assert s3.fake.requests[0][2]["host"] == "shared.s3.test:8333"
    assert s3.keys() == ["k"] and s3.run(s3.store.usage(BUCKET)) == (1, 1)
    assert s3.run(s3.store.open("other-1250000000", ("k",))) is None


def test_a_failed_put_leaves_nothing(s3: Harness, tmp_path: Path) -> None:
    """A PUT the store refuses fails the commit; nothing is stored and the temporary file is gone."""
    writer = s3.run(s3.store.writer(BUCKET, ("big",), None))
    writer.write(b"x" * 300_000)
    assert len(_tmp_files(tmp_path)) == 1
    s3.fake.fail_next["PUT"] = 500
    with pytest.raises(StoreError, match="PUT big: HTTP 500 InternalError"):
        s3.run(writer.commit({}, None))
    assert "big" not in s3.objects and _tmp_files(tmp_path) == []
    writer.abort()  # after a failed commit: harmless


def test_abort_and_a_wrong_etag_leave_nothing(s3: Harness, tmp_path: Path) -> None:
    """An aborted writer PUTs nothing; a store ETag that is not the body's MD5 is deleted and fails."""
    writer = s3.run(s3.store.writer(BUCKET, ("cut",), None))
    writer.write(b"partial")
    writer.abort()
    writer.abort()
    with pytest.raises(ValueError):
        s3.run(writer.commit({}, None))
    assert _tmp_files(tmp_path) == [] and not any(r[0] == "PUT" for r in s3.fake.requests)
    s3.fake.bad_etag = True
    with pytest.raises(StoreError, match="is not the body's MD5"):
        s3.put("garbled", b"data")
    assert "garbled" not in s3.objects


def test_metadata_over_the_limit(s3: Harness) -> None:
    """Past S3's 2 KiB, x-cos-meta-* go first, then optional headers; essentials that cannot fit fail."""
    meta = {"etag": '"e"', "x-cos-meta-big": "b" * 1500, "cache-control": "c" * 1000, "expires": "x" * 1200}
    with capture_logs() as events:
        s3.put("m", b"m", meta)
    assert dict(s3.open("m").meta) == {"etag": '"e"', "cache-control": "c" * 1000}
    assert [e["names"] for e in events if "names" in e] == ["expires, x-cos-meta-big"]
    with pytest.raises(StoreError, match="2048-byte limit"):
        s3.put("n", b"n", {"content-type": "t" * 2100})
    assert "n" not in s3.objects


def test_an_object_from_another_tool(s3: Harness) -> None:
    """An object without cosedge's metadata is served with its own S3 headers and ETag."""
    s3.objects["foreign"] = (b"abc", {"content-type": "image/png", "x-amz-meta-owner": "me"}, '"md5"')
    obj = s3.open("foreign")
    assert dict(obj.meta) == {"content-type": "image/png", "x-cos-meta-owner": "me"}
    assert (obj.identity, obj.mtime) == ("md5", 1796122800.0)


def test_missing_and_invalid_keys(s3: Harness) -> None:
    """Missing keys and buckets open as None; keys with empty, . or .. segments are never sent."""
    assert s3.open("nope") is None
    assert s3.run(s3.store.open("nobucket-1", ("k",))) is None
    for segments in [(), ("a", "", "b"), ("..",), ("a/b",)]:
        assert s3.run(s3.store.open(BUCKET, segments)) is None
        with pytest.raises(OSError):
            s3.run(s3.store.writer(BUCKET, segments))
    assert len(s3.fake.requests) == 2


def test_range_produce_streams_with_back_pressure(s3: Harness) -> None:
    """
    A range is written as the store sends it: its part in the first 64 KiB
    from memory at once, the rest with one ranged GET; a paused consumer
    pauses the store's connection.
    """
    data = os.urandom(1_000_000)
    s3.put("big", data)
    obj = s3.open("big")
    consumer = PushConsumer()
    done = obj.produce(consumer, 1000, 900_000)
    assert bytes(consumer.data[: PREFIX - 1000]) == data[1000:PREFIX]  # at once, from memory
    assert s3.fake.requests[-1][2]["range"] == f"bytes={PREFIX}-899999"
    s3.pump()
    assert s3.run(done) == 899_000 and bytes(consumer.data) == data[1000:900_000]
    assert consumer.producer is None
    small = PushConsumer()
    requests = len(s3.fake.requests)
    done = obj.produce(small, 10, 20)  # inside the first 64 KiB: from memory, no request
    assert s3.run(done) == 10 and bytes(small.data) == data[10:20] and small.producer is None
    assert len(s3.fake.requests) == requests


def test_a_replaced_object_fails_the_read(s3: Harness) -> None:
    """Reads of an open object must match its ETag: a replaced object is ShortObject, not mixed bytes."""
    s3.put("k", os.urandom(200_000))
    obj = s3.open("k")
    s3.put("k", os.urandom(200_000))
    with pytest.raises(ShortObject):
        s3.run(obj.read(PREFIX + 1, 10))
    consumer = PushConsumer()
    done = obj.produce(consumer, 0, 200_000)
    with pytest.raises(ShortObject):
        s3.run(done)
    assert consumer.producer is None


def test_range_stream_pauses_the_store_and_stops() -> None:
    """Paused by its consumer, the store's connection is paused (also before it answered); resumed, it resumes."""
    consumer = PushConsumer()
    stream = RangeStream(consumer, 10 * 65536, head=b"h" * 10)
    done = stream.start()
    assert bytes(consumer.data) == b"h" * 10
    consumer.producer.pauseProducing()  # before the store has answered
    transport = StringTransport()
    stream.makeConnection(transport)
    assert transport.producerState == "paused"
    consumer.producer.resumeProducing()
    assert transport.producerState == "producing"
    stream.dataReceived(b"a" * 65536)
    assert consumer.writes == 2 and len(consumer.data) == 65546
    consumer.producer.pauseProducing()
    assert transport.producerState == "paused"
    consumer.producer.stopProducing()
    assert transport.producerState == "stopped"
    stopped = result_of(done)
    assert isinstance(stopped, Failure) and stopped.check(CancelledError)
    short = RangeStream(PushConsumer(), 10)
    ended = short.start()
    short.makeConnection(StringTransport())
    short.dataReceived(b"12345")
    short.connectionLost(Failure(ResponseDone()))
    assert result_of(ended).check(ShortObject)
    extra = PushConsumer()
    whole = RangeStream(extra, 4)
    whole.start()
    whole.makeConnection(StringTransport())
    whole.dataReceived(b"123456")  # never more than the range
    whole.connectionLost(Failure(ResponseDone()))
    assert bytes(extra.data) == b"1234"


@pytest.mark.parametrize("seaweed_order", [False, True])
def test_listing_is_in_key_order_across_pages(tmp_path: Path, seaweed_order: bool) -> None:
    """
    Keys come in byte order page after page, whether the store lists in
    key order or SeaweedFS's folder-first order (``a/…`` before ``a-c``).
    """
    s3 = Harness(tmp_path, seaweed_order=seaweed_order)
    s3.fake.page_size = 2
    keys = ["a", "a/b", "a-c", "a.d/e", "a0", "a-c/z", "b", "a/b/c-d", "a/b-x", "a!/x", "ab/c", "z/z/z"]
    for key in keys:
        s3.put(key, key.encode())
    s3.objects["folder/"] = (b"", {}, '"d"')  # a folder marker is no object
    assert s3.keys() == sorted(keys)
    for limit in (1, 3):
        marker, seen = "", []
        while page := s3.keys("", marker, limit):
            seen += page
            marker = page[-1]
        assert seen == sorted(keys)
    for prefix in ("a", "a/", "a-"):
        assert s3.keys(prefix) == [k for k in sorted(keys) if k.startswith(prefix)]
    for marker in ("a!/x", "a/", "a-c", "a/b/c-d"):
        assert s3.keys("", marker) == [k for k in sorted(keys) if k > marker]
    entry = s3.run(s3.store.list(BUCKET, "b"))[0]
    assert (entry.size, entry.etag) == (1, '"' + hashlib.md5(b"b").hexdigest() + '"')
    assert s3.run(s3.store.usage(BUCKET)) == (len(keys), sum(map(len, keys)))


def test_remove_and_update_meta(s3: Harness) -> None:
    """remove() says whether there was an object; update_meta() copies it onto itself, bytes and mtime kept."""
    s3.put("k", b"bytes", {"etag": '"e"', "cosedge-checked": "1"}, 1445412480.0)
    assert s3.run(s3.store.update_meta(BUCKET, ("k",), {"cosedge-checked": "2"})) is True
    obj = s3.open("k")
    assert dict(obj.meta) == {"etag": '"e"', "cosedge-checked": "2"} and obj.mtime == 1445412480.0
    assert s3.run(obj.read(0, 10)) == b"bytes"
    copy = next(h for m, _, h in s3.fake.requests if "x-amz-copy-source" in h)
    assert copy["x-amz-metadata-directive"] == "REPLACE" and copy["x-amz-copy-source"] == f"/{BUCKET}/k"
    assert s3.run(s3.store.update_meta(BUCKET, ("gone",), {"cosedge-checked": "2"})) is False
    assert s3.run(s3.store.remove(BUCKET, ("k",))) is True
    assert s3.run(s3.store.remove(BUCKET, ("k",))) is False and s3.open("k") is None


def _puts(s3: Harness) -> list[dict[str, str]]:
    """The headers of the object PUTs sent so far (copies and bucket creations left out)."""
    return [h for m, w, h in s3.fake.requests if m == "PUT" and w.partition("/")[2] and "x-amz-copy-source" not in h]


def _write(s3: Harness, key: str, data: bytes, length: int | None = None, **options: Any) -> Any:
    """Open a writer (``length``: as the fill declares it), write ``data``, commit; the writer."""
    writer = s3.run(s3.store.writer(BUCKET, tuple(key.split("/")), length, **options))
    writer.write(data)
    s3.run(writer.commit({"etag": '"e"'}, 1e9))
    return writer


@pytest.mark.parametrize("length", [5, None], ids=["in-memory", "temporary-file"])
def test_a_fill_after_a_miss_puts_if_none_match_and_a_412_is_success(
    s3: Harness, tmp_path: Path, length: int | None
) -> None:
    """
    Several edges over one store: the writer of a key an open just found
    missing PUTs with ``If-None-Match: *``.  Stored by another edge
    meanwhile, the store answers 412: the commit succeeds, the other copy
    stays, and nothing is left behind.
    """
    assert s3.open("race") is None
    _write(s3, "race", b"first", length)
    assert _puts(s3)[-1]["if-none-match"] == "*" and s3.objects["race"][0] == b"first"
    assert s3.open("late") is None
    s3.objects["late"] = (b"other", {}, '"other-etag"')  # another edge's copy, stored since the miss
    with capture_logs() as events:
        _write(s3, "late", b"mine!", length)
    assert _puts(s3)[-1]["if-none-match"] == "*"
    assert s3.objects["late"][0] == b"other" and s3.open("late").etag == '"other-etag"'
    assert [e["key"] for e in events if "stored already" in e.get("log_format", "")] == ["late"]
    assert _tmp_files(tmp_path) == []


def test_a_replacement_puts_plainly(s3: Harness) -> None:
    """
    A writer for a key the store holds (a revalidation opened it), or that
    no open found missing, PUTs without ``If-None-Match`` and replaces the
    copy, as before; a miss is remembered for one writer, for a while.
    """
    s3.put("kept", b"old")  # no open before: a plain PUT
    assert s3.open("kept") is not None
    _write(s3, "kept", b"new")
    assert s3.objects["kept"][0] == b"new"
    assert all("if-none-match" not in h for h in _puts(s3))
    assert s3.open("once") is None
    _write(s3, "once", b"1")
    _write(s3, "once", b"2")  # the miss made one writer exclusive, not the next
    assert [h.get("if-none-match") for h in _puts(s3)[-2:]] == ["*", None] and s3.objects["once"][0] == b"2"
    assert s3.open("old-miss") is None
    s3.clock.advance(MISS_MEMORY + 1)
    _write(s3, "old-miss", b"x")
    assert "if-none-match" not in _puts(s3)[-1]
    assert s3.open("miss-then-hit") is None
    s3.objects["miss-then-hit"] = (b"there", {}, '"t"')
    s3.clock.advance(MISS_CACHE)
    assert s3.open("miss-then-hit") is not None  # found since: the miss is forgotten
    _write(s3, "miss-then-hit", b"replaced")
    assert s3.objects["miss-then-hit"][0] == b"replaced"


def test_exclusive_says_it_whatever_the_store_saw(s3: Harness) -> None:
    """``exclusive=True`` sends ``If-None-Match: *`` without a miss; ``False`` never does."""
    s3.put("x", b"there")
    _write(s3, "x", b"mine", exclusive=True)
    assert _puts(s3)[-1]["if-none-match"] == "*" and s3.objects["x"][0] == b"there"
    assert s3.open("y") is None
    _write(s3, "y", b"plain", exclusive=False)
    assert "if-none-match" not in _puts(s3)[-1]


def test_a_412_to_a_plain_put_and_a_409_conflict(s3: Harness) -> None:
    """
    A conditional PUT that meets S3's 409 ConditionalRequestConflict (another
    conditional write under way) is tried again after a pause, up to three
    times; a 409 or 412 without ``If-None-Match`` fails the commit.
    """
    assert s3.open("c") is None
    writer = s3.run(s3.store.writer(BUCKET, ("c",), 1))
    writer.write(b"c")
    s3.fake.conflicts = 2
    done = writer.commit({}, None)
    for _ in range(100):
        if done.called:
            break
        s3.pump()
        s3.clock.advance(0.1)
    assert s3.run(done) is None and s3.objects["c"][0] == b"c" and s3.fake.conflicts == 0
    assert len(_puts(s3)) == 3
    s3.fake.conflicts = 10
    assert s3.open("d") is None
    writer = s3.run(s3.store.writer(BUCKET, ("d",), 1))
    writer.write(b"d")
    done = writer.commit({}, None)
    for _ in range(200):
        if done.called:
            break
        s3.pump()
        s3.clock.advance(0.1)
    with pytest.raises(StoreError, match="HTTP 409 ConditionalRequestConflict"):
        s3.run(done)
    assert s3.fake.conflicts == 6 and "d" not in s3.objects  # 1 + 3 tries
    s3.fake.fail_next["PUT"] = 412
    with pytest.raises(StoreError, match="PUT e: HTTP 412"):
        _write(s3, "e", b"e")


def test_a_miss_in_a_new_store_bucket_keeps_if_none_match(s3: Harness) -> None:
    """The PUT tried again after creating a missing store bucket still says ``If-None-Match: *``."""
    assert s3.run(s3.store.open("new-1250000000", ("k",))) is None
    writer = s3.run(s3.store.writer("new-1250000000", ("k",), 1))
    writer.write(b"1")
    s3.run(writer.commit({}, None))
    assert [h.get("if-none-match") for h in _puts(s3)] == ["*", "*"]
    assert s3.fake.buckets["new-1250000000"]["k"][0] == b"1"


def test_a_missing_store_bucket_is_created_on_the_first_put(s3: Harness) -> None:
    """With a store bucket per cosedge bucket, the first PUT into a new one creates it and is retried."""
    writer = s3.run(s3.store.writer("new-1250000000", ("k",), 1))
    writer.write(b"1")
    s3.run(writer.commit({}, None))
    assert s3.fake.buckets["new-1250000000"]["k"][0] == b"1"
    assert s3.run(s3.store.list("none-1250000000")) == [] and s3.run(s3.store.usage("none-1250000000")) == (0, 0)


def test_the_configured_store_bucket_still_being_created_at_the_first_put(tmp_path: Path) -> None:
    """
    A fill's PUT that comes before the probe at start has created the
    configured store bucket (Ceph RGW takes seconds over its first bucket)
    creates it and is tried again, rather than failing with NoSuchBucket.
    """
    s3 = Harness(tmp_path, bucket="shared")
    del s3.fake.buckets["shared"]
    assert s3.open("k") is None
    s3.put("k", b"v")
    assert s3.fake.buckets["shared"][f"{BUCKET}/k"][0] == b"v"
    assert [h.get("if-none-match") for h in _puts(s3)] == ["*", "*"]


def test_probe_and_the_start_line(s3: Harness) -> None:
    """probe() fails saying why (an error answer, no connection); the start line says it once."""
    assert s3.run(s3.store.probe()) is None
    s3.fake.fail_next["GET"] = 503
    with pytest.raises(StoreError, match="HTTP 503"):
        s3.run(s3.store.probe())
    refusing = S3Client(_Refusing(), s3.clock, "http://s3.test:8333", "us-east-1", KEYS)
    store = S3Store(refusing, s3.clock, "unused")
    store.describe = "http://s3.test:8333"
    with capture_logs() as events:
        s3.run(store.announce())
    with pytest.raises(StoreError, match="http://s3.test:8333: probe: Connection was refused"):
        s3.run(store.probe())
    warned = [e for e in events if "unreachable" in e.get("log_format", "")]
    assert len(warned) == 1 and KEYS[1] not in repr(events)


class _Refusing:
    def request(self, *args: object) -> Deferred[Any]:
        return fail(ConnectionRefusedError())


def test_sweep_removes_temporary_files(s3: Harness, tmp_path: Path) -> None:
    """Temporary files carry the writing process's id; sweep(owner) removes only that process's."""
    mine = s3.run(s3.store.writer(BUCKET, ("x",), None))
    theirs = tmp_path / "tmp" / f"{os.getpid() + 1}.{BUCKET}.x.part"
    theirs.write_bytes(b"left by a dead worker")
    assert s3.run(s3.store.sweep(owner=os.getpid() + 1)) == 1 and len(_tmp_files(tmp_path)) == 1
    assert s3.run(s3.store.sweep()) == 1 and _tmp_files(tmp_path) == []
    mine.abort()


def _config(storage: str, buckets: str = f'[buckets."{BUCKET}"]\n') -> Any:
    import tomllib

    return parse_config(tomllib.loads(storage + "\n" + buckets))


S3_SECTION = '[storage]\nbackend = "s3"\nendpoint = "http://127.0.0.1:8333"\n'


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ('[storage]\nbackend = "dsk"', "[storage] backend must be 'disk' or 's3', not 'dsk'"),
        ('[storage]\nbackend = "s3"', "[storage] endpoint must be the S3 gateway's http:// or https:// URL"),
        ('[storage]\nbackend = "s3"\nendpoint = "ftp://x"', "[storage] endpoint must be"),
        (S3_SECTION + 'addressing = "vhost"', "[storage] addressing must be 'path' or 'virtual'"),
        (S3_SECTION + 'bucket = "Bad_Name"', "[storage] bucket 'Bad_Name' is not a valid S3 bucket name"),
        (S3_SECTION + 'access_key_id = "k"', "[storage] access_key_id and secret_access_key go together"),
        (S3_SECTION + "timeout = 0", "[storage] timeout must be a positive number of seconds"),
        (S3_SECTION + "cache_validity = -1", "[storage] cache_validity must be a number of seconds, 0 or more"),
        (S3_SECTION + "cache_bytes = 1.5", "[storage] cache_bytes must be a number of bytes, 0 or more"),
        (S3_SECTION + "multipart_threshold = 1024", "[storage] multipart_threshold must be between 5 MiB"),
        (S3_SECTION + "multipart_part_size = 6442450944", "[storage] multipart_part_size must be between 5 MiB"),
        (S3_SECTION + 'multipart_part_size = "16M"', "[storage] multipart_part_size must be a number of bytes"),
        (S3_SECTION + "colour = 1", "[storage] has unknown setting(s) colour"),
        (S3_SECTION, "[storage] backend = 's3' needs credentials"),
        (S3_SECTION + 'credentials_file = "/nonexistent"', "[storage] credentials_file '/nonexistent' cannot be"),
    ],
)
def test_configuration_errors_name_the_field(section: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_config(_config(section), environ={})
    assert message in str(info.value)


def test_credentials_from_a_file_or_the_environment(tmp_path: Path) -> None:
    """Keys come from the section, an INI file (with or without a section), or AWS_* variables; never shown."""
    plain = tmp_path / "s3.ini"
    plain.write_text("access_key_id = FILEKEY\nsecret_access_key = file-secret\n")
    config = _config(S3_SECTION + f'credentials_file = "{plain}"')
    assert check_config(config, environ={}).credentials_file == str(plain)
    aws = tmp_path / "aws.ini"
    aws.write_text("[default]\naws_access_key_id = A\naws_secret_access_key = B\n")
    check_config(_config(S3_SECTION + f'credentials_file = "{aws}"'), environ={})
    check_config(_config(S3_SECTION), environ={"AWS_ACCESS_KEY_ID": "E", "AWS_SECRET_ACCESS_KEY": "F"})
    inline = check_config(_config(S3_SECTION + 'access_key_id = "K"\nsecret_access_key = "hidden-secret"'))
    assert "hidden-secret" not in repr(inline)
    long_name = "a" * 50 + "-" + "1" * 20
    with pytest.raises(ConfigError, match=rf"\[buckets.{long_name}\] is not a valid S3 bucket name"):
        check_config(
            _config(S3_SECTION, f'[buckets."{long_name}"]\n'),
            environ={"AWS_ACCESS_KEY_ID": "E", "AWS_SECRET_ACCESS_KEY": "F"},
        )


def test_the_service_builds_the_store_the_section_asks_for(tmp_path: Path) -> None:
    """``backend = "s3"`` gives the daemon an S3 store (with its start line); the disk stays the default."""
    section = S3_SECTION + 'access_key_id = "K"\nsecret_access_key = "S"\nbucket = "edge"\n'
    config = _config(section + f'[server]\ndata_dir = "{tmp_path}"\n')
    reactor = MemoryReactorClock()
    store = open_s3_store(config, reactor, lambda f: Deferred())
    assert isinstance(store, S3Store) and store.tmp_dir == str(tmp_path / ".cosedge" / "s3-tmp")
    assert len(reactor.whenRunningHooks) == 1 and reactor.triggers["before"]["shutdown"]
    assert open_s3_store(_config(""), reactor, lambda f: Deferred()) is None
    service = build_service(config, reactor, _agent=RequestTraversalAgent(Resource()))
    assert isinstance(service.store, S3Store)


def test_the_store_endpoint_is_made_once_per_host() -> None:
    """One endpoint per scheme, host and port, reused by every request (a new one costs a host-name encoding)."""
    from twisted.internet.endpoints import HostnameEndpoint
    from twisted.web.client import URI

    from cosedge.storage.s3 import _Endpoints

    endpoints = _Endpoints(MemoryReactorClock(), 5.0)
    first = endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8333/b/k"))
    assert isinstance(first, HostnameEndpoint)
    assert endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8333/b/other")) is first
    assert endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8334/b/k")) is not first
    secure = endpoints.endpointForURI(URI.fromBytes(b"https://s3.example.com/b/k"))
    assert not isinstance(secure, HostnameEndpoint)  # wrapped in TLS
    assert endpoints.endpointForURI(URI.fromBytes(b"https://s3.example.com/b/k2")) is secure


def test_a_miss_storm_is_not_a_storm_of_store_requests(s3: Harness) -> None:
    """
    For :data:`MISS_CACHE` after a miss the key's opens are answered from
    memory; another edge's copy is seen after it, this store's own write at once.
    """
    assert s3.open("storm") is None
    asked = len(s3.fake.requests)
    assert all(s3.open("storm") is None for _ in range(100))
    assert len(s3.fake.requests) == asked
    s3.objects["storm"] = (b"from another edge", {}, '"o"')
    assert s3.open("storm") is None  # not seen yet
    s3.clock.advance(MISS_CACHE)
    assert s3.open("storm").size == len(b"from another edge")
    assert s3.open("mine") is None
    _write(s3, "mine", b"my own fill")
    assert s3.open("mine").size == len(b"my own fill")  # this store's own write: at once


def test_a_miss_answered_after_this_stores_own_write_is_not_remembered(s3: Harness) -> None:
    """
    An open that began before this store stored the key and was answered
    404 after (a miss storm during a fill) must not hide the new copy: the
    fill is visible to the very next request.
    """
    where = s3.store._where(BUCKET, ("raced",))
    began = s3.store._generation
    _write(s3, "raced", b"stored meanwhile")
    assert s3.store._remember(None, where, began) is None  # the late 404 of the open that began before
    assert s3.open("raced").size == len(b"stored meanwhile")
    assert s3.open("gone") is None
    began = s3.store._generation
    s3.store._remember(None, s3.store._where(BUCKET, ("gone",)), began)  # no store since: remembered
    asked = len(s3.fake.requests)
    assert s3.open("gone") is None and len(s3.fake.requests) == asked


def test_every_store_request_is_observed_by_operation_and_outcome(s3: Harness) -> None:
    """The metrics' source: each request's operation, outcome (status class) and seconds to its answer."""
    seen: list[tuple[str, str, float]] = []
    s3.store.observe_requests(lambda *request: seen.append(request))
    assert s3.open("absent") is None
    _write(s3, "present", b"data")
    s3.keys()
    s3.run(s3.store.remove(BUCKET, ("present",)))
    operations = [(operation, outcome) for operation, outcome, _ in seen]
    assert ("GET", "4xx") in operations and ("PUT", "2xx") in operations and ("LIST", "2xx") in operations
    assert ("HEAD", "2xx") in operations and ("DELETE", "2xx") in operations
    assert all(seconds >= 0 for *_, seconds in seen)


def test_a_small_object_is_answered_again_without_the_store_for_its_validity(tmp_path: Path) -> None:
    """
    ``cache_validity``: a small object opened is opened again from memory
    until the validity has passed; this store's own write, purge or
    metadata change of it is seen at once; another edge's after the validity.
    Objects larger than the first read are never kept.
    """
    s3 = Harness(tmp_path, cache=1.0)
    s3.put("hot", b"v1")
    assert _read(s3, "hot") == b"v1"
    asked = len(s3.fake.requests)
    assert all(_read(s3, "hot") == b"v1" for _ in range(50))
    assert len(s3.fake.requests) == asked  # from memory
    s3.objects["hot"] = (b"v2 from another edge", {}, '"other"')
    assert _read(s3, "hot") == b"v1"
    s3.clock.advance(1.0)
    assert _read(s3, "hot") == b"v2 from another edge"
    s3.put("hot", b"v3")  # this store's own write
    assert _read(s3, "hot") == b"v3"
    s3.run(s3.store.update_meta(BUCKET, ("hot",), {"cosedge-checked": "5"}))
    assert s3.open("hot").meta["cosedge-checked"] == "5"
    assert s3.run(s3.store.remove(BUCKET, ("hot",)))
    assert s3.open("hot") is None
    s3.put("big", os.urandom(PREFIX + 1))
    s3.open("big")
    asked = len(s3.fake.requests)
    s3.open("big")
    assert len(s3.fake.requests) == asked + 1  # not kept: asked again


def test_recent_objects_are_bounded_by_bytes() -> None:
    """The least recently used objects are dropped past ``cache_bytes``; a validity of 0 keeps none."""
    clock = Clock()
    recent = RecentObjects(clock, 10.0, 100)

    def obj(size: int) -> Any:
        from cosedge.storage.s3_objects import S3Object

        return S3Object(lambda *a: fail(AssertionError("no read")), size, 0.0, '"e"', {}, b"x" * size)

    recent.put(("b", "a"), obj(40))
    recent.put(("b", "b"), obj(40))
    assert recent.get(("b", "a")) is not None  # a is now the most recent
    recent.put(("b", "c"), obj(40))  # 120 bytes: b goes
    assert recent.get(("b", "b")) is None and recent.get(("b", "a")) is not None and len(recent) == 2
    recent.put(("b", "huge"), obj(101))
    assert recent.get(("b", "huge")) is None
    off = RecentObjects(clock, 0.0, 100)
    off.put(("b", "a"), obj(1))
    assert len(off) == 0


def _read(s3: Harness, key: str) -> bytes:
    obj = s3.open(key)
    consumer = PushConsumer()
    s3.run(obj.produce(consumer, 0, obj.size))
    obj.close()
    return bytes(consumer.data)


def test_an_error_answer_is_read_whatever_whitespace_comes_first() -> None:
    """S3 may keep a slow request's connection alive with whitespace before its XML: the code is still read."""
    from twisted.web.http_headers import Headers

    from cosedge.storage.s3_http import Reply

    error = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code><Message>Try again</Message></Error>'
    )
    for body in (error, b"\n  \n" + error, b"   "):
        failure = Reply(500, Headers(), body).failure("PUT cosedge/k")
        expected = (
            ("InternalError", "PUT cosedge/k: HTTP 500 InternalError Try again")
            if body.strip()
            else ("", "PUT cosedge/k: HTTP 500")
        )
        assert (failure.code, str(failure)) == expected
