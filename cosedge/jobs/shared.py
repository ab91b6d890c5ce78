"""
What the runners of jobs share: the daemon's parts they use
(:class:`Shared`), the slots that bound the keys worked on at once over
every job (:class:`Slots`), and a job's pace (:class:`Limiter`).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable

from attrs import define, field
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.web.iweb import IAgent

from ..config import Config
from ..fill.scheduler import Filler
from ..interfaces import IObjectStore
from ..origins import Source
from .journal import RunBlocking
from .model import Job

__all__ = ["Limiter", "Shared", "Slots"]


@define(eq=False)
class Slots:
    """At most ``limit()`` keys worked on at once, over every job; waiters in turn."""

    limit: Callable[[], int]
    used: int = 0
    _waiters: deque[Deferred[None]] = field(factory=deque, init=False)

    def acquire(self) -> Deferred[None]:
        if not self._waiters and self.used < self.limit():
            self.used += 1
            return succeed(None)
        waiter: Deferred[None] = Deferred(self._waiters.remove)
        self._waiters.append(waiter)
        return waiter

    def release(self) -> None:
        self.used -= 1
        while self._waiters and self.used < self.limit():
            self.used += 1
            self._waiters.popleft().callback(None)


@define(eq=False)
class Limiter:
    """A job's pace: starts at most ``objects()`` a second, and ``bytes_()`` bytes a second (0: unlimited)."""

    clock: IReactorTime
    objects: Callable[[], float]
    bytes_: Callable[[], int]
    _next: float = 0.0

    async def take(self) -> None:
        """Wait for the next start."""
        now = self.clock.seconds()
        start = max(now, self._next)
        rate = self.objects()
        self._next = start + (1.0 / rate if rate > 0 else 0.0)
        if start > now:
            await deferLater(self.clock, start - now)

    def spend(self, size: int) -> None:
        """``size`` bytes were copied: the next start waits for them."""
        rate = self.bytes_()
        if rate > 0:
            self._next = max(self._next, self.clock.seconds()) + size / rate


@define(eq=False)
class Shared:
    """What every runner uses of the daemon (given by the jobs service)."""

    config: Callable[[], Config]
    store: IObjectStore
    filler: Filler
    clock: IReactorTime
    run_blocking: RunBlocking
    #: ``<data_dir>/.cosedge/jobs``
    folder: str
    slots: Slots
    #: Saves a job's file.
    save: Callable[[Job], None]
    #: Counts a finished key for the metrics: kind, outcome, bytes.
    counted: Callable[[str, str, int], None]

    def agents(self, url: bytes, source: Source) -> IAgent:
        tls = self.filler.tls
        if tls is not None and url.startswith(b"https:"):
            return tls(source.ca_file, source.server_name)
        agent: IAgent = self.filler.agent
        return agent

    def breathe(self) -> Deferred[None]:
        return deferLater(self.clock, 0)

    def path(self, job: Job, suffix: str) -> str:
        return os.path.join(self.folder, f"{job.id}{suffix}")
