"""
Jobs: long-running work on a bucket's keys inside the daemon, sharing the
fill scheduler's single flight, limits and metrics with live misses.

- **backfill** copies every key of a source that is not stored yet: a file
  of keys, a web server's access log, or a sitemap on the origin;
- **verify** asks the origin (``HEAD``) about each stored object and reports
  those whose length or ETag differ, and those the origin no longer has.

Operators start, list, pause, resume, cancel and watch jobs from the
manhole (``edge.backfill``, ``edge.verify``, ``edge.jobs()``, ...; see
:mod:`cosedge.admin.jobs`).  Modules:

- :mod:`~cosedge.jobs.model`: a job, its states and counts;
- :mod:`~cosedge.jobs.sources`: reading keys from files and listings;
- :mod:`~cosedge.jobs.origin`: a verify's ``HEAD``, a backfill's sitemap;
- :mod:`~cosedge.jobs.journal`: what a restart needs to go on;
- :mod:`~cosedge.jobs.runner`: running one job;
- :mod:`~cosedge.jobs.service`: all of a daemon's jobs, and their files;
- :mod:`~cosedge.jobs.watch`: ``edge.watch``'s progress bar.
"""

from __future__ import annotations

from typing import Any

from .journal import RunBlocking
from .model import Job, JobError
from .service import JobsService

__all__ = ["Job", "JobError", "JobsService", "attach"]


def attach(service: Any, run_blocking: RunBlocking) -> JobsService:
    """
    Give ``service`` (an :class:`~cosedge.service.EdgeService`, the primary
    process's) its jobs: a child service named ``"jobs"``, also kept as
    ``service.jobs``.  ``run_blocking`` is the store's thread pool (the
    journals' ``fsync``).
    """
    jobs = JobsService(lambda: service.config, service.store, service.filler, service.reactor, run_blocking)
    jobs.setServiceParent(service)
    service.jobs = jobs
    return jobs
