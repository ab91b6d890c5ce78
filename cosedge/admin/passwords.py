"""
Telnet passwords: scrypt hashes in a password file, and the
``python -m cosedge.admin hash-password [USER]`` command that makes its lines.

One line per user: ``USER:scrypt$N$R$P$SALT$HASH``
with SALT and HASH in unpadded URL-safe base64, HASH = ``hashlib.scrypt(
password, salt=SALT, n=N, r=R, p=P, dklen=32)``.  Blank lines and lines
starting with '#' are ignored.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import hashlib
import hmac
import re
import secrets
import sys
from collections.abc import Iterable

from ..config import ConfigError

__all__ = ["hash_password", "main", "read_password_file", "verify_password"]

_USER = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_SCRYPT = (2**14, 8, 1)
_MAXMEM = 64 * 1024 * 1024


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """The ``scrypt$…`` hash of ``password`` (a fresh random salt unless given)."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    n, r, p = _SCRYPT
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=32, maxmem=_MAXMEM)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def _parse_hash(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("expected scrypt$N$R$P$SALT$HASH")
    n, r, p = (int(x) for x in parts[1:4])
    if n < 2 or n & (n - 1) or n > 2**20 or not 1 <= r <= 32 or not 1 <= p <= 16:
        raise ValueError("scrypt parameters out of range")
    salt, digest = _unb64(parts[4]), _unb64(parts[5])
    if len(salt) < 8 or len(digest) < 16:
        raise ValueError("salt or hash too short")
    return n, r, p, salt, digest


def verify_password(encoded: str, password: str) -> bool:
    """Whether ``password`` matches ``encoded`` (constant-time comparison)."""
    try:
        n, r, p, salt, digest = _parse_hash(encoded)
    except ValueError:
        return False
    computed = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=len(digest), maxmem=_MAXMEM)
    return hmac.compare_digest(computed, digest)


def read_password_file(path: str) -> dict[str, str]:
    """
    ``{user: hash}`` from a password file.

    :raises ConfigError: naming the file and line when it is malformed.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    users: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, encoded = line.partition(":")
        try:
            if not sep or not _USER.match(user):
                raise ValueError("expected USER:scrypt$N$R$P$SALT$HASH")
            _parse_hash(encoded)
        except (ValueError, binascii.Error) as e:
            raise ConfigError(f"{path} line {number}: {e}") from None
        users[user] = encoded
    return users


def _read_new_password(stream_is_tty: bool) -> str:
    if not stream_is_tty:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != first:
        raise SystemExit("the passwords differ")
    return first


def main(argv: Iterable[str] | None = None) -> int:
    """``python -m cosedge.admin hash-password [USER]``: print a password-file line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "hash-password" or len(args) > 2:
        print(
            "usage: python -m cosedge.admin hash-password [USER]\n"
            "  reads the password (twice on a terminal, once from a pipe) and prints\n"
            "  the line to add to the [manhole] telnet_passwords file",
            file=sys.stderr,
        )
        return 2
    user = args[1] if len(args) == 2 else "admin"
    if not _USER.match(user):
        print(f"invalid user name {user!r}: letters, digits, '.', '_', '-'", file=sys.stderr)
        return 2
    password = _read_new_password(sys.stdin.isatty())
    if not password:
        print("refusing an empty password", file=sys.stderr)
        return 2
    print(f"{user}:{hash_password(password)}")
    return 0
