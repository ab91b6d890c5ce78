"""
Buckets on an S3-compatible store (SeaweedFS, Ceph RGW, AWS S3): the
``[storage] backend = "s3"`` section and :class:`S3Store`.

Each cosedge bucket is the store bucket of its name, or, with ``bucket``
set, the key prefix ``<name>/`` in that one store bucket.  The store talks S3
with its own Twisted HTTP client (:mod:`cosedge.storage.s3_http`), so no
call ever blocks the reactor beyond a small temporary-file write.

- A hit opens the object with one GET of its first 128 KiB (size, metadata
  and a small body in one answer) and reads the rest with ranged GETs that
  must match its ETag, streamed with back-pressure.
- A fill holds the body (in memory when small, else in a temporary file
  under ``<data_dir>/.cosedge/s3-tmp/``) and PUTs it whole on commit, with
  its length and MD5 (above ``multipart_threshold``: a multipart upload,
  :mod:`cosedge.storage.s3_multipart`): S3 never shows a partial object, so a
  fill cut short leaves nothing in the store, and a crash leaves only a
  temporary file (and an upload's journal), swept at the next start.
- Several edges over one store: the PUT of a key the store was just found
  not to hold says ``If-None-Match: *``, and the store's 412 means another
  edge stored it first, which is as good (the same key from the same
  origin, whole): the commit succeeds and this copy is dropped.  A writer
  that replaces a stored copy (a revalidation's 200) PUTs plainly.
- Listings come in key order whatever the store's own order (SeaweedFS
  lists a folder before its siblings ``a-b`` and ``a.b``): each folder is
  listed with the delimiter ``/`` and its entries merged in key order.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import glob
import heapq
import os
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Mapping
from functools import partial
from itertools import count
from typing import Any, TypeVar

from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    _HTTP11ClientFactory,
)
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from zope.interface import implementer

from ..config import Config
from ..interfaces import IObjectStore, IObjectWriter, IStoredObject, ShortObject, StoredEntry, StoreError
from .produce import RunBlocking, temporary_file
from .s3_cache import RecentObjects
from .s3_config import StorageConfig, access_keys, check_config, parse_storage
from .s3_http import MAX_REPLY, Reply, S3Client, parse_listing, quote_key, read_body
from .s3_multipart import JOURNAL_SUFFIX, abort_journalled
from .s3_objects import PREFIX, S3Object, S3Writer, last_modified, meta_headers, meta_of
from .s3_put import S3Puts

__all__ = ["S3Store", "StorageConfig", "check_config", "open_s3_store", "parse_storage"]

_log = Logger()
_T = TypeVar("_T")

#: A body declared this small or smaller is held in memory until commit (as the disk store does).
SMALL_BODY = 256 * 1024
_NOT_NAMES = frozenset({"", ".", ".."})
#: Seconds a key the store was found not to hold makes its next writer exclusive (``If-None-Match: *``).
MISS_MEMORY = 300.0
#: Keys remembered so, at most (the oldest are forgotten first: their writers then PUT plainly).
MISS_KEYS = 50_000
#: Seconds a miss is answered from that memory, without asking the store again: a miss storm
#: (hundreds of clients on a new key) is not a storm of GETs on the store.  A copy stored by
#: another edge is seen this much later at most; this store's own writes are seen at once.
MISS_CACHE = 1.0


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False  # no log line for every connection to the store


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """
    The store's endpoints, made once per scheme, host and port (Agent's own
    factory makes a new one, host name encoded anew, for every request:
    6 % of a hit's CPU, measured with py-spy).  ``https://`` is verified as
    Agent does by default (the system's CAs and the host's name).
    """

    def __init__(self, reactor: Any, timeout: float) -> None:
        self._reactor = reactor
        self._timeout = timeout
        self._tls = BrowserLikePolicyForHTTPS()
        self._made: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        where = (uri.scheme, uri.host, uri.port)
        endpoint = self._made.get(where)
        if endpoint is None:
            endpoint = HostnameEndpoint(self._reactor, uri.host, uri.port, timeout=self._timeout)
            if uri.scheme == b"https":
                endpoint = wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), endpoint)
            self._made[where] = endpoint
        return endpoint


def open_s3_store(config: Config, reactor: Any, run_blocking: RunBlocking) -> S3Store | None:
    """
    The S3 store that ``[storage]`` asks for, with its own connection pool
    (closed when the reactor stops); None when the backend is the disk.

    :raises ConfigError: naming the field that is wrong.
    """
    settings = check_config(config)
    if settings.backend != "s3":
        return None
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool._factory = _QuietFactory
    pool.maxPersistentPerHost = 32
    reactor.addSystemEventTrigger("before", "shutdown", pool.closeCachedConnections)
    agent = Agent.usingEndpointFactory(reactor, _Endpoints(reactor, settings.timeout), pool=pool)
    keys = access_keys(settings, os.environ)
    client = S3Client(agent, reactor, settings.endpoint, settings.region, keys, settings.addressing, settings.timeout)
    tmp_dir = os.path.join(config.server.data_dir, ".cosedge", "s3-tmp")
    recent = RecentObjects(reactor, settings.cache_validity, settings.cache_bytes)
    multipart = (settings.multipart_threshold, settings.multipart_part_size)
    store = S3Store(
        client, reactor, tmp_dir, bucket=settings.bucket, run_blocking=run_blocking, recent=recent, multipart=multipart
    )
    store.describe = settings.endpoint + (f" (bucket {settings.bucket})" if settings.bucket else "")
    reactor.callWhenRunning(store.announce)
    return store


# -- the store --


def _is_key(segments: tuple[str, ...]) -> bool:
    return bool(segments) and _NOT_NAMES.isdisjoint(segments) and not any("/" in s for s in segments)


def _start_after(directory: str, marker: str) -> str:
    """
    Where a listing of ``directory`` may start so that it misses nothing
    after ``marker``: a sub-folder ``a/`` sorts after its siblings ``a-b`` and
    ``a.b`` but a store may list it before them, so the listing starts before
    the shortest name of the marker's that could be such a folder.
    """
    if not marker.startswith(directory):
        return marker if marker > directory else ""
    name = marker[len(directory) :].split("/", 1)[0]
    cut = next((i for i in range(1, len(name)) if name[i] < "/"), len(name))
    return directory + name[: cut - 1] if cut > 1 else ""


@implementer(IObjectStore)
class S3Store:
    """
    An :class:`~cosedge.interfaces.IObjectStore` on an S3 endpoint.
    ``bucket``: the one store bucket holding every cosedge bucket as a
    prefix ("": each cosedge bucket is the store bucket of its name).
    """

    def __init__(
        self,
        client: S3Client,
        clock: IReactorTime,
        tmp_dir: str,
        *,
        bucket: str = "",
        run_blocking: RunBlocking = maybeDeferred,
        cooperator: Any = task,
        recent: RecentObjects | None = None,
        multipart: tuple[int, int] = (64 * 1024 * 1024, 16 * 1024 * 1024),
    ) -> None:
        self.client = client
        #: Small objects opened lately, answered again without the store (None given: none kept).
        self._recent = recent if recent is not None else RecentObjects(clock, 0.0, 0)
        self._clock = clock
        self.tmp_dir = tmp_dir
        self.bucket = bucket
        self._run_blocking = run_blocking
        #: How objects are stored (one PUT, or in parts) and store buckets created.
        self.puts = S3Puts(client, clock, run_blocking, cooperator, multipart, lambda: self.describe)
        #: How the store is named in log lines and errors (never with credentials).
        self.describe = "S3 store"
        #: (store bucket, key) -> when an open found nothing there (see :meth:`writer`).
        self._missing: OrderedDict[tuple[str, str], float] = OrderedDict()
        #: How many objects this store has stored, and the count at each key's latest store.
        self._generation = 0
        self._written: OrderedDict[tuple[str, str], int] = OrderedDict()

    def _where(self, bucket: str, segments: tuple[str, ...]) -> tuple[str, str]:
        """The store bucket and key of a cosedge bucket's object."""
        key = "/".join(segments)
        return (self.bucket, f"{bucket}/{key}") if self.bucket else (bucket, key)

    def _guard(self, what: str, work: Coroutine[Any, Any, _T]) -> Deferred[_T]:
        """Run ``work``; any failure but a store's own answer or a cancel becomes a :class:`StoreError`."""

        def failed(failure: Failure) -> Failure:
            if failure.check(StoreError, ShortObject, CancelledError):
                return failure
            why = "no answer in time" if failure.check(DeferredTimeout) else failure.getErrorMessage()
            error = StoreError(f"{self.describe}: {what}: {why}")
            error.__cause__ = failure.value
            return Failure(error)

        return Deferred.fromCoroutine(work).addErrback(failed)

    # -- IObjectStore --

    def open(self, bucket: str, segments: tuple[str, ...]) -> Deferred[IStoredObject | None]:
        if not _is_key(segments):
            return succeed(None)
        where = self._where(bucket, segments)
        recent = self._recent.get(where)
        if recent is not None:
            return succeed(recent)
        since = self._missing.get(where)
        if since is not None and self._clock.seconds() - since < MISS_CACHE:
            return succeed(None)
        opening = self._guard("GET", self._open(*where))
        return opening.addCallback(self._remember, where, self._generation)

    def _remember(self, found: IStoredObject | None, where: tuple[str, str], began: int) -> IStoredObject | None:
        """
        Note whether the store holds ``where`` (a miss makes the key's next
        writer exclusive, and answers its opens for :data:`MISS_CACHE`) — unless
        this store has stored the key since the open began (``began``: the
        count of stores then): that miss is out of date already.
        """
        self._missing.pop(where, None)
        if self._written.get(where, -1) > began:
            return found
        if found is None:
            self._missing[where] = self._clock.seconds()
            while len(self._missing) > MISS_KEYS:
                self._missing.popitem(last=False)
        elif isinstance(found, S3Object):
            self._recent.put(where, found)
        return found

    def _stored(self, where: tuple[str, str]) -> None:
        """This store has just stored ``where`` (or found it stored by a PUT's 412): the next open asks the store."""
        self._generation += 1
        self._missing.pop(where, None)
        self._recent.drop(where)
        self._written.pop(where, None)
        self._written[where] = self._generation
        while len(self._written) > MISS_KEYS:
            self._written.popitem(last=False)

    def _was_missing(self, where: tuple[str, str]) -> bool:
        """Whether the last open of ``where``, within :data:`MISS_MEMORY` seconds, found nothing (forgotten now)."""
        since = self._missing.pop(where, None)
        return since is not None and self._clock.seconds() - since <= MISS_MEMORY

    async def _open(self, store_bucket: str, key: str) -> IStoredObject | None:
        response = await self.client.request("GET", store_bucket, key, headers={"range": f"bytes=0-{PREFIX - 1}"})
        if response.code in (200, 206):
            size = _total_size(response)
            headers, prefix = response.headers, await read_body(response, PREFIX, cut=True)
        else:
            reply = Reply(response.code, response.headers, await read_body(response, MAX_REPLY))
            if reply.status == 404:
                return None
            if reply.status != 416:  # an empty object has no first byte: its headers from a HEAD
                raise reply.failure(f"GET {key}")
            head = await self.client.call("HEAD", store_bucket, key)
            if head.status == 404:
                return None
            if head.status != 200:
                raise head.failure(f"HEAD {key}")
            headers, prefix, size = head.headers, b"", int(head.header(b"content-length") or 0)
        meta, mtime = meta_of(headers)
        etag = (headers.getRawHeaders(b"etag") or [b""])[-1].decode("latin-1")
        ranged = partial(self._ranged, store_bucket, key)
        return S3Object(ranged, size, last_modified(headers) if mtime is None else mtime, etag, meta, prefix)

    def _ranged(self, store_bucket: str, key: str, start: int, end: int, etag: str) -> Deferred[IResponse]:
        headers = {"range": f"bytes={start}-{end - 1}"}
        if etag:
            headers["if-match"] = etag

        def answered(response: IResponse) -> IResponse | Deferred[IResponse]:
            if response.code == 206 or (response.code == 200 and start == 0):
                return response

            def refused(body: bytes) -> IResponse:
                if response.code in (404, 412, 416):
                    raise ShortObject(f"{key} was replaced or removed while it was read")
                raise Reply(response.code, response.headers, body).failure(f"GET {key}")

            return read_body(response, MAX_REPLY).addCallback(refused)

        request: Deferred[IResponse] = self.client.request("GET", store_bucket, key, headers=headers)
        return request.addCallback(answered)

    def writer(
        self, bucket: str, segments: tuple[str, ...], length: int | None = None, *, exclusive: bool | None = None
    ) -> Deferred[IObjectWriter]:
        """
        A writer of the object (see :class:`~cosedge.interfaces.IObjectStore`).
        ``exclusive``: its PUT says ``If-None-Match: *``, and a store that
        holds the key already (another edge stored it) makes the commit a
        success that stores nothing; False: it replaces whatever is stored.
        None (the default, as the fills open it): exclusive when this
        store's last :meth:`open` of the key, within :data:`MISS_MEMORY`
        seconds, found nothing, so a fill after a miss never overwrites
        another edge's copy while a revalidation (which opened the stored
        copy) replaces it.
        """
        if not _is_key(segments):
            return fail(OSError(errno.EINVAL, f"not an object key: {'/'.join(segments)!r}"))
        where = self._where(bucket, segments)
        if exclusive is None:
            exclusive = self._was_missing(where)
        put = partial(self._put, *where, exclusive=exclusive)
        if length is not None and length <= SMALL_BODY:
            return succeed(S3Writer(put, self._clock.seconds))
        return self._run_blocking(lambda: S3Writer(put, self._clock.seconds, *temporary_file(self.tmp_dir, bucket)))

    def _put(
        self,
        store_bucket: str,
        key: str,
        source: bytes | str,
        size: int,
        headers: dict[str, str],
        md5: str,
        *,
        exclusive: bool = False,
    ) -> Deferred[None]:
        if exclusive:
            headers = {**headers, "if-none-match": "*"}
        putting = self._guard("PUT", self.puts.put(store_bucket, key, source, size, headers, md5))
        return putting.addCallback(self._put_done, store_bucket, key)

    def _put_done(self, stored: bool, store_bucket: str, key: str) -> None:
        if not stored:
            _log.info(
                "{store}: {key} is stored already (another edge or process was first): this copy is dropped",
                store=self.describe,
                key=key,
            )
        self._stored((store_bucket, key))

    def remove(self, bucket: str, segments: tuple[str, ...]) -> Deferred[bool]:
        if not _is_key(segments):
            return succeed(False)
        where = self._where(bucket, segments)
        self._stored(where)  # forgotten at once, and again once done (an open meanwhile may see the old copy)
        return self._guard("DELETE", self._remove(*where)).addBoth(self._changed, where)

    async def _remove(self, store_bucket: str, key: str) -> bool:
        head = await self.client.call("HEAD", store_bucket, key)
        if head.status == 404:
            return False
        if head.status != 200:
            raise head.failure(f"HEAD {key}")
        reply = await self.client.call("DELETE", store_bucket, key)
        if reply.status not in (200, 204, 404):
            raise reply.failure(f"DELETE {key}")
        return reply.status != 404

    def update_meta(self, bucket: str, segments: tuple[str, ...], changes: Mapping[str, str]) -> Deferred[bool]:
        if not _is_key(segments):
            return succeed(False)
        where = self._where(bucket, segments)
        self._stored(where)
        return self._guard("COPY", self._update_meta(*where, changes)).addBoth(self._changed, where)

    def _changed(self, result: _T, where: tuple[str, str]) -> _T:
        self._stored(where)
        return result

    async def _update_meta(self, store_bucket: str, key: str, changes: Mapping[str, str]) -> bool:
        head = await self.client.call("HEAD", store_bucket, key)
        if head.status == 404:
            return False
        if head.status != 200:
            raise head.failure(f"HEAD {key}")
        meta, mtime = meta_of(head.headers)
        headers = meta_headers({**meta, **changes}, last_modified(head.headers) if mtime is None else mtime)
        headers["x-amz-copy-source"] = f"/{store_bucket}/{quote_key(key)}"
        headers["x-amz-metadata-directive"] = "REPLACE"
        etag = head.header(b"etag")
        if etag:  # replaced meanwhile: the new object's metadata is newer, and stays
            headers["x-amz-copy-source-if-match"] = etag
        reply = await self.client.call("PUT", store_bucket, key, headers=headers)
        if reply.status in (404, 412):
            return reply.status == 412
        if reply.status != 200 or b"<Error>" in reply.body:  # a copy may fail after its 200 has been sent
            raise reply.failure(f"COPY {key}")
        return True

    def list(
        self, bucket: str, prefix: str = "", marker: str = "", limit: int = 1000
    ) -> Deferred[builtins.list[StoredEntry]]:
        base = f"{bucket}/" if self.bucket else ""
        found: builtins.list[StoredEntry] = []
        if limit <= 0:
            return succeed(found)
        folder = base + prefix[: prefix.rfind("/") + 1]
        walk = self._walk(self.bucket or bucket, folder, base + prefix, base + marker, len(base), found, limit)
        return self._guard("list", walk).addCallback(lambda _: found)

    async def _walk(
        self,
        store_bucket: str,
        folder: str,
        prefix: str,
        marker: str,
        base: int,
        found: builtins.list[StoredEntry],
        limit: int,
    ) -> None:
        """
        Append to ``found`` the objects under ``folder`` whose keys start with
        ``prefix`` and sort after ``marker``, in key order, up to ``limit``:
        the folder's entries, page by page, each sub-folder walked in its place.
        """
        order = count()
        waiting: list[tuple[str, int, tuple[int, float, str] | None]] = []  # (sort key, arrival, object)
        token = None
        start = _start_after(folder, marker)
        while True:
            query = [("list-type", "2"), ("delimiter", "/"), ("prefix", prefix)]
            query.append(("continuation-token", token) if token else ("start-after", start))
            reply = await self.client.call("GET", store_bucket, query=[q for q in query if q[1]])
            if reply.status == 404 and not self.bucket:
                return  # no store bucket yet: no objects
            if reply.status != 200:
                raise reply.failure("list")
            objects, folders, token = parse_listing(reply.body)
            names = [key for key, *_ in objects] + [f[:-1] for f in folders]
            for key, size, mtime, etag in objects:
                if not key.endswith("/"):  # a folder marker object is no object
                    heapq.heappush(waiting, (key, next(order), (size, mtime, etag)))
            for sub in folders:
                heapq.heappush(waiting, (sub, next(order), None))
            # A sub-folder sorts as "name/": it waits until no later entry of the store can sort before it.
            bound = max(names, default="")
            while waiting and (token is None or waiting[0][0] <= bound):
                key, _, entry = heapq.heappop(waiting)
                if entry is None:
                    if marker < key or marker.startswith(key):
                        await self._walk(store_bucket, key, key, marker, base, found, limit)
                elif key > marker:
                    found.append(StoredEntry(key[base:], *entry))
                if len(found) >= limit:
                    return
            if token is None:
                return

    def usage(self, bucket: str) -> Deferred[tuple[int, int]]:
        return self._guard("list", self._usage(bucket))

    async def _usage(self, bucket: str) -> tuple[int, int]:
        objects = total = 0
        token = None
        while True:
            query = [("list-type", "2"), ("prefix", f"{bucket}/" if self.bucket else "")]
            if token:
                query.append(("continuation-token", token))
            reply = await self.client.call("GET", self.bucket or bucket, query=[q for q in query if q[1]])
            if reply.status == 404 and not self.bucket:
                return 0, 0
            if reply.status != 200:
                raise reply.failure("list")
            page, _, token = parse_listing(reply.body)
            for key, size, _mtime, _etag in page:
                if not key.endswith("/"):
                    objects += 1
                    total += size
            if token is None:
                return objects, total

    def observe_requests(self, observer: Callable[[str, str, float], None]) -> None:
        """Tell ``observer`` of every request to the store (for the metrics; see :mod:`cosedge.interfaces`)."""
        self.client.observe = observer

    def probe(self) -> Deferred[None]:
        return self._guard("probe", self._probe())

    async def _probe(self) -> None:
        if not self.bucket:
            reply = await self.client.call("GET", "")  # ListBuckets: reachable, and the keys are right
        else:
            reply = await self.client.call("HEAD", self.bucket)
            if reply.status == 404:
                await self.puts.create_bucket(self.bucket)
                return
        if reply.status != 200:
            raise reply.failure(self.describe)

    def sweep(self, owner: int | None = None) -> Deferred[int]:
        return self._guard("sweep", self._sweep(owner))

    async def _sweep(self, owner: int | None) -> int:
        """
        Remove leftover temporary files and abort the multipart uploads their
        journals name (``owner``: only that process's); how many.
        """
        os.makedirs(self.tmp_dir, exist_ok=True)
        names = os.path.join(glob.escape(self.tmp_dir), "*" if owner is None else f"{owner}.*")
        removed = 0
        for path in glob.glob(names + ".part"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed += 1
        for path in glob.glob(names + JOURNAL_SUFFIX):
            removed += await abort_journalled(self.client, path)
        return removed

    def announce(self) -> Deferred[None]:
        """Say in one line, at start, whether the store answers (``/readyz`` says so until it does)."""

        def reachable(_: object) -> None:
            _log.info("objects are stored in {store}", store=self.describe)

        def unreachable(failure: Failure) -> None:
            _log.warn(
                "{store} is unreachable: {why}; /readyz answers 503 until it is",
                store=self.describe,
                why=failure.getErrorMessage(),
            )

        return self.probe().addCallbacks(reachable, unreachable)


def _total_size(response: IResponse) -> int:
    """The object's size from a (ranged) GET's Content-Range, or its Content-Length."""
    ranges = response.headers.getRawHeaders(b"content-range")
    if ranges:
        total = ranges[-1].rpartition(b"/")[2]
        if total.isdigit():
            return int(total)
    elif isinstance(response.length, int):  # not UNKNOWN_LENGTH
        return response.length
    raise StoreError("the store's answer does not say the object's size")
