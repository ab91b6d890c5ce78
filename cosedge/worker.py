"""
``python -m cosedge.worker``: one worker process of a daemon with
``[server] workers`` above 1, started by the primary (see
:mod:`cosedge.workers`).  It serves the listeners it was given and runs
fills; it reads ``init``/``config``/``forget`` frames on descriptor 3 and
writes ``ready``, counters and log events to descriptor 4.
"""

from __future__ import annotations

import json
import pickle
import signal
import sys
from typing import Any

from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.stdio import StandardIO
from twisted.internet.task import LoopingCall
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    eventAsJSON,
    globalLogBeginner,
)
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from .workers import FROM_WORKER_FD, MAX_FRAME, TO_WORKER_FD

__all__ = ["WorkerChannel", "main"]

#: Seconds between two reports of the counters to the primary.
REPORT_INTERVAL = 1.0
#: The most in-flight fills a report lists (``edge.fills()`` in the primary).
MAX_REPORTED_FILLS = 1000


@implementer(IHalfCloseableProtocol)
class WorkerChannel(Int32StringReceiver):
    """The worker's side of its channel to the primary."""

    MAX_LENGTH = MAX_FRAME

    def __init__(self, reactor: Any, build: Any = None) -> None:
        self.reactor = reactor
        self.service: Any = None
        #: The service could not start (the process then exits with status 1).
        self.failed = False
        self._build = build
        self._reporter: LoopingCall | None = None

    def stringReceived(self, string: bytes) -> None:
        message = pickle.loads(string)  # noqa: S301 - from the primary, our parent
        if "init" in message:
            self._start(message["init"])
        elif self.service is None:
            return
        elif "config" in message:
            self.service.replace_config(message["config"])
        elif "forget" in message:
            self.service.filler.forget(*message["forget"])
        elif "reopen" in message:
            self.service.reopen_logs()

    def readConnectionLost(self) -> None:
        # The primary closed the pipe: it is stopping (or died); so does this
        # worker, still able to send its last counters and log lines.
        self.quit()

    def writeConnectionLost(self) -> None:
        self.quit()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.quit()

    def quit(self) -> None:
        """Stop the worker (once, however many ways it is asked to)."""
        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass

    def send(self, message: dict[str, Any]) -> None:
        if self.transport is None or getattr(self.transport, "disconnecting", False):
            return
        try:
            self.sendString(json.dumps(message).encode("utf-8"))
        except Exception:  # the pipe is gone with the primary: nobody to tell
            pass

    def _start(self, init: dict[str, Any]) -> None:
        if self.service is not None:
            return
        if self._build is None:
            from .service import build_worker_service

            self._build = build_worker_service
        self.failed = True  # until it serves: the exit status says so
        service = self._build(init["config"], self.reactor, init["listeners"])
        self.service = service
        self.reactor.addSystemEventTrigger("before", "shutdown", self._stop)
        service.startService()  # adopting the listeners is synchronous; a failure raises
        self.failed = False
        self.send({"ready": True})
        self._reporter = LoopingCall(self._report)
        self._reporter.clock = self.reactor
        self._reporter.start(REPORT_INTERVAL, now=False)

    def _report(self) -> None:
        service = self.service
        filler = service.filler
        gauges = {
            "running": filler.running,
            "queued": filler.queued,
            "not_found": filler.remembered_not_found(),
            "hosts_down": len(filler.health.down_hosts()),
        }
        fills = filler.in_flight()[:MAX_REPORTED_FILLS]
        self.send({"stats": service.stats.to_json(), "gauges": gauges, "fills": fills})

    def _stop(self) -> Any:
        if self._reporter is not None and self._reporter.running:
            self._reporter.stop()

        def report(result: object) -> object:
            self._report()  # the final counts, before the pipe closes
            return result

        return self.service.stopService().addBoth(report)


@implementer(ILogObserver)
class _Forward:
    """Sends log events to the primary, which logs them as its own."""

    def __init__(self, channel: WorkerChannel) -> None:
        self._channel = channel

    def __call__(self, event: dict[str, Any]) -> None:
        try:
            plain = _plain(event)
            self._channel.send({"event": plain} if plain is not None else {"log": eventAsJSON(event)})
        except Exception:  # never let a log line take the worker down
            pass


#: Fields of an event that only make sense in the process that emitted it.
_LOCAL_FIELDS = ("log_logger", "log_source", "log_observer")


def _plain(event: dict[str, Any]) -> dict[str, Any] | None:
    """
    The event as plain JSON values, or None when a field holds anything else
    (a failure, an object a format string reaches into): those take
    Twisted's slower, complete ``eventAsJSON``.  Most events (every fill's
    line) are plain, and this is several times faster both ways.
    """
    out: dict[str, Any] = {}
    for key, value in event.items():
        if key in _LOCAL_FIELDS:
            continue
        if key == "log_level":
            out[key] = value.name
        elif value is None or isinstance(value, str | int | float):
            out[key] = value
        else:
            return None
    return out


def main() -> None:
    from twisted.internet import reactor as installed

    reactor: Any = installed

    channel = WorkerChannel(reactor)
    observer = FilteringLogObserver(_Forward(channel), [LogLevelFilterPredicate(LogLevel.info)])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False, discardBuffer=True)
    StandardIO(channel, stdin=TO_WORKER_FD, stdout=FROM_WORKER_FD, reactor=reactor)  # type: ignore[call-arg]
    # SIGTERM from a service manager, SIGINT from a terminal, and the primary
    # closing the pipe can all arrive together: each asks for one stop.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: reactor.callFromThread(channel.quit))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads are the primary's: it sends the result
    reactor.run(installSignalHandlers=False)
    if channel.failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
