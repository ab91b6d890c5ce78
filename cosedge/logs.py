"""
Log observers for twistd's ``--logger`` option and the ``[log]`` section.

``twistd --logger cosedge.logs.journald -n --pidfile= cosedge …`` writes one
plain line per event to standard output.  When standard output is the
journal's stream (systemd sets ``$JOURNAL_STREAM`` to its ``device:inode``)
each line starts with a ``<N>`` syslog priority prefix and carries no
timestamp, so ``journalctl -p warning`` works and times are not doubled;
anywhere else the lines are twistd's usual timestamped text.

``twistd --logger cosedge.logs.json …`` writes one JSON object per line (the
format of :func:`twisted.logger.eventAsJSON`, readable back with
:func:`twisted.logger.eventsFromJSONLogFile`), for log shippers.

:func:`json_file_observer` is the same JSON format into a size-rotated file;
``[log] json_file`` in the configuration adds it beside the console log.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    eventAsJSON,
    eventAsText,
    textFileLogObserver,
)
from twisted.python.logfile import LogFile

__all__ = [
    "PRIORITIES",
    "journal_line",
    "journald",
    "json",
    "json_file_observer",
    "json_line",
    "stream_is_journal",
]

#: syslog priorities (``sd-daemon(3)``) for Twisted's log levels.
PRIORITIES = {
    LogLevel.debug: 7,
    LogLevel.info: 6,
    LogLevel.warn: 4,
    LogLevel.error: 3,
    LogLevel.critical: 2,
}


def stream_is_journal(stream: IO[Any], environ: Mapping[str, str] | None = None) -> bool:
    """
    Whether ``stream`` is connected to the journal: ``$JOURNAL_STREAM`` names
    the ``device:inode`` of the stream systemd connected, which stops matching
    when an operator redirects the output elsewhere (``systemd.exec(5)``).
    """
    env = os.environ if environ is None else environ
    device, sep, inode = env.get("JOURNAL_STREAM", "").partition(":")
    if not sep or not device.isdigit() or not inode.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def journal_line(event: LogEvent) -> str | None:
    """
    An event as journal lines: ``<N>[system] text``; each line of a
    multi-line event (a traceback, say) carries the prefix, since the journal
    reads every line as its own entry.
    """
    text = eventAsText(event, includeTimestamp=False)
    if not text:
        return None
    priority = PRIORITIES.get(event.get("log_level", LogLevel.info), 6)
    return "".join(f"<{priority}>{line}\n" for line in text.splitlines())


def json_line(event: LogEvent) -> str:
    """An event as one line of JSON."""
    return eventAsJSON(event) + "\n"


def journald(stream: IO[Any] | None = None, environ: Mapping[str, str] | None = None) -> ILogObserver:
    """
    The console observer for running under systemd (``--logger
    cosedge.logs.journald``): priority-prefixed lines when standard output is
    the journal, else twistd's ordinary timestamped text.
    """
    out = sys.stdout if stream is None else stream
    if stream_is_journal(out, environ):
        return FileLogObserver(out, journal_line)
    return textFileLogObserver(out)


def json(stream: IO[Any] | None = None) -> ILogObserver:
    """
    Every event as a line of JSON on standard output (``--logger
    cosedge.logs.json``).
    """
    return FileLogObserver(sys.stdout if stream is None else stream, json_line)


def json_file_observer(path: str, rotate_bytes: int, keep: int) -> tuple[ILogObserver, LogFile]:
    """
    A JSON-lines observer writing to ``path``, rotated to ``path.1`` … when it
    grows past ``rotate_bytes`` (0: never), keeping ``keep`` old files.
    Returns the observer and the file, which the caller closes.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    logfile = LogFile.fromFullPath(
        os.path.abspath(path), rotateLength=rotate_bytes or None, maxRotatedFiles=keep or None
    )
    return FileLogObserver(logfile, json_line), logfile
