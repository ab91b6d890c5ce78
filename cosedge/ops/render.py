"""
HTML pieces of the migration page (:mod:`cosedge.ops.page`): its style
sheet, tables, progress bars, the hit-share chart (inline SVG) and number
formats.  Every text that is not the page's own is escaped here or by the
caller.
"""

from __future__ import annotations

import html
from collections.abc import Collection, Sequence

from .history import Point

__all__ = ["PAGE_CSS", "bar", "chart", "count", "duration", "human_bytes", "number", "percent", "table"]

PAGE_CSS = """
:root{color-scheme:light;font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1d2430;background:#f3f5f8}
body{margin:0 auto;max-width:1180px;padding:16px 24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:0 0 8px}
h3{font-size:13px;margin:12px 0 4px;color:#4a5568;text-transform:uppercase;letter-spacing:.03em}
.meta{color:#5a6472;margin:0 0 16px}a{color:#1f5fbf}
section{background:#fff;border:1px solid #dde2e8;border-radius:6px;padding:14px 16px;margin:0 0 16px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eef1f4;vertical-align:top}
th{font-weight:600;color:#4a5568}.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.key{font-family:ui-monospace,"DejaVu Sans Mono",monospace;word-break:break-all}
.up{color:#17803d}.down{color:#b42318;font-weight:600}.muted{color:#7a8491}
.share{font-size:20px;font-weight:600}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(320px,1fr));gap:4px 16px}
.bar{display:inline-block;width:200px;height:12px;background:#e4e8ee;border-radius:6px;overflow:hidden;
vertical-align:middle;margin-right:6px}
.bar>span{display:block;height:100%;background:#2f7de1}.bar.unknown>span{width:100%;background:#b8c4d4}
svg.chart{display:block;width:100%;max-width:720px;height:auto;margin:6px 0}
svg.chart text{font:11px system-ui,sans-serif;fill:#5a6472}
svg.chart .grid{stroke:#e4e8ee}svg.chart .line{fill:none;stroke:#1f8a4c;stroke-width:2}
svg.chart .area{fill:#1f8a4c;fill-opacity:.12}svg.chart .dot{fill:#1f8a4c}
svg.chart .dot.partial{fill:#fff;stroke:#1f8a4c;stroke-width:1.5}
""".strip()

_W, _H = 720, 180
_LEFT, _RIGHT, _TOP, _BOTTOM = 44, 14, 10, 24


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def number(value: object) -> str:
    """``1,234`` for whole numbers, ``1,234.5`` for others; anything else as escaped text."""
    if isinstance(value, bool):
        return _e(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return _e(value)


def count(n: int, noun: str) -> str:
    """``1 request``, ``1,024 requests``."""
    return f"{number(n)} {noun}{'' if n == 1 else 's'}"


def percent(part: int, whole: int) -> str:
    """``part`` of ``whole`` as a percentage; a dash when ``whole`` is 0."""
    return f"{100 * part / whole:.1f}%" if whole > 0 else "—"


def human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{size:,} B" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def duration(seconds: float) -> str:
    """``250 ms``, ``4.2 s``, ``3 min 20 s``, ``2 h 5 min``."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    whole = round(seconds)
    big, small = (
        (f"{whole // 60} min", f"{whole % 60} s")
        if whole < 3600
        else (f"{whole // 3600} h", f"{whole % 3600 // 60} min")
    )
    return big if small.startswith("0 ") else f"{big} {small}"


def table(head: Sequence[str], rows: Sequence[Sequence[str]], numeric: Collection[int] = (), empty: str = "") -> str:
    """A table of HTML cells (``head`` is escaped; the cells are not); ``empty``'s text when there are no rows."""
    if not rows and empty:
        return f'<p class="muted">{_e(empty)}</p>'

    def cls(i: int) -> str:
        return ' class="n"' if i in numeric else ""

    heading = "".join(f"<th{cls(i)}>{_e(h)}</th>" for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{heading}</tr></thead><tbody>{body}</tbody></table>"


def bar(done: object, total: object, label: str) -> str:
    """A progress bar (``role="progressbar"``) and its numbers; a grey bar when the total is not known."""
    count = done if isinstance(done, int | float) and not isinstance(done, bool) else 0
    attrs = f'role="progressbar" aria-label="{_e(label)}" aria-valuemin="0"'
    if isinstance(total, int | float) and not isinstance(total, bool) and total > 0:
        share = min(100.0, max(0.0, 100 * count / total))
        return (
            f'<div class="bar" {attrs} aria-valuemax="{total}" aria-valuenow="{count}">'
            f'<span style="width:{share:.1f}%"></span></div>{number(count)} / {number(total)} ({share:.0f}%)'
        )
    return f'<div class="bar unknown" {attrs}><span></span></div>{number(count)} done, total not known yet'


def _point_title(point: Point) -> str:
    when = "this minute so far" if point.partial else ("now" if point.ago < 1 else f"{duration(point.ago)} ago")
    if point.share is None:
        return f"{when}: no requests"
    return f"{when}: {100 * point.share:.1f}% of {count(point.requests, 'request')} answered locally"


def chart(name: str, points: Sequence[Point], window: float = 3600.0) -> str:
    """
    The share of ``name``'s requests answered locally over the last
    ``window`` seconds as an inline SVG: a line through one point per
    interval, broken where an interval had no request, the running interval
    drawn hollow.  ``data-points`` counts the points drawn.
    """
    width, height = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def x(ago: float) -> float:
        return _LEFT + width * (1 - min(max(ago, 0.0), window) / window)

    def y(share: float) -> float:
        return _TOP + height * (1 - share)

    shown = [p for p in points if p.share is not None]
    out = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}"'
        f' role="img" data-points="{len(shown)}">',
        f"<title>Share of requests to {_e(name)} answered locally, last hour</title>",
    ]
    for share in (0.0, 0.5, 1.0):
        out.append(f'<line class="grid" x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{y(share):.1f}" y2="{y(share):.1f}"/>')
        out.append(f'<text x="{_LEFT - 6}" y="{y(share) + 4:.1f}" text-anchor="end">{share:.0%}</text>')
    for minutes in range(int(window // 60), -1, -15):
        label = "now" if minutes == 0 else f"−{minutes} min"
        out.append(f'<text x="{x(minutes * 60):.1f}" y="{_H - 6}" text-anchor="middle">{label}</text>')
    segments: list[list[Point]] = [[]]
    for point in points:
        if point.share is None:
            segments.append([])
        else:
            segments[-1].append(point)
    for segment in segments:
        if len(segment) < 2:
            continue
        line = " ".join(f"{x(p.ago):.1f},{y(p.share or 0.0):.1f}" for p in segment)
        base = f"{x(segment[-1].ago):.1f},{y(0.0):.1f} {x(segment[0].ago):.1f},{y(0.0):.1f}"
        out.append(f'<polygon class="area" points="{line} {base}"/>')
        out.append(f'<polyline class="line" points="{line}"/>')
    for point in shown:
        cls = "dot partial" if point.partial else "dot"
        out.append(
            f'<circle class="{cls}" cx="{x(point.ago):.1f}" cy="{y(point.share or 0.0):.1f}" r="3.5">'
            f"<title>{_e(_point_title(point))}</title></circle>"
        )
    if not shown:
        out.append(
            f'<text x="{_LEFT + width / 2:.1f}" y="{_TOP + height / 2:.1f}" text-anchor="middle">'
            "no requests in the last hour yet</text>"
        )
    out.append("</svg>")
    return "".join(out)
