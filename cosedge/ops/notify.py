"""
A small ``sd_notify``: tell the service manager (systemd) how the daemon is
doing, over the datagram socket named by ``$NOTIFY_SOCKET``.

With ``Type=notify`` systemd considers the service started only when it
receives ``READY=1``; ``STOPPING=1`` says a shutdown has begun, ``STATUS=…``
is shown by ``systemctl status`` and ``WATCHDOG=1`` keeps a ``WatchdogSec=``
timer from firing.  Without ``$NOTIFY_SOCKET`` (not run by systemd) every
call is a no-op.  This is the documented protocol (``sd_notify(3)``): one
datagram of newline-separated ``VARIABLE=value`` assignments to a UNIX
socket, where a leading ``@`` names a socket in the abstract namespace.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from twisted.logger import Logger

__all__ = ["notify", "notify_socket_address", "watchdog_interval"]

_log = Logger(namespace="cosedge.notify")


def notify_socket_address(environ: Mapping[str, str] | None = None) -> str | bytes | None:
    """
    The address in ``$NOTIFY_SOCKET`` ready for ``socket.sendto``: a path, the
    abstract name (``@name`` becomes ``b"\\0name"``), or None when there is no
    usable socket (unset, empty, or not a UNIX socket address).
    """
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET", "")
    if address.startswith("@") and len(address) > 1:
        return b"\0" + address[1:].encode("utf-8", "surrogateescape")
    if address.startswith("/"):
        return address
    # Empty, or a transport we do not speak (vsock:…): behave as if unset.
    return None


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """
    Send ``state`` (for example ``"READY=1"`` or ``"STOPPING=1\\nSTATUS=bye"``)
    to the service manager.  Returns True when a datagram was sent, False when
    there is no manager to tell or it could not be reached (logged, never
    raised: a daemon must not die because its supervisor went away).
    """
    address = notify_socket_address(environ)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode("utf-8"), address)
    except OSError as e:
        _log.warn("could not notify the service manager ({state!r}): {error}", state=state, error=str(e))
        return False
    return True


def watchdog_interval(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """
    Seconds between ``WATCHDOG=1`` keep-alives when the service manager asked
    for them (``WatchdogSec=`` sets ``$WATCHDOG_USEC``): half the timeout, as
    ``sd_watchdog_enabled(3)`` advises.  None when no watchdog is set, or it is
    meant for another process (``$WATCHDOG_PID``).
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    return int(usec) / 2_000_000
