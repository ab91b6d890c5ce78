"""
End-to-end: the core behaviour of a real ``twistd cosedge`` over each
store (issue 13): the disk, SeaweedFS and Ceph RGW, one suite parametrised
by backend.  Each S3 engine is real, on 127.0.0.1, started once for the
session by :mod:`tests.e2e.engines` (skipped, with the reason, when it is not
installed); what a test expects of the store is checked in the store itself
(the file, or a signed GET of the engine), not only in cosedge's answers.

Also here: several edges filling one key at once over a real engine
(``If-None-Match: *``): exactly one PUT stores, the others succeed without.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import attrs
import pytest

from .conftest import BUCKET, FAST_FILL, Daemon, Reply, Stream, _daemons_in_test, at_once, wait_for
from .engines import Engine, api_section, cos_client, shared_engine, storage_section
from .origin import BIG_SIZE, LAST_MODIFIED, MisbehavingOrigin, body_for, content_type_for, etag_for

pytestmark = pytest.mark.e2e

#: The store bucket of the daemons here (each cosedge bucket a prefix in it).
STORE_BUCKET = "cosedge-engines"
#: A bucket whose copies are revalidated with the origin after a second.
FRESH_BUCKET = "fresh-1250000000"
#: A bucket with one mirror rule for every key.
MIRROR_BUCKET = "mirror-1250000000"
#: Seconds until its copies are stale: the check time is kept in whole seconds (up to 0.5 s late).
STALE_AFTER = 2.0
BACKENDS = ["disk", "seaweedfs", "rgw"]
#: The S3 daemons' multipart threshold and part size: S3's smallest (a ``big/`` object is 3 parts).
MULTIPART = 5 * 1024 * 1024


@pytest.fixture(scope="session")
def seaweedfs_engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return shared_engine("seaweedfs", request, tmp_path_factory)


@pytest.fixture(scope="session")
def rgw_engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return shared_engine("rgw", request, tmp_path_factory)


@attrs.define(eq=False)
class Backend:
    """A daemon over one store, and what that store holds."""

    name: str
    daemon: Daemon
    engine: Engine | None = None

    def stored(self, key: str, bucket: str = BUCKET) -> bytes | None:
        """The bytes the store holds under ``key`` of ``bucket`` (None: nothing)."""
        if self.engine is None:
            path = self.daemon.data_dir / bucket / key
            return path.read_bytes() if path.exists() else None
        return self.engine.get(STORE_BUCKET, f"{bucket}/{key}")

    @property
    def tmp_dir(self) -> Path:
        return self.daemon.data_dir / ".cosedge" / ("tmp" if self.engine is None else "s3-tmp")

    def tmp_files(self) -> list[Path]:
        return sorted(self.tmp_dir.iterdir()) if self.tmp_dir.exists() else []

    def key(self, kind: str, name: str) -> str:
        """A key of this backend's own (the origin counts GETs by path, across backends)."""
        return f"{kind}/{self.name}/{name}"


@pytest.fixture(scope="module", params=BACKENDS)
def _backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, origin: MisbehavingOrigin
) -> Iterator[Backend]:
    name = request.param
    engine: Engine | None = None if name == "disk" else request.getfixturevalue(f"{name}_engine")
    root = tmp_path_factory.mktemp(f"cosedge-{name}")
    extra = api_section()
    extra += f'\n[buckets."{FRESH_BUCKET}"]\norigin = "{origin.netloc}"\norigin_pull = true\nrevalidate_after = 1\n'
    extra += f'\n[[buckets."{MIRROR_BUCKET}".rules]]\npriority = 1\ntype = "mirror"\nhosts = ["{origin.netloc}"]\n'
    if engine is not None:
        credentials = root / "s3.ini"  # keys from a file: the configuration holds no secret
        credentials.write_text(f"access_key_id = {engine.key_id}\nsecret_access_key = {engine.secret}\n")
        extra += storage_section(
            engine,
            bucket=STORE_BUCKET,
            credentials_file=str(credentials),
            multipart_threshold=MULTIPART,
            multipart_part_size=MULTIPART,
        )
    daemon = Daemon(root, origin.netloc, dict(FAST_FILL), extra_config=extra)
    try:
        daemon.start()
        yield Backend(name, daemon, engine)
    finally:
        daemon.stop()


@pytest.fixture
def backend(_backend: Backend) -> Iterator[Backend]:
    """The module's daemon over one store (restarted if a test left it down); no error and no secret logged."""
    daemon = _backend.daemon
    if daemon.proc is None or daemon.proc.poll() is not None:
        daemon.proc = None
        daemon.start()
    _daemons_in_test.append(daemon)
    since = len(daemon.log())
    yield _backend
    assert daemon.problems(since) == [], "the daemon logged an unexpected error"
    if _backend.engine is not None:
        assert _backend.engine.secret not in daemon.log() + daemon.access_log.read_text(), "a secret was logged"


def assert_redirect(reply: Reply, origin: MisbehavingOrigin, key: str) -> None:
    assert reply.status == 302, (reply.status, reply.body[:300])
    assert reply.headers.get_all("Location") == [f"http://{origin.netloc}/{key}"]
    assert reply.header("Cache-Control") == "no-store"


def fill(backend: Backend, origin: MisbehavingOrigin, key: str, timeout: float = 10) -> None:
    """A miss (302), and its background fill stored."""
    assert_redirect(backend.daemon.request(f"/{key}"), origin, key)
    assert backend.daemon.fill_outcome(key, timeout) == "stored"


def assert_served(backend: Backend, key: str, path: str | None = None) -> Reply:
    """A hit with exactly the origin's bytes and headers (``path``: the origin's spelling of the key)."""
    path = path or f"/{key}"
    reply = backend.daemon.request(f"/{key}")
    expected = body_for(path)
    assert reply.status == 200, (reply.status, reply.body[:300])
    assert reply.header("Content-Length") == str(len(expected)) and reply.body == expected
    assert reply.header("Content-Type") == content_type_for(path)
    return reply


def test_a_miss_redirects_and_the_fill_is_then_a_hit(backend: Backend, origin: MisbehavingOrigin) -> None:
    """
    A miss is a 302 to the origin and one background fill; the store then
    holds the origin's bytes, and hits (GET and HEAD) have its headers; the
    origin was asked once and no temporary file is left.
    """
    key = backend.key("ok", "hit.bin")
    fill(backend, origin, key)
    assert backend.stored(key) == body_for(f"/{key}")
    reply = assert_served(backend, key)
    assert reply.header("ETag") == etag_for(f"/{key}") and reply.header("Last-Modified") == LAST_MODIFIED
    assert reply.header("Cache-Control") == "max-age=60" and reply.header("x-cos-meta-origin") == "e2e"
    head = backend.daemon.request(f"/{key}", method="HEAD")
    assert (head.status, head.header("Content-Length"), head.header("ETag")) == (
        200,
        str(len(reply.body)),
        reply.header("ETag"),
    )
    assert origin.gets(f"/{key}") == 1
    assert backend.tmp_files() == []


def test_concurrent_misses_make_one_origin_get(backend: Backend, origin: MisbehavingOrigin) -> None:
    """50 clients missing one key at the same moment all get the 302; the origin is asked once."""
    key = backend.key("slow", "concurrent.bin")
    try:
        replies = at_once(backend.daemon, f"/{key}", 50)
    finally:
        origin.release(f"/{key}")
    for reply in replies:
        assert_redirect(reply, origin, key)
    assert backend.daemon.fill_outcome(key, timeout=30) == "stored"
    assert origin.gets(f"/{key}") == 1
    assert_served(backend, key)


def test_ranges(backend: Backend, origin: MisbehavingOrigin) -> None:
    """
    Ranges of a 1 MiB object, past its first 64 KiB too (an S3 store reads
    them with ranged GETs): one range, a suffix, several (multipart), and an
    unsatisfiable one (416).
    """
    key = backend.key("slow", "ranges.bin")
    origin.release(f"/{key}")
    fill(backend, origin, key, timeout=30)
    data = body_for(f"/{key}")
    daemon = backend.daemon
    reply = daemon.request(f"/{key}", headers={"Range": "bytes=100-199"})
    assert (reply.status, reply.body) == (206, data[100:200])
    assert reply.header("Content-Range") == f"bytes 100-199/{len(data)}"
    reply = daemon.request(f"/{key}", headers={"Range": "bytes=-10"})
    assert (reply.status, reply.body) == (206, data[-10:])
    reply = daemon.request(f"/{key}", headers={"Range": "bytes=500000-999999"})
    assert (reply.status, reply.body) == (206, data[500000:1000000])
    reply = daemon.request(f"/{key}", headers={"Range": "bytes=0-9,1000000-1000099"})
    assert reply.status == 206 and (reply.header("Content-Type") or "").startswith("multipart/byteranges")
    assert data[:10] in reply.body and data[1000000:1000100] in reply.body
    reply = daemon.request(f"/{key}", headers={"Range": f"bytes={len(data)}-"})
    assert (reply.status, reply.error_code) == (416, "InvalidRange")
    assert reply.header("Content-Range") == f"bytes */{len(data)}"
    assert daemon.request(f"/{key}").body == data
    assert origin.gets(f"/{key}") == 1


def test_conditionals(backend: Backend, origin: MisbehavingOrigin) -> None:
    """The stored ETag and Last-Modified answer conditionals: 304, 412, and If-Range, without the origin."""
    key = backend.key("ok", "conditional.bin")
    fill(backend, origin, key)
    daemon, etag, data = backend.daemon, etag_for(f"/{key}"), body_for(f"/{key}")
    for headers in ({"If-None-Match": etag}, {"If-Modified-Since": LAST_MODIFIED}):
        reply = daemon.request(f"/{key}", headers=headers)
        assert (reply.status, reply.body, reply.header("ETag")) == (304, b"", etag), headers
    reply = daemon.request(f"/{key}", headers={"If-None-Match": '"another"'})
    assert (reply.status, reply.body) == (200, data)
    reply = daemon.request(f"/{key}", headers={"If-Match": '"another"'})
    assert (reply.status, reply.error_code) == (412, "PreconditionFailed")
    reply = daemon.request(f"/{key}", headers={"If-Range": etag, "Range": "bytes=0-9"})
    assert (reply.status, reply.body) == (206, data[:10])
    reply = daemon.request(f"/{key}", headers={"If-Range": '"another"', "Range": "bytes=0-9"})
    assert (reply.status, reply.body) == (200, data)
    assert origin.gets(f"/{key}") == 1


def test_an_empty_object_and_a_key_to_encode(backend: Backend, origin: MisbehavingOrigin) -> None:
    """A 0-byte object and a key with non-ASCII letters, spaces and ``+`` are stored and served."""
    key = backend.key("empty", "zero.txt")
    fill(backend, origin, key)
    assert backend.stored(key) == b""
    reply = backend.daemon.request(f"/{key}")
    assert (reply.status, reply.header("Content-Length"), reply.body) == (200, "0", b"")
    encoded = backend.key("ok", "%E5%9B%BE%E7%89%87/a%20b+c.jpg")
    decoded = backend.key("ok", "图片/a b+c.jpg")
    assert_redirect(backend.daemon.request(f"/{encoded}"), origin, encoded)
    assert backend.daemon.fill_outcome(decoded) == "stored"
    assert backend.stored(decoded) == body_for(f"/{encoded}")
    assert_served(backend, encoded)


@pytest.mark.parametrize(("kind", "reason"), [("truncated", "truncated"), ("chunked-cut", "truncated")])
def test_a_fill_cut_mid_body_stores_nothing(
    backend: Backend, origin: MisbehavingOrigin, kind: str, reason: str
) -> None:
    """An origin that closes mid-body (with a length, or chunked): nothing stored, nothing left, a 302 again."""
    key = backend.key(kind, "cut.bin")
    assert_redirect(backend.daemon.request(f"/{key}"), origin, key)
    assert backend.daemon.fill_outcome(key) == reason
    assert backend.stored(key) is None
    assert backend.tmp_files() == []
    assert_redirect(backend.daemon.request(f"/{key}"), origin, key)


def test_sigkill_mid_fill_leaves_nothing_visible(backend: Backend, origin: MisbehavingOrigin) -> None:
    """
    A daemon killed mid-fill leaves no object in the store, only its
    temporary file, swept at the next start; the next miss fills the key.
    """
    key = backend.key("slow", "killed.bin")
    daemon = backend.daemon
    assert_redirect(daemon.request(f"/{key}"), origin, key)
    wait_for(lambda: any(p.stat().st_size >= 65536 for p in backend.tmp_files()), 10, "a partial fill")
    daemon.kill()
    origin.release(f"/{key}")
    assert backend.stored(key) is None
    assert len(backend.tmp_files()) == 1
    daemon.start()
    assert backend.tmp_files() == []
    assert backend.stored(key) is None
    fill(backend, origin, key, timeout=30)
    assert origin.gets(f"/{key}") == 2
    assert_served(backend, key)


def test_a_late_mirror_client_reads_the_fill_as_it_is_written(backend: Backend, origin: MisbehavingOrigin) -> None:
    """
    Mirror mode on every store: a client that comes after the origin has
    answered reads the fill's temporary file (the disk's, or the S3 spool)
    as it grows, then every byte; the object is stored once, nothing is left.
    """
    key = backend.key("slow", "mirror-late.bin")
    host = f"{MIRROR_BUCKET}.file.myqcloud.com"
    early = Stream(backend.daemon, host, f"/{key}")
    assert early.read(lambda: len(early.body) >= 65536, 10), early.data[:300]
    late = Stream(backend.daemon, host, f"/{key}")
    assert late.read(lambda: len(late.body) >= 65536, 10), "the late client waited for the store"
    assert b"x-cos-mirror: origin" in late.head.lower()
    origin.release(f"/{key}")
    assert early.whole() == late.whole() == body_for(f"/{key}")
    assert backend.daemon.fill_outcome(key, bucket=MIRROR_BUCKET) == "stored"
    assert backend.stored(key, MIRROR_BUCKET) == body_for(f"/{key}")
    assert origin.gets(f"/{key}") == 1
    assert backend.tmp_files() == [] and not list((backend.daemon.data_dir / ".cosedge" / "partial").iterdir())


def _uploads(engine: Engine) -> list[str]:
    """The keys of the multipart uploads under way in the store bucket."""
    status, _, body = engine.request("GET", STORE_BUCKET, query="uploads")
    assert status == 200, body[:300]
    return re.findall(r"<Key>([^<]*)</Key>", body.decode())


def test_a_large_object_is_stored_in_parts(backend: Backend, origin: MisbehavingOrigin) -> None:
    """
    An object past ``multipart_threshold`` (5 MiB here) is stored on an S3
    engine with a multipart upload (3 parts: the engine's ETag ends in
    ``-3``), served whole, and leaves no upload behind.
    """
    key = backend.key("big", "video.mp4")
    fill(backend, origin, key, timeout=60)
    assert backend.stored(key) == body_for(f"/{key}") and len(body_for(f"/{key}")) == BIG_SIZE
    assert_served(backend, key)
    assert backend.tmp_files() == []
    if backend.engine is not None:
        status, headers, _ = backend.engine.request("HEAD", STORE_BUCKET, f"{BUCKET}/{key}")
        assert status == 200 and headers["etag"].strip('"').endswith("-3"), headers
        assert _uploads(backend.engine) == []


def test_what_a_crash_left_mid_store_is_cleared_at_the_next_start(backend: Backend) -> None:
    """
    A daemon killed while storing a large object leaves its temporary file
    (on S3, also the multipart upload, named in a journal beside it): the
    next start removes the file and aborts the upload in the engine.
    """
    daemon = backend.daemon
    if backend.engine is None:
        daemon.kill()
        backend.tmp_dir.mkdir(parents=True, exist_ok=True)
        (backend.tmp_dir / f"999999.{BUCKET}.crashed.part").write_bytes(b"x" * MULTIPART)
        daemon.start()
        wait_for(lambda: backend.tmp_files() == [], 5, "the temporary file swept")
        return
    engine = backend.engine
    key = f"{BUCKET}/" + backend.key("big", "crashed.bin")
    status, _, body = engine.request("POST", STORE_BUCKET, key, query="uploads")
    found = re.search(r"<UploadId>([^<]+)</UploadId>", body.decode())
    assert status == 200 and found is not None, body[:300]
    upload_id = found.group(1)
    part = f"partNumber=1&uploadId={quote(upload_id, safe='-_.~')}"
    assert engine.request("PUT", STORE_BUCKET, key, query=part, body=b"x" * MULTIPART)[0] == 200
    assert key in _uploads(engine)
    daemon.kill()
    backend.tmp_dir.mkdir(parents=True, exist_ok=True)
    journal = {"bucket": STORE_BUCKET, "key": key, "upload_id": upload_id}
    (backend.tmp_dir / f"999999.{BUCKET}.crashed.upload").write_text(json.dumps(journal))
    (backend.tmp_dir / f"999999.{BUCKET}.crashed.part").write_bytes(b"x" * MULTIPART)
    daemon.start()
    wait_for(lambda: key not in _uploads(engine), 15, "the upload aborted")
    wait_for(lambda: backend.tmp_files() == [], 5, "the temporary files swept")


def test_a_purge_removes_the_object(backend: Backend, origin: MisbehavingOrigin) -> None:
    """The COS API's DELETE (a purge) removes the object from the store; the next request is a miss again."""
    key = backend.key("ok", "purged.bin")
    fill(backend, origin, key)
    cos_client(backend.daemon).delete_object(Bucket=BUCKET, Key=key)
    assert backend.stored(key) is None
    assert_redirect(backend.daemon.request(f"/{key}"), origin, key)


def test_a_stale_copy_is_revalidated_and_replaced(backend: Backend, origin: MisbehavingOrigin) -> None:
    """
    Past ``revalidate_after`` a hit serves the copy and asks the origin with
    its validators: a 304 keeps it (its check time rewritten in the store),
    a 200 replaces it in the store (a fill of a stored key is no
    ``If-None-Match: *`` PUT: it is not refused as "already stored").
    """
    key = backend.key("mut", "doc.bin")
    host = f"{FRESH_BUCKET}.file.myqcloud.com"
    daemon, path = backend.daemon, f"/{key}"
    stored_line = f"fill {FRESH_BUCKET}/{key} stored"
    assert daemon.request(path, host=host).status == 302
    wait_for(lambda: stored_line in daemon.log(), 10, "the first fill")
    first = body_for(path) + b"version 0"
    assert backend.stored(key, FRESH_BUCKET) == first
    time.sleep(STALE_AFTER)
    assert daemon.request(path, host=host).body == first
    daemon.wait_for_log(rf"fill {FRESH_BUCKET}/{re.escape(key)} not modified")
    assert backend.stored(key, FRESH_BUCKET) == first
    origin.change(path)
    time.sleep(STALE_AFTER)
    assert daemon.request(path, host=host).body == first  # served stale while the copy is replaced
    wait_for(lambda: daemon.log().count(stored_line) == 2, 10, "the replacing fill")
    second = body_for(path) + b"version 1"
    assert backend.stored(key, FRESH_BUCKET) == second
    reply = daemon.request(path, host=host)
    assert (reply.status, reply.body) == (200, second)
    assert "stored already" not in daemon.log()
    assert origin.gets(path) == 3


def test_the_cos_api_lists_in_key_order(backend: Backend, origin: MisbehavingOrigin) -> None:
    """The COS API's listing comes in key order page after page, whatever order the store lists in."""
    base = backend.key("ok", "list/")
    keys = [base + name for name in ("a/b", "a-c", "a.d/e", "a0", "b")]  # (no "a" and "a/b" on a disk)
    for key in keys:
        fill(backend, origin, key)
    client = cos_client(backend.daemon)
    listed: list[str] = []
    marker = ""
    for _ in range(len(keys) + 1):
        page = client.list_objects(Bucket=BUCKET, Prefix=base, Marker=marker, MaxKeys=2)
        listed += [c["Key"] for c in page.get("Contents", [])]
        if page["IsTruncated"] != "true":
            break
        marker = page["NextMarker"] if "NextMarker" in page else listed[-1]
    assert listed == sorted(keys)


# -- several edges over one store --

RACE_WRITERS = 8
RACE_SIZE = 1024 * 1024


@pytest.mark.parametrize("kind", ["seaweedfs", "rgw"])
def test_concurrent_fills_of_one_key_store_one_whole_copy(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str
) -> None:
    """
    8 stores (8 edges) find one key missing and commit 1 MiB bodies of their
    own at the same moment: their PUTs say ``If-None-Match: *``, so exactly
    one is stored (200) and the others are refused (412); every commit
    succeeds, the object is one whole body, and no temporary file is left.
    """
    engine: Engine = request.getfixturevalue(f"{kind}_engine")
    key = f"race/{kind}.bin"
    assert engine.put(STORE_BUCKET, "race-probe", b"ok") == 200  # the store bucket exists
    script = Path(__file__).with_name("s3_race.py")
    environ = {**os.environ, "AWS_ACCESS_KEY_ID": engine.key_id, "AWS_SECRET_ACCESS_KEY": engine.secret}
    done = subprocess.run(
        [sys.executable, str(script), engine.endpoint, STORE_BUCKET, key, str(RACE_WRITERS), str(RACE_SIZE)]
        + [str(tmp_path)],
        env=environ,
        capture_output=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    report = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert report["found"] == [False] * RACE_WRITERS
    assert report["outcomes"] == ["stored"] * RACE_WRITERS
    assert sorted(report["statuses"]) == [200] + [412] * (RACE_WRITERS - 1)
    stored = engine.get(STORE_BUCKET, f"race/{key}")
    assert stored is not None and len(stored) == RACE_SIZE
    assert hashlib.md5(stored).hexdigest() in report["md5"]
    assert report["left"] == []
