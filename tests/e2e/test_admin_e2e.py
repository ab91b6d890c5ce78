"""
End-to-end: live administration of the real ``twistd -n --pidfile= cosedge``
daemon through its manhole, with real clients over loopback and a UNIX
socket (an SSH client from twisted.conch with a generated key, a telnet
client protocol), and SIGHUP reloads.

Run with ``.venv/bin/python -m pytest tests/e2e/test_admin_e2e.py -q``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import stat
import struct
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
import pytest_twisted  # type: ignore[import-untyped]
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh import channel, common, connection, keys, session, transport, userauth
from twisted.conch.telnet import ECHO, SGA, TelnetProtocol, TelnetTransport
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint, connectProtocol
from twisted.python.failure import Failure

from cosedge.admin.passwords import hash_password

from .conftest import BUCKET, FAST_FILL, HOST, Daemon, free_port, refused_start
from .origin import MisbehavingOrigin

pytestmark = pytest.mark.e2e

_Test = TypeVar("_Test", bound=Callable[..., Coroutine[Any, Any, None]])


def ensure_deferred(test: _Test) -> _Test:
    """pytest-twisted's ``ensureDeferred``, typed: run an async test on the reactor."""
    wrapped: _Test = pytest_twisted.ensureDeferred(test)
    return wrapped


TIMEOUT = 10.0
PASSWORD = "correct horse battery"
_ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[c=>]")
#: Log lines at error level that these tests cause on purpose.
_EXPECTED_ERRORS = ("reload via sighup rejected",)


# ---------------------------------------------------------------------------
# The daemon, with a manhole.


@attrs.define(eq=False)
class AdminDaemon(Daemon):
    """A daemon whose config file also has a ``[manhole]`` section."""

    manhole: str = ""

    def write_config(self) -> None:
        super().write_config()
        with self.config_path.open("a") as f:
            f.write("\n" + self.manhole)

    @property
    def state_file(self) -> Path:
        return self.data_dir / ".cosedge" / "state.json"

    @property
    def host_key(self) -> Path:
        return self.data_dir / ".cosedge" / "ssh_host_ed25519_key"

    def unexpected_problems(self) -> list[str]:
        return [line for line in self.problems() if not any(e in line for e in _EXPECTED_ERRORS)]


@attrs.frozen
class Credentials:
    key: keys.Key
    other_key: keys.Key
    authorized_keys: Path
    passwords: Path


@pytest.fixture
def credentials(tmp_path: Path) -> Credentials:
    """An operator key in authorized_keys, a stranger's key, and a password file with alice."""
    key = keys.Key(ed25519.Ed25519PrivateKey.generate())
    other = keys.Key(ed25519.Ed25519PrivateKey.generate())
    authorized = tmp_path / "authorized_keys"
    authorized.write_bytes(key.public().toString("openssh") + b" operator@laptop\n")
    passwords = tmp_path / "manhole.passwd"
    passwords.write_text(f"alice:{hash_password(PASSWORD)}\n")
    return Credentials(key, other, authorized, passwords)


@pytest.fixture
def make_admin_daemon(
    tmp_path_factory: pytest.TempPathFactory, origin: MisbehavingOrigin, credentials: Credentials
) -> Iterator[Callable[..., AdminDaemon]]:
    """Start daemons with SSH and telnet manholes (stopped, and their logs checked, at the end)."""
    daemons: list[AdminDaemon] = []

    def make(telnet: str = "tcp") -> AdminDaemon:
        root = tmp_path_factory.mktemp("cosedge-admin")
        ssh_port = free_port()
        if telnet == "tcp":
            telnet_section = (
                f'telnet = "tcp:{free_port()}:interface=127.0.0.1"\ntelnet_passwords = "{credentials.passwords}"\n'
            )
        else:
            telnet_section = f'telnet = "unix:{root / "manhole.sock"}"\n'
        manhole = (
            f'[manhole]\nssh = "tcp:{ssh_port}:interface=127.0.0.1"\n'
            f'ssh_authorized_keys = "{credentials.authorized_keys}"\n' + telnet_section
        )
        daemon = AdminDaemon(root, origin.netloc, dict(FAST_FILL), manhole=manhole)
        daemons.append(daemon)
        start(daemon)
        return daemon

    yield make
    for daemon in daemons:
        daemon.stop()
    for daemon in daemons:
        assert daemon.unexpected_problems() == [], "the daemon logged an unexpected error"


def keepalive_get(sock: socket.socket, path: str) -> tuple[int, str | None]:
    """One GET on an open keep-alive connection: the status and Location (bounded reads)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    data = b""
    deadline = time.monotonic() + TIMEOUT
    while b"\r\n\r\n" not in data:
        assert time.monotonic() < deadline and len(data) < 65536, data
        piece = sock.recv(65536)
        assert piece, f"the connection was closed: {data!r}"
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        assert time.monotonic() < deadline, body
        piece = sock.recv(65536)
        assert piece, "the connection was closed mid-body"
        body += piece
    return int(lines[0].split()[1]), headers.get("location")


def start(daemon: AdminDaemon) -> None:
    """
    Start the daemon and wait until it says it is serving: the conftest's
    port probe can succeed through a TCP self-connect before twistd has bound
    anything.
    """
    seen = daemon.log().count("cosedge serving")
    daemon.start()
    deadline = time.monotonic() + TIMEOUT
    while daemon.log().count("cosedge serving") <= seen:
        assert time.monotonic() < deadline, f"the daemon did not start:\n{daemon.log()}"
        time.sleep(0.05)


def manhole_port(daemon: AdminDaemon, kind: str) -> int:
    match = re.search(rf'{kind} = "tcp:(\d+):', daemon.manhole)
    assert match is not None
    return int(match.group(1))


# ---------------------------------------------------------------------------
# Clients.


class Screen:
    """What a shell has printed (escape sequences dropped), awaitable for text."""

    def __init__(self) -> None:
        self.raw = b""
        self._waiting: list[tuple[bytes, int, Deferred[None]]] = []
        self.closed: Deferred[None] = Deferred()

    @property
    def text(self) -> str:
        return _ANSI.sub(b"", self.raw).decode("utf-8", "replace")

    def feed(self, data: bytes) -> None:
        self.raw += data
        plain = _ANSI.sub(b"", self.raw)
        for item in list(self._waiting):
            needle, start, d = item
            if plain.find(needle, start) >= 0:
                self._waiting.remove(item)
                d.callback(None)

    def lost(self) -> None:
        if not self.closed.called:
            self.closed.callback(None)

    def mark(self) -> int:
        return len(_ANSI.sub(b"", self.raw))

    async def expect(self, needle: str, since: int = 0) -> str:
        """Wait (bounded) until ``needle`` appears after offset ``since``; return the text since."""
        encoded = needle.encode()
        d: Deferred[None] = Deferred()
        self._waiting.append((encoded, since, d))
        self.feed(b"")
        d.addTimeout(TIMEOUT, reactor)
        try:
            await d
        except Exception:
            pytest.fail(f"{needle!r} did not appear within {TIMEOUT}s; the shell showed:\n{self.text[since:]}")
        return _ANSI.sub(b"", self.raw).decode("utf-8", "replace")[since:]


class Shell:
    """Type a line into a manhole and wait for the next prompt."""

    def __init__(self, screen: Screen, write: Callable[[bytes], None], newline: bytes) -> None:
        self.screen = screen
        self._write = write
        self._newline = newline

    async def run(self, line: str) -> str:
        """The output of one line (between the echoed line and the next prompt)."""
        since = self.screen.mark()
        self._write(line.encode() + self._newline)
        text = await self.screen.expect("\n>>> ", since)
        output = text.rsplit(">>> ", 1)[0]
        # Drop the echoed input (the shell redraws it as it is typed).
        return output.split("\n", 1)[1] if "\n" in output else ""


# -- SSH (twisted.conch client) --


class _SSHClientTransport(transport.SSHClientTransport):
    factory: _SSHClientFactory

    def verifyHostKey(self, hostKey: bytes, fingerprint: bytes) -> Deferred[bool]:
        self.factory.host_keys.append(keys.Key.fromString(hostKey))
        return succeed(True)

    def connectionSecure(self) -> None:
        self.requestService(_UserAuth(b"admin", _Connection(self.factory)))

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        self.factory.screen.lost()


class _SSHClientFactory:
    def __init__(self, key: keys.Key) -> None:
        self.key = key
        self.host_keys: list[keys.Key] = []
        self.screen = Screen()
        self.opened: Deferred[_SessionChannel] = Deferred()
        #: Run this one command instead of opening the shell.
        self.command: bytes | None = None


class _UserAuth(userauth.SSHUserAuthClient):
    def __init__(self, user: bytes, instance: Any) -> None:
        super().__init__(user, instance)
        self._offered = False

    def getPublicKey(self) -> keys.Key | None:
        if self._offered:
            return None
        self._offered = True
        key: keys.Key = self._client().key.public()
        return key

    def getPrivateKey(self) -> Deferred[keys.Key]:
        return succeed(self._client().key)

    def _client(self) -> _SSHClientFactory:
        ssh: Any = self.transport
        client: _SSHClientFactory = ssh.factory
        return client

    def getPassword(self, prompt: bytes | None = None) -> None:
        return None


class _Connection(connection.SSHConnection):
    def __init__(self, factory: _SSHClientFactory) -> None:
        super().__init__()
        self.client = factory

    def serviceStarted(self) -> None:
        self.openChannel(_SessionChannel(self.client, conn=self))


class _SessionChannel(channel.SSHChannel):
    name = b"session"

    def __init__(self, client: _SSHClientFactory, **kw: Any) -> None:
        super().__init__(**kw)
        self.client = client
        self.exit_status: int | None = None
        self.ended: Deferred[None] = Deferred()

    def channelOpen(self, data: bytes) -> None:
        conn: Any = self.conn
        if self.client.command is not None:
            conn.sendRequest(self, b"exec", common.NS(self.client.command), wantReply=False)
        else:
            pty = session.packRequest_pty_req(b"xterm", (24, 120, 0, 0), b"")
            conn.sendRequest(self, b"pty-req", pty, wantReply=False)
            conn.sendRequest(self, b"shell", common.NS(b""), wantReply=False)
        self.client.opened.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.client.screen.feed(data)

    def request_exit_status(self, data: bytes) -> int:
        self.exit_status = struct.unpack(">L", data)[0]
        return 1

    def closed(self) -> None:
        if not self.ended.called:
            self.ended.callback(None)


async def ssh_shell(port: int, key: keys.Key) -> tuple[Shell, _SSHClientFactory, Any]:
    """Log in over SSH with ``key``; returns the shell, the client state and the transport."""
    client = _SSHClientFactory(key)
    proto = _SSHClientTransport()
    proto.factory = client  # type: ignore[assignment]
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), proto)
    chan = await client.opened.addTimeout(TIMEOUT, reactor)
    shell = Shell(client.screen, chan.write, b"\r")
    await client.screen.expect(">>> ")
    return shell, client, proto


async def ssh_command(port: int, key: keys.Key, command: str) -> tuple[str, int | None]:
    """``ssh admin@127.0.0.1 COMMAND``: the output and the exit status."""
    client = _SSHClientFactory(key)
    client.command = command.encode()
    proto = _SSHClientTransport()
    proto.factory = client  # type: ignore[assignment]
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), proto)
    chan = await client.opened.addTimeout(TIMEOUT, reactor)
    await chan.ended.addTimeout(TIMEOUT, reactor)
    tcp: Any = proto.transport
    tcp.loseConnection()
    return client.screen.raw.decode(), chan.exit_status


# -- telnet (twisted.conch.telnet client) --


class _TelnetClient(TelnetProtocol):
    def __init__(self, screen: Screen) -> None:
        self.screen = screen

    def enableRemote(self, option: bytes) -> bool:
        return option in (ECHO, SGA)  # the server echoes; no local line editing

    def enableLocal(self, option: bytes) -> bool:
        return False

    def disableRemote(self, option: bytes) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        self.screen.feed(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.screen.lost()


async def telnet_connect(endpoint: Any) -> tuple[Screen, TelnetTransport]:
    screen = Screen()
    proto = TelnetTransport(_TelnetClient, screen)
    await connectProtocol(endpoint, proto)
    return screen, proto


def _send(proto: TelnetTransport) -> Callable[[bytes], None]:
    return lambda data: proto.transport.write(data)  # type: ignore[union-attr]


async def telnet_login(port: int, user: str, password: str) -> tuple[Screen, TelnetTransport]:
    screen, proto = await telnet_connect(TCP4ClientEndpoint(reactor, "127.0.0.1", port))
    await screen.expect("Username: ")
    _send(proto)(user.encode() + b"\r\n")
    await screen.expect("Password: ")
    _send(proto)(password.encode() + b"\r\n")
    return screen, proto


async def closed(screen: Screen) -> None:
    await screen.closed.addTimeout(TIMEOUT, reactor)


# ---------------------------------------------------------------------------
# Tests.


@ensure_deferred
async def test_ssh_live_change_redirects_the_next_miss_and_survives_a_restart(
    make_admin_daemon: Callable[..., AdminDaemon], credentials: Credentials, origin: MisbehavingOrigin
) -> None:
    """
    The seed's console step done live over SSH: set_origin in the manhole and
    the very next miss — on a keep-alive connection opened before the change —
    is redirected to the new origin (which is then copied from it), the
    change is in the state file and the audit log, and a restart of the
    daemon keeps it, with the same host key.
    """
    second = MisbehavingOrigin()
    second.start()
    with contextlib.ExitStack() as stack:
        stack.callback(second.stop)
        daemon = make_admin_daemon()
        kept = socket.create_connection(("127.0.0.1", daemon.port), timeout=TIMEOUT)
        stack.callback(kept.close)
        assert keepalive_get(kept, "/before.jpg") == (302, f"http://{daemon.origin}/before.jpg")
        shell, client, proto = await ssh_shell(manhole_port(daemon, "ssh"), credentials.key)
        assert "cosedge manhole (ssh:admin@127.0.0.1)" in client.screen.text
        assert client.host_keys == [keys.Key.fromFile(str(daemon.host_key)).public()]
        assert oct(stat.S_IMODE(daemon.host_key.stat().st_mode)) == "0o600"
        out = await shell.run(f"edge.set_origin({BUCKET!r}, {second.netloc!r})")
        assert f"origin of {BUCKET}: {daemon.origin} -> {second.netloc}" in out
        # The next request on a connection opened before the change follows it.
        assert keepalive_get(kept, "/ok/after.jpg") == (302, f"http://{second.netloc}/ok/after.jpg")
        assert daemon.fill_outcome("ok/after.jpg") == "stored"
        assert second.gets("/ok/after.jpg") == 1 and origin.gets("/ok/after.jpg") == 0
        out = await shell.run("edge.buckets()")
        assert re.search(rf"{BUCKET}\s+{re.escape(second.netloc)}\s+on\s+changed", out), out
        proto.transport.loseConnection()
        assert json.loads(daemon.state_file.read_text())["buckets"] == {BUCKET: {"origin": second.netloc}}
        daemon.wait_for_log(
            rf"audit: origin of {BUCKET}: {re.escape(daemon.origin)} -> "
            rf"{re.escape(second.netloc)} via ssh:admin@127\.0\.0\.1"
        )
        host_key = daemon.host_key.read_bytes()

        daemon.stop()
        start(daemon)
        assert daemon.request("/restarted.jpg").header("Location") == f"http://{second.netloc}/restarted.jpg"
        assert daemon.host_key.read_bytes() == host_key


@ensure_deferred
async def test_ssh_refuses_a_key_not_in_authorized_keys(
    make_admin_daemon: Callable[..., AdminDaemon], credentials: Credentials
) -> None:
    """A stranger's key gets no shell: the server ends the connection after refusing it."""
    daemon = make_admin_daemon()
    client = _SSHClientFactory(credentials.other_key)
    proto = _SSHClientTransport()
    proto.factory = client  # type: ignore[assignment]
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", manhole_port(daemon, "ssh")), proto)
    await closed(client.screen)
    assert not client.opened.called
    assert client.screen.raw == b""
    daemon.wait_for_log("manhole ssh login failed from 127.0.0.1: no accepted key")


@ensure_deferred
async def test_invalid_origins_typed_in_the_shell_change_nothing(
    make_admin_daemon: Callable[..., AdminDaemon], credentials: Credentials
) -> None:
    """
    Each invalid origin form typed into the manhole prints one error line; the
    bucket keeps redirecting to its old origin and nothing is saved.
    """
    daemon = make_admin_daemon()
    shell, client, proto = await ssh_shell(manhole_port(daemon, "ssh"), credentials.key)
    for bad in ["http://abc.example.com", "abc.example.com/images", "", "abc.example.com:99999", " 10.0.0.1"]:
        out = await shell.run(f"edge.set_origin({BUCKET!r}, {bad!r})")
        assert out.startswith("error: set_origin refused: origin address"), out
        assert "nothing changed" in out and "Traceback" not in out
    out = await shell.run("edge.enable_origin_pull('nosuch-1250000000')")
    assert "error: no bucket named" in out
    out = await shell.run("help(edge)")
    assert "edge.set_origin(bucket, address)" in out and "edge.prefetch(bucket, key)" in out
    proto.transport.loseConnection()
    assert not daemon.state_file.exists()
    assert daemon.request("/x.jpg").header("Location") == f"http://{daemon.origin}/x.jpg"


@ensure_deferred
async def test_ssh_runs_one_command_for_scripts(
    make_admin_daemon: Callable[..., AdminDaemon], credentials: Credentials, origin: MisbehavingOrigin
) -> None:
    """
    ``ssh admin@host 'edge.…'`` runs one command: a refused change exits 1
    with one error line and changes nothing; an accepted one exits 0 and the
    next miss follows it; a prefetch ends when the object is stored.
    """
    daemon = make_admin_daemon()
    port = manhole_port(daemon, "ssh")
    out, status = await ssh_command(port, credentials.key, f"edge.set_origin({BUCKET!r}, 'abc.example.com/x')")
    assert status == 1 and out.startswith("error: set_origin refused") and out.count("\n") == 1
    assert not daemon.state_file.exists()
    out, status = await ssh_command(port, credentials.key, f"edge.prefetch({BUCKET!r}, 'ok/pre.bin')")
    assert status == 0 and "stored=True" in out, out
    assert daemon.request("/ok/pre.bin").status == 200
    out, status = await ssh_command(port, credentials.key, f"edge.disable_origin_pull({BUCKET!r})")
    assert (out, status) == (f"origin_pull of {BUCKET}: on -> off\n", 0)
    assert daemon.request("/ok/after-script.bin").status == 404


@ensure_deferred
async def test_telnet_on_loopback_needs_the_right_password(
    make_admin_daemon: Callable[..., AdminDaemon],
) -> None:
    """
    Telnet on a loopback port asks for a user name and password: a wrong
    password is refused and the connection closed; the right one opens the
    shell, whose changes apply at once.
    """
    daemon = make_admin_daemon("tcp")
    port = manhole_port(daemon, "telnet")
    for user, password in [("alice", "wrong"), ("mallory", PASSWORD), ("alice", "")]:
        screen, _ = await telnet_login(port, user, password)
        await screen.expect("Authentication failed")
        await closed(screen)
        assert ">>> " not in screen.text
    daemon.wait_for_log("manhole telnet login refused for 'mallory' from 127.0.0.1")

    screen, proto = await telnet_login(port, "alice", PASSWORD)
    await screen.expect(">>> ")
    assert "cosedge manhole (telnet:alice@127.0.0.1)" in screen.text
    shell = Shell(screen, _send(proto), b"\r\n")
    out = await shell.run(f"edge.disable_origin_pull({BUCKET!r})")
    assert f"origin_pull of {BUCKET}: on -> off" in out
    assert daemon.request("/off.jpg").status == 404
    daemon.wait_for_log(rf"audit: origin_pull of {BUCKET}: on -> off via telnet:alice@127\.0\.0\.1")
    proto.transport.loseConnection()  # type: ignore[union-attr]


@ensure_deferred
async def test_telnet_on_a_unix_socket_is_private_to_the_daemon_user(
    make_admin_daemon: Callable[..., AdminDaemon],
) -> None:
    """The telnet UNIX socket is created with mode 0600 and opens the shell without a password."""
    daemon = make_admin_daemon("unix")
    path = daemon.root / "manhole.sock"
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    screen, proto = await telnet_connect(UNIXClientEndpoint(reactor, str(path)))
    await screen.expect(">>> ")
    shell = Shell(screen, _send(proto), b"\r\n")
    out = await shell.run("edge.add_bucket('new-1250000000', origin='10.10.10.10:8080', origin_pull=True)")
    assert "bucket new-1250000000 added: origin=10.10.10.10:8080 origin_pull=on" in out
    reply = daemon.request("/a.jpg", host="new-1250000000.file.myqcloud.com")
    assert reply.header("Location") == "http://10.10.10.10:8080/a.jpg"
    proto.transport.loseConnection()  # type: ignore[union-attr]


def test_sighup_rejects_a_broken_file_and_applies_a_good_one(
    make_admin_daemon: Callable[..., AdminDaemon],
) -> None:
    """
    SIGHUP with a broken file logs the rejection and the running
    configuration stays (the daemon keeps serving); SIGHUP with a good file
    applies it to the next request.
    """
    daemon = make_admin_daemon()
    assert daemon.proc is not None
    good = daemon.config_path.read_text()
    daemon.config_path.write_text(good.replace("origin_pull = true", "origin_pull = maybe"))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_for_log("reload via sighup rejected, keeping the running configuration: .*not valid TOML")
    assert daemon.proc.poll() is None
    assert daemon.request("/k1.jpg").status == 302

    daemon.config_path.write_text(good.replace(f'origin = "{daemon.origin}"', 'origin = "http://x"'))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_for_log("reload via sighup rejected.*has a scheme")
    assert daemon.request("/k2.jpg").status == 302

    daemon.config_path.write_text(good.replace("origin_pull = true", "origin_pull = false"))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_for_log(r"configuration reloaded from .* via sighup: 1 change\(s\)")
    assert daemon.request("/k3.jpg").status == 404
    daemon.wait_for_log(rf"audit: origin_pull of {BUCKET}: on -> off via sighup")


@pytest.mark.parametrize(
    ("section", "words"),
    [
        ('telnet = "tcp:{port}"\ntelnet_passwords = "{pw}"', "refusing to listen for telnet on all interfaces"),
        ('telnet = "tcp:{port}:interface=0.0.0.0"\ntelnet_passwords = "{pw}"', "interface '0.0.0.0'"),
        ('telnet = "tcp:{port}:interface=127.0.0.1"', "telnet on TCP needs telnet_passwords"),
    ],
)
def test_the_daemon_refuses_to_start_with_an_unsafe_telnet(
    tmp_path: Path, credentials: Credentials, section: str, words: str
) -> None:
    """twistd exits non-zero with one clear message instead of exposing telnet on the network."""
    config = tmp_path / "cosedge.toml"
    config.write_text(
        f'[server]\nlisten = ["tcp:{free_port()}:interface=127.0.0.1"]\ndata_dir = "{tmp_path / "data"}"\n'
        "[manhole]\n" + section.format(port=free_port(), pw=credentials.passwords) + "\n"
    )
    output = refused_start(config)  # exits non-zero, no traceback
    assert "configuration error: [manhole] telnet" in output and words in output
