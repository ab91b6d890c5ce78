"""
The quick path for the commonest requests of all (issue 15): a plain
keep-alive GET of a small object held in memory, and one of a missing object
that its bucket answers with a redirect (the 302 that starts a fill).

Twisted's ``HTTPChannel`` takes each request line by line, builds a
``Request`` (two ``Headers``, a URL parse, a notification list), renders the
resource and writes the answer through the request's machinery: about 70 %
of a 1 KiB hit's CPU time, measured.  When a whole request head arrives in
one read, on an idle keep-alive connection, and it is a GET that nothing can
make differ from the usual answer (no body, no conditional or range, no
``Connection`` but keep-alive, no cluster header), the channel parses it here
in one pass and asks :class:`QuickAnswers` for the answer, in a public bucket
that does not revalidate: a hot object's 200, or, when the store surely has
no object there, the redirect the bucket's rules plan, and its fill.  The
answer is the same bytes Twisted would write (a hot object's header lines
are made with Twisted's ``Headers``, once per object), counted and logged
the same way.

Anything else — a head in two reads, a pipelined request, a method, header
or target that is not plain, a bucket that is private or revalidates, an
object that is not in memory, a miss in mirror mode or not found — goes to
Twisted's channel exactly as it came, so what is answered, refused or logged
there does not change.  The quick path only ever says "mine" or "not mine";
it never answers an error.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from attrs import frozen
from twisted.internet.interfaces import IAddress
from twisted.web.http_headers import Headers

from .. import origins
from ..cluster import HEADER, SCHEME_HEADER
from ..config import Config
from ..fill.scheduler import Filler
from ..keys import BadKey, parse_target
from ..stats import Stats
from ..storage.hot import HotObject
from .hit import whole_answer_head
from .hosts import BucketHosts

__all__ = ["QuickAnswers", "QuickGet", "QuickRecord", "QuickStore", "parse_quick_get"]

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
        HEADER,
        SCHEME_HEADER,
    }
)


@frozen
class QuickGet:
    """A plain GET: its target and its header fields (lower-case names, each once)."""

    uri: bytes
    fields: dict[bytes, bytes]

    @property
    def host(self) -> bytes:
        return self.fields[b"host"]


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
    return QuickGet(line.group(1), seen)


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
        return self._get.fields.get(name)


@runtime_checkable
class QuickStore(Protocol):
    """What the quick path asks of a store, at once (see :class:`cosedge.storage.disk.DiskStore`)."""

    def hot(self, bucket: str, segments: tuple[str, ...]) -> HotObject | None: ...

    def absent(self, bucket: str, segments: tuple[str, ...]) -> bool: ...


class QuickAnswers:
    """
    The quick path's answers for one bucket listener, over its configuration,
    Host routing, store, filler and counters (the resource's own).  The store
    must say at once what it holds in memory (``hot``) and what it surely
    does not hold (``absent``): the disk store does.
    """

    def __init__(
        self,
        config: Callable[[], Config],
        hosts: BucketHosts,
        store: QuickStore,
        filler: Filler,
        stats: Stats,
        request_id: Callable[[], str],
    ) -> None:
        self._config = config
        self._hosts = hosts
        self._hot = store.hot
        self._absent = store.absent
        self._filler = filler
        self._stats = stats
        self._request_id = request_id

    def answer(self, get: QuickGet, secure: bool) -> tuple[int, bytes, bytes, bytes] | None:
        """
        The answer to a plain GET (``secure``: it came over HTTPS) in a public bucket that does not revalidate, when it
        is the hit of an object the store holds in memory or a miss the
        bucket answers with a redirect: its status, request id, the header
        lines after x-cos-request-id, and its body; counted (and for a miss,
        the fill started) as the usual way does.  None for anything else,
        with nothing done or counted: the usual way then takes the request
        from its start.
        """
        try:
            target = parse_target(get.uri)
        except BadKey:
            return None
        segments = target.segments
        if target.query is not None or target.authority is not None or not segments:
            return None
        config = self._config()
        bucket_name = self._hosts.bucket(get.host, config)
        bucket = config.buckets.get(bucket_name) if bucket_name is not None else None
        if bucket is None or bucket_name is None or bucket.acl == "private" or bucket.revalidate_after:
            return None
        stats = self._stats
        obj = self._hot(bucket_name, segments)
        if obj is not None:
            if not obj.data:  # an empty object's answer is Twisted's to make
                return None
            head = obj.derived.get("head")
            if head is None:
                head = obj.derived["head"] = whole_answer_head(obj, segments[-1])
            stats.hit(bucket_name)
            stats.inc("bytes_served", len(obj.data))
            return 200, self._request_id().encode("ascii"), head, obj.data
        if not self._absent(bucket_name, segments):
            return None
        plan = origins.plan(
            bucket,
            segments,
            None,
            b"GET",
            secure=secure,
            headers=Headers({name: [value] for name, value in get.fields.items()}),
            up=self._filler.health.up,
        )
        if plan.answer != "redirect" or plan.location is None:  # mirror mode, or a 404: the usual way
            return None
        stats.inc("misses")
        stats.redirected(bucket_name, target.key)
        if plan.fetch is not None:
            self._filler.start(bucket_name, segments, plan.fetch)
        return plan.status, self._request_id().encode("ascii"), _redirect_head(plan.location), b""


def _redirect_head(location: bytes) -> bytes:
    """A redirect's header lines after x-cos-request-id, as the usual way has Twisted write them."""
    return b"Location: %s\r\nCache-Control: no-store\r\nContent-Length: 0\r\n\r\n" % location
