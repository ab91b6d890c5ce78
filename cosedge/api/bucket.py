"""
The COS API of a bucket, on the bucket listener (issue 12): what COS tools
(the official SDK, ``coscmd``) send besides object GET and HEAD.

- ``PUT``/``GET``/``DELETE /?origin``: the bucket's origin rules as COS
  ``<OriginConfiguration>`` XML, changed through the same validation, state
  file and audit as the manhole (the audit channel is ``api:<secret_id>``);
- ``HEAD /``: the bucket exists; ``GET /``: ListObjects (``prefix``,
  ``delimiter``, ``marker``, ``max-keys``), from the store's listing;
- ``DELETE /<key>``: purge one stored object;
- anything else of the COS API: 501 ``NotImplemented``, naming it.

Every call but ``HEAD /`` of a public bucket must be signed
(:mod:`cosedge.api.auth`); the checks and the answers are here, the
routing in :class:`cosedge.web.resource.EdgeResource`.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import parse_qsl, quote
from xml.sax.saxutils import escape

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.server import Request

from ..config import BucketConfig, Config
from ..cosxml import rules_to_xml
from ..interfaces import IObjectStore, StoredEntry
from ..keys import Target
from ..origins import matching_rule
from ..web.errors import answer_error
from .auth import SignatureProblem, find_signature, verify

__all__ = ["BucketApi", "OriginChanges", "is_api_call", "query_of"]

_log = Logger(namespace="cosedge.api")

#: COS sub-resources (query parameters that make a request an API call, not an object read).
_SUBRESOURCES = frozenset(
    {
        "origin", "acl", "cors", "lifecycle", "policy", "tagging", "versioning", "website", "logging",
        "referer", "domain", "inventory", "replication", "encryption", "intelligenttiering",
        "object-lock", "uploads", "uploadid", "partnumber", "restore", "select", "append", "accelerate",
        "notification", "versions", "delete", "location", "analytics", "metrics", "torrent", "list-type",
    }
)  # fmt: skip
_MAX_KEYS = 1000
_PAGE = 1000  # objects read from the store at a time while listing
_MAX_PAGES = 50  # store pages one listing reads at most (a delimiter can skip many keys)
_NO_SUCH_KEY = "The specified key does not exist."


class OriginChanges(Protocol):
    """What the origin API changes rules through (the manhole's ``edge`` façade for a channel)."""

    def set_rules_xml(self, bucket: str, xml: str | bytes) -> object: ...

    def set_rules(self, bucket: str, rules: object) -> object: ...


def query_of(target: Target) -> dict[str, str]:
    """The request's query parameters, decoded (the last value of each name)."""
    if target.query is None:
        return {}
    return dict(parse_qsl(target.query.decode("utf-8", "replace"), keep_blank_values=True))


def is_api_call(method: bytes, target: Target, query: Mapping[str, str]) -> bool:
    """Anything but a GET or HEAD of an object without a COS sub-resource."""
    if not target.segments or method not in (b"GET", b"HEAD"):
        return True
    return any(name.lower() in _SUBRESOURCES for name in query)


def _http_time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class BucketApi:
    """Answers a bucket's API calls (see the module's docstring)."""

    def __init__(
        self,
        config: Callable[[], Config],
        store: IObjectStore,
        forget: Callable[[str, tuple[str, ...]], None],
        clock: Callable[[], float],
    ) -> None:
        self._config = config
        self._store = store
        #: Drops a purged key's remembered 404 (the daemon's every process, once the service says so).
        self.forget = forget
        self._clock = clock
        #: Set by the admin service: the ``edge`` façade of a channel (None: no live changes here).
        self.changes: Callable[[str], OriginChanges] | None = None

    # -- signatures --

    def signer(self, request: Request, target: Target, query: Mapping[str, str]) -> str | None:
        """
        The secret id that signed ``request``, or None when it is not
        signed.  :raises SignatureProblem: when it is signed wrongly, or
        the API is off.
        """
        signed = find_signature(request.getHeader(b"authorization"), query)
        if signed is None:
            return None
        settings = self._config().api
        if settings is None:
            raise SignatureProblem("AccessDenied", "The COS API is off on this server: it has no [api] section.")
        headers = {name.decode("latin-1").lower(): b", ".join(values).decode("latin-1")
                   for name, values in request.requestHeaders.getAllRawHeaders()}  # fmt: skip
        path = "/" + target.key
        signed_query = {k: v for k, v in query.items() if not (signed.in_query and k.startswith("q-"))}
        return verify(settings, signed, request.method, path, signed_query, headers, self._clock())

    # -- the calls --

    def answer(
        self, request: Request, request_id: str, bucket_name: str, bucket: BucketConfig, target: Target
    ) -> bytes | Deferred[Any]:
        """The answer to an API call (bytes, or a Deferred of bytes)."""
        query = query_of(target)
        method = request.method
        try:
            signer = self.signer(request, target, query)
        except SignatureProblem as e:
            return answer_error(request, request_id, e.code, e.message)
        if not target.segments and method == b"HEAD" and not query and (signer or bucket.acl != "private"):
            request.setHeader(b"x-cos-bucket-region", b"cosedge")
            return b""
        if signer is None:
            return answer_error(request, request_id, "AccessDenied", "This request must be signed (COS signature).")
        names = {name.lower() for name in query}
        if not target.segments and "origin" in names:
            return self._origin(request, request_id, bucket_name, bucket, signer)
        unsupported = sorted(names & _SUBRESOURCES)
        if unsupported:
            return self._not_implemented(request, request_id, f"?{unsupported[0]}")
        if not target.segments and method == b"GET":
            return self._list(request, request_id, bucket_name, query)
        if target.segments and method == b"DELETE":
            return self._purge(request, request_id, bucket_name, target, signer)
        return self._not_implemented(request, request_id, f"{method.decode('ascii', 'replace')} of an object")

    def _not_implemented(self, request: Request, request_id: str, what: str) -> bytes:
        return answer_error(request, request_id, "NotImplemented", f"cosedge does not implement {what} of the COS API.")

    # -- ?origin --

    def _origin(self, request: Request, request_id: str, name: str, bucket: BucketConfig, signer: str) -> bytes:
        method = request.method
        if method == b"GET":
            rules = bucket.rules or (
                () if bucket.origin is None else (matching_rule(bucket, ""),)  # the seed's one rule
            )
            if not rules:
                return answer_error(
                    request, request_id, "NoSuchOriginConfiguration", "The bucket has no origin configuration."
                )
            request.setHeader(b"content-type", b"application/xml")
            return rules_to_xml(tuple(r for r in rules if r is not None))
        if method not in (b"PUT", b"DELETE"):
            request.setHeader(b"allow", b"GET, PUT, DELETE")
            return answer_error(request, request_id, "MethodNotAllowed", "?origin takes GET, PUT and DELETE.")
        if self.changes is None:
            return answer_error(
                request,
                request_id,
                "ServiceUnavailable",
                "Origin changes are taken by the daemon's primary process; please retry.",
            )
        edge = self.changes(f"api:{signer}")
        if method == b"DELETE":
            return self._apply(request, request_id, lambda: edge.set_rules(name, []), 204)
        body = request.content.read() if request.content is not None else b""
        md5 = request.getHeader(b"content-md5")
        if md5 is not None and base64.b64encode(hashlib.md5(body).digest()) != md5.strip():
            return answer_error(
                request, request_id, "BadDigest", "The Content-MD5 you specified did not match the body."
            )
        return self._apply(request, request_id, lambda: edge.set_rules_xml(name, body), 200)

    def _apply(self, request: Request, request_id: str, change: Callable[[], object], status: int) -> bytes:
        from ..admin.errors import AdminError  # noqa: PLC0415 (admin imports the web layer's users, not the reverse)

        try:
            change()
        except AdminError as e:
            text = str(e)
            code = "MalformedXML" if "<" in text.split(":", 1)[0] or "XML" in text else "InvalidArgument"
            return answer_error(request, request_id, code, text)
        request.setResponseCode(status)
        return b""

    # -- GET / (ListObjects) --

    def _list(self, request: Request, request_id: str, bucket: str, query: Mapping[str, str]) -> bytes | Deferred[Any]:
        prefix, delimiter, marker = query.get("prefix", ""), query.get("delimiter", ""), query.get("marker", "")
        raw_max = query.get("max-keys", str(_MAX_KEYS))
        if not raw_max.isdigit() or len(raw_max) > 6:
            return answer_error(request, request_id, "InvalidArgument", "max-keys must be a whole number.")
        max_keys = min(int(raw_max), _MAX_KEYS)
        if query.get("encoding-type", "url") not in ("url", ""):
            return answer_error(request, request_id, "InvalidArgument", "encoding-type must be url.")
        return Deferred.fromCoroutine(self._listing(bucket, prefix, delimiter, marker, max_keys)).addCallback(
            self._list_body, request, bucket, prefix, delimiter, marker, max_keys, "encoding-type" in query
        )

    async def _listing(
        self, bucket: str, prefix: str, delimiter: str, marker: str, max_keys: int
    ) -> tuple[list[StoredEntry], list[str], bool]:
        """Up to ``max_keys`` objects and common prefixes after ``marker``; whether more follow."""
        contents: list[StoredEntry] = []
        prefixes: list[str] = []
        after = marker
        for _ in range(_MAX_PAGES):
            page = await self._store.list(bucket, prefix, after, _PAGE)
            for entry in page:
                if entry.key <= after:
                    continue
                cut = entry.key.find(delimiter, len(prefix)) if delimiter else -1
                common = entry.key[: cut + len(delimiter)] if cut >= 0 else ""
                if common and common <= marker:  # reported already: the previous page ended with it
                    after = common + "\U0010ffff"
                    continue
                if len(contents) + len(prefixes) >= max_keys:
                    return contents, prefixes, True
                if common:
                    prefixes.append(common)
                    after = common + "\U0010ffff"  # every key under it is summed up by it
                else:
                    contents.append(entry)
                    after = entry.key
            if len(page) < _PAGE:
                return contents, prefixes, False
            after = max(after, page[-1].key)
        return contents, prefixes, True

    def _list_body(
        self,
        found: tuple[list[StoredEntry], list[str], bool],
        request: Request,
        bucket: str,
        prefix: str,
        delimiter: str,
        marker: str,
        max_keys: int,
        url_encoded: bool,
    ) -> bytes:
        contents, prefixes, truncated = found

        def text(value: str) -> str:
            return escape(quote(value, safe="/") if url_encoded else value)

        parts = [
            "<?xml version='1.0' encoding='utf-8' ?>\n<ListBucketResult>",
            f"<Name>{escape(bucket)}</Name>",
            "<EncodingType>url</EncodingType>" if url_encoded else "",
            f"<Prefix>{text(prefix)}</Prefix><Marker>{text(marker)}</Marker>",
            f"<MaxKeys>{max_keys}</MaxKeys>",
            f"<Delimiter>{text(delimiter)}</Delimiter>" if delimiter else "",
            f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>",
        ]
        if truncated:
            last = max([*(e.key for e in contents), *prefixes], default=marker)
            parts.append(f"<NextMarker>{text(last)}</NextMarker>")
        for entry in contents:
            parts.append(
                f"<Contents><Key>{text(entry.key)}</Key><LastModified>{_http_time(entry.mtime)}</LastModified>"
                f"<ETag>{escape(entry.etag)}</ETag><Size>{entry.size}</Size>"
                f"<Owner><ID>{escape(bucket)}</ID><DisplayName>{escape(bucket)}</DisplayName></Owner>"
                "<StorageClass>STANDARD</StorageClass></Contents>"
            )
        parts += [f"<CommonPrefixes><Prefix>{text(p)}</Prefix></CommonPrefixes>" for p in prefixes]
        parts.append("</ListBucketResult>\n")
        request.setHeader(b"content-type", b"application/xml")
        return "".join(parts).encode("utf-8")

    # -- DELETE /<key> --

    def _purge(self, request: Request, request_id: str, bucket: str, target: Target, signer: str) -> Deferred[Any]:
        def removed(existed: bool) -> bytes:
            self.forget(bucket, target.segments)
            _log.info(
                "purged {bucket}/{key} through the API ({signer}): {what}",
                bucket=bucket,
                key=target.key,
                signer=signer,
                what="removed" if existed else "was not stored",
            )
            request.setResponseCode(204)
            return b""

        return self._store.remove(bucket, target.segments).addCallback(removed)
