"""
Several edges over one store: the ``[cluster]`` section.

Each key has one owner among ``peers``, chosen by rendezvous hashing (the
highest ``hash(peer, bucket/key)`` wins), so every edge agrees on it without
talking, and a change of membership moves only the keys of the peers that
came or went.  An edge that misses a key it does not own answers its client
as the rule says and asks the owner to copy the object, over an internal
request signed with the cluster's shared secret; the owner's single flight
then makes one origin GET of all the edges' misses.  An owner that does not
take the fill within ``owner_timeout`` (down, overloaded, unreachable) is
passed over: the edge fills the key itself, and the store's
``If-None-Match: *`` keeps a duplicate copy harmless.

Background copies (proxy rules) are handed over.  A mirror answer is
streamed to its client by the edge that has it, but a non-owner reads it
from the owner (:meth:`Cluster.parent_source`): a ``GET`` of the client's
own URI on the owner's bucket listener, with the client's Host and scheme
(``x-cosedge-scheme``) and an ``x-cosedge-cluster`` signature over the time,
the method, the URI, the Host, the scheme and the owner's URL
(:func:`sign_read`); the owner checks it and that it owns the key, and
answers it as a mirror miss of its own (or a hit), so every edge's clients
share the owner's one origin GET.  An owner that cannot answer (refused,
timed out, 5xx; or 403, a redirect) is passed over for the origin itself.
Jobs run where they were started.

The internal request is ``POST /<key>`` on the owner's bucket listener with
an ``x-cosedge-cluster: <unix time> <hex HMAC-SHA256>`` header over the time,
the request URI and the body: a JSON object naming the bucket and the
source to copy from.  The secret is as powerful as the configuration (a
peer names the URLs the owner fetches): keep it as private as the file.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, urlsplit

from attrs import evolve, field, frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from .config import Config, ConfigError
from .origins import Source
from .stats import Stats

__all__ = [
    "HEADER",
    "SCHEME_HEADER",
    "Cluster",
    "ClusterConfig",
    "check_config",
    "owner_of",
    "parse_cluster",
    "sign_read",
    "verify_read",
]

_log = Logger(namespace="cosedge.cluster")

#: The request header that carries the internal request's signature.
HEADER = b"x-cosedge-cluster"
#: A read through the owner: the scheme its client used (``http``/``https``), signed with it.
SCHEME_HEADER = b"x-cosedge-scheme"
#: Seconds an internal request's time may differ from ours (the edges' clocks, and the trip).
MAX_SKEW = 300
#: The smallest secret accepted, in bytes.
MIN_SECRET = 16
_MAX_ASKS = 10_000  # owner requests in flight at once, at most (more: fill here)
#: Client headers a read through the owner does not pass on: those no rule may
#: pass to an origin (hop-by-hop, Host, the encoding, the client's range and
#: conditions: the fill copies the whole object) and the cluster's own.
_NOT_PASSED = frozenset(
    {
        b"host",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"expect",
        b"content-length",
        b"accept-encoding",
        b"range",
        b"if-range",
        b"if-match",
        b"if-none-match",
        b"if-modified-since",
        b"if-unmodified-since",
        HEADER,
        SCHEME_HEADER,
    }
)


def _peer_url(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, not {value!r}")
    parts = urlsplit(value)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("http", "https") or not parts.hostname or not port or parts.path not in ("", "/"):
        raise ConfigError(f"{name} must be an edge's bucket listener as http://host:port, not {value!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(f"{name} must be a plain http://host:port URL, not {value!r}")
    return f"{parts.scheme}://{parts.netloc}"


def _peer_list(value: object) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not value:
        raise ConfigError(f"peers must be a list of the edges' URLs (this one's included), not {value!r}")
    return tuple(_peer_url(p, "peers") for p in value)


def _seconds(instance: object, attribute: Any, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{attribute.name} must be a positive number of seconds, not {value!r}")


def _path(instance: object, attribute: Any, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{attribute.name} must be the path of the cluster's shared secret, not {value!r}")


@frozen
class ClusterConfig:
    """``[cluster]``: the edges sharing one store, and how they trust each other."""

    #: ``self`` in the file: how the other edges reach this one.
    self_url: str
    peers: tuple[str, ...]
    secret_file: str = field(validator=_path)
    #: Seconds the owner has to take a fill before this edge fills the key itself.
    owner_timeout: float = field(default=2.0, validator=_seconds)
    #: The secret, read from ``secret_file`` (at start and on reload).
    secret: bytes = field(init=False, repr=False, default=b"")

    def __attrs_post_init__(self) -> None:
        if self.self_url not in self.peers:
            raise ConfigError(f"peers must include self ({self.self_url}); peers are {', '.join(self.peers)}")
        if len(set(self.peers)) != len(self.peers):
            raise ConfigError("peers must not repeat an edge")
        object.__setattr__(self, "secret", _read_secret(self.secret_file))


def _read_secret(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            secret = f.read(4096).strip()
    except OSError as e:
        raise ConfigError(f"secret_file: cannot read {path}: {e.strerror}") from None
    if len(secret) < MIN_SECRET:
        raise ConfigError(
            f"secret_file: {path} holds {len(secret)} bytes; a secret is at least {MIN_SECRET}"
            " (e.g. head -c 32 /dev/urandom | base64)"
        )
    return secret


_KNOWN = ("self", "peers", "secret_file", "owner_timeout")


def parse_cluster(table: object) -> ClusterConfig:
    """``[cluster]`` as read from TOML; :raises ConfigError: naming the field."""
    if not isinstance(table, Mapping):
        raise ConfigError("[cluster] must be a table")
    unknown = sorted(set(table) - set(_KNOWN))
    if unknown:
        raise ConfigError(f"[cluster] has unknown setting(s) {', '.join(unknown)}; known: {', '.join(_KNOWN)}")
    missing = [name for name in _KNOWN[:3] if name not in table]
    if missing:
        raise ConfigError(f"[cluster] needs {', '.join(missing)}")
    try:
        return ClusterConfig(
            _peer_url(table["self"], "self"),
            _peer_list(table["peers"]),
            table["secret_file"],
            **({"owner_timeout": table["owner_timeout"]} if "owner_timeout" in table else {}),
        )
    except ConfigError as e:
        raise ConfigError(f"[cluster] {e}") from None


def check_config(config: Config) -> ClusterConfig | None:
    """The ``[cluster]`` of ``config`` (None: one edge alone); :raises ConfigError:."""
    table = config.extra.get("cluster")
    return None if table is None else parse_cluster(table)


def owner_of(peers: tuple[str, ...], bucket: str, key: str) -> str:
    """The peer that owns ``bucket/key``: the highest rendezvous score (ties: the first name)."""
    name = f"{bucket}/{key}".encode()

    def score(peer: str) -> tuple[int, str]:
        digest = hashlib.blake2b(peer.encode() + b"\n" + name, digest_size=8).digest()
        return int.from_bytes(digest, "big"), peer

    return max(peers, key=score)


def sign(secret: bytes, when: int, uri: bytes, body: bytes) -> bytes:
    """The internal request's header value: ``<time> <hex HMAC>``."""
    mac = hmac.new(secret, b"%d\n%s\n%s" % (when, uri, body), hashlib.sha256).hexdigest()
    return b"%d %s" % (when, mac.encode("ascii"))


def verify(secret: bytes, header: bytes | None, uri: bytes, body: bytes, now: float) -> str | None:
    """Why an internal request's signature is refused (None: it is good)."""
    if not header:
        return "no signature"
    when, _, mac = header.partition(b" ")
    if not when.isdigit() or not mac:
        return "a malformed signature"
    if abs(now - int(when)) > MAX_SKEW:
        return f"a signature more than {MAX_SKEW}s from our clock"
    if not hmac.compare_digest(sign(secret, int(when), uri, body), header):
        return "a signature that does not match the cluster's secret"
    return None


def _read_body(method: bytes, host: bytes, scheme: bytes, edge: bytes) -> bytes:
    """What a read through the owner signs besides its time and URI: the method, Host, scheme and the edge asked."""
    return b"read\n%s\n%s\n%s\n%s" % (method, host, scheme, edge)


def sign_read(secret: bytes, when: int, uri: bytes, host: bytes, scheme: bytes, edge: bytes) -> bytes:
    """The signature of a GET of ``uri`` (origin-form, exactly as sent) on ``edge``'s bucket listener."""
    return sign(secret, when, uri, _read_body(b"GET", host, scheme, edge))


def verify_read(
    secret: bytes, header: bytes | None, method: bytes, uri: bytes, host: bytes, scheme: bytes, edge: bytes, now: float
) -> str | None:
    """Why a read through this edge (``edge``, its own URL) is refused (None: it is good)."""
    return verify(secret, header, uri, _read_body(method, host, scheme, edge), now)


def source_to_json(bucket: str, source: Source) -> bytes:
    latin = lambda b: b.decode("latin-1")  # noqa: E731
    return json.dumps(
        {
            "bucket": bucket,
            "url": latin(source.url),
            "alternates": [latin(u) for u in source.alternates],
            "headers": [[latin(n), latin(v)] for n, v in source.headers],
            "ca_file": source.ca_file,
            "server_name": None if source.server_name is None else latin(source.server_name),
            "follow_redirects": source.follow_redirects,
            "rule": source.rule,
        },
        separators=(",", ":"),
    ).encode()


def source_from_json(body: bytes) -> tuple[str, Source]:
    """The bucket and source of an internal request; :raises ValueError: when it is not one."""
    data = json.loads(body)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")

    def text(name: str, optional: bool = False) -> Any:
        value = data.get(name)
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string")
        return value

    def url(value: object) -> bytes:
        if not isinstance(value, str) or urlsplit(value).scheme not in ("http", "https"):
            raise ValueError(f"not an http(s) URL: {value!r}")
        return value.encode("latin-1")

    alternates, headers = data.get("alternates", []), data.get("headers", [])
    if not isinstance(alternates, list) or not isinstance(headers, list):
        raise ValueError("alternates and headers must be lists")
    if not all(isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in headers):
        raise ValueError("headers must be [name, value] pairs")
    server_name = text("server_name", optional=True)
    source = Source(
        url(data.get("url")),
        tuple(url(u) for u in alternates),
        tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in headers),
        ca_file=text("ca_file", optional=True),
        server_name=None if server_name is None else server_name.encode("latin-1"),
        follow_redirects=data.get("follow_redirects") is True,
        rule=text("rule"),
    )
    return text("bucket"), source


class Cluster:
    """
    This edge's view of the cluster: which keys it owns, and the handing over
    of the others' fills.  ``config`` is called for the running
    :class:`Config`: a reload that changes ``[cluster]`` applies to the next miss.
    """

    def __init__(self, config: Callable[[], Config], agent: IAgent, clock: IReactorTime, stats: Stats) -> None:
        self._config = config
        self._agent = agent
        self._clock = clock
        self._stats = stats
        self._parsed: tuple[object, ClusterConfig | None] = (None, None)
        #: Keys whose owner is being asked right now (one request per key from this edge).
        self._asking: dict[tuple[str, tuple[str, ...]], Deferred[bool]] = {}

    def settings(self) -> ClusterConfig | None:
        """The running ``[cluster]`` (None: none), parsed once per configuration."""
        table = self._config().extra.get("cluster")
        if self._parsed[0] is not table:
            self._parsed = (table, None if table is None else parse_cluster(table))
        return self._parsed[1]

    def owner(self, bucket: str, segments: tuple[str, ...]) -> str | None:
        """The owner of a key when it is another edge (None: this edge owns it, or there is no cluster)."""
        settings = self.settings()
        if settings is None:
            return None
        owner = owner_of(settings.peers, bucket, "/".join(segments))
        return None if owner == settings.self_url else owner

    def parent_source(
        self, owner: str, uri: bytes, host: bytes, scheme: bytes, headers: Headers, source: Source
    ) -> Source:
        """
        For a mirror miss of a key another edge owns (``owner``, from
        :meth:`owner`): ``source`` with that owner first, asked for the
        client's ``uri`` (origin-form) with the client's ``host``, the
        ``scheme`` it used and its end-to-end ``headers`` (which the owner's
        rule may pass on to the origin), all signed with the method and the
        owner's URL; the origin's URLs after it.
        """
        settings = self.settings()
        assert settings is not None, "an owner is only named with a [cluster]"
        edge = owner.encode("ascii")
        url = edge + uri
        sent = URI.fromBytes(url).originForm  # what Twisted's client puts on the request line
        signed = sign_read(settings.secret, int(self._clock.seconds()), sent, host, scheme, edge)
        hop = {t.strip().lower() for v in headers.getRawHeaders(b"connection", []) for t in v.split(b",")}
        passed = [
            (name.lower(), value)
            for name, values in headers.getAllRawHeaders()
            if name.lower() not in _NOT_PASSED and name.lower() not in hop
            for value in values
        ]
        return evolve(
            source,
            url=url,
            alternates=source.urls,
            parent_headers=((b"host", host), (HEADER, signed), (SCHEME_HEADER, scheme), *passed),
        )

    def hand_over(
        self, bucket: str, segments: tuple[str, ...], source: Source, fill_here: Callable[[], object]
    ) -> bool:
        """
        Ask the key's owner to copy it, when it is another edge: True when
        the fill is the owner's (``fill_here`` runs if the owner does not take
        it in time), False when this edge is to fill it.
        """
        owner = self.owner(bucket, segments)
        if owner is None:
            return False
        key = (bucket, segments)
        if key in self._asking:
            return True
        if len(self._asking) >= _MAX_ASKS:
            return False
        settings = self.settings()
        assert settings is not None
        asking = self._ask(owner, settings, bucket, segments, source)
        self._asking[key] = asking

        def answered(result: bool | Failure) -> None:
            del self._asking[key]
            if result is True:
                self._stats.inc("fills_handed_over")
                return
            why = "refused" if not isinstance(result, Failure) else _why(result)
            _log.warn(
                "fill {bucket}/{key}: the owner {owner} did not take it ({why}); filling here",
                bucket=bucket,
                key="/".join(segments),
                owner=owner,
                why=why,
            )
            self._stats.inc("fills_owner_missed")
            fill_here()

        asking.addBoth(answered)
        return True

    def _ask(
        self, owner: str, settings: ClusterConfig, bucket: str, segments: tuple[str, ...], source: Source
    ) -> Deferred[bool]:
        uri = ("/" + "/".join(quote(s, safe="") for s in segments)).encode("ascii")
        body = source_to_json(bucket, source)
        headers = Headers(
            {
                HEADER: [sign(settings.secret, int(self._clock.seconds()), uri, body)],
                b"content-type": [b"application/json"],
            }
        )
        producer = _Bytes(body)
        request: Deferred[IResponse] = self._agent.request(b"POST", owner.encode() + uri, headers, producer)

        def taken(response: IResponse) -> Deferred[bool]:
            return readBody(response).addCallback(lambda reply: _taken(response.code, reply))

        asked = request.addCallback(taken)
        asked.addTimeout(settings.owner_timeout, self._clock)
        return asked


@implementer(IBodyProducer)
class _Bytes:
    """A small body, written at once (no cooperator, no file)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def _taken(code: int, reply: bytes) -> bool:
    if code in (200, 202):
        return True
    raise RuntimeError(f"HTTP {code} {reply[:200]!r}")


def _why(failure: Failure) -> str:
    if failure.check(TimeoutError, DeferredTimeout):
        return "no answer in time"
    return failure.getErrorMessage() or repr(failure.value)
