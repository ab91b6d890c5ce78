"""
Origin rules against the real daemon and real origins on 127.0.0.1
(issue 11): weights and fail-over between two origins with a probe before
re-use, a mirror-mode herd with every client's bytes checked, HEAD-first
clients, and the official COS SDK reading a mirror-mode miss.
"""

from __future__ import annotations

import itertools
import re
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from .conftest import FAST_FILL, Daemon, Reply, Stream, at_once, free_port, wait_for
from .origin import MisbehavingOrigin, body_for, etag_for

MIRROR = "mirror-1250000000"
SPREAD = "spread-1250000000"


def host(bucket: str) -> str:
    return f"{bucket}.file.myqcloud.com"


@pytest.fixture
def second_origin() -> Iterator[MisbehavingOrigin]:
    server = MisbehavingOrigin()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def rules_daemon(root: Path, origin: MisbehavingOrigin, rules: str, **fill: float) -> Daemon:
    daemon = Daemon(root, origin.netloc, {**FAST_FILL, **fill}, extra_config=rules)
    daemon.start()
    return daemon


def test_two_origins_share_by_weight_fail_over_and_a_returning_host_is_probed(
    tmp_path: Path, origin: MisbehavingOrigin, second_origin: MisbehavingOrigin
) -> None:
    """
    Weights 1:3 split the 302s; a killed origin is passed over at once; after
    the down time a HEAD probe brings it back.
    """
    a, b = origin, second_origin
    rules = f"""
[[buckets."{SPREAD}".rules]]
priority = 1
type = "proxy"
hosts = [{{ host = "{b.netloc}", weight = 3 }}, "{a.netloc}"]
"""
    # b is the one killed and restarted on its port, so it is this test's own origin.
    daemon = rules_daemon(tmp_path, a, rules, host_down_time=1.0)
    try:
        to = Counter()
        for i in range(40):
            reply = daemon.request(f"/ok/w{i}", host=host(SPREAD))
            assert reply.status == 302
            to[re.sub(r"/ok/.*", "", reply.header("location") or "")] += 1
        assert to[f"http://{b.netloc}"] > to[f"http://{a.netloc}"] > 0, to  # 3:1, give or take chance
        for i in range(40):  # every background copy was stored, from whichever host
            wait_for(lambda i=i: daemon.request(f"/ok/w{i}", host=host(SPREAD)).status == 200, 10, f"/ok/w{i} stored")
        port = b.port
        b.stop()
        # Killed: the first fill that tries it is refused and fails over; from then on every 302 goes to a.
        tried, to_b = 0, []
        while "marked down" not in daemon.log() and tried < 40:  # b is chosen 3 times in 4
            reply = daemon.request(f"/ok/after-kill-{tried}", host=host(SPREAD))
            if reply.header("location") == f"http://{b.netloc}/ok/after-kill-{tried}":
                to_b.append(tried)
            tried += 1
            time.sleep(0.05)
        wait_for(lambda: "marked down" in daemon.log(), 10, "the refused origin marked down")
        for i in range(tried, tried + 10):
            reply = daemon.request(f"/ok/after-kill-{i}", host=host(SPREAD))
            assert reply.header("location") == f"http://{a.netloc}/ok/after-kill-{i}"
        for i in range(tried + 10):  # and every copy was stored
            wait_for(lambda i=i: daemon.request(f"/ok/after-kill-{i}", host=host(SPREAD)).status == 200, 10, "stored")
        # (b's connections already open may have served a few; the refused one failed over to a.)
        assert any(a.gets(f"/ok/after-kill-{i}") == 1 for i in to_b)
        # Back on its port: not used until a probe (a HEAD) has found it up again.
        back = MisbehavingOrigin(port)
        back.start()
        try:
            fresh = itertools.count()

            def used_again() -> bool:  # new keys each time: a stored one answers 200, not 302
                keys = [f"/ok/back-{next(fresh)}" for _ in range(5)]
                locations = [daemon.request(key, host=host(SPREAD)).header("location") for key in keys]
                return any(f"http://{back.netloc}/" in (loc or "") for loc in locations)

            wait_for(used_again, 15, "the returning origin probed and used again")
            assert "is up again" in daemon.log()
        finally:
            back.stop()
    finally:
        daemon.stop()
    assert daemon.problems() == []


MIRROR_RULES = f"""
[[buckets."{MIRROR}".rules]]
priority = 1
type = "proxy"
prefix = "chunked/"
hosts = ["{{origin}}"]

[[buckets."{MIRROR}".rules]]
priority = 2
type = "mirror"
hosts = ["{{origin}}"]
"""


@pytest.fixture
def mirror(tmp_path: Path, origin: MisbehavingOrigin) -> Iterator[Daemon]:
    daemon = rules_daemon(tmp_path, origin, MIRROR_RULES.replace("{origin}", origin.netloc))
    try:
        yield daemon
    finally:
        daemon.stop()
    assert daemon.problems() == []


@attrs.frozen
class OnBucket:
    """A daemon's requests with the Host of another bucket (for :func:`at_once`)."""

    daemon: Daemon
    bucket: str

    def request(self, target: str, **kwargs: Any) -> Reply:
        return self.daemon.request(target, host=host(self.bucket), **kwargs)


def test_a_mirror_herd_shares_one_origin_get_and_every_client_gets_every_byte(
    mirror: Daemon, origin: MisbehavingOrigin
) -> None:
    path = "/ok/rules-herd.bin"
    replies = at_once(OnBucket(mirror, MIRROR), path, 30)  # type: ignore[arg-type]
    assert [r.status for r in replies] == [200] * 30
    assert all(r.body == body_for(path) for r in replies)
    assert origin.gets(path) == 1
    hit = mirror.request(path, host=host(MIRROR))
    assert hit.body == body_for(path) and hit.header("x-cos-mirror") is None  # the next one is a local hit


def test_a_late_client_of_a_slow_mirror_fill_reads_it_as_it_arrives(mirror: Daemon, origin: MisbehavingOrigin) -> None:
    """
    The second client comes after the origin's headers: it gets the bytes
    the fill has so far at once, from the fill's file, then the rest as it
    arrives (not once the object is stored), every byte right.
    """
    path = "/slow/rules-late.bin"
    early = Stream(mirror, host(MIRROR), path)
    assert early.read(lambda: len(early.body) >= 65536, 10), "the origin's first 64 KiB"
    late = Stream(mirror, host(MIRROR), path)
    assert late.read(lambda: len(late.body) >= 65536, 10), "the late client waited for the store"
    assert b"x-cos-mirror: origin" in late.head.lower() and late.head.startswith(b"HTTP/1.1 200")
    origin.release(path)
    assert early.whole() == late.whole() == body_for(path)
    assert origin.gets(path) == 1
    stored = mirror.request(path, host=host(MIRROR))
    assert stored.body == body_for(path) and stored.header("x-cos-mirror") is None


def test_with_workers_every_client_of_a_mirror_herd_reads_the_one_fill_as_it_arrives(
    tmp_path: Path, origin: MisbehavingOrigin
) -> None:
    """
    ``workers = 2``: the herd's connections are spread over both processes;
    one fetches the object, the other's clients read its fill's file as it
    grows.  Every client has the first 64 KiB while the origin still holds
    the rest, and every byte after; one origin GET.
    """
    admin = free_port()
    rules = MIRROR_RULES.replace("{origin}", origin.netloc)
    rules += f'\n[admin]\nlisten = "tcp:{admin}:interface=127.0.0.1"\nmin_free_bytes = 0\n'
    daemon = Daemon(tmp_path, origin.netloc, dict(FAST_FILL), extra_config=rules, workers=2)
    daemon.start()
    try:
        path = "/slow/rules-workers-herd.bin"
        clients = [Stream(daemon, host(MIRROR), path) for _ in range(16)]
        for client in clients:
            assert client.read(lambda c=client: len(c.body) >= 65536, 15), client.data[:300]  # type: ignore[misc]
        origin.release(path)
        assert all(client.whole() == body_for(path) for client in clients)
        assert origin.gets(path) == 1

        def followed() -> int:  # the worker's counters reach the primary every second
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as response:
                found = re.search(r"^cosedge_mirror_followed_total (\S+)", response.read().decode(), re.M)
            return 0 if found is None else int(float(found.group(1)))

        wait_for(lambda: followed() >= 1, 5, "a client that read the fill's file")
    finally:
        daemon.stop()
    assert daemon.problems() == []
    assert not list((tmp_path / "data" / ".cosedge" / "partial").iterdir())


def test_mirror_answers_origin_failures_as_cos_does(mirror: Daemon) -> None:
    """An origin 404 is NoSuchKey, an origin error 424 MirrorFailed; a body cut mid-way cuts the client's."""
    missing = mirror.request("/status/404/rules-m.bin", host=host(MIRROR))
    assert (missing.status, missing.error_code) == (404, "NoSuchKey")
    failed = mirror.request("/status/500/rules-m.bin", host=host(MIRROR))
    assert (failed.status, failed.error_code) == (424, "MirrorFailed")
    cut = mirror.request("/truncated/rules-m.bin", host=host(MIRROR))
    assert cut.status == 200 and len(cut.body) < int(cut.header("content-length") or 0)
    wait_for(
        lambda: "fill mirror-1250000000/truncated/rules-m.bin failed: truncated" in mirror.log(), 10, "the fill's end"
    )
    again = mirror.request("/truncated/rules-m.bin", host=host(MIRROR))  # nothing stored; the failure is remembered
    assert (again.status, again.error_code) == (424, "MirrorFailed")


def test_head_first_clients_get_the_object_copied(mirror: Daemon, origin: MisbehavingOrigin) -> None:
    """coscmd HEADs before it GETs: a proxy HEAD starts the copy; a mirror HEAD answers from the origin's headers."""
    proxied = mirror.request("/chunked/rules-head-first.bin", method="HEAD", host=host(MIRROR))
    assert proxied.status == 302
    wait_for(
        lambda: mirror.request("/chunked/rules-head-first.bin", host=host(MIRROR)).status == 200,
        10,
        "the HEAD's copy stored",
    )
    mirrored = mirror.request("/ok/rules-mirror-head.bin", method="HEAD", host=host(MIRROR))
    assert mirrored.status == 200 and mirrored.header("content-length") == str(
        len(body_for("/ok/rules-mirror-head.bin"))
    )
    assert mirrored.header("etag") == etag_for("/ok/rules-mirror-head.bin")
    wait_for(lambda: origin.gets("/ok/rules-mirror-head.bin") == 1, 10, "the copy")
    wait_for(
        lambda: mirror.request("/ok/rules-mirror-head.bin", host=host(MIRROR)).header("x-cos-mirror") is None,
        10,
        "stored",
    )


def test_the_cos_sdk_reads_a_mirror_mode_miss(mirror: Daemon) -> None:
    """The official SDK treats a 302 as success with an empty body; mirror mode gives it the bytes."""
    qcloud_cos = pytest.importorskip("qcloud_cos", reason="cos-python-sdk-v5 is in the test extra")
    config = qcloud_cos.CosConfig(
        Domain=host(MIRROR), IP="127.0.0.1", Port=mirror.port, Scheme="http", Anonymous=True, Region="ap-guangzhou"
    )
    client = qcloud_cos.CosS3Client(config)
    head = client.head_object(Bucket=MIRROR, Key="ok/rules-sdk-head.bin")
    assert int(head["Content-Length"]) == len(body_for("/ok/rules-sdk-head.bin"))
    got = client.get_object(Bucket=MIRROR, Key="ok/rules-sdk.bin")
    assert got["Body"].get_raw_stream().read() == body_for("/ok/rules-sdk.bin")
    again = client.get_object(Bucket=MIRROR, Key="ok/rules-sdk.bin")  # now a local hit
    assert again["Body"].get_raw_stream().read() == body_for("/ok/rules-sdk.bin")
