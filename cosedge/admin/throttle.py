"""
Slowing password guessing on the telnet manhole (reliability row S12).

Each failed login makes the next attempt from the same peer wait longer
(1 s, 2 s, 4 s … up to a minute), and a peer with ``lockout_after``
failures in a row is refused at once for ``lockout`` seconds; failures from
all peers together past ``global_limit`` a minute slow everyone down the
same way, so that many addresses (or one UNIX socket shared by every local
user) cannot guess in parallel.  A success forgets the peer's failures; a
peer with no failure for ``forget_after`` seconds starts afresh.  Times are
read from the injected clock.
"""

from __future__ import annotations

from collections import deque

from attrs import define, field
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

__all__ = ["LoginThrottle", "REFUSED"]

_log = Logger(namespace="cosedge.manhole")

#: What :meth:`LoginThrottle.delay` says of a peer that is locked out.
REFUSED = -1.0
#: Peers remembered at most (their addresses are the network's choice).
_MAX_PEERS = 4096


@define(eq=False)
class _Peer:
    failures: int = 0
    last: float = 0.0
    locked_until: float = 0.0


@define(eq=False)
class LoginThrottle:
    """Per-peer and overall back-off for password logins (see the module docstring)."""

    clock: IReactorTime
    base: float = 1.0
    most: float = 60.0
    lockout_after: int = 10
    lockout: float = 900.0
    forget_after: float = 900.0
    global_limit: int = 30
    _peers: dict[str, _Peer] = field(factory=dict, init=False)
    _recent: deque[float] = field(factory=deque, init=False)

    def delay(self, peer: str) -> float:
        """Seconds to wait before checking a login from ``peer``, or :data:`REFUSED`."""
        now = self.clock.seconds()
        state = self._current(peer, now)
        if state is not None and state.locked_until > now:
            return REFUSED
        failures = state.failures if state is not None else 0
        while self._recent and self._recent[0] <= now - 60:
            self._recent.popleft()
        overall = len(self._recent) - self.global_limit
        steps = max(failures, overall + 1 if overall >= 0 else 0)
        if steps <= 0:
            return 0.0
        return float(min(self.most, self.base * 2 ** (steps - 1)))

    def failed(self, peer: str) -> None:
        """A login from ``peer`` was refused."""
        now = self.clock.seconds()
        state = self._current(peer, now)
        if state is None:
            if len(self._peers) >= _MAX_PEERS:
                self._peers.pop(next(iter(self._peers)))
            state = self._peers[peer] = _Peer()
        state.failures += 1
        state.last = now
        self._recent.append(now)
        if state.failures >= self.lockout_after:
            state.locked_until = now + self.lockout
            _log.warn(
                "manhole telnet logins from {peer} refused for {seconds:.0f}s after {failures} failures in a row",
                peer=peer,
                seconds=self.lockout,
                failures=state.failures,
            )

    def succeeded(self, peer: str) -> None:
        """A login from ``peer`` succeeded: its failures are forgotten."""
        self._peers.pop(peer, None)

    def _current(self, peer: str, now: float) -> _Peer | None:
        state = self._peers.get(peer)
        if state is not None and state.locked_until <= now and now - state.last > self.forget_after:
            del self._peers[peer]
            return None
        return state
