"""
The S3 store's objects: how a stored object's metadata is kept in S3's
user metadata, an open object (:class:`S3Object`, read with ranged GETs),
and a writer (:class:`S3Writer`) that holds the body (in memory, or in a
temporary file) and stores it whole on commit.

Metadata: an origin's ``x-cos-meta-<name>`` of plain printable ASCII is
kept as ``x-amz-meta-<name>`` (what other S3 tools show); everything else
(Content-Type, ETag, Last-Modified, the check time, …) and the object's
modification time go into one JSON header, ``x-amz-meta-cosedge`` (ASCII:
escapes for the rest), so that any value comes back exactly.  S3 limits user
metadata to 2 KiB (names and values): past it, origin ``x-cos-meta-*``
headers, then optional headers, are left out (largest first), and the
essential ones never are.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime
from types import MappingProxyType
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IConsumer
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from zope.interface import implementer

from ..interfaces import IObjectWriter, IStoredObject, StoreError
from .produce import _Consumer
from .s3_http import RangeStream, read_body

__all__ = ["META_HEADER", "PREFIX", "S3Object", "S3Writer", "meta_headers", "meta_of"]

_log = Logger()

#: The JSON header of cosedge's metadata (the part after ``x-amz-meta-`` is its S3 name).
META_HEADER = "x-amz-meta-cosedge"
_USER = "x-amz-meta-"
_COS = "x-cos-meta-"
#: S3's limit on user metadata, names (after ``x-amz-meta-``) and values together.
META_LIMIT = 2048
#: Kept whatever their size: the headers a hit cannot be served right without.
_ESSENTIAL = frozenset({"content-type", "content-encoding", "etag", "last-modified", "cosedge-checked"})
#: A value S3 keeps and gives back as it is: printable ASCII, single spaces inside.
_PLAIN = re.compile(r"[\x21-\x7e]+(?: [\x21-\x7e]+)*\Z")
_NAME = re.compile(r"[a-z0-9!#$&'*+.^_`|~-]+\Z")
#: S3 system headers of an object another tool stored (no cosedge metadata), kept as metadata.
_FOREIGN = (b"content-type", b"content-encoding", b"content-disposition", b"cache-control", b"expires")
#: The first bytes of an object, read when it is opened: a hit of an object this small needs
#: no other request (most of a website's files; 100 KiB hits: 0.19x the engine's rate with
#: 64 KiB, two GETs each).  Held in memory while the object is open.
PREFIX = 128 * 1024


def _json(meta: Mapping[str, str], mtime: float) -> str:
    return json.dumps({"meta": dict(meta), "mtime": mtime}, separators=(",", ":"), sort_keys=True)


def meta_headers(meta: Mapping[str, str], mtime: float) -> dict[str, str]:
    """The ``x-amz-meta-*`` headers (and Content-Type) that keep ``meta`` and ``mtime``, within S3's limit."""
    own: dict[str, str] = {}
    user: dict[str, str] = {}
    for name, value in meta.items():
        suffix = name[len(_COS) :] if name.startswith(_COS) else ""
        if suffix and suffix != "cosedge" and _NAME.match(suffix) and _PLAIN.match(value):
            user[suffix] = value
        else:
            own[name] = value

    def size() -> int:
        return len(META_HEADER) - len(_USER) + len(_json(own, mtime)) + sum(len(k) + len(v) for k, v in user.items())

    dropped = []
    while size() > META_LIMIT:
        if user:
            name = max(user, key=lambda k: len(k) + len(user[k]))
            del user[name]
            dropped.append(_COS + name)
            continue
        optional = [k for k in own if k not in _ESSENTIAL]
        if not optional:
            raise StoreError(f"the object's metadata is over S3's {META_LIMIT}-byte limit")
        name = max(optional, key=lambda k: len(k) + len(own[k]))
        del own[name]
        dropped.append(name)
    if dropped:
        _log.warn("left out metadata over S3's 2 KiB limit: {names}", names=", ".join(sorted(dropped)))
    headers = {_USER + k: v for k, v in user.items()}
    headers[META_HEADER] = _json(own, mtime)
    content_type = meta.get("content-type")
    if content_type is not None and _PLAIN.match(content_type):
        headers["content-type"] = content_type  # for other S3 clients; cosedge reads its own copy
    return headers


def meta_of(headers: Headers) -> tuple[dict[str, str], float | None]:
    """The metadata and modification time kept in an object's headers (see :func:`meta_headers`)."""
    meta: dict[str, str] = {}
    mtime = None
    own = None
    for raw_name, values in headers.getAllRawHeaders():
        name = raw_name.decode("latin-1").lower()
        value = b", ".join(values).decode("latin-1")
        if name == META_HEADER:
            own = value
        elif name.startswith(_USER):
            meta[_COS + name[len(_USER) :]] = value
    try:
        kept = json.loads(own) if own is not None else None
    except ValueError:
        kept = None
    if isinstance(kept, dict) and isinstance(kept.get("meta"), dict):
        meta.update({str(k).lower(): str(v) for k, v in kept["meta"].items()})
        if isinstance(kept.get("mtime"), int | float):
            mtime = float(kept["mtime"])
    else:  # stored by another S3 client: its own headers are the object's
        for header in _FOREIGN:
            found = headers.getRawHeaders(header)
            if found:
                meta[header.decode("ascii")] = found[-1].decode("latin-1")
    return meta, mtime


def last_modified(headers: Headers) -> float:
    found = headers.getRawHeaders(b"last-modified")
    try:
        return parsedate_to_datetime(found[-1].decode("latin-1")).timestamp() if found else 0.0
    except (TypeError, ValueError, IndexError, OverflowError):
        return 0.0


#: ``ranged(start, end, if_match)``: Deferred of the answer to a ranged GET (see :class:`S3Object`).
Ranged = Callable[[int, int, str], "Deferred[Any]"]


@implementer(IStoredObject)
class S3Object:
    """
    An object the store answered for, read with ranged GETs that must match
    its ETag (a replaced object fails the read rather than mixing versions).
    Its first :data:`PREFIX` bytes came with the open and are read from memory.
    """

    def __init__(
        self, ranged: Ranged, size: int, mtime: float, etag: str, meta: Mapping[str, str], prefix: bytes
    ) -> None:
        self._ranged = ranged
        self.size = size
        self.mtime = mtime
        self.etag = etag
        self.identity = etag.strip('"') or f"{size:x}-{mtime:.0f}"
        self.meta: Mapping[str, str] = MappingProxyType(dict(meta))
        self.prefix = prefix

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        end = min(self.size, offset + length)
        if end <= len(self.prefix) or offset >= end:
            return succeed(self.prefix[offset:end])
        return self._ranged(offset, end, self.etag).addCallback(self._read_body, end - offset)

    @staticmethod
    def _read_body(response: Any, length: int) -> Deferred[bytes]:
        return read_body(response, length, cut=True)

    def produce(self, consumer: IConsumer, start: int, end: int) -> Deferred[int]:
        """The range's bytes in the first :data:`PREFIX` from memory, the rest with one ranged GET."""
        stream = RangeStream(consumer, end - start, self.prefix[start:end])
        done = stream.start()
        if stream.rest:
            stream.request = self._ranged(end - stream.rest, end, self.etag)
            stream.request.addCallbacks(lambda response: response.deliverBody(stream), lambda f: stream.fail(f.value))
        return done

    def fileno(self) -> int | None:
        return None

    def close(self) -> None:
        self.prefix = b""


#: ``put(source, size, headers, md5_hex)``: Deferred that fires once the object is stored;
#: ``source`` is the body (bytes) or the path of the temporary file that holds it.
Put = Callable[[bytes | str, int, dict[str, str], str], "Deferred[None]"]


@implementer(IObjectWriter)
class S3Writer(_Consumer):
    """
    A body held until commit: in memory (``path`` None), or in the temporary
    file ``path`` open as ``fd``.  ``commit`` stores it with its length and
    MD5 (one PUT, or a multipart upload when large): the object appears in
    the store complete or not at all.
    """

    def __init__(self, put: Put, now: Callable[[], float], fd: int = -1, path: str = "") -> None:
        self._put = put
        self._now = now
        self._fd = fd
        self._path = path
        self._chunks: list[bytes] = []
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._done = False
        self._putting: Deferred[None] | None = None
        self.size = 0
        self.spool = path or None

    def write(self, data: bytes) -> None:
        if self._done:
            raise ValueError("the object was discarded")
        self._md5.update(data)
        self.size += len(data)
        if self._fd < 0:
            self._chunks.append(data)
            return
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def commit(self, meta: Mapping[str, str], mtime: float | None) -> Deferred[None]:
        if self._done:
            return fail(ValueError("the object was discarded"))
        try:
            headers = meta_headers(meta, self._now() if mtime is None else mtime)
        except StoreError:
            self.abort()
            return fail()
        digest = self._md5.digest()
        headers["content-md5"] = base64.b64encode(digest).decode("ascii")
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        source: bytes | str = self._path or b"".join(self._chunks)
        self._chunks = []
        self._putting = self._put(source, self.size, headers, digest.hex())
        return self._putting.addBoth(self._committed)

    def _committed(self, result: object) -> object:
        self._putting = None
        self.abort()
        return result

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._chunks = []
        if self._putting is not None:
            self._putting.cancel()  # the store drops a PUT cut short: nothing is stored
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._path:
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass
