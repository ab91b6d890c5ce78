"""
The plain values the ``edge`` commands return: they read well in the shell
(a line, an aligned table, one named value per line) and are still plain
data (``str``, ``list`` of ``dict``, ``dict``) for scripts.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Message", "Report", "Table"]


class Message(str):
    """A result line; shown without quotes in the shell."""

    def __repr__(self) -> str:
        return str(self)


class Table(list[dict[str, Any]]):
    """Rows of a report (plain dicts); shown as an aligned table in the shell."""

    def __repr__(self) -> str:
        if not self:
            return "(none)"
        columns = list(self[0])
        cells = [[_cell(row.get(c)) for c in columns] for row in self]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
        return "\n".join(lines)


class Report(dict[str, Any]):
    """Named values (a plain dict); shown one per line in the shell."""

    def __repr__(self) -> str:
        width = max((len(k) for k in self), default=0)
        return "\n".join(f"{k.ljust(width)}  {_cell(v)}" for k, v in self.items())


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
    return str(value)
