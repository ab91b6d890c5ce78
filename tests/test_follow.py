"""
Mirror answers read from a fill's file as it is written (cosedge.fill.partial,
cosedge.web.follow): a late client, or one that reached another worker
process, gets the bytes as they arrive instead of waiting for the commit.
The bucket listener over a real disk store in a temporary folder, fake
origins, one clock.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet.defer import Deferred, maybeDeferred

from cosedge.fill.claims import Claims
from cosedge.fill.partial import PARTIAL_XATTR, Partial, Partials
from cosedge.storage.disk import DiskStore
from cosedge.testing import FakeOrigin
from cosedge.web.follow import POLL
from tests.helpers import BUCKET, Edge, ProcessClaims, StepCooperator, capture_logs, raw_request
from tests.test_mirror import Hosts, mirror_edge

BODY = os.urandom(300 * 1024)  # above the size the disk store keeps in memory until its commit


def disk_edge(
    cooperator: StepCooperator, hosts: Hosts, data: Path, pid: int, claims: Any = None, **rule: object
) -> Edge:
    """A mirror edge over a disk store in ``data``, publishing its fills as process ``pid``."""
    edge = mirror_edge(cooperator, hosts, **rule)
    store = DiskStore(str(data), maybeDeferred)
    partials = Partials(str(data / ".cosedge" / "partial"), pid=pid)
    edge.store = store
    edge.filler = attrs.evolve(edge.filler, store=store, partials=partials, claims=claims)
    edge.resource._filler = edge.filler
    edge.resource._store = store
    return edge


@pytest.fixture
def a() -> FakeOrigin:
    return FakeOrigin()


def test_a_late_client_reads_the_fill_as_it_arrives(cooperator: StepCooperator, a: FakeOrigin, tmp_path: Path) -> None:
    """A client that comes after the origin answered gets the bytes so far at once, the rest as they come."""
    a.add("late.bin", BODY, mode="stall", cut=100 * 1024)
    hosts = Hosts(a_test=a)
    edge = disk_edge(cooperator, hosts, tmp_path, pid=101)
    early = edge.connect()
    early.send(raw_request("/late.bin"))
    hosts.flush()  # the headers and 100 KiB; the origin stalls
    late = edge.connect()
    late.send(raw_request("/late.bin"))
    head, _, body = late.transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == BODY[: 100 * 1024]  # not waiting for the commit
    assert b"content-length: %d" % len(BODY) in head.lower() and b"x-cos-mirror: origin" in head.lower()
    stalled = a.stalled.pop()
    stalled.write(BODY[100 * 1024 : 200 * 1024])
    hosts.flush()
    edge.clock.advance(POLL)
    assert late.transport.value().partition(b"\r\n\r\n")[2] == BODY[: 200 * 1024]
    stalled.write(BODY[200 * 1024 :])
    stalled.finish()
    hosts.flush()
    edge.clock.advance(POLL)
    assert early.response().body == BODY
    response = late.response()
    assert (response.status, response.body) == (200, BODY) and late.closed
    assert a.gets(b"/late.bin") == 1 and edge.stats.events["mirror_followed"] == 1
    # The fill withdrew its name, and the stored object keeps no trace of it.
    assert os.listdir(tmp_path / ".cosedge" / "partial") == []
    stored = tmp_path / BUCKET / "late.bin"
    assert stored.read_bytes() == BODY and PARTIAL_XATTR not in os.listxattr(stored)


def test_a_client_too_slow_for_the_stream_reads_the_file_before_the_fill_ends(
    cooperator: StepCooperator, a: FakeOrigin, tmp_path: Path
) -> None:
    """
    A client more than 8 MiB behind lets go of the stream at once and reads
    on from the file while the origin is still sending: every byte once, in
    order, and the bytes stored so far before the fill has ended.
    """
    mib = 1024 * 1024
    body = os.urandom(12 * mib)
    a.add("slow.bin", body, mode="stall", cut=mib)
    hosts = Hosts(a_test=a)
    edge = disk_edge(cooperator, hosts, tmp_path, pid=107)
    conn = edge.connect()
    conn.send(raw_request("/slow.bin"))
    hosts.flush()  # the headers and the first MiB
    channel = conn.transport.producer
    channel.pauseProducing()  # the client's socket is full from now on
    stalled = a.stalled.pop()
    stalled.write(body[mib : 10 * mib])  # 9 MiB behind: the reader lets go of the stream
    hosts.flush()
    assert edge.stats.events["mirror_followed"] == 1
    channel.resumeProducing()  # the client reads again; the origin has not finished
    edge.clock.advance(POLL)
    assert conn.transport.value().partition(b"\r\n\r\n")[2] == body[: 10 * mib]
    stalled.write(body[10 * mib :])
    stalled.finish()
    hosts.flush()
    edge.clock.advance(POLL)
    response = conn.response()
    assert (response.status, response.body == body) == (200, True) and conn.closed
    assert a.gets(b"/slow.bin") == 1


def test_a_late_range_and_a_late_head(cooperator: StepCooperator, a: FakeOrigin, tmp_path: Path) -> None:
    """A late Range gets its bytes from the file (206); a late HEAD gets the origin's headers."""
    a.add("r.bin", BODY, mode="stall", cut=1000)
    hosts = Hosts(a_test=a)
    edge = disk_edge(cooperator, hosts, tmp_path, pid=102)
    edge.connect().send(raw_request("/r.bin"))
    hosts.flush()
    ranged = edge.connect()
    ranged.send(raw_request("/r.bin", headers=[("Range", "bytes=200000-200009")]))
    head = edge.connect()
    head.send(raw_request("/r.bin", method=b"HEAD"))
    answered = head.response()
    assert answered.status == 200 and answered.header(b"content-length") == b"%d" % len(BODY)
    assert answered.body == b"" and head.closed
    stalled = a.stalled.pop()
    stalled.write(BODY[1000:])
    stalled.finish()
    hosts.flush()
    edge.clock.advance(POLL)
    response = ranged.response()
    assert (response.status, response.body) == (206, BODY[200000:200010])
    assert response.header(b"content-range") == b"bytes 200000-200009/%d" % len(BODY)


def test_a_fill_that_fails_cuts_its_followers_short(cooperator: StepCooperator, a: FakeOrigin, tmp_path: Path) -> None:
    """The origin cuts the body: a follower's connection is closed with fewer bytes than declared."""
    a.add("cut.bin", BODY, mode="stall", cut=50 * 1024)
    hosts = Hosts(a_test=a)
    edge = disk_edge(cooperator, hosts, tmp_path, pid=103)
    edge.connect().send(raw_request("/cut.bin"))
    hosts.flush()
    late = edge.connect()
    late.send(raw_request("/cut.bin"))
    stalled = a.stalled.pop()
    assert stalled.transport is not None
    stalled.transport.loseConnection()
    hosts.flush()
    edge.clock.advance(POLL)
    assert late.closed
    body = late.transport.value().partition(b"\r\n\r\n")[2]
    assert body == BODY[: 50 * 1024]  # short: the client sees the truncation
    assert not (tmp_path / BUCKET / "cut.bin").exists()
    assert os.listdir(tmp_path / ".cosedge" / "partial") == []


def test_a_fill_that_stops_growing_cuts_its_followers_after_the_idle_timeout(
    cooperator: StepCooperator, a: FakeOrigin, tmp_path: Path
) -> None:
    """A published file that gets no new byte for ``idle_timeout`` (its process was killed, say): cut."""
    a.add("still.bin", BODY, mode="stall", cut=10)
    hosts = Hosts(a_test=a)
    edge = disk_edge(cooperator, hosts, tmp_path, pid=104)
    edge.connect().send(raw_request("/still.bin"))
    hosts.flush()
    late = edge.connect()
    late.send(raw_request("/still.bin"))
    idle = edge.config.fill.idle_timeout
    edge.clock.pump([POLL] * int((idle - 1) / POLL))
    assert not late.closed
    edge.clock.pump([POLL] * int(2 / POLL))
    assert late.closed and late.transport.value().endswith(BODY[:10])


def test_a_file_that_cannot_be_read_cuts_its_follower(
    cooperator: StepCooperator, a: FakeOrigin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An I/O error reading the fill's file closes the follower's connection short (and says why)."""
    a.add("eio.bin", BODY, mode="stall", cut=1000)
    hosts = Hosts(a_test=a)
    edge = disk_edge(cooperator, hosts, tmp_path, pid=108)
    edge.connect().send(raw_request("/eio.bin"))
    hosts.flush()
    late = edge.connect()
    late.send(raw_request("/eio.bin"))
    assert late.transport.value().endswith(BODY[:1000]) and not late.closed

    def failing(_: Partial) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(Partial, "size", failing)
    with capture_logs() as events:
        edge.clock.advance(POLL)
    assert late.closed and late.transport.value().endswith(BODY[:1000])
    assert any("Input/output error" in str(e.get("why", "")) for e in events)


def test_a_proxy_fill_and_a_small_object_are_not_published(
    cooperator: StepCooperator, a: FakeOrigin, tmp_path: Path
) -> None:
    """Only mirror fills of a body written to a file are readable while under way."""
    a.add("small.bin", b"x" * 1000, mode="stall", cut=10)
    a.add("proxied.bin", BODY, mode="stall", cut=10)
    hosts = Hosts(a_test=a)
    edge = disk_edge(cooperator, hosts, tmp_path, pid=105)
    edge.connect().send(raw_request("/small.bin"))
    hosts.flush()
    assert edge.filler.partial(BUCKET, ("small.bin",)) is None
    proxied = disk_edge(cooperator, hosts, tmp_path / "p", pid=106, type="proxy")
    assert proxied.request("/proxied.bin").status == 302
    hosts.flush()
    assert proxied.filler.partial(BUCKET, ("proxied.bin",)) is None
    assert not (tmp_path / "p" / ".cosedge" / "partial").exists()


def test_a_client_of_another_process_reads_that_process_fill(
    cooperator: StepCooperator, a: FakeOrigin, tmp_path: Path
) -> None:
    """
    With workers, the process that lost a key's claim reads the winner's
    published file (found by the claim's holder) instead of waiting for the
    commit; before the winner has its origin's headers, it looks again.
    """
    held: dict[tuple[str, tuple[str, ...]], int] = {}
    a.add("w.bin", BODY, mode="stall", cut=64 * 1024)
    first_hosts, second_hosts = Hosts(a_test=a), Hosts(a_test=a)
    first = disk_edge(cooperator, first_hosts, tmp_path, pid=201, claims=ProcessClaims(held, 201))
    second = disk_edge(cooperator, second_hosts, tmp_path, pid=202, claims=ProcessClaims(held, 202))
    asked = first_hosts.request
    gate: Deferred[None] = Deferred()
    first_hosts.request = lambda *args: gate.addCallback(lambda _: asked(*args))  # type: ignore[method-assign]
    winner = first.connect()
    winner.send(raw_request("/w.bin"))  # the first process claims the key; no headers yet
    waiting = second.connect()
    waiting.send(raw_request("/w.bin"))
    second.clock.advance(0.1)
    assert waiting.transport.value() == b""
    gate.callback(None)
    first_hosts.flush()  # the winner's headers and 64 KiB: published
    second.clock.advance(0.1)  # the waiting process looks again
    assert waiting.transport.value().partition(b"\r\n\r\n")[2] == BODY[: 64 * 1024]
    stalled = a.stalled.pop()
    stalled.write(BODY[64 * 1024 :])
    stalled.finish()
    first_hosts.flush()
    second.clock.advance(POLL)
    response = waiting.response()
    assert (response.status, response.body) == (200, BODY) and waiting.closed
    assert winner.response().body == BODY
    assert a.gets(b"/w.bin") == 1 and second.stats.events["mirror_followed"] == 1


def test_partials_publish_open_withdraw_and_sweep(tmp_path: Path) -> None:
    """A published file opens by key and pid with its length and headers; withdrawn or swept, it is gone."""
    partials = Partials(str(tmp_path / "partial"), pid=7)
    spool = tmp_path / "spool.part"
    spool.write_bytes(b"abc")
    link = partials.publish(BUCKET, ("a", "b.bin"), str(spool), 10, {"ETag": '"e"'})
    assert link is not None and link.endswith(".7")
    assert partials.open(BUCKET, ("a", "b.bin"), 8) is None  # another process's fill of it: none
    opened = partials.open(BUCKET, ("a", "b.bin"), 7)
    assert opened is not None and (opened.length, dict(opened.meta)) == (10, {"ETag": '"e"'})
    with spool.open("ab") as more:
        more.write(b"defg")
    assert (opened.size(), opened.read(2, 5), opened.published()) == (7, b"cdefg", True)
    Partials.withdraw(link)
    assert not opened.published() and PARTIAL_XATTR not in os.listxattr(spool)
    opened.close()
    assert partials.open(BUCKET, ("a", "b.bin"), 7) is None
    for pid, key in ((7, "x"), (8, "y"), (8, "z")):
        Partials(partials.directory, pid=pid).publish(BUCKET, (key,), str(spool), 10, {})
    assert partials.sweep(owner=8) == 2 and len(os.listdir(partials.directory)) == 1
    assert partials.sweep() == 1 and os.listdir(partials.directory) == []


def test_the_holder_of_a_claim_is_the_other_process(tmp_path: Path) -> None:
    """F_GETLK names the process that holds a key's claim; nobody, or this process itself: None."""
    path = tmp_path / "claims"
    claims = Claims(str(path))
    assert claims.holder(BUCKET, ("k",)) is None
    assert claims.claim(BUCKET, ("mine",)) and claims.holder(BUCKET, ("mine",)) is None
    script = (
        "import sys; from cosedge.fill.claims import Claims;"
        f"c = Claims({str(path)!r}); assert c.claim({BUCKET!r}, ('k',));"
        "print('held', flush=True); sys.stdin.read()"
    )
    other = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert other.stdout is not None and other.stdout.readline() == b"held\n"
        assert claims.holder(BUCKET, ("k",)) == other.pid
        assert claims.holder(BUCKET, ("other",)) is None
    finally:
        assert other.stdin is not None
        other.stdin.close()
        other.wait(10)
    assert claims.holder(BUCKET, ("k",)) is None
