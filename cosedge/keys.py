"""
Object keys: from the raw request target to validated path segments.

Everything here is pure and runs before any file-system call.  A key is
percent-decoded exactly once, must be UTF-8, and is split on ``/`` into
segments that are each safe to use as one file name: no empty, ``.`` or
``..`` segment, no NUL or control characters, no backslash, nothing that a
second decoding would turn into any of those, and nothing that collides with
cosedge's internal names.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote_to_bytes

from attrs import frozen

__all__ = [
    "BadKey",
    "MAX_KEY_BYTES",
    "MAX_SEGMENT_BYTES",
    "INTERNAL_PREFIX",
    "Target",
    "encode_key",
    "encode_query",
    "parse_target",
    "split_key",
]

#: COS allows object keys of up to 850 bytes.
MAX_KEY_BYTES = 850
#: The longest file name the usual Linux file systems allow.
MAX_SEGMENT_BYTES = 255
#: Names starting with this are cosedge's own and never reachable by a key.
INTERNAL_PREFIX = ".cosedge"

# Characters allowed unencoded in a path segment (RFC 3986 pchar, less "%").
_PCHAR_SAFE = "!$&'()*+,;=:@-._~"
# Characters allowed unencoded in a query (RFC 3986), "%" kept for escapes.
_QUERY_SAFE = _PCHAR_SAFE + "/?%"
_BAD_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_CONTROL = re.compile("[\x00-\x1f\x7f]")


class BadKey(ValueError):
    """
    The request target does not name a valid object key.

    :ivar code: the COS error code (``InvalidURI`` or ``KeyTooLong``).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@frozen
class Target:
    """A parsed request target."""

    #: The authority of an absolute-form target (``GET http://host/x``), else None.
    authority: bytes | None
    #: The key's segments; empty for the bucket root.
    segments: tuple[str, ...]
    #: The raw query string (without ``?``), or None.
    query: bytes | None

    @property
    def key(self) -> str:
        return "/".join(self.segments)


def parse_target(uri: bytes) -> Target:
    """
    Parse a raw request target (origin-form ``/a/b?q`` or absolute-form
    ``http://host/a/b?q``) into a :class:`Target`.

    :raises BadKey: for anything that is not a valid key.
    """
    path, sep, query = uri.partition(b"?")
    authority = None
    if not path.startswith(b"/"):
        lowered = path[:8].lower()
        for scheme in (b"http://", b"https://"):
            if lowered.startswith(scheme):
                rest = path[len(scheme) :]
                authority, slash, tail = rest.partition(b"/")
                path = slash + tail if slash else b"/"
                break
        else:
            raise BadKey("InvalidURI", "The request target must be an absolute path.")
    path, _, _ = path.partition(b"#")
    return Target(authority, split_key(path[1:]), query if sep else None)


def split_key(raw: bytes) -> tuple[str, ...]:
    """
    Decode a percent-encoded key (without its leading ``/``) and split it
    into validated segments.
    """
    if not raw:
        return ()
    if _BAD_PERCENT.search(raw):
        raise BadKey("InvalidURI", "The key contains a malformed percent-encoding.")
    decoded = unquote_to_bytes(raw)
    if len(decoded) > MAX_KEY_BYTES:
        raise BadKey("KeyTooLong", f"The key is longer than {MAX_KEY_BYTES} bytes.")
    try:
        key = decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise BadKey("InvalidURI", "The key is not valid UTF-8.") from None
    segments = _check(key)
    # A second decoding must not produce anything a first one would refuse
    # (``%252e%252e`` → ``%2e%2e`` → ``..``): intermediaries and origins
    # that decode again would otherwise see a traversal.
    if "%" in key:
        again = unquote_to_bytes(key).decode("utf-8", "replace")
        if again != key:
            try:
                _check(again)
            except BadKey:
                raise BadKey("InvalidURI", "The key contains a double-encoded forbidden sequence.") from None
    return segments


def _check(key: str) -> tuple[str, ...]:
    if _CONTROL.search(key):
        raise BadKey("InvalidURI", "The key contains NUL or control characters.")
    if "\\" in key:
        raise BadKey("InvalidURI", "The key contains a backslash.")
    segments = tuple(key.split("/"))
    for segment in segments:
        if segment in ("", ".", ".."):
            raise BadKey("InvalidURI", "The key contains an empty, '.' or '..' path segment.")
        if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
            raise BadKey("KeyTooLong", f"A path segment of the key is longer than {MAX_SEGMENT_BYTES} bytes.")
        if segment.startswith(INTERNAL_PREFIX):
            raise BadKey("InvalidURI", f"Key segments may not start with {INTERNAL_PREFIX!r}.")
    return segments


def encode_key(segments: tuple[str, ...]) -> bytes:
    """Percent-encode validated segments back into a URL path (no leading ``/``)."""
    return "/".join(quote(s, safe=_PCHAR_SAFE) for s in segments).encode("ascii")


def encode_query(query: bytes) -> bytes:
    """
    Re-encode a raw query string so that it is a valid, single-line URL
    component; existing percent-escapes are kept.
    """
    return quote(_BAD_PERCENT.sub(b"%25", query), safe=_QUERY_SAFE).encode("ascii")
