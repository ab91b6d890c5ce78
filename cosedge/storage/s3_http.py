"""
The S3 protocol as :mod:`cosedge.storage.s3` speaks it: requests signed by
botocore's SigV4 signer and sent with a Twisted agent, answers read with a
bound, and a pull producer that streams a ranged GET into a consumer.

Payloads are never hashed: every request says ``UNSIGNED-PAYLOAD`` (Ceph RGW
refuses a streamed PUT that claims the empty body's hash; over ``http://`` the
signer would claim it), and a PUT carries its ``Content-Length`` and
``Content-MD5``, which the store checks.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote, urlsplit
from xml.etree import ElementTree

from attrs import frozen
from botocore.auth import S3SigV4Auth  # type: ignore[import-untyped]
from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
from botocore.credentials import Credentials  # type: ignore[import-untyped]
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IConsumer, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from ..interfaces import ShortObject, StoreError

__all__ = ["Reply", "S3Client", "S3Failure", "RangeStream", "child_text", "parse_listing", "read_body", "xml_tag"]

#: Read no more of an answer than this (a listing page of 1000 long keys is well under it).
MAX_REPLY = 8 * 1024 * 1024
#: What the signer reads to leave the payload unsigned (botocore's S3 client configuration).
_UNSIGNED = SimpleNamespace(s3={"payload_signing_enabled": False})
_SAFE = "-_.~"


class S3Failure(StoreError):
    """The S3 store answered a request with an error (``status``, and S3's error ``code``)."""

    def __init__(self, what: str, status: int, code: str = "", message: str = "") -> None:
        detail = " ".join(p for p in (f"HTTP {status}", code, message) if p)
        super().__init__(f"{what}: {detail}")
        self.status = status
        self.code = code


@frozen
class Reply:
    """A whole answer of the store."""

    status: int
    headers: Headers
    body: bytes

    def header(self, name: bytes) -> str | None:
        values = self.headers.getRawHeaders(name)
        return None if not values else values[-1].decode("latin-1")

    def failure(self, what: str) -> S3Failure:
        code, message = "", ""
        try:
            # An answer may start with whitespace (S3 keeps a long request's connection alive with it).
            body = self.body.lstrip()
            root = ElementTree.fromstring(body) if body else None
        except ElementTree.ParseError:
            root = None
        if root is not None and xml_tag(root) == "Error":
            code, message = child_text(root, "Code"), child_text(root, "Message")
        return S3Failure(what, self.status, code, message)


def xml_tag(element: ElementTree.Element) -> str:
    return element.tag.rpartition("}")[2]


def child_text(element: ElementTree.Element, name: str) -> str:
    for child in element:
        if xml_tag(child) == name:
            return child.text or ""
    return ""


def quote_key(key: str) -> str:
    """A key as the path of a request URL: each segment percent-encoded (UTF-8), ``/`` kept."""
    return quote(key, safe="/" + _SAFE)


def _query(pairs: Sequence[tuple[str, str]]) -> str:
    # Encoded and sorted as SigV4's canonical query string, so that the URL is its own canonical form.
    return "&".join(sorted(f"{quote(k, safe=_SAFE)}={quote(v, safe=_SAFE)}" for k, v in pairs))


class S3Client:
    """
    Signed requests to one S3 endpoint.  ``addressing`` is ``"path"``
    (``/<bucket>/<key>``) or ``"virtual"`` (``<bucket>.<endpoint host>``);
    ``timeout`` bounds each request up to its answer's headers, and a whole
    :meth:`call`.
    """

    def __init__(
        self,
        agent: IAgent,
        clock: IReactorTime,
        endpoint: str,
        region: str,
        keys: tuple[str, str],
        addressing: str = "path",
        timeout: float = 30.0,
    ) -> None:
        parts = urlsplit(endpoint)
        self._agent = agent
        self._clock = clock
        self._scheme = parts.scheme
        self._netloc = parts.netloc.lower()
        self._virtual = addressing == "virtual"
        self._signer = S3SigV4Auth(Credentials(*keys), "s3", region)
        self.region = region
        self.timeout = timeout
        #: Told of every request: ``(operation, outcome, seconds to the answer's headers)``.
        self.observe: Callable[[str, str, float], None] | None = None

    def url(self, bucket: str, key: str = "", query: Sequence[tuple[str, str]] = ()) -> tuple[str, str]:
        """The URL of a request and its Host."""
        path = "/" + quote_key(key) if key else ""
        host = self._netloc
        if self._virtual and bucket:
            host = f"{bucket}.{host}"
        elif bucket:
            path = f"/{bucket}{path}"
        return f"{self._scheme}://{host}{path or '/'}" + (f"?{_query(query)}" if query else ""), host

    def request(
        self,
        method: str,
        bucket: str,
        key: str = "",
        *,
        query: Sequence[tuple[str, str]] = (),
        headers: Mapping[str, str] | None = None,
        body: IBodyProducer | None = None,
        timeout: float | None = None,
    ) -> Deferred[IResponse]:
        """Send a signed request; the Deferred fires with the answer's headers (its body unread)."""
        url, host = self.url(bucket, key, query)
        signed = AWSRequest(method=method, url=url, headers={"host": host, **(headers or {})})
        signed.context["client_config"] = _UNSIGNED
        self._signer.add_auth(signed)
        sent = Headers()
        for name, value in signed.headers.items():
            sent.addRawHeader(name.lower().encode("latin-1"), value.encode("latin-1"))
        answer = self._agent.request(method.encode("ascii"), url.encode("ascii"), sent, body)
        observe = self.observe
        if observe is not None:
            operation = "COPY" if headers and "x-amz-copy-source" in headers else method
            if method == "GET" and not key:
                operation = "LIST" if bucket else "LIST-BUCKETS"
            began = self._clock.seconds()

            def seen(result: IResponse | Failure) -> IResponse | Failure:
                outcome = "error" if isinstance(result, Failure) else f"{result.code // 100}xx"
                observe(operation, outcome, self._clock.seconds() - began)
                return result

            answer.addBoth(seen)
        return answer.addTimeout(timeout or self.timeout, self._clock)

    def call(self, method: str, bucket: str, key: str = "", **options: Any) -> Deferred[Reply]:
        """
        :meth:`request` (with the same options), and its whole answer:
        bounded in size, and in time by ``timeout`` (twice: up to the
        headers, then for all of it).
        """
        limit = options.pop("timeout", None) or self.timeout

        async def whole() -> Reply:
            response = await self.request(method, bucket, key, timeout=limit, **options)
            data = await read_body(response, MAX_REPLY)
            return Reply(response.code, response.headers, data)

        return Deferred.fromCoroutine(whole()).addTimeout(limit * 2, self._clock)


def _proxy(protocol: Protocol) -> Any:
    """The HTTP client's transport of a response body (a ``TransportProxyProducer``: pause, resume, stop)."""
    return protocol.transport


class _Collect(Protocol):
    """Collects a body of at most ``limit`` bytes; past it, stops and fails (or, ``cut``, keeps the first bytes)."""

    def __init__(self, limit: int, cut: bool) -> None:
        self._limit = limit
        self._cut = cut
        self._chunks: list[bytes] = []
        self._size = 0
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._chunks.append(data)
        self._size += len(data)
        if self._size > self._limit:  # (exactly the limit: the end comes next, and the connection is kept)
            if self._cut:
                self.done.callback(b"".join(self._chunks)[: self._limit])
            else:
                self.done.errback(StoreError(f"the store's answer is longer than {self._limit} bytes"))
            _proxy(self).stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(StoreError(f"the store's answer was cut: {reason.getErrorMessage()}"))


def read_body(response: IResponse, limit: int, *, cut: bool = False) -> Deferred[bytes]:
    """The body of ``response``: failing past ``limit`` bytes, or with ``cut`` its first ``limit`` bytes."""
    collect = _Collect(limit, cut)
    response.deliverBody(collect)
    return collect.done


def parse_listing(body: bytes) -> tuple[builtins.list[tuple[str, int, float, str]], list[str], str | None]:
    """
    A ListObjectsV2 page: its objects (key, size, mtime, ETag), its common
    prefixes, and the token of the next page (None on the last).
    """
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError as e:
        raise StoreError(f"the store's listing is not XML: {e}") from None
    objects: builtins.list[tuple[str, int, float, str]] = []
    prefixes: list[str] = []
    token, truncated = None, False
    for element in root:
        tag = xml_tag(element)
        if tag == "Contents":
            stamp = child_text(element, "LastModified")
            try:
                mtime = datetime.fromisoformat(stamp).timestamp()
            except ValueError:
                mtime = 0.0
            size = int(child_text(element, "Size") or 0)
            objects.append((child_text(element, "Key"), size, mtime, child_text(element, "ETag")))
        elif tag == "CommonPrefixes":
            prefixes.append(child_text(element, "Prefix"))
        elif tag == "IsTruncated":
            truncated = (element.text or "").strip() == "true"
        elif tag == "NextContinuationToken":
            token = element.text or None
    return objects, prefixes, token if truncated else None


@implementer(IPushProducer)
class RangeStream(Protocol):
    """
    The body of a ranged GET, written into a consumer as it arrives, as a
    streaming producer: when the consumer pauses it (its client reads
    slower than the store sends), the store's connection is paused, so
    memory stays bounded for any object size and any reader's speed.
    ``head``: bytes of the range already at hand (the object's first bytes,
    read when it was opened), written at :meth:`start`; the request is for
    the rest.  :attr:`done` fires with the byte count; fails with
    :class:`ShortObject` if the body ends short, and with ``CancelledError``
    if the consumer stops it.

    A pull producer would be driven by ``HTTPChannel``'s ``_PullToPush``,
    whose cooperator calls it again and again, for 10 ms at a time, while
    the store's next bytes are on their way: 6 MiB/s, measured.
    """

    def __init__(self, consumer: IConsumer, expected: int, head: bytes = b"") -> None:
        self._consumer: IConsumer | None = consumer
        self._expected = expected
        self._head = head[:expected]
        self._sent = 0
        self._paused = False
        self._ended: Failure | None | bool = False
        self.request: Deferred[Any] | None = None
        self.done: Deferred[int] = Deferred(lambda d: self.stopProducing())

    @property
    def rest(self) -> int:
        """Bytes still to come from the store after ``head`` (0: the range is at hand)."""
        return self._expected - self._sent - len(self._head)

    def start(self) -> Deferred[int]:
        """Register with the consumer and write ``head``; the range ends here if that was all of it."""
        consumer = self._consumer
        assert consumer is not None
        consumer.registerProducer(self, True)
        head, self._head = self._head, b""
        if head:
            self._sent = len(head)
            consumer.write(head)
        if self._sent >= self._expected and self._consumer is not None:
            self._ended = None
            self._finish()
        return self.done

    # -- the body, from the HTTP client --

    def makeConnection(self, transport: Any) -> None:
        super().makeConnection(transport)
        if self._paused:  # paused before the store answered
            _proxy(self).pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        data = data[: self._expected - self._sent]
        if data:
            self._sent += len(data)
            consumer.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._ended = None if reason.check(ResponseDone) else reason
        if self._consumer is not None:
            self._finish()

    # -- the consumer's producer --

    def pauseProducing(self) -> None:
        if self._consumer is None or self._paused:
            return
        self._paused = True
        if self.transport is not None and self._ended is False:
            _proxy(self).pauseProducing()

    def resumeProducing(self) -> None:
        if self._consumer is None or not self._paused:
            return
        self._paused = False
        if self.transport is not None and self._ended is False:
            _proxy(self).resumeProducing()

    def stopProducing(self) -> None:
        """The consumer is gone: drop the store's connection, and fail :attr:`done` with CancelledError."""
        if self._consumer is None:
            return
        self._consumer = None
        if self.request is not None and not self.request.called:
            self.request.cancel()
        elif self.transport is not None and self._ended is False:
            _proxy(self).stopProducing()
        if not self.done.called:
            self.done.errback(CancelledError())

    def fail(self, reason: Exception) -> None:
        """The request failed before the body began."""
        if self._consumer is not None:
            self._ended = Failure(reason)
            self._finish()

    # -- internals --

    def _finish(self) -> None:
        consumer, self._consumer = self._consumer, None
        assert consumer is not None
        consumer.unregisterProducer()
        ended = self._ended
        if isinstance(ended, Failure) and ended.check(StoreError, ShortObject):
            self.done.errback(ended)
        elif self._sent < self._expected:
            why = "" if not isinstance(ended, Failure) else f" ({ended.getErrorMessage()})"
            self.done.errback(ShortObject(f"{self._expected - self._sent} byte(s) missing from the store{why}"))
        else:
            self.done.callback(self._sent)
