"""
The job commands of the ``edge`` façade (:mod:`cosedge.jobs`): start a
backfill or a verify, list jobs, pause, resume, cancel and watch them.

A job runs in the daemon (its primary process), not in the session: leaving
the manhole leaves it running, and a restart of the daemon resumes it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from ..jobs import JobError, JobsService
from ..jobs.watch import LineWatch, TerminalWatch, session_output
from .context import LiveAdmin
from .errors import AdminError
from .values import Message, Report, Table

__all__ = ["JobCommands"]


def _rate(value: object, name: str, whole: bool = False) -> Any:
    if value is None:
        return None
    kinds = int if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value < 0:
        number = "a whole number" if whole else "a number"
        raise AdminError(f"{name} must be {number} of 0 or more (0: unlimited), not {value!r}; nothing started")
    return value


class JobCommands:
    """The job commands, mixed into :class:`~cosedge.admin.shell.Edge`."""

    _live: LiveAdmin
    _channel: str

    def _bucket(self, bucket: object) -> str:
        raise NotImplementedError

    def _jobs(self) -> JobsService:
        jobs = getattr(self._live.service, "jobs", None)
        if not isinstance(jobs, JobsService):
            raise AdminError("this process runs no jobs (they run in the daemon's primary process)")
        return jobs

    def backfill(
        self, bucket: str, source: str, *, rate_objects: float | None = None, rate_bytes: int | None = None
    ) -> Message:
        """
        Copy every key of ``source`` that ``bucket`` does not store yet, from
        where a miss would (its proxy or mirror rule, or its origin), in the
        background.  ``source``:

          'keys:/path/file'     one key a line (plain keys as edge.prefetch
                                takes them; blank lines and '#' comments skipped)
          'log:/path/access.log'  an access log (common or combined format):
                                the path of every GET answered 200
          'sitemap:https://www.example.com/sitemap.xml'  a sitemap's <loc> URLs
                                (or 'sitemap:/sitemap.xml': that path on the
                                bucket's origin)

        ``rate_objects`` (objects/s) and ``rate_bytes`` (bytes/s) limit this
        job (default: [jobs] rate_objects and rate_bytes; 0: unlimited).
        Returns at once with the job's id (edge.watch(id) follows it).
        """
        name = self._bucket(bucket)
        rates = _rate(rate_objects, "rate_objects"), _rate(rate_bytes, "rate_bytes", whole=True)
        return self._started(lambda jobs: jobs.create("backfill", name, source, self._channel, *rates))

    def verify(self, bucket: str, prefix: str = "", *, rate_objects: float | None = None) -> Message:
        """
        Ask the origin (HEAD) about each object ``bucket`` stores under
        ``prefix``; report those whose length or ETag differ and those the
        origin no longer has (404, 410) in a file the job names
        (edge.job(id)['report']).  Returns at once with the job's id.
        """
        name = self._bucket(bucket)
        if not isinstance(prefix, str):
            raise AdminError(f"prefix must be a string like 'img/', not {prefix!r}; nothing started")
        rate = _rate(rate_objects, "rate_objects")
        return self._started(lambda jobs: jobs.create("verify", name, prefix, self._channel, rate))

    def refresh(self, bucket: str, prefix: str = "", *, rate_objects: float | None = None) -> Message:
        """
        Re-check each copy ``bucket`` stores under ``prefix`` with a
        conditional GET: unchanged (304) → fresh; changed (200) → replaced
        atomically; gone (404, 410) → kept and counted ``origin-gone``.
        Copies checked within the bucket's revalidate_after are fresh without
        asking.  Returns at once with the job's id.
        """
        name = self._bucket(bucket)
        if not isinstance(prefix, str):
            raise AdminError(f"prefix must be a string like 'img/', not {prefix!r}; nothing started")
        rate = _rate(rate_objects, "rate_objects")
        return self._started(lambda jobs: jobs.create("refresh", name, prefix, self._channel, rate))

    def _started(self, create: Any) -> Message:
        try:
            job = create(self._jobs())
        except JobError as e:
            raise AdminError(f"{e}; nothing started") from None
        state = "queued (another job runs)" if job.state == "queued" else "started"
        return Message(f"job {job.id} {state}: {job.kind} of {job.bucket} (edge.watch({job.id}) follows it)")

    def jobs(self) -> Table:
        """
        Every job: id, kind, bucket, source, state (queued, running, paused,
        done, cancelled, failed), keys done of total, bytes, rate, ETA,
        outcomes, failures by reason, bad lines of the source.
        """
        return Table(self._jobs().list())

    def job(self, id: int) -> Report:
        """One job in full: its counts, bad and ignored lines by reason, times, a verify's report file."""
        jobs = self._jobs()
        return Report(self._job(jobs, id).details(jobs.clock.seconds()))

    def pause(self, id: int) -> Message:
        """Pause a queued or running job: it takes no more keys (those under way finish)."""
        return self._control("pause", id)

    def resume(self, id: int) -> Message:
        """Resume a paused job (queued again until a running position is free)."""
        return self._control("resume", id)

    def cancel(self, id: int) -> Message:
        """Cancel a job for good (keys being copied are not waited for; what is stored stays)."""
        return self._control("cancel", id)

    def _control(self, action: str, id: object) -> Message:
        jobs = self._jobs()
        try:
            job = getattr(jobs, action)(id, self._channel)
        except JobError as e:
            raise AdminError(str(e)) from None
        return Message(f"job {job.id} {job.state}")

    def watch(self, id: int, interval: float = 1.0) -> Report | Deferred[Report] | None:
        """
        Draw the job's progress bar until it ends, or Ctrl-C (the job goes
        on).  From a script (ssh host 'edge.watch(3)'), the bar is rewritten
        in place and the job's details follow when it ends.
        """
        jobs = self._jobs()
        job = self._job(jobs, id)
        if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
            raise AdminError(f"interval must be a number of seconds above 0, not {interval!r}")
        ended = jobs.when_ended(job.id)
        if ended.called:
            return Report(job.details(jobs.clock.seconds()))
        kind, out = session_output()
        if kind == "terminal":
            if "keystrokeReceived" in vars(out):
                ended.cancel()
                raise AdminError("this session is watching a job already")
            TerminalWatch(out, job, jobs.clock, ended, interval).start()
            return None
        if kind == "lines":
            ended = LineWatch(out.write, job, jobs.clock, interval).start(ended)
        return ended.addCallback(lambda done: Report(done.details(jobs.clock.seconds())))

    def _job(self, jobs: JobsService, id: object) -> Any:
        try:
            return jobs.get(id)
        except JobError as e:
            raise AdminError(str(e)) from None
