"""
The bucket listener's one leaf resource: routes by Host, validates the key
before any store call, serves hits (:mod:`cosedge.web.hit`), answers misses
as the origin planner says (:mod:`cosedge.origins`) and starts the fill it
names, and answers everything else with a COS-style XML error.

``twisted.web.static.File`` is deliberately not used: it renders directory
listings, answers 500 on NUL bytes and amplifies multi-range requests.
"""

from __future__ import annotations

import errno
import itertools
import os
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from .. import origins
from ..api.auth import SignatureProblem
from ..api.bucket import BucketApi, is_api_call, query_of
from ..cluster import HEADER, SCHEME_HEADER, Cluster, owner_of, source_from_json, verify, verify_read
from ..config import BucketConfig, Config
from ..fill.fetch import CHECKED
from ..fill.scheduler import Filler, FillResult
from ..interfaces import IObjectStore, IStoredObject, StoreError
from ..keys import BadKey, Target, parse_target
from ..origins import Source
from ..stats import Stats
from .errors import answer_error
from .follow import Follower
from .hit import answer_hit
from .hosts import BucketHosts
from .mirror import MirrorReader, cut
from .quick import QuickAnswers, QuickStore

__all__ = ["EdgeResource"]

_log = Logger(namespace="cosedge.web")

_SERVED_METHODS = (b"GET", b"HEAD")
_INTERNAL_ERROR = "We encountered an internal error. Please try again."
#: What render() returns at once: a body, or NOT_DONE_YET (a tuple: ``bytes | int`` is built anew at each use).
_SYNC = (bytes, int)
_MIRROR_FAILED = "Mirroring failed: the origin could not be read."
_MIRROR_BACKOFF = "Mirroring failed recently for this key; it is retried after the back-off."


class EdgeResource(Resource):
    """The whole bucket listener, as one leaf resource."""

    isLeaf = True

    def __init__(
        self,
        config: Callable[[], Config],
        store: IObjectStore,
        filler: Filler,
        stats: Stats,
        cluster: Cluster | None = None,
    ) -> None:
        super().__init__()
        self._config = config
        #: ``[cluster]``: takes the fills other edges hand over (None: no cluster).
        self._cluster = cluster
        self._store = store
        self._filler = filler
        self._stats = stats
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(6).hex()
        #: The bucket's COS API (signed calls, the origin API, listing, purge).
        self.api = BucketApi(config, store, filler.forget, time.time)
        self._hosts = BucketHosts()
        #: The quick path (:mod:`cosedge.web.quick`), over a store that can take it.
        self.quick = (
            QuickAnswers(config, self._hosts, store, filler, stats, self._request_id)
            if isinstance(store, QuickStore)
            else None
        )

    def render(self, request: Request) -> bytes | int:  # type: ignore[override]
        request_id = self._request_id()
        # Server and Date come from _EdgeRequest.process, before anything can fail.
        request.responseHeaders.setRawHeaders(b"x-cos-request-id", [request_id.encode("ascii")])
        try:
            return self._render(request, request_id)
        except Exception:
            _log.failure("internal error serving {uri!r}", uri=request.uri)
            return answer_error(request, request_id, "InternalError", _INTERNAL_ERROR)

    def _request_id(self) -> str:
        return f"{self._id_prefix}-{next(self._ids):x}"

    def _render(self, request: Request, request_id: str) -> bytes | int:
        try:
            target = parse_target(request.uri)
        except BadKey as e:
            return answer_error(request, request_id, e.code, e.message)
        if request.method == b"POST" and self._cluster is not None and request.requestHeaders.hasHeader(HEADER):
            return self._take_fill(request, request_id, target)
        config = self._config()
        bucket_name = self._bucket_for(request, target.authority, config)
        bucket = config.buckets.get(bucket_name) if bucket_name else None
        if bucket is None or bucket_name is None:
            return answer_error(request, request_id, "NoSuchBucket", "The specified bucket does not exist.")
        if config.api is not None and (
            target.query is not None or not target.segments or request.method not in _SERVED_METHODS
        ):
            query = query_of(target)
            if is_api_call(request.method, target, query):
                answer = self.api.answer(request, request_id, bucket_name, bucket, target)
                if isinstance(answer, bytes):
                    return answer
                answer.addBoth(_deliver, request, request_id)
                return NOT_DONE_YET
        from_peer = request.requestHeaders.hasHeader(HEADER)
        if from_peer:  # another edge of the cluster reads a mirror miss through this one, its owner
            refusal = self._peer_refusal(request, request_id, bucket_name, target)
            if refusal is not None:
                return refusal
        elif bucket.acl == "private":  # (the other edge has checked its client's signature)
            problem = self._signed(request, request_id, target)
            if problem is not None:
                return answer_error(request, request_id, problem.code, problem.message)
        if request.method not in _SERVED_METHODS:
            request.setHeader(b"allow", b"GET, HEAD")
            return answer_error(
                request, request_id, "MethodNotAllowed", "The specified method is not allowed against this resource."
            )
        if not target.segments:
            return answer_error(
                request, request_id, "AccessDenied", "Listing a bucket is not served here; request an object key."
            )
        # A store on local disk has answered already, and so is this request,
        # in this call; a network store answers later.
        opening = self._store.open(bucket_name, target.segments)
        # Fired already (the disk store): take its value without running
        # Twisted's callback loop (1.3 us); see the README's Twisted internals.
        if opening.called and not opening.paused and not isinstance(opening.result, Failure):
            obj: Any = opening.result
            if obj is not None:  # a hit: straight to it, one call less on every hit
                self._stats.hit(bucket_name)
                if bucket.revalidate_after:
                    self._revalidate(obj, bucket, bucket_name, target)
                answer = answer_hit(request, request_id, obj, target.segments[-1], self._stats)
            else:
                answer = self._answer(obj, request, request_id, bucket, bucket_name, target)
        else:
            args = (request, request_id, bucket, bucket_name, target)
            opened: list[Any] = []
            opening.addBoth(opened.append)
            if not opened:
                # A store that answers later; append took the result (a
                # failure included) and passed on None.
                opening.addCallback(lambda _: opened[0]).addBoth(self._answer_later, *args)
                return NOT_DONE_YET
            answer = self._answer(opened[0], *args)  # a failure
        # bytes or NOT_DONE_YET (not isinstance(answer, Deferred): an ABC's check, slow here)
        if isinstance(answer, _SYNC):
            return answer
        answer.addBoth(_deliver, request, request_id)
        return NOT_DONE_YET

    def _answer(
        self,
        opened: IStoredObject | Failure | None,
        request: Request,
        request_id: str,
        bucket: BucketConfig,
        bucket_name: str,
        target: Target,
    ) -> Any:
        """
        The answer once the store has opened the object (or found none, or
        failed): bytes, NOT_DONE_YET or a Deferred of either.
        """
        if isinstance(opened, Failure):
            return self._open_failed(opened, request, request_id, bucket_name, target)
        if opened is not None:
            self._stats.hit(bucket_name)
            if bucket.revalidate_after:
                self._revalidate(opened, bucket, bucket_name, target)
            return answer_hit(request, request_id, opened, target.segments[-1], self._stats)
        self._stats.inc("misses")
        plan = origins.plan(
            bucket,
            target.segments,
            target.query,
            request.method,
            secure=_secure(request),
            headers=request.requestHeaders,
            up=self._filler.health.up,
        )
        if plan.answer == "mirror" and plan.fetch is not None:
            self._stats.request(bucket_name, "mirror")
            self._stats.missed(bucket_name, target.key)
            return self._mirror(plan.fetch, request, request_id, bucket, bucket_name, target)
        if plan.answer == "not-found" or plan.location is None:
            self._stats.request(bucket_name, "not-found")
            return answer_error(request, request_id, "NoSuchKey", "The specified key does not exist.")
        self._stats.redirected(bucket_name, target.key)
        request.setResponseCode(plan.status)
        request.setHeader(b"location", plan.location)
        request.setHeader(b"cache-control", b"no-store")
        if plan.fetch is not None:
            self._filler.start(bucket_name, target.segments, plan.fetch)
        return b""

    # -- [cluster] --

    def _peer_refusal(self, request: Request, request_id: str, bucket_name: str, target: Target) -> bytes | None:
        """
        None when a request carrying the cluster's header is another edge's
        read of a key this edge owns, signed with the cluster's secret over
        its time, method, URI, Host, scheme and this edge's URL; else the 403.
        """
        settings = self._cluster.settings() if self._cluster is not None else None
        if settings is None:
            problem: str | None = "no [cluster] here"
        elif request.method != b"GET":
            problem = "only a GET is read through an owner"
        elif owner_of(settings.peers, bucket_name, target.key) != settings.self_url:
            problem = "not a key this edge owns"
        else:
            problem = verify_read(
                settings.secret,
                request.getHeader(HEADER),
                request.method,
                request.uri,
                request.getHeader(b"host") or b"",
                request.getHeader(SCHEME_HEADER) or b"",
                settings.self_url.encode("ascii"),
                self._filler.clock.seconds(),
            )
        return None if problem is None else _refuse_peer(request, request_id, problem)

    def _take_fill(self, request: Request, request_id: str, target: Target) -> bytes | int:
        """
        Another edge hands this one (the key's owner) a fill: 200 when the
        key is stored already or the owner remembers the origin's 404 or a
        failure (its back-off), 202 when its fill runs, 503 when none can.
        """
        assert self._cluster is not None
        settings = self._cluster.settings()
        body = request.content.read() if request.content is not None else b""
        header = request.getHeader(HEADER)
        if settings is None:
            problem: str | None = "no [cluster] here"
        else:
            problem = verify(settings.secret, header, request.uri, body, self._filler.clock.seconds())
        if problem is not None:
            return _refuse_peer(request, request_id, problem)
        try:
            bucket_name, source = source_from_json(body)
        except ValueError as e:
            return answer_error(request, request_id, "InvalidArgument", f"Not a fill request: {e}.")
        if bucket_name not in self._config().buckets:
            return answer_error(request, request_id, "NoSuchBucket", "The specified bucket does not exist.")
        if not target.segments:
            return answer_error(request, request_id, "InvalidArgument", "A fill request names an object key.")

        def opened(obj: IStoredObject | None) -> bytes:
            if obj is not None:
                obj.close()
                return b"stored\n"
            if self._filler.start(bucket_name, target.segments, source, here=True):
                request.setResponseCode(202)
                return b"filling\n"
            # What this owner remembers holds for every edge: no other edge asks the origin again.
            if self._filler.recently_not_found(bucket_name, target.segments):
                return b"not-found\n"
            if self._filler.recently_failed(bucket_name, target.segments):
                return b"backoff\n"
            return answer_error(request, request_id, "ServiceUnavailable", "No fill can start here now.")

        answer = self._store.open(bucket_name, target.segments).addCallback(opened)
        answer.addBoth(_deliver, request, request_id)
        return NOT_DONE_YET

    # -- mirror mode --

    def _mirror(
        self,
        source: Source,
        request: Request,
        request_id: str,
        bucket: BucketConfig,
        bucket_name: str,
        target: Target,
        *,
        again: bool = True,
    ) -> Any:
        """
        Answer a miss from the origin's stream while the fill stores it
        (:mod:`cosedge.web.mirror`); in a cluster, through the key's owner
        edge when it is another (:meth:`cosedge.cluster.Cluster.parent_source`).
        """
        args = (request, request_id, bucket, bucket_name, target)
        owner = None
        if again and self._cluster is not None and not request.requestHeaders.hasHeader(HEADER):
            owner = self._cluster.owner(bucket_name, target.segments)
        if owner is not None and self._filler.health.up(owner):  # (an owner that failed lately: the origin)
            assert self._cluster is not None
            uri, host, scheme = (
                request.uri,
                request.getHeader(b"host") or b"",
                b"https" if _secure(request) else b"http",
            )
            if target.authority is not None:  # absolute-form: the owner is asked in origin-form
                host, parts = target.authority, uri.split(b"/", 3)
                uri = b"/" + (parts[3] if len(parts) == 4 else b"")
            source = self._cluster.parent_source(owner, uri, host, scheme, request.requestHeaders, source)
            self._stats.inc("mirror_via_owner")

        def from_store(reader: MirrorReader, offset: int) -> None:
            if self._follow(reader, offset, request, bucket_name, target):
                return
            waiting = self._filler.fill(bucket_name, target.segments, source)
            waiting.addCallback(self._mirror_stored, reader, offset, *args)
            waiting.addErrback(_deliver, request, request_id)

        reader = MirrorReader(request, request_id, from_store, self._stats.inc)
        refused = self._filler.read(bucket_name, target.segments, source, reader)
        if refused is None:
            return NOT_DONE_YET
        if refused == "not-found":
            return answer_error(request, request_id, "NoSuchKey", "The specified key does not exist.")
        if refused in ("elsewhere", "stored") and again:  # another process of the daemon fills it
            if not self._follow(reader, 0, request, bucket_name, target):
                deadline = self._filler.clock.seconds() + self._config().fill.total_timeout
                self._await_stored(deadline, reader, *args)
            return NOT_DONE_YET
        if refused == "backoff":
            return answer_error(request, request_id, "MirrorFailed", _MIRROR_BACKOFF)
        return answer_error(request, request_id, "ServiceUnavailable", "Please reduce your request rate.")

    def _mirror_stored(
        self, result: FillResult, reader: MirrorReader, offset: int, request: Request, request_id: str, *rest: Any
    ) -> None:
        """The fill a reader left (it came late, or fell behind) has ended: the rest from the store."""
        if request.finished or request.channel is None:
            return
        if not result.stored:
            if offset:  # the headers are out: only a cut connection tells the client
                cut(request)
                return
            code = "NoSuchKey" if result.reason in ("http-404", "http-410") else "MirrorFailed"
            message = "The specified key does not exist." if code == "NoSuchKey" else _MIRROR_FAILED
            _deliver(answer_error(request, request_id, code, message), request, request_id)
            return
        bucket_name, target = rest[1], rest[2]
        opening = self._store.open(bucket_name, target.segments)
        if offset == 0:
            opening.addBoth(self._answer_later, request, request_id, *rest)
        else:
            opening.addCallback(_produce_rest, request, offset, reader.range)
            opening.addErrback(lambda _: cut(request))

    def _follow(self, reader: MirrorReader, offset: int, request: Request, bucket_name: str, target: Target) -> bool:
        """
        Send the rest of a mirror answer (from body byte ``offset``) from the
        key's fill under way in this process or another, as it arrives
        (:mod:`cosedge.web.follow`); False when there is none to read.
        """
        partial = self._filler.partial(bucket_name, target.segments)
        if partial is None:
            return False
        if request.finished or request.channel is None:
            partial.close()
            return True
        if not reader.started:
            if not reader.answer_headers(partial.meta, partial.length):  # a HEAD: answered
                partial.close()
                return True
            offset = reader.range[0] if reader.range is not None else 0
        end = reader.range[1] if reader.range is not None else partial.length
        stall = self._config().fill.idle_timeout
        Follower(request, partial, offset, end, self._filler.clock, stall, self._stats.inc).start()
        return True

    def _await_stored(self, deadline: float, reader: MirrorReader, *args: Any) -> None:
        """
        Another process fills the key: follow its fill once it can be read,
        or serve the object once stored (checked every 0.1 s until ``deadline``).
        """
        request, request_id, _, bucket_name, target = args
        clock = self._filler.clock

        def check() -> None:
            if request.finished or request.channel is None:
                return
            if self._follow(reader, 0, request, bucket_name, target):
                return
            opening = self._store.open(bucket_name, target.segments)
            opening.addBoth(checked)

        def checked(opened: Any) -> None:
            if opened is not None:
                self._answer_later(opened, *args)
            elif not self._filler.filling_elsewhere(bucket_name, target.segments):
                # The other process has given up (its fill failed): this one
                # reads the origin itself, once, and answers what it finds.
                bucket = self._config().buckets.get(bucket_name)
                plan = None if bucket is None else origins.prefetch_source(bucket, target.segments)
                if bucket is None or plan is None:
                    _deliver(answer_error(request, request_id, "MirrorFailed", _MIRROR_FAILED), request, request_id)
                    return
                answer = self._mirror(plan, request, request_id, bucket, bucket_name, target, again=False)
                if answer is not NOT_DONE_YET:
                    _deliver(answer, request, request_id)
            elif clock.seconds() < deadline:
                clock.callLater(0.1, check)
            else:
                _deliver(answer_error(request, request_id, "MirrorFailed", _MIRROR_FAILED), request, request_id)

        clock.callLater(0.1, check)

    def _revalidate(self, obj: IStoredObject, bucket: BucketConfig, bucket_name: str, target: Target) -> None:
        """
        Stale-while-revalidate: a copy last known to be the origin's more than
        ``revalidate_after`` seconds ago is served as it is, and one
        conditional fill checks it in the background (the scheduler runs one
        per key; its 304 or new copy resets the clock).
        """
        meta = obj.meta
        checked = meta.get(CHECKED)
        now = self._filler.clock.seconds()
        try:
            fresh = checked is not None and now - float(checked) <= bucket.revalidate_after
        except ValueError:
            fresh = False
        if fresh or self._filler.recently_failed(bucket_name, target.segments):
            return
        source = origins.prefetch_source(bucket, target.segments)
        if source is None:
            return
        validators = []
        if meta.get("etag"):
            validators.append((b"if-none-match", meta["etag"].encode("latin-1")))
        if meta.get("last-modified"):
            validators.append((b"if-modified-since", meta["last-modified"].encode("latin-1")))
        if not validators:  # nothing to compare with: a plain copy would replace it whatever it is
            return
        self._stats.inc("revalidations")
        self._filler.fill(bucket_name, target.segments, source, force=True, validators=tuple(validators))

    def _signed(self, request: Request, request_id: str, target: Target) -> SignatureProblem | None:
        """Why a read of a private bucket is refused (no or a bad signature), or None when validly signed."""
        try:
            if self.api.signer(request, target, query_of(target)) is not None:
                return None
            return SignatureProblem("AccessDenied", "This bucket is private: sign the request.")
        except SignatureProblem as e:
            _log.info("refused a read of {uri!r}: {code}", uri=request.uri, code=e.code)
            return e

    def _answer_later(self, opened: IStoredObject | Failure | None, *args: Any) -> None:
        """The answer of a store that answered later, sent when it comes."""
        request, request_id = args[0], args[1]
        try:
            answer = self._answer(opened, *args)
        except Exception:
            answer = Failure()
        if isinstance(answer, Deferred):
            answer.addBoth(_deliver, request, request_id)
        else:
            _deliver(answer, request, request_id)

    @staticmethod
    def _open_failed(failure: Failure, request: Request, request_id: str, bucket_name: str, target: Target) -> bytes:
        e = failure.trap(StoreError) and failure.value
        _log.warn("cannot open {bucket}/{key}: {error}", bucket=bucket_name, key=target.key, error=e)
        if getattr(e, "errno", None) in (errno.EACCES, errno.EPERM):
            return answer_error(request, request_id, "AccessDenied", "The object cannot be read.")
        return answer_error(request, request_id, "ServiceUnavailable", "Please reduce your request rate.")

    def _bucket_for(self, request: Request, authority: bytes | None, config: Config) -> str | None:
        if authority is not None:
            host = authority
        else:
            hosts = request.requestHeaders.getRawHeaders(b"host") or []
            if len(hosts) != 1:
                return None
            host = hosts[0]
        return self._hosts.bucket(host, config)


def _produce_rest(obj: IStoredObject | None, request: Request, offset: int, wanted: tuple[int, int] | None) -> None:
    """Send ``obj``'s bytes from ``offset`` to the end of the range a mirror answer began, then finish."""
    if obj is None or request.finished or request.channel is None:
        if obj is not None:
            obj.close()
        if request.channel is not None:
            cut(request)
        return
    end = obj.size if wanted is None else min(obj.size, wanted[1])
    producing = obj.produce(request, offset, end)

    def done(result: object) -> None:
        obj.close()
        if isinstance(result, Failure):
            if request.channel is not None:
                cut(request)
        elif not request.finished and request.channel is not None:
            request.finish()

    producing.addBoth(done)


def _refuse_peer(request: Request, request_id: str, problem: str) -> bytes:
    """A request carrying the cluster's header that this edge does not take: logged, and 403."""
    _log.warn("refused a cluster request from {peer}: {problem}", peer=request.getClientAddress(), problem=problem)
    return answer_error(request, request_id, "AccessDenied", f"Not a request of this cluster: {problem}.")


def _secure(request: Request) -> bool:
    """
    Whether the client asked over HTTPS: this connection's, or for another
    edge's read through this one (checked and signed: see ``_peer_refusal``),
    the scheme that edge's client used (``protocol = "follow"`` then picks the same).
    """
    if request.requestHeaders.hasHeader(HEADER):
        return request.getHeader(SCHEME_HEADER) == b"https"
    return bool(request.isSecure())


def _deliver(result: Any, request: Request, request_id: str) -> None:
    """
    Send what ``render`` would have returned, for an answer that came later
    (as ``twisted.web.server.Request.render`` does with a returned body).
    """
    if isinstance(result, Failure):
        _log.failure("internal error serving {uri!r}", result, uri=request.uri)
        result = answer_error(request, request_id, "InternalError", _INTERNAL_ERROR)
    # A request whose connection was lost has no channel any more.
    if result is NOT_DONE_YET or request.finished or request.channel is None:
        return
    if request.method != b"HEAD":
        request.setHeader(b"content-length", b"%d" % len(result))
        request.write(result)
    request.finish()
