"""
Operations: what a service manager and a monitoring system need from the
daemon.

- Readiness to systemd (``Type=notify``): ``READY=1`` once every listener is
  accepting connections, ``STOPPING=1`` when a shutdown begins, ``WATCHDOG=1``
  keep-alives when ``WatchdogSec=`` asks for them (see :mod:`cosedge.ops.notify`).
- The ``[admin]`` section: an HTTP listener, separate from the bucket
  listener, with ``/metrics``, ``/livez`` and ``/readyz``
  (see :mod:`cosedge.ops.metrics`) and, at ``/``, the migration page for
  people (see :mod:`cosedge.ops.page`; the request counters it charts are
  sampled once a minute while the daemon runs)::

      [admin]
      listen = "tcp:9090:interface=127.0.0.1"   # or a list of endpoint strings
      min_free_bytes = 104857600                # /readyz fails below this much free disk

- The ``[log]`` section: an optional JSON event log beside the console log::

      [log]
      json_file = "/var/log/cosedge/events.json"
      json_rotate_bytes = 104857600             # rotate past this size (0: never)
      json_keep = 5                             # rotated files kept

:func:`attach` is called last by :func:`cosedge.service.build_service`, so
the service it adds starts after every listener and stops before them.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from attrs import field, frozen
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IServiceCollection, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, Logger, LogPublisher, globalLogPublisher
from twisted.python.logfile import LogFile

from ..config import Config, ConfigError, build_section
from ..interfaces import IObjectStore
from ..logs import json_file_observer
from ..stats import Totals
from .history import RequestHistory, UsageCache
from .metrics import AdminResource, AdminSite, Readiness, free_disk_check, make_registry, store_writable_check
from .notify import notify, watchdog_interval
from .page import AdminRoot, MigrationPage, PageContext

__all__ = [
    "AdminConfig",
    "JsonLogService",
    "LogConfig",
    "OpsContext",
    "OpsService",
    "attach",
    "check_config",
    "parse_admin",
    "parse_log",
]

_log = Logger(namespace="cosedge.ops")

OPS_SERVICE = "cosedge-ops"
ADMIN_SERVICE = "cosedge-admin-http"
JSON_LOG_SERVICE = "cosedge-json-log"
_MiB = 1024 * 1024
#: Seconds an admin connection may sit idle (Twisted's default is 12 hours).
_ADMIN_IDLE_TIMEOUT = 60


class Workers(Protocol):
    """What readiness uses of the worker pool."""

    @property
    def started(self) -> Deferred[bool]:
        """Fires once every worker process serves (True) or one could not start (False)."""

    def check(self) -> str | None:
        """Readiness: None while every worker process serves."""


class OpsContext(PageContext, Protocol):
    """What the operations services use of the daemon (an ``EdgeService``), the migration page's included."""

    @property
    def config(self) -> Config:
        """The running configuration: ``[admin]`` is read at every check, buckets at every scrape."""

    @property
    def reactor(self) -> Any: ...

    @property
    def store(self) -> IObjectStore:
        """Probed by ``/readyz``: can a fill write?"""

    @property
    def workers(self) -> Workers | None:
        """The worker processes, or None when the daemon is one process."""

    def totals(self) -> Totals:
        """Counters and fill gauges of every process, read at every scrape of ``/metrics``."""


def _endpoints(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not value:
        raise ConfigError(
            f"[admin] listen must be an endpoint string like 'tcp:9090:interface=127.0.0.1'"
            f" or a non-empty list of them, not {value!r}"
        )
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise ConfigError(f"[admin] listen entries must be non-empty endpoint strings, not {item!r}")
    return tuple(value)


def _count(where: str, minimum: int) -> Callable[[object, Any, object], None]:
    def check(instance: object, attribute: Any, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            what = "a positive whole number" if minimum else "zero or a positive whole number"
            raise ConfigError(f"[{where}] {attribute.name} must be {what} of bytes or files, not {value!r}")

    return check


@frozen
class AdminConfig:
    """The ``[admin]`` section: the admin HTTP listener and readiness limits."""

    listen: tuple[str, ...] = field(default=("tcp:9090:interface=127.0.0.1",), converter=_endpoints)
    #: ``/readyz`` answers 503 when the data directory has less free space.
    min_free_bytes: int = field(default=100 * _MiB, validator=_count("admin", 0))


@frozen
class LogConfig:
    """The ``[log]`` section: an optional JSON event log file."""

    json_file: str = field(default="")
    json_rotate_bytes: int = field(default=100 * _MiB, validator=_count("log", 0))
    json_keep: int = field(default=5, validator=_count("log", 1))

    @json_file.validator
    def _check_json_file(self, attribute: object, value: object) -> None:
        if not isinstance(value, str):
            raise ConfigError(f"[log] json_file must be a path (or '' for none), not {value!r}")


def parse_admin(extra: Mapping[str, Any]) -> AdminConfig | None:
    """The ``[admin]`` section of ``Config.extra``, validated; None when absent."""
    if "admin" not in extra:
        return None
    config: AdminConfig = build_section(AdminConfig, extra["admin"], "admin")
    return config


def parse_log(extra: Mapping[str, Any]) -> LogConfig | None:
    """The ``[log]`` section of ``Config.extra``, validated; None when absent."""
    if "log" not in extra:
        return None
    config: LogConfig = build_section(LogConfig, extra["log"], "log")
    return config


def check_config(config: Config) -> None:
    """
    Validate the sections this module owns, so a command line can refuse a
    bad file before anything starts.

    :raises ConfigError: naming the section and the field.
    """
    parse_admin(config.extra)
    parse_log(config.extra)


# -- listeners --


def _listeners(root: object) -> Iterator[StreamServerEndpointService]:
    if isinstance(root, StreamServerEndpointService):
        yield root
    if isinstance(root, MultiService):
        for child in root:
            yield from _listeners(child)


def _describe(listener: StreamServerEndpointService, port: Any) -> str:
    """``tcp:8080`` for a listening port, else the endpoint's kind."""
    if port is not None:
        host = port.getHost()
        return f"{getattr(host, 'type', 'socket').lower()}:{getattr(host, 'port', '') or host}"
    return type(listener.endpoint).__name__


class OpsService(Service):
    """
    Reports the daemon's life to the service manager and keeps what the
    admin listener shows: the metrics registry and the readiness checks.

    :ivar ready: every listener is accepting connections and no shutdown
        has begun.
    """

    name = OPS_SERVICE

    def __init__(self, root: OpsContext, reactor: Any, environ: Mapping[str, str] | None = None) -> None:
        self._root = root
        self._reactor = reactor
        self._environ = environ
        self.ready = False
        self.stopping = False
        self.failed: list[str] = []
        self._ports: dict[StreamServerEndpointService, Any] = {}
        self._call: IDelayedCall | None = None
        self._watchdog: LoopingCall | None = None
        #: Fires (with True or False) once every listener has started or failed.
        self.listening: Deferred[bool] = Deferred()
        self.registry = make_registry(root)
        self.readiness = Readiness([self.listeners_check])
        self.history = RequestHistory(reactor, lambda: root.totals().stats.requests)
        self.page = MigrationPage(root, reactor, self.history, UsageCache(root.store, reactor))
        self.resource = AdminRoot(AdminResource(self.registry, self.readiness), self.page)
        #: Sample the request counters for the page while running (:func:`attach` sets it with ``[admin]``).
        self.sampling = False

    def startService(self) -> None:
        super().startService()
        self.ready = self.stopping = False
        self.failed = []
        self._ports = {}
        if self.listening.called:
            self.listening = Deferred()
        interval = watchdog_interval(self._environ)
        if interval:
            self._watchdog = LoopingCall(notify, "WATCHDOG=1", self._environ)
            self._watchdog.clock = self._reactor
            self._watchdog.start(interval, now=True)
        if self.sampling:
            self.history.start()
        # Every service of the tree has been asked to start by the time this
        # call runs (a listener added after this one included).
        self._call = self._reactor.callLater(0, self._watch)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        self.stopping = True
        self.ready = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        self.history.stop()
        notify("STOPPING=1\nSTATUS=Stopping: closing listeners, cancelling fills", self._environ)
        _log.info("cosedge stopping")
        _exit_zero_after_sigterm(self._reactor)
        return None

    def listeners_check(self) -> str | None:
        """Readiness: None once every listener accepts connections."""
        if self.stopping:
            return "shutting down"
        if self.failed:
            return "listener(s) failed to start: " + ", ".join(self.failed)
        if not self.ready:
            return "listeners not up yet"
        return None

    def _watch(self) -> None:
        self._call = None
        observed = [self._observe(listener) for listener in _listeners(self._root)]
        workers = self._root.workers
        if workers is not None:  # ready once every worker process serves too
            observed.append(workers.started)
        DeferredList(observed, consumeErrors=True).addCallback(self._all_started)

    def _observe(self, listener: StreamServerEndpointService) -> Deferred[bool]:
        started: Deferred[bool] = Deferred()
        # The listener's own Deferred: fires with the listening port, or with
        # None once its failure has been logged.  Pass the result along
        # untouched; stopService chains on it.
        waiting = listener._waitingForPort
        if waiting is None:
            self.failed.append(_describe(listener, None) + " (never started)")
            started.callback(False)
            return started

        def seen(port: Any) -> Any:
            if port is not None and not isinstance(port, BaseException):
                self._ports[listener] = port
                started.callback(True)
            else:
                self.failed.append(_describe(listener, None))
                started.callback(False)
            return port

        waiting.addBoth(seen)
        return started

    def _all_started(self, results: list[tuple[bool, bool]]) -> None:
        ok = all(success and up for success, up in results)
        if self.running and not self.stopping:
            if ok:
                self.ready = True
                where = ", ".join(_describe(listener, port) for listener, port in self._ports.items())
                notify(f"READY=1\nSTATUS=Serving on {where}", self._environ)
                _log.info("cosedge ready: listening on {where}", where=where)
            else:
                notify("STATUS=Not ready: a listener failed to start", self._environ)
                _log.error("cosedge not ready: listener(s) failed: {failed}", failed=", ".join(self.failed))
        self.listening.callback(ok)


def _exit_zero_after_sigterm(reactor: Any) -> None:
    """
    A SIGTERM is how a service manager asks for an ordinary stop, and the
    shutdown that follows (listeners closed, fills cancelled, temporary files
    removed) is a success: exit 0.  twistd would otherwise re-raise the
    signal once the reactor stops and die of it (status 143), which scripts
    and supervisors other than systemd read as a failure.  SIGINT keeps
    twistd's behaviour, so a shell still sees an interrupted command.
    """
    if getattr(reactor, "_exitSignal", None) == signal.SIGTERM:
        reactor._exitSignal = None


class JsonLogService(Service):
    """Adds the ``[log] json_file`` observer while the daemon runs."""

    name = JSON_LOG_SERVICE

    def __init__(self, observer: ILogObserver, logfile: LogFile, publisher: LogPublisher = globalLogPublisher) -> None:
        self.observer = observer
        self.logfile = logfile
        self._publisher = publisher

    def startService(self) -> None:
        super().startService()
        self._publisher.addObserver(self.observer)

    def stopService(self) -> None:
        super().stopService()
        self._publisher.removeObserver(self.observer)
        self.logfile.close()


def attach(service: OpsContext, *, _environ: Mapping[str, str] | None = None) -> None:
    """
    Add the operations services to ``service`` (an
    :class:`~cosedge.service.EdgeService`): the admin listener when
    ``[admin]`` is configured, the JSON log when ``[log] json_file`` is, and
    always the notifier, last.

    :raises ConfigError: when ``[admin]`` or ``[log]`` is invalid.
    """
    admin = parse_admin(service.config.extra)
    log_config = parse_log(service.config.extra)
    ops = OpsService(service, service.reactor, _environ)
    ops.sampling = admin is not None
    parent = IServiceCollection(service)  # an EdgeService is a MultiService

    if admin is not None:
        ops.readiness.checks.append(store_writable_check(service.store))
        data_dir = service.config.server.data_dir
        # Read at every check, so a live configuration change applies.
        ops.readiness.checks.append(free_disk_check(data_dir, lambda: _min_free(service, admin)))
        site = AdminSite(ops.resource, reactor=service.reactor, timeout=_ADMIN_IDLE_TIMEOUT)
        listeners = MultiService()
        listeners.setName(ADMIN_SERVICE)
        for description in admin.listen:
            try:
                endpoint = serverFromString(service.reactor, description)
            except (ValueError, TypeError, KeyError) as e:
                raise ConfigError(f"[admin] listen: {description!r} is not a valid endpoint: {e}") from None
            listener = StreamServerEndpointService(endpoint, site)
            listener._raiseSynchronously = True
            listener.setServiceParent(listeners)
        listeners.setServiceParent(parent)

    if log_config is not None and log_config.json_file:
        try:
            observer, logfile = json_file_observer(
                log_config.json_file, log_config.json_rotate_bytes, log_config.json_keep
            )
        except OSError as e:
            raise ConfigError(f"[log] json_file: cannot open {log_config.json_file!r}: {e}") from None
        JsonLogService(observer, logfile).setServiceParent(parent)

    if service.workers is not None:
        ops.readiness.checks.append(service.workers.check)
    ops.setServiceParent(parent)


def _min_free(service: OpsContext, started_with: AdminConfig) -> int:
    try:
        current = parse_admin(service.config.extra)
    except ConfigError:
        current = None
    return (current or started_with).min_free_bytes
