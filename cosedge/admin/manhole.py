"""
The ``[manhole]`` section: which SSH and telnet listeners to open, and the
files that go with them (authorized keys, host key, telnet passwords),
validated before the daemon starts.  The listeners themselves are in
:mod:`cosedge.admin.shells`.
"""

from __future__ import annotations

import binascii
import ipaddress
import os
from collections.abc import Mapping
from typing import Any

from attrs import frozen

from ..config import ConfigError
from .passwords import read_password_file

__all__ = [
    "ManholeSettings",
    "check_manhole_files",
    "parse_manhole",
    "read_authorized_keys",
    "telnet_endpoint_parts",
]

_MANHOLE_KEYS = ("ssh", "ssh_authorized_keys", "ssh_host_key", "telnet", "telnet_passwords")


@frozen
class ManholeSettings:
    """The validated ``[manhole]`` section."""

    #: Endpoint string of the SSH listener, or None.
    ssh: str | None
    #: authorized_keys file for SSH logins (any user name; keys decide).
    ssh_authorized_keys: str | None
    #: Where the SSH host key is kept (generated on first start).
    ssh_host_key: str
    #: Endpoint string of the telnet listener (``unix:`` or loopback ``tcp:``), or None.
    telnet: str | None
    #: File of hashed passwords for telnet logins (required on TCP).
    telnet_passwords: str | None


def _string(table: Mapping[str, Any], key: str) -> str | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"[manhole] {key} must be a non-empty string, not {value!r}")
    return value


def telnet_endpoint_parts(description: str) -> tuple[str, dict[str, Any]]:
    """
    Split a telnet endpoint string into ``("tcp", {port, interface, backlog})``
    or ``("unix", {address, backlog, lockfile})``.

    :raises ConfigError: for anything but a UNIX socket or a loopback TCP port.
    """
    from twisted.internet.endpoints import _parseServer

    kind = description.partition(":")[0].strip().lower()
    if kind not in ("tcp", "unix"):
        raise ConfigError(
            f"[manhole] telnet {description!r}: only 'unix:PATH' or 'tcp:PORT:interface=127.0.0.1' are allowed"
        )
    try:
        name, args, kw = _parseServer(description, None)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"[manhole] telnet {description!r} is not a valid endpoint: {e}") from None
    if name == "UNIX":
        if "mode=" in description and kw["mode"] != 0o600:
            raise ConfigError(
                f"[manhole] telnet {description!r}: a telnet UNIX socket always has mode 600; leave mode out"
            )
        return "unix", {"address": args[0], "backlog": kw["backlog"], "lockfile": kw["wantPID"]}
    interface = kw["interface"]
    try:
        loopback = ipaddress.ip_address(interface).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        where = f"interface {interface!r}" if interface else "all interfaces (no interface= given)"
        raise ConfigError(
            f"[manhole] telnet {description!r}: refusing to listen for telnet on {where}: telnet is unencrypted."
            " Use a loopback interface (tcp:2323:interface=127.0.0.1), a unix: socket, or ssh for remote access"
        )
    return "tcp", {"port": args[0], "interface": interface, "backlog": kw["backlog"]}


def parse_manhole(table: object, data_dir: str) -> ManholeSettings:
    """
    Validate the ``[manhole]`` section (endpoints and which files go with
    them; the files themselves are checked by :func:`check_manhole_files`).

    :raises ConfigError: naming the field.
    """
    if not isinstance(table, Mapping):
        raise ConfigError("[manhole] must be a table")
    unknown = sorted(set(table) - set(_MANHOLE_KEYS))
    if unknown:
        raise ConfigError(f"[manhole] has unknown setting(s) {', '.join(unknown)}; known: {', '.join(_MANHOLE_KEYS)}")
    values = {k: _string(table, k) for k in _MANHOLE_KEYS}
    ssh, telnet = values["ssh"], values["telnet"]
    if ssh is None and telnet is None:
        raise ConfigError("[manhole] sets neither ssh nor telnet; give an endpoint, or remove the section")
    if ssh is None:
        for key in ("ssh_authorized_keys", "ssh_host_key"):
            if values[key] is not None:
                raise ConfigError(f"[manhole] {key} is set but ssh is not")
    else:
        from twisted.internet.endpoints import serverFromString
        from twisted.internet.testing import MemoryReactor

        try:
            serverFromString(MemoryReactor(), ssh)
        except Exception as e:  # the parsers raise all sorts
            raise ConfigError(f"[manhole] ssh {ssh!r} is not a valid endpoint: {e}") from None
        if values["ssh_authorized_keys"] is None:
            raise ConfigError("[manhole] ssh needs ssh_authorized_keys (an authorized_keys file of who may log in)")
    if telnet is None:
        if values["telnet_passwords"] is not None:
            raise ConfigError("[manhole] telnet_passwords is set but telnet is not")
    else:
        kind, _ = telnet_endpoint_parts(telnet)
        if kind == "tcp" and values["telnet_passwords"] is None:
            raise ConfigError(
                "[manhole] telnet on TCP needs telnet_passwords (a file of lines made by"
                " 'python -m cosedge.admin hash-password USER')"
            )
    host_key = values["ssh_host_key"] or os.path.join(data_dir, ".cosedge", "ssh_host_ed25519_key")
    return ManholeSettings(ssh, values["ssh_authorized_keys"], host_key, telnet, values["telnet_passwords"])


def read_authorized_keys(path: str) -> list[Any]:
    """
    The public keys of an authorized_keys file (``ssh-ed25519 AAAA… comment``
    lines; lines with options are not supported and are skipped).

    :raises ConfigError: when the file cannot be read.
    """
    from twisted.conch.ssh.keys import BadKeyError, Key

    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ConfigError(f"[manhole] ssh_authorized_keys {path}: cannot read: {e}") from None
    found = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith(b"#"):
            try:
                found.append(Key.fromString(line))
            except (BadKeyError, ValueError, IndexError, binascii.Error):
                continue
    return found


def check_manhole_files(settings: ManholeSettings) -> None:
    """
    Check the files the manhole needs: the authorized_keys file has at least
    one key, an existing host key loads, the password file parses.

    :raises ConfigError: naming the field and the file.
    """
    if settings.ssh_authorized_keys is not None and not read_authorized_keys(settings.ssh_authorized_keys):
        raise ConfigError(
            f"[manhole] ssh_authorized_keys {settings.ssh_authorized_keys}: no usable public key"
            " (expected lines like 'ssh-ed25519 AAAA... comment')"
        )
    if settings.ssh is not None and os.path.exists(settings.ssh_host_key):
        from twisted.conch.ssh.keys import Key

        try:
            key = Key.fromFile(settings.ssh_host_key)
        except Exception as e:  # BadKeyError, OSError, ValueError …
            raise ConfigError(f"[manhole] ssh_host_key {settings.ssh_host_key}: cannot load: {e}") from None
        if key.isPublic():
            raise ConfigError(f"[manhole] ssh_host_key {settings.ssh_host_key}: is a public key, not a private one")
    if settings.telnet_passwords is not None:
        try:
            users = read_password_file(settings.telnet_passwords)
        except ConfigError as e:
            raise ConfigError(f"[manhole] telnet_passwords {e}") from None
        if not users:
            raise ConfigError(
                f"[manhole] telnet_passwords {settings.telnet_passwords}: no users; add lines made by"
                " 'python -m cosedge.admin hash-password USER'"
            )
