"""
What live administration uses of the running daemon (and what the ``edge``
façade uses of the live configuration, :class:`LiveAdmin`): the
:class:`~cosedge.service.EdgeService` as :mod:`cosedge.admin` sees it, named
member by member, so the package needs neither the service module nor the
kind of store, filler or worker pool it holds.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.defer import Deferred

from ..config import Config
from ..interfaces import IObjectStore
from ..origins import Source
from ..stats import Totals
from .changes import Change
from .state import State

__all__ = ["AdminContext", "Fills", "LiveAdmin", "Processes"]


class Fills(Protocol):
    """What ``edge.prefetch`` uses of the filler."""

    def fill(self, bucket: str, segments: tuple[str, ...], source: Source, *, force: bool = False) -> Deferred[Any]: ...


class Processes(Protocol):
    """What ``edge.processes()`` uses of the worker pool."""

    def processes(self) -> list[dict[str, Any]]: ...


class AdminContext(Protocol):
    """The daemon that live administration changes and reports on (an ``EdgeService``)."""

    @property
    def config(self) -> Config:
        """The running configuration (replaced whole, never changed in place)."""

    @property
    def config_path(self) -> str | None:
        """The TOML file the configuration came from (None: the embedded default)."""

    @property
    def reactor(self) -> Any:
        """The reactor: SIGHUP hand-over, the password checks' threads, the manhole's listeners."""

    @property
    def store(self) -> IObjectStore:
        """Where ``edge.purge`` removes objects and ``edge.buckets(usage=True)`` counts them."""

    @property
    def filler(self) -> Fills:
        """What ``edge.prefetch`` starts a fill with."""

    @property
    def workers(self) -> Processes | None:
        """The worker processes, or None when the daemon is one process."""

    def replace_config(self, config: Config) -> Config:
        """Swap in a new configuration, in every process; returns the old one."""

    def reopen_logs(self) -> None:
        """Reopen the access-log file in every process."""

    def forget(self, bucket: str, segments: tuple[str, ...]) -> None:
        """Drop a key's remembered 404 or failure, in every process."""

    def in_flight(self) -> list[dict[str, object]]:
        """The fills running and queued, in every process."""

    def totals(self) -> Totals:
        """Counters and fill gauges of every process."""


class LiveAdmin(Protocol):
    """What the façade uses of the live configuration (a :class:`~cosedge.admin.live.LiveConfig`)."""

    #: The daemon administered.
    service: AdminContext
    #: The configuration as the file gives it, before live changes.
    base: Config
    #: The live changes kept on top of the file.
    state: State
    #: Why the last change, applied and saved, may not survive a crash of the machine.
    unsynced: str | None

    @property
    def config(self) -> Config:
        """The running configuration (the file's, with the live changes applied)."""

    def change(self, channel: str, new_state: State) -> list[Change]: ...

    def reload(self, channel: str) -> list[Change]: ...

    def usage(self, names: list[str]) -> Deferred[list[tuple[int, int]]]: ...
