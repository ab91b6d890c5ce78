"""
Packaging and the systemd units: the unit files pass ``systemd-analyze
verify`` and say what the operations guide promises; a built wheel carries
the twistd plugin and no ``dropin.cache``; installed into a clean virtualenv
it makes ``twistd --help`` list ``cosedge``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ETC = REPO / "etc"
VENV_BIN = Path(sys.executable).parent
INSTALLED_BIN = "/opt/cosedge/bin/"


Unit = dict[str, dict[str, list[str]]]


def unit(path: Path) -> Unit:
    """A unit file as {section: {key: [every value, in order]}} (systemd keys repeat)."""
    sections: Unit = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}: setting outside a section: {line}"
        key, eq, val = line.partition("=")
        assert eq, f"{path.name}: not a setting: {line}"
        current.setdefault(key.strip(), []).append(val.strip())
    return sections


def values(parsed: Unit, section: str, key: str) -> list[str]:
    return parsed.get(section, {}).get(key, [])


def value(parsed: Unit, section: str, key: str) -> str:
    found = values(parsed, section, key)
    assert found, f"[{section}] {key}= is missing"
    return found[-1]


# -- the unit files --


def test_service_unit_runs_twistd_in_the_foreground_with_readiness() -> None:
    """cosedge.service: Type=notify, foreground twistd with no pidfile, journald logs, HUP reload, restarts."""
    service = unit(ETC / "cosedge.service")
    assert value(service, "Service", "Type") == "notify"
    argv = value(service, "Service", "ExecStart").split()
    assert argv[0] == INSTALLED_BIN + "twistd"
    assert "--nodaemon" in argv[: argv.index("cosedge")] and "--pidfile=" in argv[: argv.index("cosedge")]
    assert argv[argv.index("--logger") + 1] == "cosedge.logs.journald"
    assert argv[argv.index("cosedge") :] == ["cosedge", "--config", "/etc/cosedge/cosedge.toml"]
    assert value(service, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert value(service, "Service", "Restart") == "on-failure"
    assert value(service, "Install", "WantedBy") == "multi-user.target"


def test_service_unit_is_hardened() -> None:
    """The service runs as a dynamic user that can write only its state and log directories."""
    service = unit(ETC / "cosedge.service")
    expected = {
        "DynamicUser": "yes",
        "StateDirectory": "cosedge",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "SystemCallFilter": "@system-service",
    }
    assert {key: value(service, "Service", key) for key in expected} == expected
    config = (ETC / "cosedge.systemd.toml").read_text()
    assert 'data_dir = "/var/lib/cosedge"' in config  # the StateDirectory


def test_socket_activation_files_agree() -> None:
    """cosedge.socket names its socket, and the drop-in makes the service adopt exactly that name."""
    socket_unit = unit(ETC / "cosedge.socket")
    name = value(socket_unit, "Socket", "FileDescriptorName")
    dropin = unit(ETC / "cosedge.service.d" / "socket.conf")
    starts = values(dropin, "Service", "ExecStart")
    assert starts[0] == "", "the drop-in must reset ExecStart before replacing it"
    argv = starts[-1].split()
    assert argv[argv.index("--listen") + 1] == f"systemd:domain=INET:name={name}"
    assert value(dropin, "Unit", "Requires") == "cosedge.socket"
    service_argv = value(unit(ETC / "cosedge.service"), "Service", "ExecStart").split()
    assert argv[: len(service_argv)] == service_argv


@pytest.fixture
def installed_units(tmp_path: Path) -> Path:
    """The unit files as installed, with ExecStart pointing at this virtualenv's twistd."""
    units = tmp_path / "units"
    shutil.copytree(ETC, units, ignore=shutil.ignore_patterns("*.toml"))
    for path in [units / "cosedge.service", units / "cosedge.service.d" / "socket.conf"]:
        path.write_text(path.read_text().replace(INSTALLED_BIN, f"{VENV_BIN}/"))
    return units


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_passes(installed_units: Path) -> None:
    """`systemd-analyze verify` accepts the service, the socket and the drop-in without a single warning."""
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{installed_units}:"}
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "cosedge.service", "cosedge.socket"],
        cwd=installed_units,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # unknown keys are only warnings: refuse those too


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_catches_mistakes(installed_units: Path) -> None:
    """The verification above is real: a misspelt setting is reported."""
    path = installed_units / "cosedge.service"
    path.write_text(path.read_text().replace("Type=notify", "Type=notify\nRestartSecs=2"))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "cosedge.service"],
        cwd=installed_units,
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{installed_units}:"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "RestartSecs" in result.stderr


# -- the wheel --


def _source_copy(tmp: Path) -> Path:
    """The project's source as a clean checkout would have it, plus a stray plugin cache."""
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "dropin.cache", "*.pyc")
    for name in ("cosedge", "twisted"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    # What running twistd from a checkout leaves behind; it must never ship.
    (src / "twisted" / "plugins" / "dropin.cache").write_bytes(b"stale")
    return src


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A wheel built from the source with pip (the registry only when the build backend is missing)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = _source_copy(tmp)
    out = tmp / "dist"
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)]
    if importlib.util.find_spec("hatchling") is not None:
        command.insert(4, "--no-build-isolation")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (built,) = out.glob("cosedge-*.whl")
    yield built


@pytest.mark.e2e
def test_wheel_carries_the_plugin_and_no_cache(wheel: Path) -> None:
    """The wheel has twisted/plugins/cosedge_plugin.py, no dropin.cache and nothing that would shadow Twisted."""
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/cosedge_plugin.py" in names
    assert not any(name.endswith("dropin.cache") for name in names)
    assert [n for n in names if n.startswith("twisted/")] == ["twisted/plugins/cosedge_plugin.py"]
    assert {"cosedge/__init__.py", "cosedge/tap.py", "cosedge/default.toml", "cosedge/ops/service.py"} <= names
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in names)


@pytest.mark.e2e
def test_clean_virtualenv_install_lists_the_plugin(wheel: Path, tmp_path: Path) -> None:
    """pip install of the wheel into a fresh virtualenv: `twistd --help` lists cosedge, and its options load."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    twistd = str(venv / "bin" / "twistd")
    # Run from an empty directory, so nothing from the checkout can be found by accident.
    listing = subprocess.run([twistd, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    commands = [line.split()[0] for line in listing.stdout.splitlines() if line.startswith("    ") and line.split()]
    assert "cosedge" in commands, listing.stdout
    options = subprocess.run(
        [twistd, "cosedge", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert options.returncode == 0, options.stderr
    assert "--config" in options.stdout and "--listen" in options.stdout
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import cosedge; print(cosedge.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr
