"""
The manhole over SSH: public-key logins against an authorized_keys file
(re-read at every login), a host key generated on first start and kept
(mode 0600), a login deadline, one command per ``ssh host 'command'``.
Importing it installs the reactor (``twisted.conch.manhole`` does).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from twisted.conch import manhole_ssh
from twisted.conch.checkers import IAuthorizedKeysDB, SSHPublicKeyChecker
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import keys, transport
from twisted.cred.portal import Portal
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..config import ConfigError
from .manhole import ManholeSettings, read_authorized_keys
from .shells import NamespaceFactory, _peer, _shell_protocol, run_command
from .state import write_atomically

__all__ = ["load_host_key"]

_log = Logger(namespace="cosedge.manhole")


# ---------------------------------------------------------------------------
# SSH.


class _ServerTransport(transport.SSHServerTransport):
    """
    An operator quitting ``ssh`` is routine and a refused key a warning, not
    errors.  A connection must log in within :attr:`login_timeout` seconds,
    key exchange included (Twisted's own limit is ten hours, and only from
    the start of authentication).
    """

    login_timeout = 60.0
    _login_deadline: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        reactor: Any = self.factory.reactor  # type: ignore[attr-defined]
        self._login_deadline = reactor.callLater(self.login_timeout, self._login_timed_out)

    def setService(self, service: Any) -> None:
        super().setService(service)
        if service.name == b"ssh-connection":  # authenticated
            self._cancel_login_deadline()

    def connectionLost(self, reason: Any = None) -> None:
        self._cancel_login_deadline()
        super().connectionLost(reason)

    def _cancel_login_deadline(self) -> None:
        if self._login_deadline is not None and self._login_deadline.active():
            self._login_deadline.cancel()
        self._login_deadline = None

    def _login_timed_out(self) -> None:
        self._login_deadline = None
        tcp: Any = self.transport
        _log.warn("manhole ssh login from {peer} timed out", peer=_peer(tcp.getPeer()))
        tcp.loseConnection()

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        reason = description.decode("utf-8", "replace")
        if reasonCode == transport.DISCONNECT_BY_APPLICATION:
            _log.info("manhole ssh client disconnected: {reason}", reason=reason)
        elif reasonCode == transport.DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE:
            tcp: Any = self.transport
            _log.warn("manhole ssh login failed from {peer}: no accepted key", peer=_peer(tcp.getPeer()))
        else:
            super().receiveError(reasonCode, description)


class _User(manhole_ssh.TerminalUser):  # type: ignore[misc]
    def __init__(self, original: Any, avatarId: bytes) -> None:
        super().__init__(original, avatarId)
        self.username = avatarId.decode("utf-8", "replace")


class _Session(manhole_ssh.TerminalSession):  # type: ignore[misc]
    """A shell session; works without a pty request and survives resizes."""

    width = 80
    height = 24
    make_namespace: NamespaceFactory

    def _channel(self) -> tuple[Any, str]:
        user: Any = IConchUser(self.original)
        try:
            peer = _peer(user.conn.transport.transport.getPeer())
        except AttributeError:
            peer = "?"
        return user, f"ssh:{user.username}@{peer}"

    def openShell(self, proto: Any) -> None:
        user, channel = self._channel()
        self.transportFactory(proto, _shell_protocol(self.make_namespace, channel), user, self.width, self.height)
        self._proto = proto

    def execCommand(self, proto: Any, cmd: bytes) -> None:
        """``ssh … 'edge.stats()'``: run one line, print its value, exit 0 (1 if refused or failed)."""
        _, channel = self._channel()
        source = cmd.decode("utf-8", "replace")
        _log.info("manhole command via {channel}: {command}", channel=channel, command=source)

        def done(code: int) -> None:
            proto.processEnded(Failure(ProcessDone(0) if code == 0 else ProcessTerminated(exitCode=code)))

        run_command(source, self.make_namespace(channel), proto.write, done)

    def windowChanged(self, newWindowSize: tuple[int, ...]) -> None:
        self.height, self.width = newWindowSize[:2]

    def eofReceived(self) -> None:
        proto = getattr(self, "_proto", None)
        if proto is not None:
            proto.loseConnection()


class _Realm(manhole_ssh.TerminalRealm):  # type: ignore[misc]
    userFactory = _User
    sessionFactory = _Session

    def __init__(self, make_namespace: NamespaceFactory) -> None:
        super().__init__()
        self.make_namespace = make_namespace

    def _getAvatar(self, avatarId: bytes) -> Any:
        user = super()._getAvatar(avatarId)
        from twisted.conch.interfaces import ISession

        session: Any = ISession(user.original)
        session.make_namespace = self.make_namespace
        _log.info("manhole login: {user} over ssh", user=user.username)
        return user


@implementer(IAuthorizedKeysDB)
class _AuthorizedKeysFile:
    """Every key in one authorized_keys file, for any user name; re-read at each login."""

    def __init__(self, path: str) -> None:
        self.path = path

    def getAuthorizedKeys(self, avatarId: bytes) -> Iterator[keys.Key]:
        try:
            return iter(read_authorized_keys(self.path))
        except ConfigError as e:
            _log.error("manhole ssh login refused: {error}", error=str(e))
            return iter(())


def load_host_key(path: str) -> keys.Key:
    """
    The SSH host key at ``path``; an Ed25519 key is generated and saved there
    on first use: written to a new temporary file of a random name (created
    exclusively, mode 0600, never through a symbolic link), synced, renamed
    into place, and the folder synced.
    """
    if not os.path.exists(path):
        from cryptography.hazmat.primitives.asymmetric import ed25519

        new = keys.Key(ed25519.Ed25519PrivateKey.generate())
        unsynced = write_atomically(path, new.toString("openssh"))
        if unsynced is not None:  # the key is in place: use it
            _log.warn("manhole SSH host key {path}: folder not synced to disk: {error}", path=path, error=unsynced)
        _log.info("generated the manhole SSH host key {path}", path=path)
    key: keys.Key = keys.Key.fromFile(path)
    return key


def _ssh_factory(settings: ManholeSettings, make_namespace: NamespaceFactory, reactor: Any) -> Factory[Any]:
    assert settings.ssh_authorized_keys is not None
    host_key = load_host_key(settings.ssh_host_key)
    checker = SSHPublicKeyChecker(_AuthorizedKeysFile(settings.ssh_authorized_keys))
    factory: Any = manhole_ssh.ConchFactory(Portal(_Realm(make_namespace), [checker]))  # type: ignore[arg-type]
    factory.publicKeys = {host_key.sshType(): host_key.public()}
    factory.privateKeys = {host_key.sshType(): host_key}
    factory.noisy = False
    factory.protocol = _ServerTransport
    factory.reactor = reactor  # for the login deadline
    _log.info(
        "manhole SSH host key {path}: {fingerprint}",
        path=settings.ssh_host_key,
        fingerprint="SHA256:" + host_key.fingerprint(keys.FingerprintFormats.SHA256_BASE64).rstrip("="),
    )
    return factory  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------
# Telnet.
