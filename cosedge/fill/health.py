"""
Which origin hosts are believed up.

A host (``scheme://host[:port]``) that refuses a connection, times out or
answers 5xx is marked down for ``host_down_time`` seconds; the planner then
prefers the rule's other hosts and its standby hosts.  When the time is up
the host is not trusted again at once: one ``HEAD /`` probes it (as OSS's
mirror probe does), and only an answer below 500 brings it back.  Until
then it stays down, and a failed probe starts another period.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from ..config import FillConfig
from ..origins import Source

__all__ = ["Health"]

_log = Logger(namespace="cosedge.fill")
_LIMIT = 10_000  # hosts remembered at most (they come from the configuration)


@define(eq=False)
class Health:
    """Down marks and probes of origin hosts (see the module's docstring)."""

    clock: IReactorTime
    config: Callable[[], FillConfig]
    #: The agent for a probe of a host of ``source`` (TLS settings included).
    agent_for: Callable[[bytes, Source], IAgent]
    _down: dict[str, tuple[float, Source]] = field(factory=dict, init=False)
    _probing: set[str] = field(factory=set, init=False)

    def up(self, base: str) -> bool:
        """Whether ``base`` (``scheme://host[:port]``) is believed up; starts its probe when its time is up."""
        marked = self._down.get(base)
        if marked is None:
            return True
        until, source = marked
        if self.clock.seconds() >= until and base not in self._probing:
            self._probe(base, source)
        return False

    def down(self, base: str, source: Source, why: str) -> None:
        """Mark ``base`` down for the configured time."""
        if base not in self._down:
            _log.warn("origin {base} marked down for {seconds}s: {why}", base=base, seconds=self._period(), why=why)
        if len(self._down) >= _LIMIT:
            self._down.pop(next(iter(self._down)))
        self._down[base] = (self.clock.seconds() + self._period(), source)

    def ok(self, base: str) -> None:
        """``base`` answered: it is up."""
        if self._down.pop(base, None) is not None:
            _log.info("origin {base} is up again", base=base)

    def down_hosts(self) -> list[str]:
        return sorted(self._down)

    def _period(self) -> float:
        return self.config().host_down_time

    def _probe(self, base: str, source: Source) -> None:
        self._probing.add(base)
        url = base.encode("ascii") + b"/"
        headers = Headers({b"user-agent": [b"cosedge (origin probe)"]})
        for name, value in source.headers:
            if name == b"host":
                headers.setRawHeaders(b"host", [value])
        d: Deferred[Any] = self.agent_for(url, source).request(b"HEAD", url, headers)
        d.addTimeout(self.config().header_timeout, self.clock)
        d.addBoth(self._probed, base, source)

    def _probed(self, result: IResponse | Failure, base: str, source: Source) -> None:
        self._probing.discard(base)
        if isinstance(result, Failure):
            self.down(base, source, f"probe failed: {result.getErrorMessage()}")
        elif result.code >= 500:
            self.down(base, source, f"probe answered {result.code}")
        else:
            self.ok(base)
