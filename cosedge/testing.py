"""
Test doubles that ship with cosedge, as ``treq.testing`` does: an in-memory
object store and a fake origin ``Resource`` that can misbehave on purpose.

Use the fake origin in memory through ``treq.testing.RequestTraversalAgent``
(or ``StubTreq``), or on a real port with ``twisted.web.server.Site``.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping

from attrs import define, field
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from .storage.disk import IObjectStore, IPendingObject, IStoredObject

__all__ = ["FakeOrigin", "MemoryStore", "OriginObject"]


@implementer(IStoredObject)
@define(eq=False)
class _MemoryObject:
    data: bytes
    mtime: float
    identity: str
    meta: Mapping[str, str]
    closed: bool = False

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]

    def fileno(self) -> int | None:
        return None

    def close(self) -> None:
        self.closed = True


@implementer(IPendingObject)
@define(eq=False)
class _MemoryPending:
    store: MemoryStore
    bucket: str
    segments: tuple[str, ...]
    buffer: bytearray = field(factory=bytearray)
    done: bool = False

    @property
    def size(self) -> int:
        return len(self.buffer)

    def write(self, data: bytes) -> None:
        limit = self.store.disk_limit
        if limit is not None and self.store.used + len(self.buffer) + len(data) > limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.buffer += data

    def commit(self, meta: Mapping[str, str], mtime: float | None) -> None:
        self.store.put(self.bucket, self.segments, bytes(self.buffer), dict(meta), mtime or 0.0)
        self.abort()

    def abort(self) -> None:
        if not self.done:
            self.done = True
            self.store.pending.remove(self)


@implementer(IObjectStore)
@define(eq=False)
class MemoryStore:
    """
    An :class:`~cosedge.storage.disk.IObjectStore` in memory.

    :ivar pending: objects being written (a clean miss leaves none).
    :ivar disk_limit: total bytes after which writes fail with ENOSPC.
    """

    objects: dict[tuple[str, tuple[str, ...]], _MemoryObject] = field(factory=dict)
    pending: list[_MemoryPending] = field(factory=list)
    disk_limit: int | None = None
    _version: int = 0

    @property
    def used(self) -> int:
        return sum(o.size for o in self.objects.values())

    def put(
        self,
        bucket: str,
        segments: tuple[str, ...],
        data: bytes,
        meta: Mapping[str, str] | None = None,
        mtime: float = 0.0,
    ) -> None:
        """Store an object directly."""
        self._version += 1
        self.objects[(bucket, segments)] = _MemoryObject(data, mtime, f"m{self._version}", dict(meta or {}))

    def get(self, bucket: str, key: str) -> bytes | None:
        """The stored bytes of ``bucket``/``key``, or None."""
        obj = self.objects.get((bucket, tuple(key.split("/"))))
        return None if obj is None else obj.data

    def open(self, bucket: str, segments: tuple[str, ...]) -> _MemoryObject | None:
        obj = self.objects.get((bucket, segments))
        if obj is None:
            return None
        return _MemoryObject(obj.data, obj.mtime, obj.identity, obj.meta)

    def begin(self, bucket: str, segments: tuple[str, ...]) -> _MemoryPending:
        pending = _MemoryPending(self, bucket, segments)
        self.pending.append(pending)
        return pending

    def remove(self, bucket: str, segments: tuple[str, ...]) -> bool:
        return self.objects.pop((bucket, segments), None) is not None

    def usage(self, bucket: str) -> tuple[int, int]:
        sizes = [o.size for (b, _), o in self.objects.items() if b == bucket]
        return len(sizes), sum(sizes)

    def sweep(self, owner: int | None = None) -> int:
        if owner is not None and owner != os.getpid():
            return 0  # everything pending here is this process's
        count = len(self.pending)
        for p in list(self.pending):
            p.abort()
        return count


@define
class OriginObject:
    """
    What the fake origin answers for one key.

    ``mode`` is one of: ``"normal"``; ``"truncate"`` (declare the full
    Content-Length, send ``cut`` bytes, close); ``"chunked-cut"`` (chunked,
    send ``cut`` bytes, close without the final chunk); ``"stall"`` (send
    ``cut`` bytes, then nothing, keep the connection open); ``"chunked"``
    (a proper chunked body with no Content-Length).
    """

    body: bytes = b""
    status: int = 200
    headers: Mapping[str, str] = field(factory=dict)
    mode: str = "normal"
    cut: int = 0


class FakeOrigin(Resource):
    """
    A fake origin server.  Every request is recorded in :attr:`requests` as
    ``(method, path, headers)``; unknown keys answer 404.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.objects: dict[str, OriginObject] = {}
        self.requests: list[tuple[bytes, bytes, dict[bytes, list[bytes]]]] = []
        #: Requests left hanging by ``"stall"`` objects.
        self.stalled: list[Request] = []

    def add(self, key: str, body: bytes = b"", *, content_type: str | None = None, **kwargs: object) -> OriginObject:
        """Serve ``body`` under ``key`` (``/``-separated, not encoded)."""
        headers = dict(kwargs.pop("headers", {}) or {})  # type: ignore[call-overload]
        if content_type is not None:
            headers["Content-Type"] = content_type
        obj = OriginObject(body, headers=headers, **kwargs)  # type: ignore[arg-type]
        self.objects[key] = obj
        return obj

    def gets(self, path: bytes) -> int:
        """How many GETs the origin has seen for ``path`` (e.g. ``b"/1.jpg"``)."""
        return sum(1 for m, p, _ in self.requests if m == b"GET" and p == path)

    def render(self, request: Request) -> bytes | int:  # type: ignore[override]
        from urllib.parse import unquote

        assert request.method is not None and request.path is not None
        headers = {name: list(values) for name, values in request.requestHeaders.getAllRawHeaders()}
        self.requests.append((request.method, request.path, headers))
        obj = self.objects.get(unquote(request.path.decode("ascii"))[1:])
        if obj is None:
            request.setResponseCode(404)
            return b"not found"
        request.setResponseCode(obj.status)
        for name, value in obj.headers.items():
            request.setHeader(name, value)
        body = obj.body
        if obj.mode == "normal":
            return body
        if obj.mode == "chunked":
            for i in range(0, len(body), 7):
                request.write(body[i : i + 7])
            request.finish()
            return NOT_DONE_YET
        if obj.mode in ("truncate", "stall"):
            request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body[: obj.cut])
        if obj.mode == "stall":
            self.stalled.append(request)
        else:
            assert request.channel is not None and request.channel.transport is not None
            request.channel.transport.loseConnection()
        return NOT_DONE_YET
