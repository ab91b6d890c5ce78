"""
Live administration: the running configuration as *file* + *live changes*,
SIGHUP reloads, and the wiring of it all into the service.

An operator changes the running daemon through the ``edge`` façade
(:mod:`cosedge.admin.shell`), an object in the namespace of the manhole shell
(SSH or telnet, see :mod:`cosedge.admin.shells`).  Every change is validated
by the same rules as the TOML file, saved atomically to the state file
(:mod:`cosedge.admin.state`) *before* it is applied, then swapped in whole
with :meth:`EdgeService.replace_config`, so it applies to the very next
request and survives a restart.  A change that cannot be saved is not
applied.  Each change is logged as one structured audit line (what, from,
to, through which channel) in the ``cosedge.audit`` log namespace
(:mod:`cosedge.admin.changes`).

SIGHUP re-reads the TOML file and the state file the same way; a bad file is
rejected with a log line and the running configuration stays.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, TypeVar

from attrs import evolve
from twisted.application.service import IServiceCollection, MultiService, Service
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger

from ..cluster import check_config as check_cluster
from ..config import Config, ConfigError, load_config
from .changes import Change, audit, audit_unchanged, diff_configs
from .context import AdminContext
from .errors import AdminError
from .manhole import check_manhole_files, parse_manhole
from .shell import Edge
from .state import MemoryStateFile, NotSynced, State, StateFile, state_path

__all__ = ["LiveConfig", "attach", "check_config"]

_log = Logger(namespace="cosedge.admin")
_T = TypeVar("_T")

#: Runs a blocking function off the reactor thread: a Deferred of its result.

#: Server settings bound when the daemon starts (listeners, store, access
#: log): a reload keeps the running values and says a restart is needed (as
#: it does for [manhole], [admin] listen and [log]: see LiveConfig._fixed_of).
_FIXED_SERVER = ("listen", "data_dir", "access_log", "request_timeout", "workers")


class LiveConfig(Service):
    """
    Owns the running configuration as *file* + *live changes*: applies the
    state overlay at start-up, makes every live change (validate, save,
    apply, audit), reloads on SIGHUP.  A child service of the
    :class:`~cosedge.service.EdgeService`, named ``"admin"``.
    """

    name = "admin"

    def __init__(self, service: AdminContext, state_file: StateFile | MemoryStateFile) -> None:
        self.service = service
        self.state_file = state_file
        #: One walk at a time: they hold a thread of the pool the fills use.
        self._walks = DeferredSemaphore(1)
        #: The configuration as the file (and the command line) give it.
        self.base: Config = service.config
        # What the *file* says of the settings bound at start, for the next
        # reload to tell an edit of them: the running configuration would
        # not do, as the command line (--listen) overrides the file.
        try:
            from_file = load_config(service.config_path)
        except ConfigError:
            from_file = service.config  # changed since the start; a reload says so
        self._file_fixed = self._fixed_of(from_file)
        self.state: State = state_file.load()
        self._previous_handler: Any = None
        #: Set by :meth:`change` when the last change was applied but its
        #: save could not be synced to disk (what to tell the operator).
        self.unsynced: str | None = None
        effective = self.state.apply(self.base)
        for name in self.state.ignored(self.base):
            _log.warn("live changes to bucket {bucket} ignored: the configuration no longer defines it", bucket=name)
        changes = diff_configs(self.base, effective)
        if changes:
            _log.info(
                "applied {count} live change(s) from {path}: {changes}",
                count=len(changes),
                path=state_file.path,
                changes="; ".join(map(str, changes)),
            )
        service.replace_config(effective)

    @staticmethod
    def _fixed_of(config: Config) -> dict[str, object]:
        """The settings bound at start, by the name a restart warning gives them."""
        from ..ops import service as ops

        fixed: dict[str, object] = {n: getattr(config.server, n) for n in _FIXED_SERVER}
        fixed["manhole"] = config.extra.get("manhole")
        # The admin listener and the JSON log file are opened at start; the
        # rest of [admin] (min_free_bytes) is read live.
        try:
            admin = ops.parse_admin(config.extra)
            log = ops.parse_log(config.extra) or ops.LogConfig()
        except ConfigError:  # checked before a reload applies anything
            return fixed
        fixed["[admin] listen"] = None if admin is None else admin.listen
        for name in ("json_file", "json_rotate_bytes", "json_keep"):
            fixed[f"[log] {name}"] = getattr(log, name)
        return fixed

    def usage(self, names: list[str]) -> Deferred[list[tuple[int, int]]]:
        """
        (objects, bytes) of each bucket in ``names``, one walk at a time; the
        store counts off the reactor thread (the disk store in its thread pool).
        """
        store = self.service.store

        async def walk() -> list[tuple[int, int]]:
            return [await store.usage(name) for name in names]

        # A Deferred of its own: the one run() returns is paused on the
        # store's, which the shell would show as already fired.
        d: Deferred[list[tuple[int, int]]] = Deferred()
        self._walks.run(lambda: Deferred.fromCoroutine(walk())).chainDeferred(d)
        return d

    def edge(self, channel: str) -> Edge:
        """The façade for one shell session (``channel`` goes into audit lines)."""
        return Edge(self, channel)

    @property
    def config(self) -> Config:
        current: Config = self.service.config
        return current

    def change(self, channel: str, new_state: State) -> list[Change]:
        """
        Make the live change that leads to ``new_state``: validate, save,
        apply, audit.

        :raises AdminError: when it is invalid or cannot be saved; then
            nothing changed.  A change saved but not synced to disk (the
            file was replaced, its folder's ``fsync`` failed) is applied
            with a warning, kept in :attr:`unsynced` for the caller to show.
        """
        self.unsynced = None
        if new_state == self.state:
            return []
        try:
            effective = new_state.apply(self.base)
        except ConfigError as e:
            raise AdminError(f"{e}; nothing changed") from None
        try:
            self.state_file.save(new_state)
        except NotSynced as e:
            # The file already holds the new state: not applying it would
            # leave the daemon at odds with what a restart loads.
            _log.warn(
                "live change via {channel} saved to {path} but not synced to disk ({error});"
                " applied, but a crash of the machine may undo it",
                channel=channel,
                path=self.state_file.path,
                error=e.error,
            )
            self.unsynced = f"saved, but not synced to disk ({e.error}): a crash of the machine may undo it"
        except OSError as e:
            _log.error(
                "live change via {channel} not saved to {path}: {error}",
                channel=channel,
                path=self.state_file.path,
                error=e,
            )
            raise AdminError(f"could not save the change to {self.state_file.path} ({e}); nothing changed") from None
        self.state = new_state
        old = self.service.replace_config(effective)
        changes = diff_configs(old, effective)
        for change in changes:
            audit(channel, change)
        if not changes:
            audit_unchanged(channel)
        return changes

    def reload(self, channel: str) -> list[Change]:
        """
        Re-read the TOML file and the state file and apply them.

        :raises AdminError: when either is invalid; the running configuration
            stays (and the rejection is logged).
        """
        path = self.service.config_path
        try:
            loaded = load_config(path)
            if "manhole" in loaded.extra:
                parse_manhole(loaded.extra["manhole"], loaded.server.data_dir)
            from ..ops import service as ops

            ops.check_config(loaded)  # [admin] and [log], which ops reads live
            check_cluster(loaded)  # [cluster] (its peers and secret apply to the next miss)
            state = self.state_file.load()
            running = self.config
            # The other optional sections follow the file; the manhole's
            # listeners are bound at start, so its section stays as running.
            extra = {k: v for k, v in loaded.extra.items() if k != "manhole"}
            if "manhole" in running.extra:
                extra["manhole"] = running.extra["manhole"]
            base = evolve(
                loaded,
                server=evolve(loaded.server, **{n: getattr(running.server, n) for n in _FIXED_SERVER}),
                extra=extra,
            )
            effective = state.apply(base)
        except ConfigError as e:
            _log.error(
                "reload via {channel} rejected, keeping the running configuration: {error}",
                channel=channel,
                error=str(e),
            )
            raise AdminError(f"reload rejected, the running configuration stays: {e}") from None
        fixed = self._fixed_of(loaded)
        needs = [n for n in {**self._file_fixed, **fixed} if fixed.get(n) != self._file_fixed.get(n)]
        if needs:
            _log.warn(
                "{file}: {settings} changed; that takes effect only after a restart",
                file=path or "embedded default config",
                settings=", ".join(needs),
            )
        self._file_fixed = fixed
        for name in state.ignored(base):
            _log.warn("live changes to bucket {bucket} ignored: the configuration no longer defines it", bucket=name)
        self.base, self.state = base, state
        old = self.service.replace_config(effective)
        changes = diff_configs(old, effective)
        for change in changes:
            audit(channel, change)
        _log.info(
            "configuration reloaded from {file} via {channel}: {count} change(s)",
            file=path or "embedded default config",
            channel=channel,
            count=len(changes),
        )
        return changes

    # -- SIGHUP --

    def startService(self) -> None:
        super().startService()
        reactor = self.service.reactor
        if IReactorThreads.providedBy(reactor) and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGHUP, self._on_hangup)

    def stopService(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
            self._previous_handler = None
        super().stopService()

    def _on_hangup(self, signum: int, frame: object) -> None:
        # A signal handler runs between two bytecodes of whatever the main
        # thread was doing: hand the work to the reactor.
        self.service.reactor.callFromThread(self._reload_on_hangup)

    def _reload_on_hangup(self) -> None:
        self.service.reopen_logs()  # logrotate's postrotate: a new access-log file
        try:
            self.reload("sighup")
        except AdminError:
            pass  # already logged


def check_config(config: Config) -> None:
    """
    Everything this module checks before the daemon starts: the
    ``[manhole]`` section and its files, and that the saved live changes
    still fit the configuration.  ``twistd cosedge`` calls it so that a bad
    setting stops the daemon with one clear message.

    :raises ConfigError:
    """
    if "manhole" in config.extra:
        check_manhole_files(parse_manhole(config.extra["manhole"], config.server.data_dir))
    StateFile(state_path(config.server.data_dir)).load().apply(config)


def attach(service: AdminContext) -> None:
    """
    Wire live administration into ``service`` (called by ``build_service``):
    apply the saved live changes on top of the file, handle SIGHUP, and
    start the manhole listeners configured in ``[manhole]``.

    :raises ConfigError: for a bad ``[manhole]`` section or state file.
    """
    settings = None
    if "manhole" in service.config.extra:
        settings = parse_manhole(service.config.extra["manhole"], service.config.server.data_dir)
        check_manhole_files(settings)
    parent = IServiceCollection(service)  # an EdgeService is a MultiService
    live = LiveConfig(service, StateFile(state_path(service.config.server.data_dir)))
    live.setServiceParent(parent)
    if settings is not None:
        from .listeners import manhole_service  # installs the reactor: only now

        shells: MultiService = manhole_service(
            settings,
            lambda channel: {"edge": live.edge(channel)},
            service.reactor,
            data_dir=service.config.server.data_dir,
        )
        shells.setServiceParent(parent)
