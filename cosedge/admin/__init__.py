"""
Live administration of a running cosedge daemon.

- :mod:`~cosedge.admin.live`: the running configuration as *file* + *live
  changes*, SIGHUP reloads, and :func:`~cosedge.admin.live.attach`, which
  wires it all into the service;
- :mod:`~cosedge.admin.state`: the persisted overlay of live changes;
- :mod:`~cosedge.admin.changes`: what changed, and the ``cosedge.audit`` line
  that says so;
- :mod:`~cosedge.admin.shell`: the ``edge`` façade an operator types into,
  with its origin-rule commands in :mod:`~cosedge.admin.rules` and the
  values its commands return in :mod:`~cosedge.admin.values`;
- :mod:`~cosedge.admin.manhole`: the ``[manhole]`` section and its files;
- :mod:`~cosedge.admin.shells`: the SSH and telnet listeners (installs the
  reactor when imported);
- :mod:`~cosedge.admin.passwords`: telnet password hashes, and
  ``python -m cosedge.admin hash-password [USER]``;
- :mod:`~cosedge.admin.context`: what all of it uses of the daemon.
"""
