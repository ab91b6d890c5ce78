"""
``edge.watch(id)``: a job's progress bar, drawn where the command was typed.

- In an interactive manhole session (SSH or telnet): the bar is redrawn in
  place on the prompt's line every ``interval`` seconds until the job ends
  or the operator presses Ctrl-C; then the prompt comes back (the job goes
  on either way).  While the bar is drawn the session takes no other input.
  It works because the manhole runs a command with ``sys.stdout`` pointing
  at the session (``twisted.conch.manhole.FileWrapper``): the command finds
  the session's terminal there and, for as long as it watches, takes the
  session's keystrokes (an attribute of the shell protocol instance, removed
  afterwards).
- One command per ``ssh host 'edge.watch(3)'``: the bar is written again
  after a carriage return (a terminal shows it in place) until the job
  ends; the command then prints the job's final details and exits.
- Anywhere else (a script's ``run_command`` writer is not found, a test):
  nothing is drawn; a Deferred fires with the final details.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from .model import FINAL, Job, clock_text

__all__ = ["LineWatch", "TerminalWatch", "progress_line", "session_output"]

_CTRL_C = b"\x03"


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def progress_line(job: Job, now: float, width: int = 80) -> str:
    """``job 3 backfill running [#####.....] 1200/5000 24% 24.0 MB 85.3/s ETA 0:00:44``, at most ``width``."""
    total = job.total
    if job.state == "done":
        fraction = 1.0
    else:
        fraction = min(1.0, job.done / total) if total else 0.0
    objects, _ = job.rates(now)
    percent = "?" if total is None else f"{100 * fraction:.0f}%"
    tail = f"{job.done}/{'?' if total is None else total} {percent} {_size(job.bytes)} {objects:.1f}/s"
    eta = clock_text(job.eta(now))
    if eta is not None:
        tail += f" ETA {eta}"
    if job.failures:
        tail += f" failed {job.failed_count()}"
    head = f"job {job.id} {job.kind} {job.state}"
    room = max(10, width - len(head) - len(tail) - 5)
    filled = int(fraction * room)
    return f"{head} [{'#' * filled}{'.' * (room - filled)}] {tail}"[: max(20, width - 1)]


def session_output() -> tuple[str, Any]:
    """
    Where the running command writes: ``("terminal", shell)`` in an
    interactive manhole session, ``("lines", stdout)`` for one command of a
    script, else ``("none", None)``.
    """
    out = sys.stdout
    manhole = sys.modules.get("twisted.conch.manhole")
    if manhole is not None and isinstance(out, manhole.FileWrapper):
        shell = out.o
        if getattr(getattr(shell, "terminal", None), "terminalProtocol", None) is shell:
            return "terminal", shell
    shells = sys.modules.get("cosedge.admin.shells")
    writer = getattr(shells, "_Writer", None)  # run_command's: what `ssh host 'command'` prints
    if writer is not None and isinstance(out, writer):
        return "lines", out
    return "none", None


@define(eq=False)
class TerminalWatch:
    """The bar in an interactive session (see the module's docstring)."""

    shell: Any
    job: Job
    clock: IReactorTime
    #: Fires when the job ends (cancelled by Ctrl-C).
    ended: Deferred[Job]
    interval: float = 1.0
    _timer: IDelayedCall | None = field(default=None, init=False)
    _over: bool = field(default=False, init=False)

    def start(self) -> None:
        self.shell.keystrokeReceived = self._key
        self._timer = self.clock.callLater(0, self._draw)
        self.ended.addCallbacks(self._ended, lambda _: None)

    def _alive(self) -> bool:
        terminal = getattr(self.shell, "terminal", None)
        return terminal is not None and getattr(terminal, "terminalProtocol", None) is self.shell

    def _show(self) -> None:
        terminal = self.shell.terminal
        terminal.write(b"\r")
        terminal.eraseLine()
        width = getattr(self.shell, "width", 80) or 80
        terminal.write(progress_line(self.job, self.clock.seconds(), width).encode("utf-8"))

    def _draw(self) -> None:
        self._timer = None
        if not self._alive():
            self._stop(None)
            return
        self._show()
        self._timer = self.clock.callLater(self.interval, self._draw)

    def _key(self, key: bytes, modifier: object) -> None:
        if key == _CTRL_C:
            job = self.job.id
            self._stop(f"stopped watching; job {job} goes on (edge.job({job}), edge.watch({job}))")

    def _ended(self, job: Job) -> None:
        self._stop(f"job {job.id} {job.state}: {job.totals()}" + (f"; {job.error}" if job.error else ""))

    def _stop(self, note: str | None) -> None:
        if self._over:
            return
        self._over = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.shell.__dict__.pop("keystrokeReceived", None)  # the session takes input again
        if not self.ended.called:
            self.ended.cancel()
        if note is None or not self._alive():
            return
        terminal = self.shell.terminal
        self._show()
        terminal.nextLine()
        terminal.write(note.encode("utf-8"))
        terminal.nextLine()
        terminal.write(self.shell.ps[self.shell.pn])


@define(eq=False)
class LineWatch:
    """The bar for one command of a script: rewritten after ``\\r`` until the job ends."""

    write: Callable[[str], object]
    job: Job
    clock: IReactorTime
    interval: float = 1.0
    _timer: IDelayedCall | None = field(default=None, init=False)
    _width: int = field(default=0, init=False)

    def start(self, ended: Deferred[Job]) -> Deferred[Job]:
        """Draw until ``ended`` fires; the returned Deferred fires with the job after the last bar."""
        self._timer = self.clock.callLater(0, self._draw)
        return ended.addCallback(self._ended)

    def _put(self, end: str) -> None:
        line = progress_line(self.job, self.clock.seconds())
        try:
            self.write("\r" + line.ljust(self._width) + end)
        except Exception:  # the client went away: nothing more to draw
            self._cancel()
            return
        self._width = len(line)

    def _draw(self) -> None:
        self._timer = None
        if self.job.state not in FINAL:
            self._put("")
            self._timer = self.clock.callLater(self.interval, self._draw)

    def _cancel(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _ended(self, job: Job) -> Job:
        self._cancel()
        self._put("\n")
        return job
