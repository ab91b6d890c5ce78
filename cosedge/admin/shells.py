"""
The manhole: a Python shell inside the running daemon, over SSH or telnet.

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
import os
import socket
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.conch import manhole, manhole_ssh, telnet
from twisted.conch.checkers import IAuthorizedKeysDB, SSHPublicKeyChecker
from twisted.conch.insults import insults
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import keys, transport
from twisted.cred import credentials as cred
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import threads
from twisted.internet.defer import Deferred, DeferredSemaphore, fail
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, UNIXServerEndpoint, serverFromString
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import Factory, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..config import ConfigError
from .errors import AdminError
from .manhole import ManholeSettings, read_authorized_keys, telnet_endpoint_parts
from .passwords import read_password_file, verify_password
from .state import write_atomically

__all__ = ["PasswordFileChecker", "Shell", "load_host_key", "manhole_service", "run_command"]

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

    def __init__(self, portal: Portal, reactor: Any) -> None:
        super().__init__(portal)
        self.reactor = reactor
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

        def login(ignored: object) -> None:
            d = self.portal.login(cred.UsernamePassword(username, password), peer, telnet.ITelnetProtocol)
            d.addCallbacks(self._cbLogin, self._refused, errbackArgs=(username, peer))

        transport.wont(telnet.ECHO).addBoth(login)
        return "Discard"

    def _cbLogin(self, ial: tuple[Any, Any, Callable[[], None]]) -> None:
        if self._lost:  # timed out (or hung up) while the password was checked
            ial[2]()
            return
        self._cancel_deadline()
        transport: Any = self.transport
        transport.write(b"\r\n")  # the password line was not echoed
        super()._cbLogin(ial)

    def _refused(self, failure: Failure, username: bytes, peer: str) -> None:
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
    """Listens with a 077 umask, so the UNIX socket is never briefly world-accessible."""

    def privilegedStartService(self) -> None:
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


def _telnet_service(settings: ManholeSettings, make_namespace: NamespaceFactory, reactor: Any) -> Any:
    assert settings.telnet is not None
    kind, parts = telnet_endpoint_parts(settings.telnet)
    if settings.telnet_passwords is not None:
        portal = Portal(_TelnetRealm(make_namespace), [PasswordFileChecker(settings.telnet_passwords, reactor)])
        factory = _TelnetFactory(lambda: telnet.TelnetTransport(_Login, portal, reactor))
    else:
        factory = _TelnetFactory(
            lambda: telnet.TelnetTransport(
                _Bootstrap, insults.ServerProtocol, Shell, make_namespace("telnet:unix"), "telnet:unix"
            )
        )
    if kind == "unix":
        endpoint: Any = UNIXServerEndpoint(reactor, parts["address"], parts["backlog"], 0o600, parts["lockfile"])
        return _PrivateSocketService(endpoint, factory)
    cls = TCP6ServerEndpoint if ":" in parts["interface"] else TCP4ServerEndpoint
    endpoint = cls(reactor, parts["port"], parts["backlog"], parts["interface"])
    return StreamServerEndpointService(endpoint, factory)


def manhole_service(settings: ManholeSettings, make_namespace: NamespaceFactory, reactor: Any) -> MultiService:
    """The manhole listeners configured in ``settings``, as one service."""
    service = MultiService()
    service.setName("manhole")
    if settings.ssh is not None:
        factory = _ssh_factory(settings, make_namespace, reactor)
        StreamServerEndpointService(serverFromString(reactor, settings.ssh), factory).setServiceParent(service)
    if settings.telnet is not None:
        _telnet_service(settings, make_namespace, reactor).setServiceParent(service)
    return service
