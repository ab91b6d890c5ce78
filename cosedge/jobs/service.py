"""
The jobs service: every backfill and verify job of the daemon, their files
under ``<data_dir>/.cosedge/jobs/``, which of them run, and their start
again after a restart.

Each job has a file ``<id>.json`` (its settings, state and, once it has
ended, its counts; replaced atomically) and a journal ``<id>.journal``
(:mod:`cosedge.jobs.journal`); a sitemap source is copied to ``<id>.locs``,
a verify's differences go to ``<id>.report.tsv``.  At start, the jobs that
were queued or running are queued again and go on where their journal says
they stopped; paused ones stay paused until ``edge.resume``.

At most ``[jobs] max_running`` jobs run at once (in the order they were
made); their keys share ``[jobs] max_concurrent`` slots.  A job that starts
and one that ends each log one audit line (``cosedge.audit``), the second
with its totals.  It runs in the daemon's primary process only: workers
serve requests and fills, never jobs.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..admin.state import write_atomically
from ..config import Config
from ..fill.scheduler import Filler
from ..interfaces import IObjectStore
from .journal import RunBlocking, replay
from .model import ACTIVE, FINAL, KINDS, STATES, Job, JobError, JobFailed
from .origin import sitemap_source
from .runner import Runner
from .shared import Shared, Slots
from .sources import split_spec

__all__ = ["JobsService"]

_log = Logger(namespace="cosedge.jobs")
_audit = Logger(namespace="cosedge.audit")
#: Ended jobs listed (the newest; the files of older ones stay on disk).
_KEEP = 200
#: Seconds the daemon stopping waits for the keys jobs have asked the origin for.
STOP_GRACE = 10.0


def _what(job: Job) -> str:
    if job.kind in ("verify", "refresh"):
        return f"{job.kind} of {job.bucket} (prefix {job.source!r})"
    return f"backfill of {job.bucket} from {job.source}"


class JobsService(Service):
    """Owns the daemon's jobs (see the module's docstring); a child of the service named ``"jobs"``."""

    name = "jobs"

    def __init__(
        self,
        config: Callable[[], Config],
        store: IObjectStore,
        filler: Filler,
        clock: IReactorTime,
        run_blocking: RunBlocking,
    ) -> None:
        self.config = config
        self.clock = clock
        self.folder = os.path.join(config().server.data_dir, ".cosedge", "jobs")
        self.jobs: dict[int, Job] = {}
        #: Keys finished since the daemon started, by (kind, outcome) ("failed" for every failure).
        self.objects: Counter[tuple[str, str]] = Counter()
        #: Failed keys since the daemon started, by (kind, reason).
        self.failures: Counter[tuple[str, str]] = Counter()
        #: Bytes copied (backfill) or checked (verify) since the daemon started, by kind.
        self.bytes: Counter[str] = Counter()
        self._runners: dict[int, Runner] = {}
        self._runs: dict[int, Deferred[Any]] = {}
        self._waiters: dict[int, list[Deferred[Job]]] = {}
        self._cancelled_by: dict[int, str] = {}
        self._next_id = 1
        self._stopping = False
        slots = Slots(lambda: self.config().jobs.max_concurrent)
        self.shared = Shared(config, store, filler, clock, run_blocking, self.folder, slots, self._save, self._counted)

    # -- the service --

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._load()
        self.clock.callLater(0, self._schedule)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        return self.wind_down()

    def wind_down(self) -> Deferred[Any]:
        """
        Stop every run where it is, once the keys it has asked the origin
        for have ended (:data:`STOP_GRACE` seconds at most): the journal
        then holds them, and their jobs go on at the next start without
        asking for any of them again.  Fires when the runs have stopped.
        """
        self._stopping = True
        for runner in list(self._runners.values()):
            runner.wind_down(STOP_GRACE)
        return DeferredList(list(self._runs.values()), consumeErrors=True)

    # -- what the admin façade asks --

    def create(
        self,
        kind: str,
        bucket: str,
        source: str,
        channel: str,
        rate_objects: float | None = None,
        rate_bytes: int | None = None,
    ) -> Job:
        """Make a job and queue it.  :raises JobError: when it cannot be made (nothing is)."""
        if self._stopping or not self.running:
            raise JobError("the daemon is stopping")
        config = self.config().buckets.get(bucket)
        if config is None or kind not in KINDS:
            raise JobError(f"no bucket named {bucket!r}")
        if kind == "backfill":
            spec, where = split_spec(source)
            if spec == "sitemap":
                sitemap_source(where, config)
            else:
                where = os.path.abspath(where)
                try:
                    open(where, "rb").close()
                except OSError as e:
                    raise JobError(f"cannot read {where}: {e.strerror or e}") from None
                source = f"{spec}:{where}"
        job = Job(self._next_id, kind, bucket, source, channel, self.clock.seconds(), rate_objects=rate_objects)
        job.rate_bytes = rate_bytes
        try:
            self._write(job)
        except OSError as e:
            raise JobError(f"cannot save the job in {self.folder}: {e.strerror or e}") from None
        self._next_id += 1
        self.jobs[job.id] = job
        _audit.info(
            "audit: job {job} started: {what} via {channel}",
            audit=True,
            job=job.id,
            kind=job.kind,
            bucket=job.bucket,
            source=job.source,
            what=_what(job),
            channel=channel,
        )
        self._schedule()
        return job

    def list(self) -> list[dict[str, Any]]:
        """Every job as a row (:meth:`Job.row`), oldest first: ``edge.jobs()``, the migration page."""
        now = self.clock.seconds()
        return [job.row(now) for job in sorted(self.jobs.values(), key=lambda j: j.id)]

    def get(self, job_id: object) -> Job:
        """:raises JobError: when there is no such job."""
        try:
            return self.jobs[int(str(job_id))]
        except (KeyError, ValueError):
            known = ", ".join(map(str, self.jobs)) or "none"
            raise JobError(f"no job {job_id!r} (jobs: {known})") from None

    def pause(self, job_id: object, channel: str) -> Job:
        job = self._in_state(job_id, ("queued", "running"), "only a queued or running job can be paused")
        runner = self._runners.get(job.id)
        if runner is not None:
            runner.pause()
        job.halt(self.clock.seconds())
        return self._moved(job, "paused", "paused", channel)

    def resume(self, job_id: object, channel: str) -> Job:
        job = self._in_state(job_id, ("paused",), "only a paused job can be resumed")
        return self._moved(job, "queued", "resumed", channel)

    def _in_state(self, job_id: object, states: tuple[str, ...], rule: str) -> Job:
        job = self.get(job_id)
        if job.state not in states:
            raise JobError(f"job {job.id} is {job.state}; {rule}")
        return job

    def _moved(self, job: Job, state: str, verb: str, channel: str) -> Job:
        """``job`` is now in ``state``: saved, logged, and the jobs scheduled again."""
        job.state = state
        self._save(job)
        _log.info("job {job} {verb} via {channel}", job=job.id, verb=verb, channel=channel)
        self._schedule()
        return job

    def cancel(self, job_id: object, channel: str) -> Job:
        job = self.get(job_id)
        if job.state in FINAL:
            raise JobError(f"job {job.id} has ended ({job.state}); nothing to cancel")
        self._cancelled_by[job.id] = channel
        runner = self._runners.get(job.id)
        job.state = "cancelled"
        if runner is not None:
            runner.stop("cancelled")  # its run ends, and with it the job
        else:
            self._end(job, "cancelled")
        return job

    def when_ended(self, job_id: object) -> Deferred[Job]:
        """Fires with the job once it has ended (at once if it has)."""
        job = self.get(job_id)
        if job.state in FINAL and job.id not in self._runners:
            return succeed(job)
        waiters = self._waiters.setdefault(job.id, [])
        waiter: Deferred[Job] = Deferred(waiters.remove)
        waiters.append(waiter)
        return waiter

    def states(self) -> Counter[tuple[str, str]]:
        """How many jobs are listed, by (kind, state), every pair present."""
        counts = Counter({(kind, state): 0 for kind in KINDS for state in STATES})
        counts.update((job.kind, job.state) for job in self.jobs.values())
        return counts

    # -- running --

    def _schedule(self) -> None:
        """Start queued jobs, oldest first, while fewer than ``max_running`` run."""
        if self._stopping or not self.running:
            return
        for job in sorted(self.jobs.values(), key=lambda j: j.id):
            running = sum(1 for j in self.jobs.values() if j.state == "running")
            if running >= self.config().jobs.max_running:
                return
            if job.state == "queued":  # (a job that ended at once may have started the next already)
                self._start(job)

    def _start(self, job: Job) -> None:
        now = self.clock.seconds()
        job.state = "running"
        job.started = job.started or now
        job.run_from(now)
        self._save(job)
        runner = self._runners.get(job.id)
        if runner is not None:  # paused, and resumed
            runner.resume()
            return
        runner = Runner(job, self.shared)
        self._runners[job.id] = runner
        run = Deferred.fromCoroutine(runner.run())
        run.addBoth(self._ran, job)
        if job.id in self._runners:
            self._runs[job.id] = run

    def _ran(self, result: str | Failure, job: Job) -> None:
        self._runners.pop(job.id, None)
        self._runs.pop(job.id, None)
        job.halt(self.clock.seconds())
        if result == "stopped":  # the daemon stops: the job goes on at the next start
            self._save(job)
            return
        if isinstance(result, Failure):
            if result.check(JobFailed, JobError, OSError):
                job.error = str(result.value)
            else:
                _log.failure("job {job} failed unexpectedly", result, job=job.id)
                job.error = f"unexpected error: {result.getErrorMessage()}"
            _log.error("job {job} failed: {error}", job=job.id, error=job.error)
            result = "failed"
        self._end(job, result)

    def _end(self, job: Job, state: str) -> None:
        job.state = state
        job.ended = self.clock.seconds()
        self._save(job)
        by = self._cancelled_by.pop(job.id, None)
        _audit.info(
            "audit: job {job} {state}: {what}: {totals} in {seconds:.0f}s{via}",
            audit=True,
            job=job.id,
            state=state,
            kind=job.kind,
            bucket=job.bucket,
            what=_what(job),
            totals=job.totals(),
            done=job.done,
            total=job.total,
            failed=job.failed_count(),
            seconds=job.seconds,
            via="" if by is None else f" (cancelled via {by})",
            channel=job.channel,
        )
        for waiter in self._waiters.pop(job.id, []):
            waiter.callback(job)
        self._schedule()

    def _counted(self, kind: str, outcome: str, size: int) -> None:
        if outcome.startswith("!"):
            self.objects[(kind, "failed")] += 1
            self.failures[(kind, outcome[1:])] += 1
        else:
            self.objects[(kind, outcome)] += 1
        self.bytes[kind] += size

    # -- the files --

    def _path(self, job_id: int) -> str:
        return os.path.join(self.folder, f"{job_id}.json")

    def _write(self, job: Job) -> None:
        """:raises OSError:"""
        data = json.dumps(job.to_json(), indent=1, sort_keys=True).encode("utf-8")
        unsynced = write_atomically(self._path(job.id), data)
        if unsynced is not None:
            _log.warn("job {job}: {folder} not synced to disk: {error}", job=job.id, folder=self.folder, error=unsynced)

    def _save(self, job: Job) -> None:
        try:
            self._write(job)
        except OSError as e:
            _log.error("job {job}: cannot save {path}: {error}", job=job.id, path=self._path(job.id), error=e)

    def _load(self) -> None:
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return
        except OSError as e:
            _log.error("cannot read the jobs in {folder}: {error}", folder=self.folder, error=e)
            return
        loaded: list[Job] = []
        for name in names:
            stem, dot, ext = name.partition(".")
            if ext != "json" or not stem.isdigit():
                continue
            self._next_id = max(self._next_id, int(stem) + 1)
            try:
                with open(os.path.join(self.folder, name), "rb") as f:
                    job = Job.from_json(json.load(f))
                if job.state in ACTIVE:
                    replay(os.path.join(self.folder, f"{job.id}.journal")).restore(job)
            except (OSError, ValueError, TypeError) as e:
                _log.warn("job file {name} in {folder} ignored: {error}", name=name, folder=self.folder, error=e)
                continue
            if job.state in ("queued", "running"):
                job.state = "queued"
                _log.info(
                    "job {job} ({what}) goes on after a restart: {done} key(s) done",
                    job=job.id,
                    what=_what(job),
                    done=job.done,
                )
            loaded.append(job)
        ended = sorted((j for j in loaded if j.state in FINAL), key=lambda j: j.id)
        for job in sorted(loaded, key=lambda j: j.id):
            if job.state in ACTIVE or job in ended[-_KEEP:]:
                self.jobs[job.id] = job
