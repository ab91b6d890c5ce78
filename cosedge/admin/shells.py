"""
The manhole's shell: a Python shell inside the running daemon, reached over
SSH (:mod:`cosedge.admin.ssh`) or telnet (:mod:`cosedge.admin.telnet`),
whose listeners :mod:`cosedge.admin.listeners` makes.

Each session gets its own namespace holding ``edge`` (:class:`cosedge.admin.shell.Edge`),
bound to the session's channel (``ssh:admin@127.0.0.1``, ``telnet:alice@…``,
``telnet:unix``) so that audit lines say who changed what.

- SSH: public-key authentication against an authorized_keys file (re-read at
  every login, so keys can be added and revoked without a restart); the host
  key is generated on first start (Ed25519) and kept, mode 0600.  ``ssh host
  'edge.stats()'`` runs one command for scripts (:func:`run_command`).
- Telnet: on a UNIX socket created with mode 0600 (the file system is the
  authentication), or on a loopback TCP port with a user name and a password
  checked against a file of scrypt hashes (re-read at every login; one attempt
  per connection).  :func:`cosedge.admin.manhole.parse_manhole` refuses anything else.

Importing this module installs the reactor (``twisted.conch.manhole`` does), so
:func:`cosedge.admin.live.attach` imports it only when a manhole is configured.
"""

from __future__ import annotations

import contextlib
import io
import socket
import traceback
from collections.abc import Callable
from typing import Any

from twisted.conch import manhole
from twisted.conch.insults import insults
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..config import ConfigError
from .errors import AdminError

__all__ = ["NamespaceFactory", "Shell", "run_command"]

_log = Logger(namespace="cosedge.manhole")

#: Builds the namespace of one shell session from its channel name.
NamespaceFactory = Callable[[str], dict[str, Any]]

_BANNER = (
    "cosedge manhole ({channel}) on {host}.\r\n"
    "A Python shell inside the running daemon.  'edge' administers it: help(edge).\r\n"
    "Changes apply to the next request and are saved.  Ctrl-D leaves.\r\n"
)


# ---------------------------------------------------------------------------
# The shell.


class _Interpreter(manhole.ManholeInterpreter):  # type: ignore[misc]
    """Shows a refused command as one ``error:`` line, not a traceback."""

    def excepthook(self, excType: type[BaseException], excValue: BaseException, excTraceback: Any) -> None:
        if isinstance(excValue, AdminError | ConfigError):
            self.write(f"error: {excValue}\n")
        else:
            super().excepthook(excType, excValue, excTraceback)

    def _cbDisplayDeferred(self, result: object, k: int, obj: Deferred[Any]) -> object:
        # A table (edge.buckets(usage=True)) starts on a line of its own.
        text = repr(result)
        sep = "\n" if "\n" in text else " "
        self.write(f"Deferred #{k} called back:{sep}{text}", True)
        del self._pendingDeferreds[id(obj)]
        return result


class Shell(manhole.ColoredManhole):  # type: ignore[misc]
    """The manhole REPL, with a banner naming the session's channel."""

    def __init__(self, namespace: dict[str, Any], channel: str) -> None:
        super().__init__(namespace)
        self.channel = channel

    def connectionMade(self) -> None:
        super().connectionMade()
        self.interpreter = _Interpreter(self, self.namespace)
        _log.info("manhole session opened: {channel}", channel=self.channel)

    def connectionLost(self, reason: Failure) -> None:
        _log.info("manhole session closed: {channel}", channel=self.channel)
        super().connectionLost(reason)

    def initializeScreen(self) -> None:
        self.terminal.write(_BANNER.format(channel=self.channel, host=socket.gethostname()).encode("utf-8"))
        self.terminal.write(self.ps[self.pn])
        self.setInsertMode()

    def terminalSize(self, width: int, height: int) -> None:
        # Only record the size: the default clears the screen (and the banner).
        self.width, self.height = width, height


class _Writer(io.TextIOBase):
    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._write = write

    def write(self, text: str) -> int:
        self._write(text.encode("utf-8"))
        return len(text)


def run_command(
    source: str, namespace: dict[str, Any], write: Callable[[bytes], None], done: Callable[[int], None]
) -> None:
    """
    Run one line of Python as the shell would, for scripts: write the value
    of an expression (waiting for a Deferred), then call ``done`` with 0; a
    refused command writes one ``error:`` line and a failure its traceback,
    and ``done(1)``.
    """
    out = _Writer(write)
    try:
        with contextlib.redirect_stdout(out):  # print() goes to the client too
            try:
                code = compile(source, "<command>", "eval")
            except SyntaxError:
                exec(compile(source, "<command>", "exec"), namespace)
                value: Any = None
            else:
                value = eval(code, namespace)
    except (AdminError, ConfigError) as e:
        write(f"error: {e}\n".encode())
        done(1)
        return
    except Exception as e:
        tb = e.__traceback__.tb_next if e.__traceback__ is not None else None
        write("".join(traceback.format_exception(type(e), e, tb)).encode())
        done(1)
        return
    if isinstance(value, Deferred):

        def fired(result: object) -> None:
            write(f"{result!r}\n".encode())
            done(0)

        def failed(failure: Failure) -> None:
            write(f"error: {failure.getErrorMessage()}\n".encode())
            done(1)

        value.addCallbacks(fired, failed)
        return
    if value is not None:
        write(f"{value!r}\n".encode())
    done(0)


def _shell_protocol(make_namespace: NamespaceFactory, channel: str) -> insults.ServerProtocol:
    return insults.ServerProtocol(Shell, make_namespace(channel), channel)


def _peer(address: Any) -> str:
    host = getattr(address, "host", None)
    return str(host) if host is not None else "unix"
