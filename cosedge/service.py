"""
The cosedge service: one object that owns the configuration, the store, the
filler, the HTTP client pool and the listeners, and starts and stops them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool
from twisted.web.iweb import IAgent

from .adopted import adopted_endpoints, bucket_endpoint
from .cluster import Cluster
from .config import Config
from .fill.claims import Claims
from .fill.client import OriginAgents, QuietPool
from .fill.partial import Partials
from .fill.scheduler import Filler
from .interfaces import IObjectStore
from .jobs import JobsService
from .jobs import attach as attach_jobs
from .settle import settled
from .stats import Stats, Totals
from .storage.disk import DiskStore
from .storage.s3 import open_s3_store
from .web.channel import EdgeSite
from .web.resource import EdgeResource
from .workers import SharedEndpoint, WorkerPool

__all__ = ["EdgeService", "build_service", "build_worker_service"]

_log = Logger()


class EdgeService(MultiService):
    """
    The running daemon.  ``config`` is replaced whole by
    :meth:`replace_config`; every request and fill reads the current value,
    so a change applies to the very next request.

    ``endpoints`` are the bucket listeners (default: ``[server] listen``).
    A worker process passes ``primary=False``: temporary files are the
    primary's to sweep, when no other process can be writing one.
    """

    def __init__(
        self,
        config: Config,
        reactor: Any,
        store: IObjectStore,
        agent: IAgent,
        pool: HTTPConnectionPool | None,
        *,
        endpoints: list[IStreamServerEndpoint] | None = None,
        claims: Claims | None = None,
        partials: Partials | None = None,
        primary: bool = True,
    ) -> None:
        super().__init__()
        self.config = config
        #: The TOML file the configuration came from (None: the embedded default).
        self.config_path: str | None = None
        self.reactor = reactor
        self.store = store
        self.stats = Stats()
        observe_requests = getattr(store, "observe_requests", None)  # a network store's requests, in the metrics
        if observe_requests is not None:
            observe_requests(self.stats.store_request)
        self._pool = pool
        tls = agent.tls if isinstance(agent, OriginAgents) else None
        self.filler = Filler(
            store, agent, reactor, lambda: self.config.fill, self.stats, claims, tls=tls, partials=partials
        )
        #: ``[cluster]``: which edge owns each key; hands fills over and takes them.
        self.cluster = Cluster(lambda: self.config, agent, reactor, self.stats)
        self.filler.hand_over = self.cluster.hand_over
        #: The worker processes (``[server] workers`` above 1), or None.
        self.workers: WorkerPool | None = None
        #: Backfill and verify jobs (the primary process's; None in a worker).
        self.jobs: JobsService | None = None
        self._primary = primary
        self.resource = EdgeResource(lambda: self.config, store, self.filler, self.stats, self.cluster)
        self.site = EdgeSite(
            self.resource,
            self.stats,
            config.server.access_log,
            reactor,
            config.server.request_timeout,
            send_timeout=config.server.send_timeout,
            max_connections=config.server.max_connections,
        )
        if endpoints is None:
            endpoints = [bucket_endpoint(reactor, d) for d in config.server.listen]
        for endpoint in endpoints:
            listener = StreamServerEndpointService(endpoint, self.site)
            listener._raiseSynchronously = True  # as strports.service does: fail the start
            listener.setServiceParent(self)

    def replace_config(self, config: Config) -> Config:
        """Swap in a new configuration; returns the old one."""
        if not isinstance(config, Config):
            raise TypeError(f"expected a Config, not {config!r}")
        old, self.config = self.config, config
        # Read for each new connection: a live change applies to the next one.
        self.site.send_timeout = config.server.send_timeout
        self.site.max_connections = config.server.max_connections
        if self.workers is not None:
            self.workers.tell({"config": config})
        return old

    def reopen_logs(self) -> None:
        """Reopen the access-log file in every process (SIGHUP: after logrotate)."""
        self.site.reopen_access_log()
        if self.workers is not None:
            self.workers.tell({"reopen": True})

    def forget(self, bucket: str, segments: tuple[str, ...]) -> None:
        """Drop a key's remembered 404 or failure, in every process."""
        self.filler.forget(bucket, segments)
        if self.workers is not None:
            self.workers.tell({"forget": (bucket, segments)})

    def in_flight(self) -> list[dict[str, object]]:
        """The fills running and queued in every process (see :meth:`Filler.in_flight`)."""
        fills = self.filler.in_flight()
        if self.workers is None:
            return fills
        return [{**f, "process": 0} for f in fills] + self.workers.in_flight()

    def totals(self) -> Totals:
        """Counters and fill gauges of the whole daemon, every process included."""
        filler = self.filler
        gauges = (filler.running, filler.queued, filler.remembered_not_found(), len(filler.health.down_hosts()))
        if self.workers is not None:
            return self.workers.totals(self.stats, *gauges)
        return Totals(self.stats, *gauges)

    def startService(self) -> None:
        if not self._primary:
            super().startService()
            return
        # A disk store has swept when this returns, before the listeners start.
        self._sweep_partials()
        swept = settled(self.store.sweep())
        if isinstance(swept, Deferred):
            swept.addCallbacks(self._swept, lambda f: _log.failure("sweeping temporary files failed", f))
        else:
            self._swept(swept)
        super().startService()
        _log.info(
            "cosedge serving {buckets} bucket(s) for {domains} from {data_dir}",
            buckets=len(self.config.buckets),
            domains=", ".join(self.config.server.domains),
            data_dir=self.config.server.data_dir,
        )

    def sweep(self, owner: int) -> Deferred[int]:
        """A dead process's leftovers: its published fills' names and its temporary files (how many)."""
        self._sweep_partials(owner)
        return self.store.sweep(owner=owner)

    def _sweep_partials(self, owner: int | None = None) -> None:
        """Remove the published names of fills a process left (:mod:`cosedge.fill.partial`)."""
        if self.filler.partials is not None:
            try:
                self.filler.partials.sweep(owner)
            except OSError as e:
                _log.warn("cannot remove the names of fills under way: {error}", error=e)

    @staticmethod
    def _swept(count: int) -> None:
        if count:
            _log.info("removed {count} leftover temporary file(s) from an earlier run", count=count)

    def stopService(self) -> Deferred[object]:
        # Jobs first: the keys they have asked the origin for end before the
        # fills are cancelled (for a bounded time), so a restart asks for none again.
        jobs: Deferred[Any] = self.jobs.wind_down() if self.jobs is not None else succeed(None)
        listeners = super().stopService()
        fills = jobs.addCallback(lambda _: self.filler.stop())
        steps: list[Deferred[Any]] = [d for d in (listeners, fills) if d is not None]

        def after_stop(_: object) -> object:
            swept: Deferred[Any] = succeed(None)
            if self._primary:  # any temporary file a cancelled fill could not remove
                self._sweep_partials()
                swept = self.store.sweep()
            if self._pool is not None:
                pool = self._pool
                return swept.addCallback(lambda _: pool.closeCachedConnections())
            return swept

        return DeferredList(steps, consumeErrors=True).addCallback(after_stop)


def _origin_agent(
    reactor: Any, config: Config, current: Callable[[], Config]
) -> tuple[IAgent, HTTPConnectionPool, Any]:
    """
    The fills' HTTP agent on a real reactor, its persistent connection pool,
    and a function running blocking calls in the reactor's thread pool.
    """
    # Commits (fsync + rename) go to the thread pool so the event loop never
    # waits on the disk; enough threads for every fill to create or commit
    # its file at once.
    threads = reactor.getThreadPool()
    threads.adjustPoolsize(maxthreads=max(threads.max, config.fill.max_concurrent))
    pool = QuietPool(reactor, persistent=True)
    pool.maxPersistentPerHost = config.fill.max_concurrent
    # Read at each new connection, so a live change applies.  HTTPS origins
    # get an agent per TLS setting (``agent.tls``), all on this one pool.
    agent = OriginAgents(reactor, lambda: current().fill, pool)
    return agent, pool, partial(deferToThreadPool, reactor, threads)


def _open_store(config: Config, reactor: Any, run_blocking: Callable[..., Deferred[Any]]) -> IObjectStore:
    """``[storage] backend = "s3"``: the S3 store; else (the default) the disk store in ``data_dir``."""
    s3 = open_s3_store(config, reactor, run_blocking)  # validates [storage]: errors name the field
    return s3 if s3 is not None else DiskStore(config.server.data_dir, run_blocking)


def _claims(config: Config) -> Claims:
    return Claims(os.path.join(config.server.data_dir, ".cosedge", "claims"))


def _partials(config: Config) -> Partials:
    return Partials(os.path.join(config.server.data_dir, ".cosedge", "partial"))


def build_service(
    config: Config,
    reactor: Any,
    *,
    config_path: str | None = None,
    _agent: IAgent | None = None,
    _store: IObjectStore | None = None,
    _spawn: Callable[..., Any] | None = None,
) -> EdgeService:
    """
    Build the whole daemon from a configuration and a reactor.  Tests pass a
    ``MemoryReactorClock`` and, through the private keywords, an in-memory
    agent and store, and a fake ``spawnProcess``.
    """
    pool = None
    run_blocking: Callable[[Callable[[], Any]], Deferred[Any]] = maybeDeferred
    if _agent is None:
        # ``service`` is bound below, before any fill can start.
        _agent, pool, run_blocking = _origin_agent(reactor, config, lambda: service.config)
    store = _store if _store is not None else _open_store(config, reactor, run_blocking)
    workers = config.server.workers
    shared = [SharedEndpoint(reactor, d, workers - 1) for d in config.server.listen] if workers > 1 else None
    # Several processes on one data directory claim keys there (a test's own store has none).
    claims = _claims(config) if workers > 1 and _store is None else None
    partials = _partials(config) if _store is None else None
    service = EdgeService(
        config,
        reactor,
        store,
        _agent,
        pool,
        endpoints=list(shared) if shared else None,
        claims=claims,
        partials=partials,
    )
    service.config_path = config_path
    if shared:
        service.workers = WorkerPool(
            reactor,
            workers,
            shared,
            lambda: service.config,
            _spawn,
            sweep=lambda pid: service.sweep(owner=pid),
            site=service.site,
        )
        service.workers.setServiceParent(service)
    # Optional features configured by their own TOML sections; each adds its
    # child services (and checks its section) in its own module.
    from .admin import live
    from .ops import service as ops

    attach_jobs(service, run_blocking)  # in the primary only: workers run no jobs
    live.attach(service)
    ops.attach(service)
    # The origin API changes rules as the manhole does (validated, saved, audited).
    service.resource.api.changes = service.getServiceNamed("admin").edge
    service.resource.api.forget = service.forget  # a purge forgets the key in every process
    return service


def build_worker_service(config: Config, reactor: Any, listeners: list[tuple[int, int]]) -> EdgeService:
    """
    The service of one worker process (:mod:`cosedge.worker`): the bucket
    listeners it was given as descriptors, fills, and nothing the primary owns.
    """
    agent, pool, run_blocking = _origin_agent(reactor, config, lambda: service.config)
    store = _open_store(config, reactor, run_blocking)
    endpoints: list[IStreamServerEndpoint] = list(adopted_endpoints(reactor, config.server.listen, listeners))
    service = EdgeService(
        config,
        reactor,
        store,
        agent,
        pool,
        endpoints=endpoints,
        claims=_claims(config),
        partials=_partials(config),
        primary=False,
    )
    return service
