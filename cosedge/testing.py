"""
Test doubles that ship with cosedge, as ``treq.testing`` does: an in-memory
object store and a fake origin ``Resource`` that can misbehave on purpose.

Use the fake origin in memory through ``treq.testing.RequestTraversalAgent``
(or ``StubTreq``), or on a real port with ``twisted.web.server.Site``.
"""

from __future__ import annotations

from collections.abc import Mapping

from attrs import define, field
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from .storage.memory import MemoryStore

__all__ = ["FakeOrigin", "MemoryStore", "OriginObject"]


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
