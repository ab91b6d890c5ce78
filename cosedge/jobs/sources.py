"""
Where a job's keys come from, read as a stream (memory stays bounded however
large the source): a file of lines, each turned into a key by a parser, or
the listing of a bucket's stored objects.

The line parsers:

- :func:`parse_keys_line`: a file of keys, one a line, as ``edge.prefetch``
  takes them: plain keys (``img/a b.jpg``, not percent-encoded), an optional
  leading ``/``; blank lines and lines starting with ``#`` are ignored.
- :func:`parse_log_line`: a web server's access log in the common or combined
  format (Apache, nginx): the path of each ``GET`` answered ``200``, its
  query string dropped, percent-decoded and validated exactly as a request's
  target is (:func:`cosedge.keys.parse_target`).  Other methods and statuses
  are ignored.
- :func:`parse_loc`: the ``<loc>`` of a sitemap's ``<url>``: the path of an
  ``http(s)`` URL (its host is not checked: a site's sitemap names its
  public domain, not the origin's address), decoded and validated the same way.

A line that cannot be read as its format says, or whose key is invalid
(``..``, control characters, over 850 bytes, ...), is *bad*: counted by
reason, never fatal.  Lines over :data:`MAX_LINE` bytes are bad too.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import IO
from urllib.parse import quote, urlsplit

from attrs import define, frozen
from twisted.internet.defer import Deferred

from ..interfaces import IObjectStore
from ..keys import BadKey, parse_target, split_key
from .model import Item, JobError, JobFailed

__all__ = [
    "MAX_LINE",
    "Counted",
    "FileSource",
    "ListingSource",
    "Skip",
    "parse_keys_line",
    "parse_loc",
    "parse_log_line",
    "split_spec",
]

#: The longest line read; longer ones are bad (``too-long``).
MAX_LINE = 64 * 1024
#: Lines read between two turns of the reactor while counting.
_CHUNK = 5000
#: Objects asked of the store at once.
_PAGE = 1000
#: The source kinds of ``edge.backfill``.
SPEC_KINDS = ("keys", "log", "sitemap")

# host ident user [date] "request" status bytes ...: the common log format's fields.
_LOG_LINE = re.compile(rb'^\S+ \S+ \S+ \[[^\]]*\] "((?:[^"\\]|\\.)*)" (\d{3}) (?:\d+|-)(?:\s|$)')
_BLANK = re.compile(r"\s")


@frozen
class Skip:
    """A line that names no key: ``bad`` (counted and reported) or ignored, and why."""

    bad: bool
    reason: str


#: What a parser makes of one line: the key's segments, or why it has none.
Parsed = tuple[str, ...] | Skip
LineParser = Callable[[bytes], Parsed]


def _bad_key(e: BadKey) -> Skip:
    return Skip(True, "key-too-long" if e.code == "KeyTooLong" else "invalid-key")


def parse_keys_line(line: bytes) -> Parsed:
    """One line of a file of keys (see the module's docstring)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return Skip(True, "not-utf8")
    if not text.strip() or text.startswith("#"):
        return Skip(False, "blank")
    try:
        return split_key(quote(text.removeprefix("/"), safe="/").encode("ascii"))
    except BadKey as e:
        return _bad_key(e)


def parse_log_line(line: bytes) -> Parsed:
    """One line of an access log (see the module's docstring)."""
    match = _LOG_LINE.match(line)
    if match is None:
        return Skip(True, "unparsable")
    request, status = match.groups()
    parts = request.split(b" ")
    if len(parts) not in (2, 3) or not parts[1]:
        return Skip(True, "unparsable")
    if parts[0] != b"GET":
        return Skip(False, "not-get")
    if status != b"200":
        return Skip(False, "not-200")
    try:
        segments = parse_target(parts[1]).segments
    except BadKey as e:
        return _bad_key(e)
    return segments or Skip(False, "no-key")


def parse_loc(line: bytes) -> Parsed:
    """One ``<loc>`` of a sitemap, as the sitemap's copy keeps it (see the module's docstring)."""
    try:
        text = line.decode("utf-8").strip()
    except UnicodeDecodeError:
        return Skip(True, "not-utf8")
    if not text:
        return Skip(False, "blank")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc or _BLANK.search(text):
        return Skip(True, "bad-url")
    try:
        segments = split_key(parts.path.removeprefix("/").encode("utf-8"))
    except BadKey as e:
        return _bad_key(e)
    return segments or Skip(False, "no-key")


PARSERS: dict[str, LineParser] = {"keys": parse_keys_line, "log": parse_log_line, "sitemap": parse_loc}


def split_spec(spec: object) -> tuple[str, str]:
    """``"log:/var/log/nginx/access.log"`` → ``("log", "/var/log/nginx/access.log")``; :raises JobError:"""
    kind, sep, rest = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or kind not in SPEC_KINDS or not rest:
        raise JobError(
            f"the source must be 'keys:/path/to/file' (one key a line), 'log:/path/to/access.log'"
            f" (GETs answered 200) or 'sitemap:https://www.example.com/sitemap.xml', not {spec!r}"
        )
    return kind, rest


@frozen
class Counted:
    """A source's keys, and the lines that name none."""

    total: int
    bad: Counter[str]
    ignored: Counter[str]


def _lines(f: IO[bytes]) -> Iterator[tuple[int, int, bytes | None]]:
    """Each line's offset, the offset after it, and the line without its end (None: longer than MAX_LINE)."""
    offset = f.tell()
    while True:
        line = f.readline(MAX_LINE)
        if not line:
            return
        start, offset = offset, offset + len(line)
        if line.endswith(b"\n") or len(line) < MAX_LINE:
            yield start, offset, line.rstrip(b"\r\n")
            continue
        while True:  # the rest of an overlong line
            more = f.readline(MAX_LINE)
            offset += len(more)
            if not more or more.endswith(b"\n"):
                break
        yield start, offset, None


@define(eq=False)
class FileSource:
    """The keys of a file of lines, in file order; a position is a byte offset."""

    path: str
    parse: LineParser
    #: Lets the reactor run (a Deferred that fires on its next turn).
    breathe: Callable[[], Deferred[None]]

    def _open(self) -> IO[bytes]:
        try:
            return open(self.path, "rb")
        except OSError as e:
            raise JobFailed(f"cannot read {self.path}: {e.strerror or e}") from None

    async def count(self) -> Counted:
        total, bad, ignored = 0, Counter[str](), Counter[str]()
        with self._open() as f:
            for n, (_, _, line) in enumerate(_lines(f)):
                if n % _CHUNK == _CHUNK - 1:
                    await self.breathe()
                parsed = Skip(True, "too-long") if line is None else self.parse(line)
                if not isinstance(parsed, Skip):
                    total += 1
                else:
                    (bad if parsed.bad else ignored)[parsed.reason] += 1
        return Counted(total, bad, ignored)

    async def items(self, resume: str, seq: int) -> AsyncGenerator[Item, None]:
        with self._open() as f:
            f.seek(int(resume or 0))
            for start, end, line in _lines(f):
                parsed = None if line is None else self.parse(line)
                if isinstance(parsed, tuple):
                    yield Item(seq, str(start), "/".join(parsed), parsed, str(end))
                    seq += 1


@define(eq=False)
class ListingSource:
    """The objects a bucket stores under a prefix, in key order; a position is the listing's marker."""

    store: IObjectStore
    bucket: str
    prefix: str

    async def count(self) -> Counted:
        total, marker = 0, ""
        while True:
            page = await self.store.list(self.bucket, self.prefix, marker, _PAGE)
            total += len(page)
            if len(page) < _PAGE:
                return Counted(total, Counter(), Counter())
            marker = page[-1].key

    async def items(self, resume: str, seq: int) -> AsyncGenerator[Item, None]:
        marker = resume
        while True:
            page = await self.store.list(self.bucket, self.prefix, marker, _PAGE)
            for entry in page:
                yield Item(seq, marker, entry.key, tuple(entry.key.split("/")), entry.key)
                marker = entry.key
                seq += 1
            if len(page) < _PAGE:
                return
