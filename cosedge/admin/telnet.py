"""
The manhole over telnet: on a UNIX socket created with mode 0600 (the file
system is the authentication), or on a loopback TCP port with a user name
and a password checked against a file of scrypt hashes (re-read at every
login; one attempt per connection; guessing slowed by
:mod:`cosedge.admin.throttle`).  Importing it installs the reactor.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.conch import telnet
from twisted.conch.insults import insults
from twisted.cred import credentials as cred
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import threads
from twisted.internet.defer import Deferred, DeferredSemaphore, fail
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, UNIXServerEndpoint
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..config import ConfigError
from .manhole import ManholeSettings, telnet_endpoint_parts
from .passwords import read_password_file, verify_password
from .shells import NamespaceFactory, Shell, _peer
from .throttle import REFUSED, LoginThrottle

__all__ = ["PasswordFileChecker"]

_log = Logger(namespace="cosedge.manhole")


@implementer(ICredentialsChecker)
class PasswordFileChecker:
    """
    User names and passwords against a file of scrypt hashes, re-read at each
    login.  The hash runs in the reactor's thread pool, so a login attempt
    never stalls the bucket listener, and one at a time (each takes 16 MiB
    and tens of milliseconds), so a burst of login attempts holds one thread
    of the pool the fills use, never all of them.
    """

    credentialInterfaces = (cred.IUsernamePassword,)
    #: Login attempts that may wait for the one running; more are refused at once.
    max_waiting = 16
    _dummy = "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"

    def __init__(self, path: str, reactor: Any) -> None:
        self.path = path
        self.reactor = reactor
        self._one_at_a_time = DeferredSemaphore(1)

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        username = credentials.username.decode("utf-8", "replace")
        password = credentials.password.decode("utf-8", "replace")
        if len(self._one_at_a_time.waiting) >= self.max_waiting:
            # A flood of attempts (connections that may already be gone)
            # must not queue hashing work without bound.
            _log.warn("manhole telnet login refused: {count} login attempts already waiting", count=self.max_waiting)
            return fail(UnauthorizedLogin())
        try:
            users = read_password_file(self.path)
        except ConfigError as e:
            _log.error("manhole telnet login refused: {error}", error=str(e))
            return fail(UnauthorizedLogin())
        # An unknown user costs as much as a known one.
        encoded = users.get(username, self._dummy)
        known = username in users

        def check() -> bool:
            return verify_password(encoded, password) and known

        d: Deferred[bool] = self._one_at_a_time.run(
            threads.deferToThreadPool, self.reactor, self.reactor.getThreadPool(), check
        )

        def decide(ok: bool) -> bytes:
            if not ok:
                raise UnauthorizedLogin()
            return credentials.username  # type: ignore[no-any-return]

        return d.addCallback(decide)


class _Bootstrap(telnet.TelnetBootstrapProtocol):  # type: ignore[misc]
    """Negotiates the terminal; a client that refuses an option is fine."""

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.negotiationMap[telnet.NAWS] = self.telnet_NAWS
        transport.negotiationMap[telnet.LINEMODE] = self.telnet_LINEMODE
        for opt in (telnet.LINEMODE, telnet.NAWS, telnet.SGA):
            transport.do(opt).addErrback(lambda f: None)
        transport.will(telnet.ECHO).addErrback(lambda f: None)
        self.protocol = self.protocolFactory(*self.protocolArgs, **self.protocolKwArgs)
        self.protocol.makeConnection(self)


class _Login(telnet.AuthenticatingTelnetProtocol):  # type: ignore[misc]
    """
    Username and password prompts; one attempt per connection, a failed one
    answered after a pause, and the peer passed on for the audit channel.
    A connection not logged in within :attr:`login_timeout` seconds is
    closed, so idle connections cannot pile up and use up the daemon's file
    descriptors (which the bucket listener needs too).
    """

    failure_delay = 1.0
    login_timeout = 30.0

    def __init__(self, portal: Portal, reactor: Any, throttle: LoginThrottle | None = None) -> None:
        super().__init__(portal)
        self.reactor = reactor
        self.throttle = throttle if throttle is not None else LoginThrottle(reactor)
        self._deadline: Any = None
        self._lost = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self._deadline = self.reactor.callLater(self.login_timeout, self._timed_out)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        self._cancel_deadline()
        super().connectionLost(reason)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        transport: Any = self.transport
        _log.warn("manhole telnet login timed out from {peer}", peer=_peer(transport.getPeer()))
        transport.write(b"\r\nLogin timed out\r\n")
        transport.loseConnection()

    def telnet_User(self, line: bytes) -> str:
        transport: Any = self.transport
        self.username = line.strip()
        transport.will(telnet.ECHO).addErrback(lambda f: None)
        transport.write(b"Password: ")
        return "Password"

    def telnet_Password(self, line: bytes) -> str:
        transport: Any = self.transport
        username, password = self.username, line.rstrip(b"\r\n")
        del self.username
        peer = _peer(transport.getPeer())
        wait = self.throttle.delay(peer)
        if wait == REFUSED:
            _log.warn("manhole telnet login refused from {peer}: too many failures", peer=peer)
            transport.write(b"\r\nToo many failed logins; try again later\r\n")
            transport.loseConnection()
            return "Discard"

        def login() -> None:
            if self._lost:
                return
            d = self.portal.login(cred.UsernamePassword(username, password), peer, telnet.ITelnetProtocol)
            d.addCallbacks(self._cbLogin, self._refused, (peer,), None, (username, peer))

        def after_echo(ignored: object) -> None:
            # After failures, the check itself waits: guessing gets slower.
            if wait > 0:
                self.reactor.callLater(wait, login)
            else:
                login()

        transport.wont(telnet.ECHO).addBoth(after_echo)
        return "Discard"

    def _cbLogin(self, ial: tuple[Any, Any, Callable[[], None]], peer: str = "") -> None:
        self.throttle.succeeded(peer)
        if self._lost:  # timed out (or hung up) while the password was checked
            ial[2]()
            return
        self._cancel_deadline()
        transport: Any = self.transport
        transport.write(b"\r\n")  # the password line was not echoed
        super()._cbLogin(ial)

    def _refused(self, failure: Failure, username: bytes, peer: str) -> None:
        self.throttle.failed(peer)
        _log.warn(
            "manhole telnet login refused for {user!r} from {peer}",
            user=username.decode("utf-8", "replace"),
            peer=peer,
        )

        transport: Any = self.transport

        def close() -> None:
            transport.write(b"\r\nAuthentication failed\r\n")
            transport.loseConnection()

        self.reactor.callLater(self.failure_delay, close)


@implementer(IRealm)
class _TelnetRealm:
    def __init__(self, make_namespace: NamespaceFactory) -> None:
        self.make_namespace = make_namespace

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> tuple[Any, Any, Callable[[], None]]:
        if telnet.ITelnetProtocol not in interfaces:
            raise NotImplementedError()
        channel = f"telnet:{avatarId.decode('utf-8', 'replace')}@{mind}"
        _log.info("manhole login: {channel}", channel=channel)
        protocol = _Bootstrap(insults.ServerProtocol, Shell, self.make_namespace(channel), channel)
        return telnet.ITelnetProtocol, protocol, lambda: None


class _TelnetFactory(ServerFactory):
    noisy = False

    def __init__(self, make: Callable[[], telnet.TelnetTransport]) -> None:
        self.make = make

    def buildProtocol(self, addr: Any) -> telnet.TelnetTransport:
        protocol = self.make()
        protocol.factory = self
        return protocol


class _PrivateSocketService(StreamServerEndpointService):
    """
    Listens with a 077 umask, so the UNIX socket is never briefly
    world-accessible.  A socket path inside the data directory gets its
    folder made first (a new data directory has none yet).
    """

    def __init__(self, endpoint: Any, factory: Any, path: str, data_dir: str | None) -> None:
        super().__init__(endpoint, factory)
        self._path = path
        self._data_dir = data_dir

    def privilegedStartService(self) -> None:
        folder = os.path.dirname(os.path.abspath(self._path))
        if self._data_dir is not None:
            data_dir = os.path.abspath(self._data_dir)
            if os.path.commonpath([folder, data_dir]) == data_dir:
                os.makedirs(folder, 0o700, exist_ok=True)
        old = os.umask(0o077)
        try:
            super().privilegedStartService()
        finally:
            os.umask(old)

    def startService(self) -> None:
        old = os.umask(0o077)
        try:
            super().startService()
        finally:
            os.umask(old)


def _telnet_service(
    settings: ManholeSettings, make_namespace: NamespaceFactory, reactor: Any, data_dir: str | None
) -> Any:
    assert settings.telnet is not None
    kind, parts = telnet_endpoint_parts(settings.telnet)
    if settings.telnet_passwords is not None:
        portal = Portal(_TelnetRealm(make_namespace), [PasswordFileChecker(settings.telnet_passwords, reactor)])
        throttle = LoginThrottle(reactor)  # one for every connection of the listener
        factory = _TelnetFactory(lambda: telnet.TelnetTransport(_Login, portal, reactor, throttle))
    else:
        factory = _TelnetFactory(
            lambda: telnet.TelnetTransport(
                _Bootstrap, insults.ServerProtocol, Shell, make_namespace("telnet:unix"), "telnet:unix"
            )
        )
    if kind == "unix":
        endpoint: Any = UNIXServerEndpoint(reactor, parts["address"], parts["backlog"], 0o600, parts["lockfile"])
        return _PrivateSocketService(endpoint, factory, parts["address"], data_dir)
    cls = TCP6ServerEndpoint if ":" in parts["interface"] else TCP4ServerEndpoint
    endpoint = cls(reactor, parts["port"], parts["backlog"], parts["interface"])
    return StreamServerEndpointService(endpoint, factory)
