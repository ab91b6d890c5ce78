"""
Operations: what a service manager and a monitoring system need from the
daemon.

- :mod:`~cosedge.ops.service`: the ``[admin]`` and ``[log]`` sections, the
  readiness notifier and :func:`~cosedge.ops.service.attach`, which adds
  them to the service;
- :mod:`~cosedge.ops.metrics`: the admin HTTP listener (``/metrics``,
  ``/livez``, ``/readyz``);
- :mod:`~cosedge.ops.notify`: a small ``sd_notify`` for systemd;
- :mod:`~cosedge.ops.page` (with :mod:`~cosedge.ops.history` and
  :mod:`~cosedge.ops.render`): the migration page, ``GET /`` on the admin
  listener.

The console and journald log formats stay in :mod:`cosedge.logs`, whose
names (``--logger cosedge.logs.journald``) are written in service units.
"""
