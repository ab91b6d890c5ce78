"""
The cosedge service: one object that owns the configuration, the store, the
filler, the HTTP client pool and the listeners, and starts and stops them.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from attrs import frozen
from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web.client import URI, Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.iweb import IAgent, IAgentEndpointFactory
from zope.interface import implementer

from .config import Config
from .fill import Filler
from .stats import Stats
from .store import DiskStore, IObjectStore
from .web import EdgeResource, EdgeSite

__all__ = ["EdgeService", "build_service"]

_log = Logger()


class _QuietClientFactory(_HTTP11ClientFactory):
    noisy = False


class _QuietPool(HTTPConnectionPool):
    """A connection pool that does not log every origin connection."""

    _factory = _QuietClientFactory


@implementer(IAgentEndpointFactory)
@frozen
class _OriginEndpoints:
    """Connects to origins with the connect timeout of the current configuration."""

    reactor: Any
    connect_timeout: Callable[[], float]

    def endpointForURI(self, uri: URI) -> HostnameEndpoint:
        return HostnameEndpoint(self.reactor, uri.host, uri.port, timeout=self.connect_timeout())


class EdgeService(MultiService):
    """
    The running daemon.  ``config`` is replaced whole by
    :meth:`replace_config`; every request and fill reads the current value,
    so a change applies to the very next request.
    """

    def __init__(
        self,
        config: Config,
        reactor: Any,
        store: IObjectStore,
        agent: IAgent,
        pool: HTTPConnectionPool | None,
        run_blocking: Callable[[Callable[[], Any]], Deferred[Any]] = maybeDeferred,
    ) -> None:
        super().__init__()
        self.config = config
        #: The TOML file the configuration came from (None: the embedded default).
        self.config_path: str | None = None
        self.reactor = reactor
        self.store = store
        self.stats = Stats()
        self._pool = pool
        self.filler = Filler(store, agent, reactor, lambda: self.config.fill, self.stats, run_blocking)
        self.resource = EdgeResource(lambda: self.config, store, self.filler, self.stats)
        self.site = EdgeSite(
            self.resource, self.stats, config.server.access_log, reactor, config.server.request_timeout
        )
        for description in config.server.listen:
            strports.service(description, self.site, reactor=reactor).setServiceParent(self)

    def replace_config(self, config: Config) -> Config:
        """Swap in a new configuration; returns the old one."""
        if not isinstance(config, Config):
            raise TypeError(f"expected a Config, not {config!r}")
        old, self.config = self.config, config
        return old

    def startService(self) -> None:
        swept = self.store.sweep()
        if swept:
            _log.info("removed {count} leftover temporary file(s) from an earlier run", count=swept)
        super().startService()
        _log.info(
            "cosedge serving {buckets} bucket(s) for {domains} from {data_dir}",
            buckets=len(self.config.buckets),
            domains=", ".join(self.config.server.domains),
            data_dir=self.config.server.data_dir,
        )

    def stopService(self) -> Deferred[object]:
        listeners = super().stopService()
        fills = self.filler.stop()
        steps: list[Deferred[Any]] = [d for d in (listeners, fills) if d is not None]

        def after_stop(_: object) -> object:
            self.store.sweep()  # any temporary file a cancelled fill could not remove
            if self._pool is not None:
                return self._pool.closeCachedConnections()
            return None

        return DeferredList(steps, consumeErrors=True).addCallback(after_stop)


def build_service(
    config: Config,
    reactor: Any,
    *,
    config_path: str | None = None,
    _agent: IAgent | None = None,
    _store: IObjectStore | None = None,
) -> EdgeService:
    """
    Build the whole daemon from a configuration and a reactor.  Tests pass a
    ``MemoryReactorClock`` and, through the private keywords, an in-memory
    agent and store.
    """
    pool = None
    run_blocking: Callable[[Callable[[], Any]], Deferred[Any]] = maybeDeferred
    if _agent is None:
        # A real reactor: commits (fsync + rename) go to its thread pool so
        # the event loop never waits on the disk.
        # Enough threads for every fill to create or commit its file at once.
        threads = reactor.getThreadPool()
        threads.adjustPoolsize(maxthreads=max(threads.max, config.fill.max_concurrent))
        run_blocking = partial(deferToThreadPool, reactor, threads)
        pool = _QuietPool(reactor, persistent=True)
        pool.maxPersistentPerHost = config.fill.max_concurrent
        # Read at each new connection, so a live change applies (``service`` is
        # bound below, before any fill can start).
        endpoints = _OriginEndpoints(reactor, lambda: service.config.fill.connect_timeout)
        _agent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
    store = _store if _store is not None else DiskStore(config.server.data_dir)
    service = EdgeService(config, reactor, store, _agent, pool, run_blocking)
    service.config_path = config_path
    # Optional features configured by their own TOML sections; each adds its
    # child services (and checks its section) in its own module.
    from . import admin, ops

    admin.attach(service)
    ops.attach(service)
    return service
