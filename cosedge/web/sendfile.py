"""
Large objects sent with ``sendfile(2)``: the kernel copies file pages straight
to the socket, so a big object costs neither a read into Python nor a copy
through the transport's buffer, and memory stays flat whatever the size.

Twisted's TCP transport buffers what it is given and reports when that buffer
is flushed only to a producer it has paused.  :class:`SendfileProducer` uses
exactly that: it writes the response headers and a *primer* — the next bytes
of the object, one more than the transport's ``bufferSize`` — through the
ordinary request, which makes the transport pause it; when the transport has
flushed everything it resumes it, and only then, with the transport's buffer
empty, does the producer ``sendfile`` on the socket until the kernel says
``EAGAIN``.  Then it primes again.  Bytes therefore reach the socket in order,
through public interfaces only; a primer costs one small copy per socket
buffer's worth of data.  Like nginx's ``tcp_nopush``, the socket is corked
(``TCP_CORK``, where there is one) while the body is sent, so the headers, the
primers and the file's pages leave in full-sized segments; it is uncorked
before the response finishes.

Only plain TCP connections qualify (not TLS, not HTTP/2), only one byte range
(a whole object or a single range), only objects with a real descriptor, and
only from :data:`SENDFILE_MIN` bytes: small objects stay on the plain path,
where a ``read`` and a ``write`` are cheaper than the extra round through the
reactor.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.logger import Logger
from twisted.web.server import Request
from zope.interface import implementer

from ..interfaces import IStoredObject
from ..stats import Stats

__all__ = ["SENDFILE_MIN", "SendfileProducer", "sendfile_producer"]

_log = Logger(namespace="cosedge.web")

#: Bodies shorter than this go on the plain read-and-write path.
SENDFILE_MIN = 1024 * 1024
#: At most this many bytes are sent in one turn of the reactor, so one fast
#: client cannot keep the others waiting.
_TURN = 8 * 1024 * 1024
#: The transport's buffer size when it does not say (Twisted's default).
_DEFAULT_BUFFER = 64 * 1024
_TCP_CORK: int | None = getattr(socket, "TCP_CORK", None)  # Linux
_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF, errno.ESHUTDOWN)


def _socket_fd(request: Request) -> int | None:
    """The descriptor of a plain TCP connection, or None when there is none."""
    transport: Any = getattr(getattr(request, "channel", None), "transport", None)
    if transport is None or ISSLTransport.providedBy(transport) or getattr(transport, "TLS", False):
        return None
    # The channel must be the transport's streaming producer: the transport's
    # pause and resume are how this module learns that its buffer is empty.
    if getattr(transport, "producer", None) is None or not getattr(transport, "streamingProducer", False):
        return None
    fileno = getattr(transport, "fileno", None)
    if fileno is None:
        return None
    try:
        fd = fileno()
    except Exception:
        return None
    return fd if isinstance(fd, int) and fd >= 0 else None


def sendfile_producer(
    request: Request, obj: IStoredObject, parts: list[tuple[bytes, int, int]], trailer: bytes, stats: Stats
) -> SendfileProducer | None:
    """
    A :class:`SendfileProducer` for this response, or None when it should
    take the plain path: several ranges, a multipart prefix or trailer, a
    body shorter than :data:`SENDFILE_MIN`, an object without a descriptor,
    or a connection that is not plain TCP.
    """
    if len(parts) != 1 or trailer:
        return None
    prefix, start, end = parts[0]
    if prefix or end - start < SENDFILE_MIN:
        return None
    file_fd = obj.fileno()
    if file_fd is None:
        return None
    sock_fd = _socket_fd(request)
    if sock_fd is None:
        return None
    return SendfileProducer(request, obj, start, end, stats, file_fd, sock_fd)


@implementer(IPushProducer)
class SendfileProducer:
    """
    Sends bytes ``[start, end)`` of an open object on the request's
    connection with ``sendfile``.  Never sends more than that; if the file
    turns out shorter, the connection is dropped so the client cannot take a
    short body for a whole one.  Owns ``obj`` and closes it when done.
    """

    def __init__(
        self, request: Request, obj: IStoredObject, start: int, end: int, stats: Stats, file_fd: int, sock_fd: int
    ) -> None:
        self._request: Request | None = request
        self._obj = obj
        self._offset = start
        self._end = end
        self._stats = stats
        self._file_fd = file_fd
        self._sock_fd = sock_fd
        transport: Any = request.channel.transport  # type: ignore[union-attr]
        buffer = getattr(transport, "bufferSize", _DEFAULT_BUFFER)
        self._primer = (buffer if isinstance(buffer, int) and buffer > 0 else _DEFAULT_BUFFER) + 1
        #: True from the transport's pause until its resume: its buffer is
        #: not empty, so nothing may go to the socket directly.
        self._paused = False
        get_handle = getattr(transport, "getHandle", None)
        handle = get_handle() if get_handle is not None else None
        self._socket: socket.socket | None = handle if isinstance(handle, socket.socket) else None
        self._corked = False
        self.sent_by_sendfile = 0

    def start(self) -> None:
        """Send the headers and the first primer; the rest follows on resume."""
        request = self._request
        assert request is not None
        request.notifyFinish().addErrback(lambda _: self.stopProducing())
        request.registerProducer(self, True)
        self._cork(True)
        self._prime()

    # -- IPushProducer --

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        if self._request is None or not self._paused:
            return
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        if self._request is not None:
            self._request = None
            self._obj.close()
            self._cork(False)

    # -- internals --

    def _prime(self) -> None:
        """
        Write the next bytes through the request: the whole rest when it is
        small, else a primer that fills the transport's buffer past its limit,
        so the transport pauses this producer and resumes it once flushed.
        """
        request = self._request
        if request is None:
            return
        want = min(self._primer, self._end - self._offset)
        data = os.pread(self._file_fd, want, self._offset) if want else b""
        if len(data) < want:
            self._shrank(request)
            return
        self._offset += len(data)
        self._stats.inc("bytes_served", len(data))
        # The write may pause this producer (synchronously) or even end the
        # connection; the request is looked at again afterwards.
        request.write(data)
        if self._request is None:
            return
        if self._offset >= self._end:
            self._finish(self._request)
        elif not self._paused:
            # Without the transport's pause there is no telling when its
            # buffer is empty; never write around it.
            _log.warn("transport did not pause for the sendfile primer; dropping the connection")
            self._abort(self._request)

    def _pump(self) -> None:
        """The transport's buffer is empty: sendfile until EAGAIN, the end, or one turn's worth."""
        request = self._request
        if request is None:
            return
        budget = _TURN
        while self._offset < self._end and budget > 0:
            count = min(self._end - self._offset, budget)
            try:
                sent = os.sendfile(self._sock_fd, self._file_fd, self._offset, count)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno in _GONE:
                    self._gone(request)
                else:
                    _log.warn("sendfile failed: {error}; dropping the connection", error=e)
                    self._abort(request)
                return
            if sent == 0:
                self._shrank(request)
                return
            self._offset += sent
            self.sent_by_sendfile += sent
            request.sentLength += sent  # for the access log
            self._stats.inc("bytes_served", sent)
            budget -= sent
        if self._offset >= self._end:
            self._finish(request)
        else:
            self._prime()

    def _cork(self, on: bool) -> None:
        """Cork or uncork the socket (best effort: not every socket has TCP_CORK)."""
        if _TCP_CORK is None or self._socket is None or self._corked == on:
            return
        try:
            self._socket.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, int(on))
        except OSError:
            return
        self._corked = on

    def _finish(self, request: Request) -> None:
        self._request = None
        self._obj.close()
        self._cork(False)  # push out the last partial segment now
        request.unregisterProducer()
        request.finish()

    def _shrank(self, request: Request) -> None:
        _log.warn("object shrank while being served; dropping the connection")
        self._abort(request)

    def _gone(self, request: Request) -> None:
        """The client went away; the transport will notice and clean up."""
        self._abort(request)

    def _abort(self, request: Request) -> None:
        self._request = None
        self._obj.close()
        request.unregisterProducer()
        request.channel.transport.abortConnection()  # type: ignore[union-attr]
