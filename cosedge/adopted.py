"""
The bucket listeners' endpoints: an ``ssl:`` entry of ``[server] listen``
as a TCP port with a TLS wrapper that passes a refused connection on
(:class:`RefusingTLSFactory`), and a worker's listening sockets, handed to it
by the primary (:mod:`cosedge.workers`), adopted as plain TCP, UNIX or — for
an ``ssl:`` listener, whose one socket every process accepts on — TLS, with
the listener's own certificate and settings.
"""

from __future__ import annotations

import os
import socket
import stat
from typing import Any

from twisted.internet import tcp, unix
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, serverFromString
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["AdoptedEndpoint", "RefusingTLSFactory", "adopted_endpoints", "bucket_endpoint"]


class RefusingTLSFactory(TLSMemoryBIOFactory):
    """
    Twisted's TLS wrapper, except that a connection the wrapped factory
    refuses (``buildProtocol`` gives None: ``max_connections`` reached) is
    closed at once, as on plain TCP.  Twisted's would wrap the None, finish
    the TLS handshake and then fail on it, once per refused connection.
    """

    def buildProtocol(self, addr: Any) -> Any:
        wrapped = self.wrappedFactory.buildProtocol(addr)
        return None if wrapped is None else self.protocol(self, wrapped)


@implementer(IStreamServerEndpoint)
class _TLSEndpoint:
    """An ``ssl:`` listener: its TCP port, with :class:`RefusingTLSFactory` around the factory."""

    def __init__(self, tcp: IStreamServerEndpoint, tls: IOpenSSLServerConnectionCreator) -> None:
        self.tcp = tcp
        self.tls = tls

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self.tcp.listen(RefusingTLSFactory(self.tls, False, factory))


def bucket_endpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    """
    The endpoint of a ``[server] listen`` entry: Twisted's, but an ``ssl:``
    one is its TCP port with :class:`RefusingTLSFactory` (the same address,
    backlog and TLS settings its string names).
    """
    if _is_ssl(description):
        return _ssl_endpoint(reactor, description)
    endpoint: IStreamServerEndpoint = serverFromString(reactor, description)
    return endpoint


def _is_ssl(description: str) -> bool:
    return description.partition(":")[0] == "ssl"


def _ssl_endpoint(reactor: Any, description: str) -> _TLSEndpoint:
    """An ``ssl:`` string's TCP port (address, backlog) and TLS settings, as Twisted's parser reads them."""
    endpoint: Any = serverFromString(reactor, description)
    tcp = TCP4ServerEndpoint(reactor, endpoint._port, endpoint._backlog, endpoint._interface)
    return _TLSEndpoint(tcp, endpoint._sslContextFactory)


def adopted_endpoints(reactor: Any, listen: tuple[str, ...], listeners: list[tuple[int, int]]) -> list[AdoptedEndpoint]:
    """
    An endpoint for each ``(descriptor, family)`` a worker was given, in the
    order of ``[server] listen`` (``listen``); an ``ssl:`` one gets its TLS
    settings from its endpoint string, as the primary's listener did.
    """
    return [
        AdoptedEndpoint(reactor, fd, family, tls_of(reactor, description))
        for (fd, family), description in zip(listeners, listen, strict=True)
    ]


def tls_of(reactor: Any, description: str) -> IOpenSSLServerConnectionCreator | None:
    """The TLS context factory of an ``ssl:`` endpoint string (Twisted's parser's), or None for any other kind."""
    if not _is_ssl(description):
        return None  # not parsed: a worker cannot parse a systemd: one (its LISTEN_FDS are the primary's)
    tls: IOpenSSLServerConnectionCreator = _ssl_endpoint(reactor, description).tls
    return tls


@implementer(IStreamServerEndpoint)
class AdoptedEndpoint:
    """
    A listening socket a worker was given (descriptor ``fd``), served with
    TLS when ``tls`` is the context factory of the ``ssl:`` listener it is.
    """

    def __init__(self, reactor: Any, fd: int, family: int, tls: IOpenSSLServerConnectionCreator | None = None) -> None:
        self.reactor = reactor
        self.fd = fd
        self.family = family
        self.tls = tls

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        if self.tls is not None:  # what reactor.listenSSL does with a port it binds
            factory = RefusingTLSFactory(self.tls, False, factory)
        try:
            port: IListeningPort
            if self.family == socket.AF_UNIX:
                port = _SharedUNIXPort.adopt(self.reactor, self.fd, factory)
            else:
                port = self.reactor.adoptStreamPort(self.fd, self.family, factory)
        except Exception:
            return fail()
        finally:
            os.close(self.fd)  # adopted as a duplicate
        return succeed(port)


class _SharedUNIXPort(unix.Port):
    """
    A UNIX listening socket whose path belongs to the primary.  Twisted's
    port treats a socket it adopts as its own: it sets the path's mode (to
    0666 unless told otherwise) when it starts and removes the path when it
    stops, which would open the socket to everyone and, at a worker's stop,
    take it away from every process; and its close shuts the socket down
    (``shutdown(2)``), which stops every process's accepts on it.  This one
    keeps the mode the path has, leaves the path alone and only closes its
    own descriptor, as Twisted's TCP port does with an adopted socket.
    """

    _shouldShutdown = False

    @classmethod
    def adopt(cls, reactor: Any, fd: int, factory: IProtocolFactory) -> _SharedUNIXPort:
        port: _SharedUNIXPort = cls._fromListeningDescriptor(reactor, fd, factory)
        path = port._bindPath
        if path and path[:1] not in ("\0", b"\0"):  # abstract names have no mode
            port.mode = stat.S_IMODE(os.stat(path).st_mode)  # so the start's chmod changes nothing
        port.startListening()
        return port

    def connectionLost(self, reason: Failure) -> None:
        tcp.Port.connectionLost(self, reason)  # without unix.Port's unlink of the path
