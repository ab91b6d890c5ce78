"""
The origin planner: what to do about a key that is not stored.

:func:`plan` is a pure function of a bucket's configuration, the key and the
request, and the only place that reads a bucket's origin settings or builds
an origin URL.  Web code asks it how to answer a miss; the fill scheduler is
handed the :class:`Source` it names.  Today's behaviour is its one rule: with
an origin and origin-pull on, a miss is a 302 to ``http://<origin>/<key>``
(the client's query string kept) and a GET starts a background copy from the
same URL; otherwise it is a plain 404.
"""

from __future__ import annotations

from typing import Literal

from attrs import frozen

from .config import BucketConfig, Origin
from .keys import encode_key, encode_query

__all__ = ["NOT_FOUND", "Plan", "Source", "origin_url", "plan", "prefetch_source"]


@frozen
class Source:
    """Where a fill copies an object from."""

    url: bytes


@frozen
class Plan:
    """The answer to a miss, and what to fetch in the background."""

    answer: Literal["not-found", "redirect"]
    #: The redirect's Location (``answer == "redirect"``).
    location: bytes | None = None
    status: int = 302
    #: Copy the object from here into the bucket (None: nothing to copy).
    fetch: Source | None = None


NOT_FOUND = Plan("not-found")


def origin_url(origin: Origin, segments: tuple[str, ...]) -> bytes:
    """``http://<origin>/<percent-encoded key>``."""
    return b"http://" + origin.netloc + b"/" + encode_key(segments)


def plan(bucket: BucketConfig, segments: tuple[str, ...], query: bytes | None, method: bytes) -> Plan:
    """
    How to answer a miss of ``segments`` (``query``: the request's decoded
    query string, or None).  A HEAD is answered like a GET but copies nothing.
    """
    if not bucket.origin_pull or bucket.origin is None:
        return NOT_FOUND
    url = origin_url(bucket.origin, segments)
    location = url if query is None else url + b"?" + encode_query(query)
    return Plan("redirect", location, 302, Source(url) if method == b"GET" else None)


def prefetch_source(bucket: BucketConfig, segments: tuple[str, ...]) -> Source | None:
    """Where an operator's prefetch copies ``segments`` from (origin-pull on or not); None without an origin."""
    if bucket.origin is None:
        return None
    return Source(origin_url(bucket.origin, segments))
