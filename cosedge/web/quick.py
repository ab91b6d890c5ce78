"""
The quick path for the commonest request of all: a plain keep-alive GET of a
small object held in memory (issue 15).

Twisted's ``HTTPChannel`` takes each request line by line, builds a
``Request`` (two ``Headers``, a URL parse, a notification list), renders the
resource and writes the answer through the request's machinery: about 70 %
of a 1 KiB hit's CPU time, measured.  When a whole request head arrives in
one read, on an idle keep-alive connection, and it is a GET that nothing can
make differ from the usual 200 (no body, no conditional or range, no
``Connection`` but keep-alive, no cluster header), the channel parses it here
in one pass and asks the resource for a hot object's answer
(:meth:`cosedge.web.resource.EdgeResource.quick_hit`).  The answer is the
same bytes Twisted would write (its head is made with Twisted's ``Headers``,
once per object), counted and logged the same way.

Anything else — a head in two reads, a pipelined request, a method, header
or target that is not plain, a bucket that is private or revalidates, an
object that is not in memory — goes to Twisted's channel exactly as it came,
so what is answered, refused or logged there does not change.  The quick
path only ever says "mine" or "not mine"; it never answers an error.
"""

from __future__ import annotations

import re

from attrs import frozen
from twisted.internet.interfaces import IAddress

__all__ = ["QuickGet", "QuickRecord", "parse_quick_get"]

#: At most this many bytes of head (Twisted's ``totalHeadersSize`` is 16 KiB) and header lines.
_MAX_HEAD = 8192
_MAX_FIELDS = 64
#: Header fields as RFC 9110 has them (a token, a colon, visible characters, spaces, tabs and
#: obs-text): a head with anything else (no colon, a space before it, a folded line, a control
#: character) is left to Twisted's channel, which refuses what it must.
_FIELDS = re.compile(rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e\x80-\xff]*\r\n)*\Z")
#: The request line: GET, an origin-form target of visible characters, HTTP/1.1.
_REQUEST_LINE = re.compile(rb"GET (/[\x21-\x7e]*) HTTP/1\.1\r\n")
#: Request headers that frame a body, end or upgrade the connection, make a hit's answer differ
#: (conditionals, ranges) or mark another edge's read: a request with one goes the usual way.
_NOT_QUICK = frozenset(
    {
        b"content-length",
        b"transfer-encoding",
        b"expect",
        b"upgrade",
        b"range",
        b"if-range",
        b"if-match",
        b"if-none-match",
        b"if-modified-since",
        b"if-unmodified-since",
        b"x-cosedge-cluster",
        b"x-cosedge-scheme",
    }
)


@frozen
class QuickGet:
    """What the quick path needs of a plain GET: its target and the headers the answer or log reads."""

    uri: bytes
    host: bytes
    referer: bytes | None
    user_agent: bytes | None


def parse_quick_get(data: bytes) -> QuickGet | None:
    """
    ``data`` as one plain keep-alive GET head and nothing after it, or None
    (the usual way takes it): see the module's docstring for what is plain.
    """
    if len(data) > _MAX_HEAD or not data.endswith(b"\r\n\r\n"):
        return None
    line = _REQUEST_LINE.match(data)
    if line is None:
        return None
    start = line.end()
    end = len(data) - 2
    if data.find(b"\r\n\r\n", start - 2) != end - 2 or not _FIELDS.match(data, start, end):
        return None
    fields = data[start : end - 2].split(b"\r\n") if end > start else []
    if len(fields) > _MAX_FIELDS:
        return None
    seen: dict[bytes, bytes] = {}
    for field in fields:
        name, _, value = field.partition(b":")
        name = name.lower()
        if name in seen or name in _NOT_QUICK:  # a repeated header: Twisted's channel decides what it means
            return None
        seen[name] = value.strip(b" \t")
    host = seen.get(b"host")
    connection = seen.get(b"connection")
    if host is None or (connection is not None and connection.lower() != b"keep-alive"):
        return None
    return QuickGet(line.group(1), host, seen.get(b"referer"), seen.get(b"user-agent"))


class QuickRecord:
    """
    An answered quick GET as the access log reads a request
    (``twisted.web.http.combinedLogFormatter``'s attributes): the same line
    as Twisted's ``Request`` would give.
    """

    __slots__ = ("_get", "_peer", "code", "sentLength", "uri")
    method = b"GET"
    clientproto = b"HTTP/1.1"

    def __init__(self, get: QuickGet, peer: IAddress, code: int, sent: int) -> None:
        self._get = get
        self._peer = peer
        self.uri = get.uri
        self.code = code
        self.sentLength = sent

    def getClientAddress(self) -> IAddress:
        return self._peer

    def getHeader(self, name: bytes) -> bytes | None:
        if name == b"referer":
            return self._get.referer
        if name == b"user-agent":
            return self._get.user_agent
        return None
