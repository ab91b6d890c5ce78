"""
End-to-end: the real ``twistd -n --pidfile= cosedge`` daemon against a real
misbehaving origin, over loopback sockets.

Run with ``.venv/bin/python -m pytest tests/e2e -q`` (or ``-m e2e``).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from .conftest import BUCKET, DEAD_BUCKET, HOST, OFF_BUCKET, Daemon, MakeDaemon, Reply, at_once, tmp_files, wait_for
from .origin import LAST_MODIFIED, MisbehavingOrigin, body_for, content_type_for, etag_for

pytestmark = pytest.mark.e2e


def assert_redirect(reply: Reply, origin: MisbehavingOrigin, key: str) -> None:
    assert reply.status == 302, (reply.status, reply.body)
    assert reply.headers.get_all("Location") == [f"http://{origin.netloc}/{key}"]
    assert reply.header("Cache-Control") == "no-store"
    assert reply.header("x-cos-request-id")


def assert_served(daemon: Daemon, key: str) -> Reply:
    """The object is a hit whose bytes and type are exactly the origin's."""
    reply = daemon.request(f"/{key}")
    expected = body_for(f"/{key}")
    assert reply.status == 200, (reply.status, reply.body[:300])
    assert reply.header("Content-Length") == str(len(expected))
    assert reply.body == expected
    assert reply.header("Content-Type") == content_type_for(f"/{key}")
    return reply


def test_seed_example_redirects_then_serves_the_copy(edge: Daemon, origin: MisbehavingOrigin) -> None:
    """
    The seed document's walk-through: the first GET for a missing /1.jpg is
    sent to the origin with a 302 and the file is copied into the bucket
    root in the background; the second GET is served from the bucket with
    the origin's exact bytes and Content-Type, and the origin was asked once.
    """
    reply = edge.request("/1.jpg")
    assert_redirect(reply, origin, "1.jpg")

    stored = edge.object_path("1.jpg")
    wait_for(stored.exists, 10, f"{stored} to appear")
    assert stored.read_bytes() == body_for("/1.jpg")

    reply = assert_served(edge, "1.jpg")
    assert reply.header("Content-Type") == "image/jpeg"
    assert reply.header("Cache-Control") == "max-age=60"
    assert reply.header("x-cos-meta-origin") == "e2e"
    assert reply.header("x-cos-request-id")
    assert origin.gets("/1.jpg") == 1
    assert tmp_files(edge) == []

    access = edge.access_log.read_text()
    assert '"GET /1.jpg HTTP/1.1" 302' in access
    assert '"GET /1.jpg HTTP/1.1" 200' in access


def test_concurrent_misses_make_one_origin_request(edge: Daemon, origin: MisbehavingOrigin) -> None:
    """
    200 clients asking for the same missing object at the same moment all
    get the 302, and the origin is asked for it exactly once.
    """
    key = "slow/concurrent.bin"
    try:
        replies = at_once(edge, f"/{key}", 200)
    finally:
        origin.release(f"/{key}")  # the fill is held in flight until every client is answered
    for reply in replies:
        assert_redirect(reply, origin, key)
    assert edge.fill_outcome(key) == "stored"
    assert origin.gets(f"/{key}") == 1
    assert_served(edge, key)


FAULTS = [
    pytest.param("truncated/f1.bin", "truncated", id="F1-short-body"),
    pytest.param("chunked-cut/f2.bin", "truncated", id="F2-chunked-without-end"),
    pytest.param("unframed/f3.bin", "unframed", id="F3-no-length-no-chunking"),
    pytest.param("cut-headers/h1.bin", "bad-response", id="headers-cut-short"),
    pytest.param("garbage/h2.bin", "bad-response", id="not-http"),
    pytest.param("stall-headers/f4a.bin", "timeout", id="F4-stall-in-headers"),
    pytest.param("stall-after-headers/f4b.bin", "idle-timeout", id="F4-stall-after-headers"),
    pytest.param("stall-mid-body/f4c.bin", "idle-timeout", id="F4-stall-mid-body"),
    pytest.param("status/404/f5a.bin", "http-404", id="F5-404"),
    pytest.param("status/403/f5b.bin", "http-403", id="F5-403"),
    pytest.param("status/500/f5c.bin", "http-500", id="F5-500"),
    pytest.param("status/503/f5d.bin", "http-503", id="F5-503"),
    pytest.param("status/206/f5e.bin", "http-206", id="F5-206"),
    pytest.param("status/302/f6a.bin", "http-302", id="F6-302-to-loopback"),
    pytest.param("status/301/f6b.bin", "http-301", id="F6-301"),
]


@pytest.mark.parametrize(("key", "reason"), FAULTS)
def test_a_bad_origin_answer_stores_nothing(edge: Daemon, origin: MisbehavingOrigin, key: str, reason: str) -> None:
    """
    When the origin's answer is not provably the whole object (cut short,
    unframed, stalled, an error or a redirect), nothing appears under the
    key, no temporary file is left, the failure is logged with its reason,
    and the next request is again an ordinary 302 to the origin.
    """
    assert_redirect(edge.request(f"/{key}"), origin, key)
    assert edge.fill_outcome(key) == reason
    assert not edge.object_path(key).exists()
    assert tmp_files(edge) == []
    assert origin.gets(f"/{key}") == 1
    assert origin.gets("/ok/redirected") == 0, "an origin redirect was followed"

    assert_redirect(edge.request(f"/{key}"), origin, key)
    assert not edge.object_path(key).exists()


@pytest.mark.parametrize("kind", ["overlong", "overlong-late"])
def test_bytes_beyond_content_length_are_never_stored(edge: Daemon, origin: MisbehavingOrigin, kind: str) -> None:
    """
    An origin that sends more than it declared (F7) — in the same packet, or
    as an unasked-for response on the kept-alive connection — never gets the
    extra bytes into the bucket: the object is exactly the declared
    representation, and the next copy over the same origin is not corrupted.
    """
    key = f"{kind}/f7.bin"
    assert_redirect(edge.request(f"/{key}"), origin, key)
    assert edge.fill_outcome(key) == "stored"
    assert edge.object_path(key).read_bytes() == body_for(f"/{key}")
    time.sleep(0.3)  # let any extra bytes reach the daemon's pooled connection
    after = f"ok/after-{kind}.bin"
    assert_redirect(edge.request(f"/{after}"), origin, after)
    assert edge.fill_outcome(after) == "stored"
    assert edge.object_path(after).read_bytes() == body_for(f"/{after}")
    assert tmp_files(edge) == []


def test_client_disconnect_does_not_stop_the_fill(edge: Daemon, origin: MisbehavingOrigin) -> None:
    """
    A client that hangs up right after receiving its 302 does not cut the
    copy short: the object is still stored whole.
    """
    key = "slow/disconnect.bin"
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as s:
        s.sendall(f"GET /{key} HTTP/1.1\r\nHost: {BUCKET}.file.myqcloud.com\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            piece = s.recv(4096)
            if not piece:
                break
            head += piece
        assert head.startswith(b"HTTP/1.1 302 "), head
    assert not edge.object_path(key).exists(), "the fill should still be held by the origin"

    time.sleep(0.3)  # the daemon has seen the disconnect; the fill must go on
    origin.release(f"/{key}")
    assert edge.fill_outcome(key) == "stored"
    assert edge.object_path(key).read_bytes() == body_for(f"/{key}")
    assert tmp_files(edge) == []
    assert_served(edge, key)


def test_sigkill_mid_fill_leaves_no_partial_object(make_daemon: MakeDaemon, origin: MisbehavingOrigin) -> None:
    """
    If the daemon is killed outright in the middle of a copy, the half-copied
    object never becomes visible; on restart the leftover temporary file is
    swept away, and the next request for the key copies it properly.
    """
    daemon = make_daemon()
    key = "slow/killed.bin"
    assert_redirect(daemon.request(f"/{key}"), origin, key)

    def partial_written() -> bool:
        return any((daemon.tmp_dir / name).stat().st_size > 0 for name in tmp_files(daemon))

    wait_for(partial_written, 10, "the fill to write its temporary file")
    daemon.kill()
    origin.release(f"/{key}")
    assert not daemon.object_path(key).exists()
    assert len(tmp_files(daemon)) == 1  # the kill left the temporary file behind

    daemon.start()
    assert tmp_files(daemon) == []
    assert not daemon.object_path(key).exists()
    daemon.wait_for_log(r"removed 1 leftover temporary file")

    assert_redirect(daemon.request(f"/{key}"), origin, key)
    assert daemon.fill_outcome(key) == "stored"
    assert origin.gets(f"/{key}") == 2
    assert_served(daemon, key)


def test_graceful_stop_cancels_fills_and_cleans_up(make_daemon: MakeDaemon, origin: MisbehavingOrigin) -> None:
    """
    SIGTERM while fills are running (one waiting for the origin's headers,
    one half-way through a large body) stops the daemon within a few seconds:
    the fills are cancelled, nothing is stored and no temporary file is left.
    """
    daemon = make_daemon()
    waiting, copying = "stall-headers/f16.bin", "slow/f16.bin"
    assert_redirect(daemon.request(f"/{waiting}"), origin, waiting)
    assert_redirect(daemon.request(f"/{copying}"), origin, copying)

    def partial_written() -> bool:
        return any((daemon.tmp_dir / name).stat().st_size > 0 for name in tmp_files(daemon))

    try:
        wait_for(partial_written, 1.5, "the fill to write its temporary file")
        started = time.monotonic()
        # twistd re-raises the signal it stopped on once it has shut down cleanly.
        assert daemon.stop() in (0, -signal.SIGTERM)
        assert time.monotonic() - started < 5
        daemon.wait_for_log(r"Server Shut Down\.", timeout=0)
    finally:
        origin.release(f"/{copying}")
    assert daemon.fill_outcome(waiting, timeout=0) == "cancelled"
    assert daemon.fill_outcome(copying, timeout=0) == "cancelled"
    assert tmp_files(daemon) == []
    assert not daemon.object_path(waiting).exists()
    assert not daemon.object_path(copying).exists()


def test_unreachable_origin_still_redirects_and_fails_fast(edge: Daemon) -> None:
    """
    When the origin refuses connections the client still gets its 302 at
    once, and the copy fails quickly with a logged reason (F14).
    """
    host = f"{DEAD_BUCKET}.file.myqcloud.com"
    reply = edge.request("/dead.bin", host=host)
    assert reply.status == 302
    location = reply.header("Location")
    assert location is not None and location.endswith("/dead.bin")
    match = edge.wait_for_log(rf"fill {DEAD_BUCKET}/dead\.bin failed: (\S+)", timeout=5)
    assert match.group(1) == "connect-failed"
    assert not (edge.data_dir / DEAD_BUCKET / "dead.bin").exists()


def test_origin_pull_off_is_no_such_key(edge: Daemon, origin: MisbehavingOrigin) -> None:
    """A missing object in a bucket with origin-pull off is 404 NoSuchKey, with no redirect and no copy."""
    reply = edge.request("/ok/off.bin", host=f"{OFF_BUCKET}.file.myqcloud.com")
    assert (reply.status, reply.error_code) == (404, "NoSuchKey")
    assert reply.header("Location") is None
    assert origin.gets("/ok/off.bin") == 0


def test_head_miss_redirects_and_copies(edge: Daemon, origin: MisbehavingOrigin) -> None:
    """
    A HEAD for a missing object is redirected like a GET and, since issue 11,
    starts the same copy (clients such as coscmd HEAD first).
    """
    key = "ok/head.bin"
    assert_redirect(edge.request(f"/{key}", method="HEAD"), origin, key)
    assert edge.fill_outcome(key) == "stored"
    assert origin.gets(f"/{key}") == 1
    assert edge.request(f"/{key}").status == 200


def test_range_miss_copies_the_whole_object(edge: Daemon, origin: MisbehavingOrigin) -> None:
    """
    A Range request for a missing object is redirected with its query
    string, and the background copy fetches the whole object, without the
    query.
    """
    key = "ok/range-miss.bin"
    reply = edge.request(f"/{key}?v=1&sign=a%2Fb", headers={"Range": "bytes=0-9"})
    assert reply.status == 302
    assert reply.header("Location") == f"http://{origin.netloc}/{key}?v=1&sign=a%2Fb"
    assert edge.fill_outcome(key) == "stored"
    assert edge.object_path(key).read_bytes() == body_for(f"/{key}")
    assert origin.gets(f"/{key}") == 1

    reply = edge.request(f"/{key}", headers={"Range": "bytes=0-9"})
    assert reply.status == 206
    assert reply.body == body_for(f"/{key}")[:10]


def test_write_failure_is_a_clean_miss_and_hits_still_served(
    make_daemon: MakeDaemon, origin: MisbehavingOrigin
) -> None:
    """
    When the disk refuses a write half-way through a copy (here: the
    daemon's file-size limit, as a full disk would), nothing is stored, no
    temporary file is left, and the daemon goes on copying and serving the
    objects that fit (F12).
    """
    daemon = make_daemon(file_size_limit=512 * 1024)
    big, small = "slow/f12.bin", "ok/f12.bin"
    origin.release(f"/{big}")
    assert_redirect(daemon.request(f"/{big}"), origin, big)
    assert daemon.fill_outcome(big) == "disk-error"
    assert not daemon.object_path(big).exists()
    assert tmp_files(daemon) == []

    assert_redirect(daemon.request(f"/{small}"), origin, small)
    assert daemon.fill_outcome(small) == "stored"
    assert_served(daemon, small)
    assert_redirect(daemon.request(f"/{big}"), origin, big)


def test_origin_metadata_is_kept_and_conditionals_work(edge: Daemon, origin: MisbehavingOrigin) -> None:
    """
    The copy keeps the origin's ETag and Last-Modified, so a client's
    conditional request is answered 304 (unchanged) or 412 (precondition
    failed) from the bucket without asking the origin again.
    """
    key = "ok/conditional.bin"
    assert_redirect(edge.request(f"/{key}"), origin, key)
    assert edge.fill_outcome(key) == "stored"
    reply = assert_served(edge, key)
    assert reply.header("ETag") == etag_for(f"/{key}")
    assert reply.header("Last-Modified") == LAST_MODIFIED

    reply = edge.request(f"/{key}", headers={"If-None-Match": etag_for(f"/{key}")})
    assert (reply.status, reply.body) == (304, b"")
    reply = edge.request(f"/{key}", headers={"If-Modified-Since": LAST_MODIFIED})
    assert (reply.status, reply.body) == (304, b"")
    reply = edge.request(f"/{key}", headers={"If-Match": '"something-else"'})
    assert (reply.status, reply.error_code) == (412, "PreconditionFailed")
    assert origin.gets(f"/{key}") == 1


def test_gzip_body_is_stored_as_sent(edge: Daemon, origin: MisbehavingOrigin) -> None:
    """
    A gzip-encoded object is stored and served exactly as the origin sent
    it, with its Content-Encoding, never transparently decompressed (F7).
    """
    key = "gzip/page.html"
    assert_redirect(edge.request(f"/{key}"), origin, key)
    assert edge.fill_outcome(key) == "stored"
    assert edge.object_path(key).read_bytes() == body_for(f"/{key}")
    reply = assert_served(edge, key)
    assert reply.header("Content-Encoding") == "gzip"


def test_unicode_and_space_keys_become_folders_and_files(edge: Daemon, origin: MisbehavingOrigin) -> None:
    """
    A key with folders, non-ASCII letters and spaces is redirected with the
    key percent-encoded, stored as plain folders and a file named by the
    decoded key, and then served from there (S4).
    """
    encoded = "ok/%E5%9B%BE%E7%89%87/a%20b+c.jpg"
    assert_redirect(edge.request(f"/{encoded}"), origin, encoded)
    assert edge.fill_outcome("ok/图片/a b+c.jpg") == "stored"
    path = edge.object_path("ok/图片/a b+c.jpg")
    assert path.read_bytes() == body_for(f"/{encoded}")
    for spelling in (encoded, "ok/%e5%9b%be%e7%89%87/a%20b%2Bc.jpg"):  # the same key, spelled differently
        reply = edge.request(f"/{spelling}")
        assert reply.status == 200
        assert reply.body == body_for(f"/{encoded}")
        assert reply.header("Content-Type") == "image/jpeg"


def test_complete_chunked_body_is_stored(edge: Daemon, origin: MisbehavingOrigin) -> None:
    """An origin that sends a complete chunked body (no Content-Length) is copied and served normally."""
    key = "chunked/whole.bin"
    assert_redirect(edge.request(f"/{key}"), origin, key)
    assert edge.fill_outcome(key) == "stored"
    assert_served(edge, key)


@pytest.mark.parametrize("key", ["ok/f8.bin", "chunked/f8.bin"], ids=["declared-length", "chunked"])
def test_object_over_the_size_limit_is_not_copied(make_daemon: MakeDaemon, origin: MisbehavingOrigin, key: str) -> None:
    """
    An object larger than max_object_size is not copied (F8), whether the
    origin declares its length up front or only reveals it while sending.
    """
    daemon = make_daemon(max_object_size=10_000)
    assert_redirect(daemon.request(f"/{key}"), origin, key)
    assert daemon.fill_outcome(key) == "too-large"
    assert not daemon.object_path(key).exists()
    assert tmp_files(daemon) == []


def test_failed_copy_is_retried_after_the_back_off(make_daemon: MakeDaemon, origin: MisbehavingOrigin) -> None:
    """
    After a failed copy the key is not fetched again at once, but a miss
    after the back-off copies it (F11).
    """
    daemon = make_daemon(retry_backoff=1)
    key = "flaky/f11.bin"
    assert_redirect(daemon.request(f"/{key}"), origin, key)
    assert daemon.fill_outcome(key) == "http-500"
    assert_redirect(daemon.request(f"/{key}"), origin, key)
    time.sleep(1.2)
    assert origin.gets(f"/{key}") == 1, "the failed key was fetched again during its back-off"

    assert_redirect(daemon.request(f"/{key}"), origin, key)
    assert daemon.wait_for_log(rf"fill {BUCKET}/flaky/f11\.bin stored")
    assert origin.gets(f"/{key}") == 2
    assert_served(daemon, key)


def test_empty_object_is_stored_and_served(edge: Daemon, origin: MisbehavingOrigin) -> None:
    """A 0-byte file at the origin is a valid object: stored, then served with Content-Length: 0."""
    key = "empty/zero.txt"
    assert_redirect(edge.request(f"/{key}"), origin, key)
    assert edge.fill_outcome(key) == "stored"
    assert edge.object_path(key).read_bytes() == b""

    reply = edge.request(f"/{key}")
    assert reply.status == 200
    assert reply.header("Content-Length") == "0"
    assert reply.body == b""
    assert origin.gets(f"/{key}") == 1


# -- bad input (reliability.md S1-S8), over a raw socket --

LONG_KEY = "/".join(["k" * 200] * 5)  # 1004 bytes, every segment short enough
BAD_INPUT = [
    pytest.param("/../etc/passwd", {}, 400, "InvalidURI", id="S1-dotdot"),
    pytest.param("/%2e%2e/x", {}, 400, "InvalidURI", id="S1-encoded-dotdot"),
    pytest.param("/a/..%2fb", {}, 400, "InvalidURI", id="S1-dotdot-encoded-slash"),
    pytest.param("/a%5cb", {}, 400, "InvalidURI", id="S1-backslash"),
    pytest.param("/%252e%252e/x", {}, 400, "InvalidURI", id="S1-double-encoded"),
    pytest.param("/a%00b", {}, 400, "InvalidURI", id="S2-nul"),
    pytest.param("/a%0d%0ab", {}, 400, "InvalidURI", id="S2-crlf"),
    pytest.param("/a%01b", {}, 400, "InvalidURI", id="S2-control"),
    pytest.param("/" + LONG_KEY, {}, 400, "KeyTooLong", id="S3-key-too-long"),
    pytest.param("/" + "s" * 256, {}, 400, "KeyTooLong", id="S3-segment-too-long"),
    pytest.param("/.cosedge/tmp/x", {}, 400, "InvalidURI", id="S3-internal-dir"),
    pytest.param("/a/.cosedge", {}, 400, "InvalidURI", id="S3-internal-name"),
    pytest.param("//evil.example/x", {}, 400, "InvalidURI", id="S5-network-path"),
    pytest.param("http://evil.example/x", {}, 404, "NoSuchBucket", id="S5-absolute-form"),
]


@pytest.mark.parametrize(("target", "headers", "status", "code"), BAD_INPUT)
def test_bad_request_targets_get_their_cos_error(
    edge: Daemon, target: str, headers: dict[str, str], status: int, code: str
) -> None:
    """
    A malicious or malformed request target is refused with its COS error
    (an XML body with the error Code and an x-cos-request-id header), never
    a 500 and never a redirect anywhere.
    """
    reply = edge.request(target, headers=headers)
    assert (reply.status, reply.error_code) == (status, code), reply.body
    assert reply.header("Content-Type") == "application/xml"
    assert reply.header("x-cos-request-id")
    assert reply.header("Location") is None
    assert f"<RequestId>{reply.header('x-cos-request-id')}</RequestId>".encode() in reply.body


def test_unknown_host_is_no_such_bucket(edge: Daemon, origin: MisbehavingOrigin) -> None:
    """A request for a Host that is not one of our buckets is 404 NoSuchBucket, not a redirect."""
    reply = edge.request("/1.jpg", host="evil.example")
    assert (reply.status, reply.error_code) == (404, "NoSuchBucket")
    assert reply.header("x-cos-request-id")
    assert reply.header("Location") is None
    reply = edge.request("/x", host="other-1250000000.file.myqcloud.com")
    assert (reply.status, reply.error_code) == (404, "NoSuchBucket")
    assert origin.gets("/x") == 0


def test_redirect_location_stays_on_the_configured_origin(edge: Daemon, origin: MisbehavingOrigin) -> None:
    """
    Whatever the key and query look like, a miss sends the client to the
    configured origin only, with exactly one Location header and the key
    percent-encoded (S4, S5).
    """
    reply = edge.request("/status/404/evil.example/a%20b?u=//evil.example/&x=%0d%0aSet-Cookie:1")
    assert reply.status == 302
    locations = reply.headers.get_all("Location")
    assert locations is not None and len(locations) == 1
    assert locations[0].startswith(f"http://{origin.netloc}/status/404/evil.example/a%20b?")
    assert "\r" not in locations[0] and "\n" not in locations[0]
    assert reply.header("Set-Cookie") is None
    edge.fill_outcome("status/404/evil.example/a b")


def test_post_is_method_not_allowed(edge: Daemon) -> None:
    """A method the bucket does not serve is 405 MethodNotAllowed, and nothing is fetched."""
    reply = edge.request("/post.bin", method="POST", headers={"Content-Length": "0"})
    assert (reply.status, reply.error_code) == (405, "MethodNotAllowed")
    assert reply.header("Allow") == "GET, HEAD"
    assert reply.header("x-cos-request-id")


def test_range_abuse_never_sends_more_than_the_object(edge: Daemon, origin: MisbehavingOrigin) -> None:
    """
    200 overlapping ``0-`` ranges on a stored object are merged: the client
    never gets more bytes than the object holds (S6); an unsatisfiable
    range is 416.
    """
    key = "ok/ranged.bin"
    assert_redirect(edge.request(f"/{key}"), origin, key)
    assert edge.fill_outcome(key) == "stored"
    body = body_for(f"/{key}")

    reply = edge.request(f"/{key}", headers={"Range": "bytes=" + ",".join(["0-"] * 200)})
    assert reply.status in (200, 206)
    assert len(reply.body) <= len(body)
    assert reply.body == body
    assert reply.header("Content-Length") == str(len(body))

    overlapping = "bytes=" + ",".join(f"{i}-{i + 1000}" for i in range(0, 20_000, 100))
    reply = edge.request(f"/{key}", headers={"Range": overlapping})
    assert reply.status == 206
    assert len(reply.body) <= len(body)
    assert reply.header("Content-Length") == str(len(reply.body))

    reply = edge.request(f"/{key}", headers={"Range": f"bytes={len(body)}-"})
    assert (reply.status, reply.error_code) == (416, "InvalidRange")
    assert reply.header("Content-Range") == f"bytes */{len(body)}"


def test_symlink_out_of_the_bucket_is_never_followed(edge: Daemon, tmp_path: Path) -> None:
    """A symlink planted in the bucket that points outside it never serves the outside file (S1)."""
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"TOP-SECRET-OUTSIDE-THE-BUCKET")
    bucket = edge.data_dir / BUCKET
    bucket.mkdir(parents=True, exist_ok=True)
    (bucket / "link.txt").symlink_to(secret)
    (bucket / "linkdir").symlink_to(tmp_path, target_is_directory=True)

    for target in ("/link.txt", "/linkdir/secret.txt"):
        reply = edge.request(target)
        assert reply.status != 500
        assert reply.status != 200
        assert b"TOP-SECRET" not in reply.body
        assert reply.header("x-cos-request-id")


HUGE_HEADERS = [
    pytest.param(b"X-Pad: " + b"p" * 65536 + b"\r\n", id="one-64KiB-header"),
    pytest.param(b"".join(b"X-H%d: v\r\n" % i for i in range(600)), id="600-headers"),
]


@pytest.mark.parametrize("extra", HUGE_HEADERS)
def test_oversized_headers_are_refused_and_others_still_served(edge: Daemon, extra: bytes) -> None:
    """
    A request with too much header data is refused — a 400 or a closed
    connection, never a 500 — and the daemon goes on serving everyone else
    (S8).
    """
    head = f"GET /x HTTP/1.1\r\nHost: {HOST}\r\n".encode() + extra + b"\r\n"
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as s:
        try:
            s.sendall(head)
            answer = s.recv(65536)
        except ConnectionError:  # refused before we finished sending
            answer = b""
    assert answer == b"" or answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 431 ")), answer[:200]
    reply = edge.request("/../x")
    assert (reply.status, reply.error_code) == (400, "InvalidURI")


def test_idle_client_is_disconnected(edge: Daemon) -> None:
    """A client that opens a connection and sends nothing is cut off after the request timeout (S8)."""
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as s:
        s.sendall(b"GET /x HTTP/1.1\r\n")
        started = time.monotonic()
        s.settimeout(edge.request_timeout + 3)
        for _ in range(100):  # the daemon may answer 408 before it closes
            if s.recv(65536) == b"":
                break
        assert time.monotonic() - started < edge.request_timeout + 3


def test_slow_header_trickle_is_cut_off(edge: Daemon) -> None:
    """
    A client that sends its headers one byte at a time, each within the
    idle timeout, is still cut off after a bounded time (S8's header
    deadline), so slow clients cannot hold connections open for ever.
    """
    budget = edge.request_timeout * 1.5 + 0.5
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as s:
        started = time.monotonic()
        s.sendall(b"GET /x HTTP/1.1\r\n")
        closed = False
        while time.monotonic() - started < budget:
            try:
                s.sendall(b"X")
            except ConnectionError:
                closed = True
                break
            s.settimeout(edge.request_timeout / 2)
            try:
                if s.recv(65536) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
    assert closed, f"a header trickle kept the connection open for {budget}s"


def _read_slowly(sock: socket.socket, limit: int, timeout: float = 20) -> bytes:
    """Read until the server closes or resets (bounded), a little at a time."""
    chunks: list[bytes] = []
    total = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and total <= limit:
        try:
            piece = sock.recv(65536)
        except ConnectionResetError:
            break
        if not piece:
            break
        chunks.append(piece)
        total += len(piece)
    return b"".join(chunks)


@pytest.mark.parametrize("change", ["replaced", "truncated"])
def test_object_changed_while_served_never_sends_more_than_announced(edge: Daemon, change: str) -> None:
    """
    A stored object that is replaced (renamed over, as cosedge and rsync
    do) while a slow client downloads it is still served whole from the
    file that was opened (S7).  One truncated in place cannot be served
    whole: the connection is dropped early, so the client sees a short
    body — never more bytes than Content-Length.
    """
    size = 32 * 1024 * 1024
    key = f"s7/{change}.bin"
    path = edge.object_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = bytes(range(256)) * (size // 256)
    path.write_bytes(old)

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        s.settimeout(10)
        s.connect(("127.0.0.1", edge.port))
        s.sendall(f"GET /{key} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        first = s.recv(16 * 1024)
        head, sep, body = first.partition(b"\r\n\r\n")
        assert sep and head.startswith(b"HTTP/1.1 200 "), head
        assert f"Content-Length: {size}".encode() in head
        time.sleep(0.2)  # the daemon is now blocked on our full receive window
        if change == "replaced":
            fresh = path.with_name("fresh.tmp")
            fresh.write_bytes(b"N" * 1000)
            os.rename(fresh, path)
        else:
            os.truncate(path, 1000)
        body += _read_slowly(s, size)

    assert len(body) <= size
    if change == "replaced":
        assert len(body) == size, "the old file is still open and must be served whole"
        assert body == old
    else:
        # What was already in flight may reflect the truncation (sendfile
        # queues page-cache pages, not copies); only the length is promised.
        assert len(body) < size, "a truncated file cannot be served whole"


def _keep_alive_get(sock: socket.socket, target: str, extra: str = "") -> tuple[bytes, list[tuple[str, str]], bytes]:
    """One GET on an open keep-alive connection: status line, headers (without Date and request id), body."""
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {HOST}\r\nUser-Agent: e2e-quick\r\n{extra}\r\n".encode())
    data = b""
    deadline = time.monotonic() + 10
    while b"\r\n\r\n" not in data and time.monotonic() < deadline:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = [(n.lower(), v.strip()) for n, _, v in (line.partition(":") for line in lines)]
    length = int(dict(headers)["content-length"])
    while len(body) < length and time.monotonic() < deadline:
        body += sock.recv(65536)
    assert len(body) == length, (status, len(body), length)
    return status.encode(), [h for h in headers if h[0] not in ("date", "x-cos-request-id")], body


def test_keep_alive_hits_are_the_same_answer_every_time(edge: Daemon, origin: MisbehavingOrigin) -> None:
    """
    Hits of a small object on one keep-alive connection — the first opens
    the file, the rest are answered from memory by the quick path — carry
    the same status, headers and bytes, and the same access-log line; a
    replaced file is served at once; a Range on the same connection still
    gets its 206.
    """
    key = "ok/app.css"
    assert edge.request(f"/{key}").status == 302
    assert edge.fill_outcome(key) == "stored"
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as sock:
        answers = [_keep_alive_get(sock, f"/{key}") for _ in range(4)]
        assert answers[0][0] == b"HTTP/1.1 200 OK" and answers[0][2] == body_for(f"/{key}")
        assert all(answer == answers[0] for answer in answers)
        assert ("x-cos-meta-origin", "e2e") in answers[0][1]
        status, headers, body = _keep_alive_get(sock, f"/{key}", "Range: bytes=0-9\r\n")
        assert status == b"HTTP/1.1 206 Partial Content" and body == body_for(f"/{key}")[:10]
        new = edge.object_path(key).with_name("app.css.new")
        new.write_bytes(b"replaced")
        new.replace(edge.object_path(key))  # what an operator's cp and mv do
        assert _keep_alive_get(sock, f"/{key}")[2] == b"replaced"
    lines = [line for line in edge.access_log.read_text().splitlines() if "e2e-quick" in line]
    assert len(lines) == 6
    shapes = {line.split("]", 1)[1] if "]" in line else line for line in lines[:4]}
    assert shapes == {f' "GET /{key} HTTP/1.1" 200 {len(body_for(f"/{key}"))} "-" "e2e-quick"'}
