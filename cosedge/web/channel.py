"""
The bucket listener's HTTP layer: a channel with a deadline for each
request's headers, a send timeout and a refusal of request bodies, a request
class that does less per request, and the site that caps its connections,
counts statuses and writes the access log.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, HTTPChannel, datetimeToString
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from ..stats import Stats
from .errors import error_body
from .quick import QuickGet, QuickRecord, parse_quick_get

__all__ = ["EdgeSite"]

_log = Logger(namespace="cosedge.web")

#: Larger request bodies (or chunked ones) are refused with 413.
_MAX_REQUEST_BODY = 64 * 1024
_SERVER = b"cosedge"
#: Looks per ``send_timeout`` at a client that reads slowly (see :class:`_EdgeChannel`).
_SEND_LOOKS = 4


class _EdgeChannel(HTTPChannel):
    """
    An HTTP/1.1 channel with a deadline for each request's headers and a
    send timeout.

    Twisted's idle timeout restarts on every byte, so a client trickling its
    headers one byte at a time would hold a connection for ever.  Here the
    headers of each request must be complete within ``header_deadline``
    seconds of the connection opening or of the previous response ending.

    That deadline replaces Twisted's idle timeout (which :class:`EdgeSite`
    turns off): wherever the idle timer runs, the deadline is armed too and
    fires no later, and while a response is being produced both are off.
    One timer is kept per connection and moved by ``reset`` for each request
    (cheap for a later time), not cancelled and made again: the headers
    having arrived only marks it paused, and if it fires while paused it
    does nothing and is made again at the end of that response.

    The same timer is the send timeout (nginx's ``send_timeout``).  The
    channel is the transport's streaming producer: the transport pauses it
    when its buffer is full (the client is not reading) and resumes it once
    the buffer is flushed.  Each pause moves the timer to a quarter of
    ``send_timeout`` from then; while the transport stays paused it looks
    every quarter whether any buffered byte has gone, and after four looks
    in a row with none the connection is aborted (a close would wait for a
    buffer the client never empties).  A client is therefore cut off between
    ``send_timeout`` and 1.25 times that after it last took a byte (exactly
    ``send_timeout`` after the pause if it took none), and a slow but steady
    reader never.
    This also covers the tail of a finished response still waiting in the
    buffer: until it is flushed the send timeout applies, then the next
    request's header deadline.
    """

    header_deadline: float = 60.0
    send_timeout: float = 60.0
    _deadline: IDelayedCall | None = None
    #: Headers are complete and the response is not done: the deadline does not apply.
    _paused = False
    #: The transport has paused this channel (its buffer is full): the send timeout applies.
    _stalled = False
    #: Bytes the transport held unsent when the send timeout was last (re)started.
    _unsent_then: int | None = None
    #: Looks left, a quarter of ``send_timeout`` apart, before a client that took no byte is cut off.
    _looks_left = 0
    _lost = False
    _counted = False
    _refused = False
    _host: IAddress | None = None
    _peer: IAddress | None = None
    #: Twisted's parser holds (or may hold) part of this connection's bytes: no quick path until it is done.
    _fed = False
    #: The connection is TLS (asked once, by the quick path).
    _secure: bool | None = None

    def getHost(self) -> IAddress:
        """The local address, asked of the transport once: every request reads it, and it never changes."""
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def getPeer(self) -> IAddress:
        """The client's address, asked of the transport once."""
        if self._peer is None:
            self._peer = super().getPeer()
        return self._peer

    def connectionMade(self) -> None:
        site: EdgeSite | None = getattr(self, "site", None)
        if site is not None:
            site.connections += 1
            self._counted = True
        super().connectionMade()
        self._arm()

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        """
        Twisted's, writing the same bytes, but as one piece: the transport
        checks and buffers each piece of a sequence (some forty here).
        """
        if not isinstance(headers, Headers):
            super().writeHeaders(version, code, reason, headers)
            return
        head = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                head += (name, b": ", value, b"\r\n")
        head.append(b"\r\n")
        self.transport.write(b"".join(head))  # type: ignore[union-attr]

    def allHeadersReceived(self) -> None:
        # GET and HEAD carry no body worth reading, and Twisted would spool a
        # large one to a temporary file: refuse before reading any of it.
        if self.length is None or self.length > _MAX_REQUEST_BODY:
            self._refuse(b"413 Payload Too Large", "EntityTooLarge", "Request bodies are not accepted here.")
            return
        super().allHeadersReceived()

    def lineLengthExceeded(self, line: bytes) -> None:
        """A request line or header line over ``MAX_LENGTH`` (16 KiB): a COS error, not a silent close."""
        self._refuse(
            b"400 Bad Request", "RequestHeaderSectionTooLarge", "The request's headers exceed the maximum allowed size."
        )

    def _respondToBadRequestAndDisconnect(self) -> None:
        """
        Twisted's answer to a request it cannot parse (a bad request line or
        version, Content-Length with Transfer-Encoding, a duplicate or bad
        Content-Length, headers over 16 KiB in all or over 500 of them),
        made a COS error with a request id instead of a bare 400.
        """
        self._refuse(b"400 Bad Request", "InvalidRequest", "The request could not be parsed as HTTP/1.1.")

    def _refuse(self, status: bytes, code: str, message: str) -> None:
        """
        Answer with a COS error and close, reading nothing more.  The
        deadline stays armed: it closes (and in the end aborts) a client
        that does not read the answer or close.
        """
        if self._refused:
            return
        self._refused = True
        request_id = os.urandom(6).hex()
        body = error_body(code, message, request_id)
        self.transport.write(  # type: ignore[union-attr]
            b"HTTP/1.1 %s\r\nConnection: close\r\nServer: %s\r\nx-cos-request-id: %s\r\n"
            b"Content-Type: application/xml\r\nContent-Length: %d\r\n\r\n%s"
            % (status, _SERVER, request_id.encode(), len(body), body)
        )
        self.loseConnection()

    def allContentReceived(self) -> None:
        self._paused = True  # the deadline covers a (small) body too
        super().allContentReceived()

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        # The quick path (cosedge.web.quick) while Twisted's parser holds
        # nothing of this connection: no request, no partial line.
        if not self._fed:
            site: EdgeSite = self.site  # type: ignore[attr-defined]
            quick_answer = site.quick_answer
            get = parse_quick_get(data) if quick_answer is not None else None
            if get is not None:
                if self._secure is None:
                    self._secure = self.isSecure()
                answer = quick_answer(get, self._secure)  # type: ignore[misc]
                if answer is not None:
                    self._quick_answer(site, get, *answer)
                    return
            self._fed = True
        super().dataReceived(data)

    def _quick_answer(
        self, site: EdgeSite, get: QuickGet, status: int, request_id: bytes, head: bytes, body: bytes
    ) -> None:
        """Write a quick GET's answer: what Twisted would write for it, counted and logged as Twisted's is."""
        self.transport.write(  # type: ignore[union-attr]
            b"HTTP/1.1 %d %s\r\nServer: %s\r\nDate: %s\r\nX-Cos-Request-Id: %s\r\n%s%s"
            % (status, RESPONSES[status], _SERVER, site.http_date(), request_id, head, body)
        )
        site.log_quick(get, self.getPeer(), status, len(body))
        self._arm()

    def requestDone(self, request: Request) -> None:
        # Armed before the channel parses any pipelined request it buffered,
        # whose complete headers then disarm it again.
        if self.persistent:
            self._arm()
        super().requestDone(request)
        if not self.requests and self.persistent:
            # Nothing more in Twisted's parser but, perhaps, the start of a
            # request line: the next request may take the quick path if not.
            rest = self.clearLineBuffer()
            if rest:
                super().dataReceived(rest)
            else:
                self._fed = False

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        if self._counted:
            self._counted = False
            self.site.connections -= 1  # type: ignore[attr-defined]
        self._disarm()
        super().connectionLost(reason)

    def pauseProducing(self) -> None:
        """The transport's buffer is full: the send timeout starts (or starts again) now."""
        super().pauseProducing()
        if self._lost:
            return
        self._stalled = True
        self._unsent_then = self._unsent()
        self._looks_left = _SEND_LOOKS
        self._set_timer(self.send_timeout / _SEND_LOOKS)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """
        A producer registered while the transport is full starts paused:
        ``HTTPChannel`` does not pause it, and would later resume a producer
        that was never paused (a pull producer's adapter then raises
        ``NotPaused`` inside the transport).  It happens when a response's
        producer comes while the previous one's bytes are still queued (a
        mirror answer going on from the store).
        """
        super().registerProducer(producer, streaming)
        if self._waitingForTransport and self._requestProducer is not None:
            self._requestProducer.pauseProducing()

    def resumeProducing(self) -> None:
        """
        The transport's buffer is flushed: the client is reading.  Between
        responses that starts the next request's header deadline.
        """
        self._stalled = False
        super().resumeProducing()
        if not self._paused and not self._lost and self.persistent and not self._refused:
            self._arm()

    def _unsent(self) -> int | None:
        """Bytes the transport still holds (Twisted's TCP transport), or None when it does not say."""
        transport: Any = self.transport
        buffered = getattr(transport, "dataBuffer", None)
        if not isinstance(buffered, bytes):
            return None
        return len(buffered) - getattr(transport, "offset", 0) + getattr(transport, "_tempDataLen", 0)

    def _arm(self) -> None:
        """Start the headers' deadline from now (once the transport is no longer paused)."""
        self._paused = False
        if self._stalled:  # the send timeout runs; resumeProducing arms this
            return
        self._set_timer(self.header_deadline)

    def _set_timer(self, seconds: float) -> None:
        deadline = self._deadline
        if deadline is not None and deadline.active():
            deadline.reset(seconds)
        else:
            self._deadline = self.callLater(seconds, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self._stalled:
            self._send_timed_out()
            return
        if self._paused:  # a response is under way; the next _arm starts a new deadline
            return
        # Twisted's own timeout path: close, and abort a client that lingers.
        self.timeoutConnection()

    def _send_timed_out(self) -> None:
        """
        A look at a paused transport: abort when no byte has gone for
        ``send_timeout`` (four looks in a row), else look again.
        """
        unsent = self._unsent()
        if unsent is not None and self._unsent_then is not None and unsent < self._unsent_then:
            self._unsent_then = unsent
            self._looks_left = _SEND_LOOKS  # counted again from this look
        else:
            self._looks_left -= 1
        if self._looks_left > 0:
            self._set_timer(self.send_timeout / _SEND_LOOKS)
            return
        _log.warn(
            "send timeout: {peer} read nothing for {timeout}s; closing the connection",
            peer=_address(self.getPeer()),
            timeout=self.send_timeout,
        )
        self.transport.abortConnection()  # type: ignore[union-attr]

    def timeoutConnection(self) -> None:
        self._disarm()  # whichever timer fired first, the connection closes once
        super().timeoutConnection()


def _address(address: IAddress | None) -> str:
    """``host:port`` of a TCP address; anything else as Twisted prints it."""
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    return f"{host}:{port}" if host is not None and port is not None else str(address)


class _EdgeRequest(Request):
    """
    A request to the bucket listener: Twisted's ``server.Request`` but for
    :meth:`process`, which does less per request.
    """

    def process(self) -> None:
        """
        Render the site's one leaf resource.  Unlike Twisted's: Server is set
        once, to ours; Date is formatted once a second; there is no resource
        traversal (so ``prepath`` is empty and ``postpath`` is not computed);
        and the ``*`` target (``OPTIONS *``, ``GET *``) reaches the resource,
        which answers it with its own error rather than Twisted's page.
        """
        site: EdgeSite = self.channel.site  # type: ignore[attr-defined]
        self.site = site
        headers = self.responseHeaders  # what setHeader sets, one call less on every request
        headers.setRawHeaders(b"server", [_SERVER])
        headers.setRawHeaders(b"date", [site.http_date()])
        self.prepath = []
        self.sitepath: list[bytes] = []
        try:
            self.render(site.resource)
        except BaseException:
            self.processingFailed(Failure())

    def connectionLost(self, reason: Failure) -> None:
        """
        The client went away.  A response it had begun to receive is logged
        as nginx does, with its status and the bytes handed to the
        connection so far (``sentLength``), since ``finish`` (which logs a
        whole one) will not come.
        """
        if self.startedWriting and not self.finished:
            site: EdgeSite | None = getattr(self, "site", None)
            if site is not None:
                site.log(self)
        super().connectionLost(reason)


class EdgeSite(Site):
    """
    The bucket listener's factory: serves one leaf resource with
    :class:`_EdgeRequest`, counts responses by status and writes the access
    log in combined log format to standard output, a file, or nowhere.

    ``timeout`` is each request's header deadline, ``send_timeout`` how long
    a response may make no progress (see :class:`_EdgeChannel`).  With
    ``max_connections`` client connections open (0: no limit), a new one is
    closed as soon as it is accepted, so that clients that hold connections
    cannot take every descriptor of the process: the ones already open,
    keep-alive ones too, go on being served.  Refusals are logged at most
    once every :attr:`refusal_log_interval` seconds, with their number.
    """

    displayTracebacks = False
    requestFactory = _EdgeRequest
    refusal_log_interval = 5.0

    def __init__(
        self,
        resource: Resource,
        stats: Stats,
        access_log: str,
        reactor: IReactorTime,
        timeout: float,
        *,
        send_timeout: float = 60.0,
        max_connections: int = 0,
    ) -> None:
        if not resource.isLeaf:
            raise TypeError("EdgeSite serves one leaf resource; it does no traversal")
        super().__init__(resource, timeout=timeout, reactor=reactor)
        self._stats = stats
        self._access_log = access_log
        #: The resource's answer to a quick GET (:mod:`cosedge.web.quick`), if it gives them.
        quick = getattr(resource, "quick", None)
        self.quick_answer: Callable[[QuickGet, bool], tuple[int, bytes, bytes, bytes] | None] | None = (
            None if quick is None else quick.answer
        )
        self._date_second = -1
        self._date = b""
        self.send_timeout = send_timeout
        self.max_connections = max_connections
        #: Client connections open now (counted by the channels).
        self.connections = 0
        #: Connections refused since the last line about it, and the timer that writes the next one.
        self._refused_count = 0
        self._refusal_log: IDelayedCall | None = None

    def http_date(self) -> bytes:
        """The current time for a Date header, from the reactor's clock, formatted once a second."""
        second = int(self.reactor.seconds())
        if second != self._date_second:
            self._date = datetimeToString(second)
            self._date_second = second
        return self._date

    def protocol(self) -> _EdgeChannel:  # type: ignore[override]
        """Build this site's channels, with the header deadline and send timeout set."""
        channel = _EdgeChannel()
        channel.header_deadline = self.timeOut or _EdgeChannel.header_deadline
        channel.send_timeout = self.send_timeout
        return channel

    def buildProtocol(self, addr: IAddress) -> _EdgeChannel | None:  # type: ignore[override]
        """
        A channel whose header deadline stands in for Twisted's idle timeout
        (off: one timer, not two); or None, which makes Twisted close the new
        connection at once, when ``max_connections`` are open.
        """
        if self.max_connections and self.connections >= self.max_connections:
            self._refuse_connection(addr)
            return None
        channel: _EdgeChannel = super().buildProtocol(addr)  # type: ignore[assignment]
        channel.timeOut = None
        return channel

    def _refuse_connection(self, addr: IAddress) -> None:
        """Count a refused connection; the first of a while is logged at once, the rest by :meth:`_log_refusals`."""
        if self._refusal_log is None:
            _log.warn(
                "max_connections ({limit}) reached: refusing new connections (first from {peer})",
                limit=self.max_connections,
                peer=_address(addr),
            )
            self._refusal_log = self.reactor.callLater(self.refusal_log_interval, self._log_refusals)
        else:
            self._refused_count += 1

    def _log_refusals(self) -> None:
        """One line for the connections refused in the last interval, if any; then wait for the next."""
        refused, self._refused_count = self._refused_count, 0
        if not refused:
            self._refusal_log = None
            return
        _log.warn(
            "max_connections ({limit}) reached: refused {count} more connections in {interval}s",
            limit=self.max_connections,
            count=refused,
            interval=self.refusal_log_interval,
        )
        self._refusal_log = self.reactor.callLater(self.refusal_log_interval, self._log_refusals)

    def stopFactory(self) -> None:
        if self._refusal_log is not None and self._refusal_log.active():
            self._refusal_log.cancel()
        self._refusal_log = None
        super().stopFactory()

    def startFactory(self) -> None:
        super().startFactory()
        if self._access_log == "-":
            self._logFile = open(os.dup(1), "w", 1, encoding="utf-8", newline="\n")
        elif self._access_log:
            self._logFile = self._openLogFile(os.path.abspath(self._access_log))
        else:
            self._logFile = None

    def log(self, request: Any) -> None:
        self._stats.statuses[request.code] += 1
        super().log(request)

    def log_quick(self, get: QuickGet, peer: IAddress, status: int, sent: int) -> None:
        """Count and log a quick GET's answer as :meth:`log` does a request's (a line only when the log is on)."""
        self._stats.statuses[status] += 1
        if self._logFile is not None:
            super().log(QuickRecord(get, peer, status, sent))  # type: ignore[arg-type]

    def _openLogFile(self, path: str) -> Any:  # type: ignore[override]
        """
        The access-log file, in append mode, written a line at a time: the
        lines of several processes (``workers``) never overwrite or split
        each other.  Rotation is logrotate's, with a SIGHUP to reopen; not
        the 1 MB self-rotation of Twisted's ``LogFile`` that ``Site`` uses,
        which several processes would each do on their own.
        """
        return open(path, "a", 1, encoding="utf-8", newline="\n")

    def reopen_access_log(self) -> None:
        """
        Open the access-log file by its name again, so that lines go to a new
        file once logrotate has moved the old one away (``-`` and off are
        left as they are).  If it cannot be opened, logging goes on to the
        old file and a warning says why.
        """
        if not self._access_log or self._access_log == "-" or self._logFile is None:
            return
        try:
            new = self._openLogFile(os.path.abspath(self._access_log))
        except OSError as e:
            _log.warn("access log {path} not reopened: {error}", path=self._access_log, error=e)
            return
        old, self._logFile = self._logFile, new
        old.close()
