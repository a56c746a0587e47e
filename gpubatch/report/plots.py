"""Small inline-SVG charts for the HTML report, written by hand.

Why not matplotlib or plotly: the report must be one self-contained file that opens offline, and
gpubatch should not pull a plotting stack onto GPU workers for four charts. Each function returns
an ``<svg>`` string with a title, labelled axes with units, and a ``data-plot`` name that the
page's self-check (and the tests) look for. NaN values break a line rather than drawing zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

WIDTH, HEIGHT = 560, 260
LEFT, RIGHT, TOP, BOTTOM = 62, 18, 34, 48
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif"
INK, GRID, MUTED = "#1f2933", "#e4e7eb", "#616e7c"
BLUE, ORANGE, GREEN, RED, AMBER, PURPLE = "#2f6fdf", "#e8833a", "#2e9e5b", "#d64545", "#e0a800", "#7b5cc4"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k steps) covering [lo, hi]; a flat range gets [lo, lo+1]."""
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        hi = lo + 1.0 if math.isfinite(lo) else 1.0
        lo = lo if math.isfinite(lo) else 0.0
    raw = (hi - lo) / max(1, n)
    exp = math.floor(math.log10(raw))
    step = next(m * 10.0**exp for m in (1, 2, 2.5, 5, 10) if m * 10.0**exp >= raw)
    first = math.floor(lo / step + 1e-9) * step
    ticks, v = [], first
    while v < hi + step * 0.999:
        ticks.append(round(v, 10))
        v += step
    return ticks


def fmt(v: float) -> str:
    """Compact tick text: 0.05, 1.5, 20, 1.2k, 3M."""
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:g}M"
    if a >= 1e4:
        return f"{v / 1e3:g}k"
    return f"{v:.3g}" if a < 1000 else f"{v:.0f}"


@dataclass
class Series:
    """One drawn series: ``line`` (points), ``step`` (held until the next x) or ``bars`` (x0..x1)."""

    name: str
    xs: Sequence[float]
    ys: Sequence[float]
    color: str = BLUE
    kind: str = "line"
    x1s: Sequence[float] = ()
    dashed: bool = False


@dataclass
class Band:
    """A shaded horizontal band between y0 and y1 with a label at its right edge."""

    y0: float
    y1: float
    color: str
    label: str


@dataclass
class _Canvas:
    """Maps data to pixels inside the plot area and collects SVG elements."""

    x_lo: float
    x_hi: float
    y_lo: float
    y_hi: float
    parts: list[str] = field(default_factory=list)

    def x(self, v: float) -> float:
        span = (self.x_hi - self.x_lo) or 1.0
        return LEFT + (v - self.x_lo) / span * (WIDTH - LEFT - RIGHT)

    def y(self, v: float) -> float:
        span = (self.y_hi - self.y_lo) or 1.0
        clamped = min(max(v, self.y_lo), self.y_hi)
        return HEIGHT - BOTTOM - (clamped - self.y_lo) / span * (HEIGHT - TOP - BOTTOM)

    def text(self, x: float, y: float, s: str, anchor: str = "middle", size: int = 11,
             color: str = MUTED, extra: str = "") -> None:
        self.parts.append(f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}" '
                          f'fill="{color}"{extra}>{escape(s)}</text>')


def _open_svg(name: str, title: str, subtitle: str = "") -> list[str]:
    sub = f'<text x="{LEFT}" y="30" font-size="11" fill="{MUTED}">{escape(subtitle)}</text>' if subtitle else ""
    return [f'<svg class="plot" data-plot="{escape(name)}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}" '
            f'font-family="{FONT}"><title>{escape(title)}</title>',
            f'<text x="{LEFT}" y="15" font-size="13" font-weight="600" fill="{INK}">{escape(title)}</text>', sub]


def _axes(c: _Canvas, x_ticks: list[float], y_ticks: list[float], x_label: str, y_label: str,
          y_fmt: str = "") -> None:
    """Grid lines, tick labels and axis titles (with units) for a numeric x and y."""
    for t in y_ticks:
        c.parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{c.y(t):.1f}" y2="{c.y(t):.1f}" '
                       f'stroke="{GRID}"/>')
        c.text(LEFT - 6, c.y(t) + 4, f"{t:.0%}" if y_fmt == "%" else fmt(t), anchor="end")
    for t in x_ticks:
        c.text(c.x(t), HEIGHT - BOTTOM + 15, fmt(t))
    base = HEIGHT - BOTTOM
    c.parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{base}" y2="{base}" stroke="{MUTED}"/>')
    c.parts.append(f'<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{base}" stroke="{MUTED}"/>')
    c.text((LEFT + WIDTH - RIGHT) / 2, HEIGHT - 10, x_label, color=INK)
    mid = (TOP + base) / 2
    c.text(14, mid, y_label, color=INK, extra=f' transform="rotate(-90 14 {mid:.1f})"')


def _segments(c: _Canvas, s: Series) -> list[list[tuple[float, float]]]:
    """Pixel points of a line/step series, split wherever a value is NaN."""
    segs: list[list[tuple[float, float]]] = [[]]
    for i, (x, y) in enumerate(zip(s.xs, s.ys, strict=True)):
        if y is None or (isinstance(y, float) and math.isnan(y)):
            segs.append([])
            continue
        segs[-1].append((c.x(x), c.y(y)))
        if s.kind == "step":
            nxt = s.xs[i + 1] if i + 1 < len(s.xs) else c.x_hi
            segs[-1].append((c.x(nxt), c.y(y)))
    return [seg for seg in segs if seg]


def _draw_series(c: _Canvas, s: Series) -> None:
    dash = ' stroke-dasharray="5 4"' if s.dashed else ""
    if s.kind == "bars":
        for x0, x1, y in zip(s.xs, s.x1s, s.ys, strict=True):
            if y and not math.isnan(y):
                w = max(1.0, c.x(x1) - c.x(x0) - 1)
                c.parts.append(f'<rect class="bar" x="{c.x(x0):.1f}" y="{c.y(y):.1f}" width="{w:.1f}" '
                               f'height="{c.y(c.y_lo) - c.y(y):.1f}" fill="{s.color}" opacity="0.85"/>')
        return
    for seg in _segments(c, s):
        pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in seg)
        c.parts.append(f'<polyline class="series" points="{pts}" fill="none" stroke="{s.color}" '
                       f'stroke-width="2"{dash}/>')
        if len(seg) == 1 or s.kind == "line":
            c.parts.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{s.color}"/>' for x, y in seg)


def _legend(c: _Canvas, entries: Sequence[tuple[str, str]]) -> None:
    """Colour keys right-aligned on the title line, clear of the subtitle below it."""
    x = float(WIDTH - RIGHT)
    for label, color in reversed(entries):
        c.text(x, 14, label, anchor="end", size=10, color=INK)
        x -= 5.6 * len(label) + 4
        c.parts.append(f'<rect x="{x - 9:.1f}" y="5" width="9" height="9" fill="{color}"/>')
        x -= 16


def time_chart(name: str, title: str, series: Sequence[Series], *, x_label: str, y_label: str,
               bands: Sequence[Band] = (), y_max: float | None = None, y_fmt: str = "",
               subtitle: str = "") -> str:
    """A chart over time (or any numeric x): bars, lines and steps, with optional shaded bands."""
    xs = [x for s in series for x in (*s.xs, *s.x1s)]
    ys = [y for s in series for y in s.ys if y is not None and not math.isnan(y)]
    x_ticks = nice_ticks(min(xs, default=0.0), max(xs, default=1.0), 6)
    top = y_max if y_max is not None else max(ys, default=1.0) * 1.08
    y_ticks = nice_ticks(0.0, top or 1.0, 4)
    c = _Canvas(x_ticks[0], x_ticks[-1], 0.0, y_max if y_max is not None else y_ticks[-1])
    for b in bands:
        c.parts.append(f'<rect class="band" x="{LEFT}" y="{c.y(b.y1):.1f}" width="{WIDTH - LEFT - RIGHT}" '
                       f'height="{c.y(b.y0) - c.y(b.y1):.1f}" fill="{b.color}" opacity="0.16"/>')
        c.text(WIDTH - RIGHT - 4, c.y(b.y1) + 12, b.label, anchor="end", size=10, color=b.color)
    _axes(c, x_ticks, [t for t in y_ticks if t <= c.y_hi + 1e-12], x_label, y_label, y_fmt)
    for s in series:
        _draw_series(c, s)
    if len(series) > 1:
        _legend(c, [(s.name, s.color) for s in series])
    return "".join([*_open_svg(name, title, subtitle), *c.parts, "</svg>"])


def hbar_chart(name: str, title: str, rows: Sequence[tuple[str, float, str, str]], *, x_label: str,
               legend: Sequence[tuple[str, str]] = (), subtitle: str = "") -> str:
    """Horizontal bars, one per (label, value, colour, note); the note prints after the bar."""
    height_per = (HEIGHT - TOP - BOTTOM) / max(1, len(rows))
    x_ticks = nice_ticks(0.0, max((r[1] for r in rows), default=1.0) * 1.25 or 1.0, 5)
    c = _Canvas(0.0, x_ticks[-1], 0.0, 1.0)
    left = LEFT + 42
    scale = (WIDTH - RIGHT - left) / (x_ticks[-1] or 1.0)
    for i, (label, value, color, note) in enumerate(rows):
        y = TOP + 6 + i * height_per
        h = max(4.0, height_per - 7)
        c.text(left - 6, y + h / 2 + 4, label, anchor="end", color=INK)
        c.parts.append(f'<rect class="bar" x="{left}" y="{y:.1f}" width="{max(0.5, value * scale):.1f}" '
                       f'height="{h:.1f}" fill="{color}"/>')
        c.text(left + value * scale + 5, y + h / 2 + 4, note, anchor="start")
    base = HEIGHT - BOTTOM + 4
    c.parts.append(f'<line x1="{left}" x2="{WIDTH - RIGHT}" y1="{base}" y2="{base}" stroke="{MUTED}"/>')
    for t in x_ticks:
        c.text(left + t * scale, base + 14, fmt(t))
    c.text((left + WIDTH - RIGHT) / 2, HEIGHT - 8, x_label, color=INK)
    _legend(c, legend)
    return "".join([*_open_svg(name, title, subtitle), *c.parts, "</svg>"])


def histogram(name: str, title: str, labels: Sequence[str], counts: Sequence[float], *, x_label: str,
              y_label: str, color: str = PURPLE, subtitle: str = "") -> str:
    """Bars over categorical bins (e.g. log-spaced latency buckets), labelled every few bins."""
    y_ticks = nice_ticks(0.0, max(counts, default=1.0) * 1.08 or 1.0, 4)
    c = _Canvas(0.0, float(len(counts)), 0.0, y_ticks[-1])
    _axes(c, [], y_ticks, x_label, y_label)
    every = max(1, math.ceil(len(labels) / 8))
    for i, (label, n) in enumerate(zip(labels, counts, strict=True)):
        w = c.x(i + 1) - c.x(i)
        if n > 0:
            c.parts.append(f'<rect class="bar" x="{c.x(i) + 1:.1f}" y="{c.y(n):.1f}" width="{max(1.0, w - 2):.1f}" '
                           f'height="{c.y(0) - c.y(n):.1f}" fill="{color}"><title>{escape(label)}: {n:g}</title></rect>')
        if i % every == 0:
            c.text(c.x(i) + w / 2, HEIGHT - BOTTOM + 15, label)
    return "".join([*_open_svg(name, title, subtitle), *c.parts, "</svg>"])


def message_plot(name: str, title: str, message: str) -> str:
    """A titled, framed placeholder that says why there is nothing to draw."""
    return "".join([*_open_svg(name, title),
                    f'<rect x="{LEFT}" y="{TOP + 10}" width="{WIDTH - LEFT - RIGHT}" '
                    f'height="{HEIGHT - TOP - BOTTOM - 10}" fill="#f5f7fa" stroke="{GRID}"/>',
                    f'<text class="empty" x="{WIDTH / 2:.0f}" y="{HEIGHT / 2 + 4:.0f}" text-anchor="middle" '
                    f'font-size="13" fill="{MUTED}">{escape(message)}</text></svg>'])
