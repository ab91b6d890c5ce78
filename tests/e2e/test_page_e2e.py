"""
The migration page in a real browser: the real daemon with an [admin]
listener, real traffic (misses filled from the real origin, then hits; a
hostile key the origin does not have; a bucket whose origin refuses
connections), then headless Chromium (Debian's ``chromium``, installed by
``.ci/run``) loads ``GET /``.  The rendered DOM must hold the chart with
data, a row per bucket, the dead host marked down, the hostile key as text
and not as markup, the progress bar of a backfill that is running (started
through the manhole), and the browser must have logged no console message
at all (the page has no script; a blocked style or asset would show up
there).  The screenshot is kept in
the test's directory; with ``COSEDGE_DOCS_SCREENSHOT=1`` it is also copied
to ``docs/migration-page.png`` for the README.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import BUCKET, FAST_FILL, Daemon, free_port, raw_request, wait_for
from .origin import MisbehavingOrigin

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium")
REPO = Path(__file__).resolve().parents[2]
DEAD = "dead-1250000000"
#: A key that would be markup if it were not escaped (percent-encoded on the wire).
HOSTILE_KEY = "status/404/<img src=x onerror=alert(1)>.jpg"
HOSTILE_TARGET = "/status/404/%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E.jpg"
BROWSER_TIMEOUT = 90
#: Keys of the backfill, and its rate (objects/s): slow enough to be running while the browser looks.
BACKFILL_KEYS = 300
BACKFILL_RATE = 10
_TELNET = re.compile(rb"\xff[\xfb-\xfe].|\xff\xfa.*?\xff\xf0|\x1b\[[0-9;?]*[A-Za-z]", re.DOTALL)


def manhole(path: Path, line: str, answer: str, timeout: float = 10.0) -> str:
    """
    Type one line into the daemon's shell (telnet on a UNIX socket: no
    password) and wait for output matching ``answer``; what it printed.
    """
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        _read_until(sock, ">>> ", timeout)
        sock.sendall(line.encode() + b"\r\n")
        return _read_until(sock, answer, timeout)


def _read_until(sock: socket.socket, pattern: str, timeout: float) -> str:
    raw, deadline = b"", time.monotonic() + timeout
    while not re.search(pattern, text := _TELNET.sub(b"", raw).decode("utf-8", "replace")):
        assert time.monotonic() < deadline and len(raw) < 1_000_000, text
        piece = sock.recv(65536)
        assert piece, f"the manhole closed the connection: {text!r}"
        raw += piece
    return text


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium with a profile of its own; console messages go to stderr."""
    assert CHROMIUM is not None
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=BROWSER_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


def console_messages(stderr: str) -> list[str]:
    """Lines Chromium logged for the page's console (every level is logged as INFO:CONSOLE)."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def get_page(admin_port: int) -> str:
    reply = raw_request(admin_port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert reply.status == 200 and reply.header("content-type") == "text/html; charset=utf-8"
    return reply.body.decode()


def bucket_section(dom: str, bucket: str) -> str:
    start = dom.index(f'data-bucket="{bucket}"')
    end = dom.find('<section class="bucket"', start)
    return dom[start : end if end != -1 else len(dom)]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; .ci/run does)")
def test_migration_page_in_a_real_browser(
    tmp_path_factory: pytest.TempPathFactory, origin: MisbehavingOrigin, tmp_path: Path
) -> None:
    admin_port = free_port()
    root = tmp_path_factory.mktemp("cosedge")
    with socket.socket() as refusing:  # bound, never listening: connections are refused
        refusing.bind(("127.0.0.1", 0))
        dead_origin = f"127.0.0.1:{refusing.getsockname()[1]}"
        daemon = Daemon(
            root,
            origin.netloc,
            dict(FAST_FILL),
            {DEAD: (dead_origin, True)},
            extra_config=f'\n[admin]\nlisten = "tcp:{admin_port}:interface=127.0.0.1"\nmin_free_bytes = 0\n'
            f'\n[manhole]\ntelnet = "unix:{root / "manhole.sock"}"\n',
        )
        daemon.start()
        try:
            _traffic(daemon)
            # The first look counts the bucket (6 objects); the count is kept for minutes.
            assert "6 objects, " in bucket_section(get_page(admin_port), BUCKET)
            _backfill(daemon, admin_port)
            _check_page(daemon, admin_port, tmp_path)
            assert daemon.problems() == [], "the daemon logged an unexpected error"
        finally:
            daemon.stop()


def _traffic(daemon: Daemon) -> None:
    """Misses that are filled, then hits; a key the origin does not have; a miss on the dead origin."""
    keys = [f"ok/page-{i}.bin" for i in range(6)]
    for key in keys:
        assert daemon.request(f"/{key}").status == 302
        assert daemon.fill_outcome(key) == "stored"
    for key in keys * 3:
        assert daemon.request(f"/{key}").status == 200
    for _ in range(3):
        assert daemon.request(HOSTILE_TARGET).status == 302
    assert daemon.fill_outcome(HOSTILE_KEY) == "http-404"
    assert daemon.request("/never.jpg", host=f"{DEAD}.file.myqcloud.com").status == 302
    daemon.wait_for_log(rf"fill {DEAD}/never\.jpg failed: ")


def _backfill(daemon: Daemon, admin_port: int) -> None:
    """Start a slow backfill through the manhole; wait until the page shows it counted and under way."""
    keys = daemon.root / "backfill.keys"
    keys.write_text("".join(f"ok/backfill-{i:03}.bin\n" for i in range(BACKFILL_KEYS)))
    command = f"edge.backfill({BUCKET!r}, 'keys:{keys}', rate_objects={BACKFILL_RATE})"
    started = manhole(daemon.root / "manhole.sock", command, r"job \d+ \w+: backfill of|Error")
    assert re.search(r"job \d+ \w+: backfill of " + BUCKET, started), started

    def under_way() -> bool:
        found = re.search(r'aria-valuemax="(\d+)" aria-valuenow="(\d+)"', get_page(admin_port))
        return found is not None and int(found.group(1)) == BACKFILL_KEYS and int(found.group(2)) >= 2 * BACKFILL_RATE

    wait_for(under_way, 15, "the page to show the backfill under way")


def _check_page(daemon: Daemon, admin_port: int, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{admin_port}/"
    profile = tmp_path / "chromium-profile"
    dumped = chromium(profile, "--dump-dom", url)
    assert dumped.returncode == 0, dumped.stderr[-3000:]
    dom = dumped.stdout
    assert console_messages(dumped.stderr) == [], "the browser logged console messages"
    assert "<title>cosedge — migration</title>" in dom

    # A row per bucket in the summary, and a section with a chart for each.
    summary = dom[dom.index('id="buckets"') : dom.index('id="jobs"')]
    assert re.findall(r'<a href="#bucket-\d+">([^<]+)</a>', summary) == sorted([BUCKET, DEAD])
    mine = bucket_section(dom, BUCKET)
    points = re.search(r'<svg class="chart"[^>]* data-points="(\d+)"', mine)
    assert points is not None and int(points.group(1)) >= 1, mine[:2000]
    assert re.search(r"<circle [^>]*><title>[^<]*% of \d+ requests? answered locally</title>", mine), mine[:3000]
    assert '<span class="share">66.7%</span> of 27 requests' in mine  # 18 hits; 6 + 3 redirects

    # The hostile key is listed as text among the keys not stored; no element came of it.
    assert "&lt;img src=x onerror=alert(1)&gt;" in mine
    assert "<img" not in dom
    # The dead origin is marked down in its bucket's hosts and in the summary.
    dead = bucket_section(dom, DEAD)
    assert re.search(rf'<span class="key">http://{re.escape(dead_host(daemon))}</span>.*?class="down">down<', dead)
    assert "1 origin host marked down" in dom

    # The backfill, running, with its progress bar.
    jobs = dom[dom.index('id="jobs"') : dom.index('id="fills"')]
    row = re.search(r"<tr><td>(\d+)</td><td>backfill</td><td>([^<]*)</td><td>running</td><td>(.*?)</td>", jobs)
    assert row is not None and row.group(2) == BUCKET, jobs
    progress = re.search(r'role="progressbar"[^>]*aria-valuemax="(\d+)" aria-valuenow="(\d+)"', row.group(3))
    assert progress is not None and progress.group(1) == str(BACKFILL_KEYS), row.group(3)
    assert 0 < int(progress.group(2)) < BACKFILL_KEYS
    assert re.search(r'<span style="width:[\d.]+%">', row.group(3))

    shot = tmp_path / "migration-page.png"
    taken = chromium(profile, f"--screenshot={shot}", "--window-size=1280,2000", "--hide-scrollbars", url)
    assert taken.returncode == 0, taken.stderr[-3000:]
    assert console_messages(taken.stderr) == []
    wait_for(lambda: shot.exists() and shot.stat().st_size > 10_000, 5, "the screenshot")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("COSEDGE_DOCS_SCREENSHOT"):
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shot, REPO / "docs" / "migration-page.png")


def dead_host(daemon: Daemon) -> str:
    return daemon.buckets[DEAD][0]
