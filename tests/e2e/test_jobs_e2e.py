"""
End-to-end: backfill and verify jobs in the real ``twistd -n --pidfile=
cosedge`` daemon, started, followed and watched through its SSH manhole (one
command per connection, as a script would; an interactive session for the
progress bar), against the real misbehaving origin on 127.0.0.1, whose GETs
are counted per path.

Run with ``.venv/bin/python -m pytest tests/e2e/test_jobs_e2e.py -q``.
"""

# ruff: noqa: F811 (the fixtures imported from test_admin_e2e are parameters of the tests)

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from twisted.internet import reactor
from twisted.internet.task import deferLater

from . import test_admin_e2e as admin
from .conftest import BUCKET
from .origin import MisbehavingOrigin, body_for
from .test_admin_e2e import credentials, make_admin_daemon  # noqa: F401 (fixtures)

pytestmark = pytest.mark.e2e

#: The longest a job of these tests may take.
JOB_TIMEOUT = 180.0


def log_line(target: str, status: int = 200, method: str = "GET") -> str:
    """A combined-format access-log line of the old server."""
    request = f"{method} {target} HTTP/1.1"
    return f'198.51.100.7 - - [01/Nov/2017:08:00:00 +0000] "{request}" {status} 20480 "-" "Mozilla/5.0"'


class Manhole:
    """``ssh admin@127.0.0.1 'edge....'`` against one daemon."""

    def __init__(self, daemon: admin.AdminDaemon, credentials: admin.Credentials) -> None:
        self.port = admin.manhole_port(daemon, "ssh")
        self.key = credentials.key

    async def run(self, command: str) -> str:
        out, status = await admin.ssh_command(self.port, self.key, command)
        assert status == 0, out
        return out

    async def start(self, command: str) -> int:
        """Start a job with ``edge.<command>``; its id."""
        out = await self.run(f"edge.{command}")
        match = re.match(r"job (\d+) (started|queued)", out)
        assert match is not None, out
        return int(match.group(1))

    async def details(self, job: int) -> dict[str, Any]:
        details: dict[str, Any] = json.loads(await self.run(f"import json; print(json.dumps(edge.job({job})))"))
        return details

    async def until(
        self, job: int, done: Callable[[dict[str, Any]], bool], timeout: float = JOB_TIMEOUT
    ) -> dict[str, Any]:
        """Poll the job (bounded) until ``done`` holds for its details."""
        deadline = time.monotonic() + timeout
        while True:
            details = await self.details(job)
            if done(details):
                return details
            assert details["state"] in ("queued", "running"), details
            assert time.monotonic() < deadline, f"job {job} not there within {timeout}s: {details}"
            await deferLater(reactor, 0.3)

    async def ended(self, job: int) -> dict[str, Any]:
        return await self.until(job, lambda d: d["state"] in ("done", "cancelled", "failed"))


def stored(daemon: admin.AdminDaemon, key: str) -> bytes | None:
    path = daemon.data_dir / BUCKET / key
    return path.read_bytes() if path.exists() else None


@admin.ensure_deferred
async def test_a_backfill_of_5000_keys_from_an_access_log_stores_exactly_the_keys_answered_200(
    make_admin_daemon: Callable[..., admin.AdminDaemon], credentials: admin.Credentials, origin: MisbehavingOrigin
) -> None:
    """
    An old server's access log of 5,000 keys answered 200 (some asked twice,
    with query strings and percent-encoded names), plus lines answered 404,
    POSTs and lines that are no request at all: exactly the 5,000 keys are
    stored, each fetched once; the rest counted.  The progress bar is drawn
    in an interactive session until Ctrl-C, and the job goes on.
    """
    daemon = make_admin_daemon()
    manhole = Manhole(daemon, credentials)
    tag = uuid.uuid4().hex[:8]
    keys = [f"ok/bf-{tag}/{i % 50}/{'a b ' if i % 7 == 0 else ''}{i}.bin" for i in range(5000)]
    lines = [log_line("/" + quote(key) + ("?v=3" if i % 3 == 0 else "")) for i, key in enumerate(keys)]
    lines += [log_line("/" + quote(key)) for key in keys[::10]]  # asked again: found stored
    lines += [log_line(f"/ok/bf-{tag}/missing-{i}.bin", status=404) for i in range(300)]
    lines += [log_line(f"/ok/bf-{tag}/posted-{i}.bin", method="POST") for i in range(100)]
    lines += ["-- rotated --"] * 30 + [log_line(f"/ok/bf-{tag}/%2e%2e/x-{i}") for i in range(20)]
    source = daemon.root / "old-server-access.log"
    source.write_text("".join(f"{line}\n" for line in lines))

    job = await manhole.start(f"backfill({BUCKET!r}, 'log:{source}')")
    shell, client, proto = await admin.ssh_shell(manhole.port, credentials.key)
    since = client.screen.mark()
    await shell.run(f"edge.watch({job})")
    shown = await client.screen.expect("/5500 ", since)
    assert re.search(rf"job {job} backfill (running|done) \[[#.]+\] \d+/5500 ", shown), shown
    shell._write(b"\x03")  # Ctrl-C: stop watching
    await client.screen.expect(f"stopped watching; job {job} goes on", since)
    proto.transport.loseConnection()

    details = await manhole.ended(job)
    assert details["state"] == "done", details
    assert (details["total"], details["done"]) == (5500, 5500)
    assert details["outcomes"] == {"stored": 5000, "skipped": 500} and details["failures"] == {}
    assert details["bad_lines"] == {"invalid-key": 20, "unparsable": 30}
    assert details["ignored_lines"] == {"not-200": 300, "not-get": 100}
    for key in keys:
        path = "/" + quote(key, safe="/")
        assert origin.gets(path) == 1, key
        assert stored(daemon, key) == body_for(path), key
    assert sum(origin.gets(f"/ok/bf-{tag}/{kind}-{i}.bin") for kind in ("missing", "posted") for i in range(100)) == 0
    daemon.wait_for_log(
        rf"audit: job {job} started: backfill of {BUCKET} from log:{re.escape(str(source))} via ssh:admin@127\.0\.0\.1"
    )
    daemon.wait_for_log(rf"audit: job {job} done: backfill of {BUCKET} .*: 5500/5500 keys, stored 5000, skipped 500")


@admin.ensure_deferred
async def test_a_restart_in_the_middle_of_a_backfill_goes_on_without_fetching_a_key_again(
    make_admin_daemon: Callable[..., admin.AdminDaemon], credentials: admin.Credentials, origin: MisbehavingOrigin
) -> None:
    """
    The daemon stops (SIGTERM) while a backfill runs and starts again: the job
    goes on from its journal by itself, and every key is fetched exactly once.
    """
    daemon = make_admin_daemon()
    manhole = Manhole(daemon, credentials)
    tag = uuid.uuid4().hex[:8]
    keys = [f"ok/rs-{tag}/{i}.bin" for i in range(1000)]
    source = daemon.root / "keys.txt"
    source.write_text("".join(f"{key}\n" for key in keys))
    job = await manhole.start(f"backfill({BUCKET!r}, 'keys:{source}', rate_objects=250)")
    before = await manhole.until(job, lambda d: d["done"] >= 200)
    assert before["done"] < 1000, "the job ended before the restart: raise the key count"

    daemon.stop()
    journal = daemon.data_dir / ".cosedge" / "jobs" / f"{job}.journal"
    journalled = journal.read_text().count("\tstored\t")
    assert 200 <= journalled < 1000
    admin.start(daemon)
    daemon.wait_for_log(rf"job {job} \(backfill of {BUCKET} from keys:.*\) goes on after a restart: {journalled} key")
    details = await manhole.ended(job)
    assert (details["state"], details["done"], details["outcomes"]) == ("done", 1000, {"stored": 1000}), details
    assert [origin.gets(f"/{key}") for key in keys] == [1] * 1000
    assert all(stored(daemon, key) == body_for(f"/{key}") for key in keys)


@admin.ensure_deferred
async def test_a_verify_reports_exactly_the_object_the_origin_no_longer_has(
    make_admin_daemon: Callable[..., admin.AdminDaemon], credentials: admin.Credentials, origin: MisbehavingOrigin
) -> None:
    """
    After a backfill, one object is stored that the origin answers 404 for
    (as if deleted there): the verify reports exactly it, and fetches nothing.
    """
    daemon = make_admin_daemon()
    manhole = Manhole(daemon, credentials)
    tag = uuid.uuid4().hex[:8]
    keys = [f"ok/vf-{tag}/{i}.bin" for i in range(30)]
    source = daemon.root / "keys.txt"
    source.write_text("".join(f"{key}\n" for key in keys))
    backfill = await manhole.start(f"backfill({BUCKET!r}, 'keys:{source}')")
    assert (await manhole.ended(backfill))["outcomes"] == {"stored": 30}
    gone = Path(daemon.data_dir / BUCKET / f"vf-{tag}" / "deleted.bin")
    gone.parent.mkdir()
    gone.write_bytes(b"the old server deleted this one")

    verify = await manhole.start(f"verify({BUCKET!r})")
    details = await manhole.ended(verify)
    assert (details["state"], details["total"]) == ("done", 31), details
    assert details["outcomes"] == {"same": 30, "gone": 1} and details["failures"] == {}, details
    report = Path(details["report"]).read_text().splitlines()
    assert report[1:] == [f"vf-{tag}/deleted.bin\tgone\tthe origin answers 404"]
    assert [origin.gets(f"/{key}") for key in keys] == [1] * 30  # HEADs: nothing fetched again
    out = await manhole.run("edge.jobs()")
    assert re.search(rf"^{verify}\s+verify\s+{BUCKET}\s+prefix ''\s+done\s+31\s+31\s", out, re.MULTILINE), out


@admin.ensure_deferred
async def test_a_refresh_after_10_files_changed_on_the_origin_replaces_exactly_those(
    make_admin_daemon: Callable[..., admin.AdminDaemon], credentials: admin.Credentials, origin: MisbehavingOrigin
) -> None:
    """
    40 copies, 10 of which change on the old server: a refresh replaces
    exactly those 10 (new bytes) and finds the other 30 fresh with a 304 each;
    copies the old server no longer has are kept (origin-gone).
    """
    daemon = make_admin_daemon()
    manhole = Manhole(daemon, credentials)
    tag = uuid.uuid4().hex[:8]
    keys = [f"mut/rf-{tag}/{i}.bin" for i in range(40)]
    source = daemon.root / "keys.txt"
    source.write_text("".join(f"{key}\n" for key in keys))
    backfill = await manhole.start(f"backfill({BUCKET!r}, 'keys:{source}')")
    assert (await manhole.ended(backfill))["outcomes"] == {"stored": 40}
    before = {key: stored(daemon, key) for key in keys}
    changed = keys[:10]
    for key in changed:
        origin.change(f"/{key}")

    refresh = await manhole.start(f"refresh({BUCKET!r}, 'mut/rf-{tag}/')")
    details = await manhole.ended(refresh)
    assert details["outcomes"] == {"fresh": 30, "replaced": 10} and details["failures"] == {}, details
    for key in changed:
        assert stored(daemon, key) == body_for(f"/{key}") + b"version 1" != before[key]
    assert all(stored(daemon, key) == before[key] for key in keys[10:])
    assert [origin.gets(f"/{key}") for key in keys] == [2] * 40  # the backfill's GET and one conditional GET

    gone = daemon.data_dir / BUCKET / f"gone-{tag}" / "a.bin"  # a copy of a page the old server deleted
    gone.parent.mkdir()
    gone.write_bytes(b"only here now")
    details = await manhole.ended(await manhole.start(f"refresh({BUCKET!r}, 'gone-{tag}/')"))
    assert details["outcomes"] == {"origin-gone": 1}, details
    assert gone.read_bytes() == b"only here now"
