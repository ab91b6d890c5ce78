"""
The manhole's listeners, SSH and telnet, as one service
(:func:`manhole_service`, which :func:`cosedge.admin.live.attach` adds when
``[manhole]`` is configured; importing this installs the reactor).
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from .manhole import ManholeSettings
from .shells import NamespaceFactory
from .ssh import _ssh_factory
from .telnet import _telnet_service

__all__ = ["manhole_service"]

_log = Logger(namespace="cosedge.manhole")


def manhole_service(
    settings: ManholeSettings, make_namespace: NamespaceFactory, reactor: Any, *, data_dir: str | None = None
) -> MultiService:
    """
    The manhole listeners configured in ``settings``, as one service.  A
    listener that cannot be bound fails the daemon's start (the bucket
    listeners' rule), rather than leaving it running without its shell.
    """
    service = MultiService()
    service.setName("manhole")
    listeners: list[StreamServerEndpointService] = []
    if settings.ssh is not None:
        factory = _ssh_factory(settings, make_namespace, reactor)
        listeners.append(StreamServerEndpointService(serverFromString(reactor, settings.ssh), factory))
    if settings.telnet is not None:
        listeners.append(_telnet_service(settings, make_namespace, reactor, data_dir))
    for listener in listeners:
        listener._raiseSynchronously = True  # as strports.service does: fail the start
        listener.setServiceParent(service)
    return service
