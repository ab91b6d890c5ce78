"""
The origin planner: what to do about a key that is not stored.

:func:`plan` is a pure function of a bucket's configuration, the key and the
request, and the only place that reads a bucket's origin settings or builds
an origin URL.  Web code asks it how to answer a miss; the fill scheduler is
handed the :class:`Source` it names.

A bucket's rules (:mod:`cosedge.rules`) are tried in priority order; the
first whose prefix and suffix match the key decides:

- ``proxy`` (the seed's one rule, and what ``origin`` + ``origin_pull``
  means): a redirect (``redirect_code``) to the chosen host's URL, and a
  background copy, for GET and HEAD alike;
- ``mirror``: the request is answered from the origin's stream while the
  object is stored;
- ``redirect``: a redirect, nothing copied.

No matching rule, or origin-pull off: a plain 404.  Hosts are tried by
weight among those believed up (``up``), then the standby hosts in order;
when none is believed up, all of them in order, since trying beats a
certain miss.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from typing import Literal

from attrs import frozen
from twisted.web.http_headers import Headers

from .config import BucketConfig, Origin
from .keys import encode_key, encode_query
from .rules import Rule, RuleHost

__all__ = ["NOT_FOUND", "Plan", "Source", "matching_rule", "origin_url", "plan", "prefetch_source"]


@frozen
class Source:
    """Where a fill copies an object from, and how it asks."""

    #: The URL tried first.
    url: bytes
    #: URLs tried in order when an earlier one refuses, times out or answers 5xx.
    alternates: tuple[bytes, ...] = ()
    #: Request headers besides cosedge's own (``host_header``, ``headers_set``, ``headers_pass``).
    headers: tuple[tuple[bytes, bytes], ...] = ()
    #: HTTPS: the CA file to trust instead of the system's (None: the system's).
    ca_file: str | None = None
    #: HTTPS: the name the certificate must carry and SNI sends (None: each URL's host).
    server_name: bytes | None = None
    #: Follow the origin's redirects (at most 5).
    follow_redirects: bool = False
    #: The rule that named this source (``<priority>:<type>``), for logs and metrics.
    rule: str = ""
    #: Not empty: ``url`` is the key's owner edge of a ``[cluster]`` (a mirror
    #: fill's parent), asked with these headers instead of ``headers``; the
    #: alternates are the origin's URLs, asked as usual when the owner cannot answer.
    parent_headers: tuple[tuple[bytes, bytes], ...] = ()

    @property
    def urls(self) -> tuple[bytes, ...]:
        return (self.url, *self.alternates)


@frozen
class Plan:
    """The answer to a miss, and what to fetch."""

    answer: Literal["not-found", "redirect", "mirror"]
    #: The redirect's Location (``answer == "redirect"``).
    location: bytes | None = None
    status: int = 302
    #: Copy the object from here into the bucket (None: nothing to copy).
    fetch: Source | None = None


NOT_FOUND = Plan("not-found")


def _always_up(base: str) -> bool:
    return True


def origin_url(origin: Origin, segments: tuple[str, ...]) -> bytes:
    """``http://<origin>/<percent-encoded key>``."""
    return b"http://" + origin.netloc + b"/" + encode_key(segments)


@functools.lru_cache(maxsize=256)
def _seed_rule(origin: Origin) -> Rule:
    """The seed's one rule: proxy every key to ``origin`` over HTTP."""
    return Rule(priority=1, hosts=(RuleHost(origin.host, origin.port),))


def _rules(bucket: BucketConfig) -> tuple[Rule, ...]:
    if bucket.rules:
        return bucket.rules
    return () if bucket.origin is None else (_seed_rule(bucket.origin),)


def matching_rule(bucket: BucketConfig, key: str) -> Rule | None:
    """The rule that decides ``key``'s miss (origin-pull on or not), or None."""
    for rule in _rules(bucket):
        if rule.matches(key):
            return rule
    return None


def _scheme(rule: Rule, secure: bool) -> bytes:
    if rule.protocol == "follow":
        return b"https" if secure else b"http"
    return rule.protocol.encode("ascii")


def _order(rule: Rule, scheme: str, up: Callable[[str], bool], choose: Callable[[], float]) -> list[RuleHost]:
    """The hosts to try: up ones by weight, then up standby hosts; all in order when none is up."""
    live = [h for h in rule.hosts if up(f"{scheme}://{h.netloc(scheme)}")]
    ordered: list[RuleHost] = []
    while live:
        total = sum(h.weight for h in live)
        point = choose() * total
        for i, h in enumerate(live):
            point -= h.weight
            if point < 0 or i == len(live) - 1:
                ordered.append(live.pop(i))
                break
    ordered += [h for h in rule.standby if up(f"{scheme}://{h.netloc(scheme)}")]
    return ordered or [*rule.hosts, *rule.standby]


def _source(
    rule: Rule, scheme: bytes, hosts: list[RuleHost], path: bytes, client: Headers | None, query: bytes
) -> Source:
    text = scheme.decode("ascii")
    urls = [scheme + b"://" + h.netloc(text).encode("ascii") + b"/" + path + query for h in hosts]
    headers = [(name.encode("ascii"), value.encode("latin-1")) for name, value in rule.headers_set]
    if client is not None:
        for name in rule.headers_pass:
            raw = name.encode("ascii")
            for value in client.getRawHeaders(raw, []):
                headers.append((raw, value))
    host_header = None if rule.host_header is None else rule.host_header.encode("ascii")
    if host_header is not None:
        headers.append((b"host", host_header))
    return Source(
        urls[0],
        tuple(urls[1:]),
        tuple(headers),
        rule.ca_file if scheme == b"https" else None,
        host_header if scheme == b"https" else None,
        rule.follow_redirects,
        rule.label,
    )


def plan(
    bucket: BucketConfig,
    segments: tuple[str, ...],
    query: bytes | None,
    method: bytes,
    *,
    secure: bool = False,
    headers: Headers | None = None,
    up: Callable[[str], bool] = _always_up,
    choose: Callable[[], float] = random.random,
) -> Plan:
    """
    How to answer a miss of ``segments`` (``query``: the request's decoded
    query string, or None; ``secure``: the client used HTTPS; ``headers``:
    the client's, for ``headers_pass``; ``up``: whether ``scheme://host``
    is believed up; ``choose``: a uniform random number, for weights).
    """
    if not bucket.origin_pull:
        return NOT_FOUND
    rule = matching_rule(bucket, "/".join(segments))
    if rule is None:
        return NOT_FOUND
    scheme = _scheme(rule, secure)
    hosts = _order(rule, scheme.decode("ascii"), up, choose)
    path = encode_key(tuple(rule.origin_path("/".join(segments)).split("/")))
    passed = b"" if query is None or not rule.follow_query_string else b"?" + encode_query(query)
    if rule.type == "mirror":
        return Plan("mirror", fetch=_source(rule, scheme, hosts, path, headers, passed))
    location = _source(rule, scheme, hosts[:1], path, None, passed).url
    fetch = _source(rule, scheme, hosts, path, headers, b"") if rule.type == "proxy" else None
    return Plan("redirect", location, rule.redirect_code, fetch)


def prefetch_source(bucket: BucketConfig, segments: tuple[str, ...]) -> Source | None:
    """
    Where an operator's prefetch copies ``segments`` from (origin-pull on or
    not): the proxy or mirror rule that matches the key; None without one.
    """
    rule = matching_rule(bucket, "/".join(segments))
    if rule is None or rule.type == "redirect":
        return None
    scheme = _scheme(rule, False)
    path = encode_key(tuple(rule.origin_path("/".join(segments)).split("/")))
    return _source(rule, scheme, [*rule.hosts, *rule.standby], path, None, b"")
