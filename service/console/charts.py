"""Small server-rendered SVG charts for the overview page (no JavaScript, no chart library).

Every chart is a self-contained <svg> with a <title> and text labels; colours are presentation
attributes (the console's Content-Security-Policy allows no inline styles). All text goes
through markupsafe.escape.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

from markupsafe import Markup, escape

COLOURS = {"match": "#2e7d32", "no_match": "#c62828", "rejected": "#8d8d8d"}
AXIS = "#555"
GRID = "#e3e3e3"
FONT = 'font-family="system-ui, sans-serif" font-size="11"'


def _nice_max(value: float) -> float:
    """A round axis maximum >= value (1, 2, 2.5, 5 x 10^k)."""
    if value <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * exp:
            return step * exp
    return 10 * exp


def _fmt(v: float) -> str:
    return f"{v:g}" if v < 10_000 else f"{v / 1000:g}k"


def _svg(width: int, height: int, title: str, body: Iterable[str]) -> Markup:
    return Markup(
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" aria-label="{escape(title)}" {FONT}><title>{escape(title)}</title>'
        + "".join(body) + "</svg>")


def _y_axis(parts: list, x0: float, y0: float, plot_h: float, plot_w: float, ymax: float, ticks: int = 4) -> None:
    for i in range(ticks + 1):
        v = ymax * i / ticks
        y = y0 - plot_h * i / ticks
        parts.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + plot_w}" y2="{y:.1f}" stroke="{GRID}"/>')
        parts.append(f'<text x="{x0 - 4}" y="{y + 4:.1f}" text-anchor="end" fill="{AXIS}">{_fmt(v)}</text>')
    parts.append(f'<line x1="{x0}" y1="{y0}" x2="{x0 + plot_w}" y2="{y0}" stroke="{AXIS}"/>')


def _legend(parts: list, x: float, y: float, names: Sequence[str]) -> None:
    for name in names:
        parts.append(f'<rect x="{x}" y="{y - 9}" width="10" height="10" fill="{COLOURS.get(name, AXIS)}"/>')
        parts.append(f'<text x="{x + 14}" y="{y}" fill="#222">{escape(name)}</text>')
        x += 14 + 7 * len(name) + 16


def stacked_bars(buckets: Sequence[tuple[str, dict[str, int]]], title: str, series=("match", "no_match", "rejected"),
                 width: int = 760, height: int = 240) -> Markup:
    """One stacked bar per bucket (e.g. per hour), segments per decision."""
    left, right, top, bottom = 44, 10, 24, 36
    plot_w, plot_h = width - left - right, height - top - bottom
    y0 = top + plot_h
    parts: list[str] = []
    ymax = _nice_max(max((sum(c.get(s, 0) for s in series) for _, c in buckets), default=0))
    _y_axis(parts, left, y0, plot_h, plot_w, ymax)
    _legend(parts, left, 14, series)
    n = max(len(buckets), 1)
    slot = plot_w / n
    bar_w = max(1.0, slot * 0.8)
    label_every = max(1, math.ceil(n / 12))
    for i, (label, counts) in enumerate(buckets):
        x = left + i * slot + (slot - bar_w) / 2
        y = y0
        tip = ", ".join(f"{s}: {counts.get(s, 0)}" for s in series)
        parts.append(f"<g><title>{escape(label)}: {escape(tip)}</title>")
        for s in series:
            h = plot_h * counts.get(s, 0) / ymax
            if h > 0:
                y -= h
                parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{h:.1f}" fill="{COLOURS[s]}"/>')
        parts.append("</g>")
        if i % label_every == 0:
            parts.append(f'<text x="{x + bar_w / 2:.1f}" y="{y0 + 14}" text-anchor="middle" fill="{AXIS}">'
                         f"{escape(label)}</text>")
    if not buckets:
        parts.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h / 2}" text-anchor="middle" fill="{AXIS}">no records</text>')
    return _svg(width, height, title, parts)


def text_width(text: str) -> float:
    """A generous estimate of `text`'s width in px at the charts' 11 px sans-serif (DejaVu Sans,
    among the widest: digits and most lowercase letters 7 px or less)."""
    return sum(11.0 if c in "mwMW@%" else 9.0 if c.isupper() else 7.0 for c in text)


def place_labels(lines: Sequence[tuple[float, str]], x_min: float, x_max: float, gap: float = 4.0
                 ) -> list[tuple[int, float, float, str]]:
    """Rows for threshold labels above a plot, so that no two labels overlap: each label sits
    beside its line (right of it when it fits, else left), in the first row where its text
    overlaps no label of that row, crosses no line coming down from a label above, and its own
    line crosses no label below. `lines`: (x, text) sorted by x. Returns (row, start, end, text)
    per line, in order; a label that fits nowhere gets a row of its own."""
    placed: list[tuple[int, float, float, float]] = []   # row, start, end, line x

    def fits(row: int, a: float, b: float, x: float) -> bool:
        for r, pa, pb, px in placed:
            if r == row and a < pb + gap and pa < b + gap:
                return False
            if r < row and a - gap <= px <= b + gap:
                return False
            if r > row and pa - gap <= x <= pb + gap:
                return False
        return True

    out = []
    for x, text in lines:
        w = text_width(text)
        sides = [(x + 4, x + 4 + w), (x - 4 - w, x - 4)]
        sides = [s for s in sides if s[0] >= x_min and s[1] <= x_max] or [max(sides, key=lambda s: min(
            s[0] - x_min, x_max - s[1]))]
        rows = 1 + max((r for r, *_ in placed), default=-1)
        spot = next(((row, a, b) for row in range(rows) for a, b in sides if fits(row, a, b, x)), None)
        row, a, b = spot or (rows, *sides[0])
        placed.append((row, a, b, x))
        out.append((row, a, b, text))
    return out


def _panel(parts: list, mode: str, scores, top: float, left: float, plot_w: float, bins: int, plot_h: int = 110,
           width: int = 760) -> float:
    """One scoring mode's histogram of match and no-match scores from `top`, on its own axis
    (0 to 1, or from the lowest score or threshold rounded down to 0.05, so that scores bunched
    near 1 stay readable), with each threshold drawn and labelled "<mode> <threshold>".
    Returns the y below the panel."""
    seen = [v for v in (*scores.match, *scores.no_match, *scores.thresholds) if v is not None and 0.0 <= v <= 1.0]
    lo = min(math.floor(min(seen) * 20) / 20, 0.95) if seen else 0.0
    span = 1.0 - lo

    def pos(v: float) -> float:
        return (min(max(v, lo), 1.0) - lo) / span

    def counts(values):
        c = [0] * bins
        for v in values:
            if v is not None and lo <= v <= 1.0:
                c[min(int(pos(v) * bins), bins - 1)] += 1
        return c

    n = len(scores.match) + len(scores.no_match)
    head = f"{mode}: {n} score{'' if n == 1 else 's'} ({len(scores.match)} match, {len(scores.no_match)} no_match)"
    parts.append(f'<text x="{left}" y="{top + 12}" fill="#222" font-weight="600" class="mode">{escape(head)}</text>')
    thresholds = sorted(set(round(t, 4) for t in scores.thresholds if t is not None))
    labels = place_labels([(left + plot_w * pos(t), f"{mode} {t:.4f}") for t in thresholds], 0, width)
    rows = 1 + max((row for row, *_ in labels), default=-1)
    plot_top = top + 20 + 14 * rows
    y0 = plot_top + plot_h
    series = {"match": counts(scores.match), "no_match": counts(scores.no_match)}
    ymax = _nice_max(max((max(c) for c in series.values()), default=0))
    _y_axis(parts, left, y0, plot_h, plot_w, ymax, ticks=2)
    bw = plot_w / bins
    for name, c in series.items():
        for i, n in enumerate(c):
            if n:
                h = plot_h * n / ymax
                a = lo + span * i / bins
                parts.append(f'<rect x="{left + i * bw + 1:.1f}" y="{y0 - h:.1f}" width="{bw - 2:.1f}" height="{h:.1f}" '
                             f'fill="{COLOURS[name]}" fill-opacity="0.55"><title>{escape(mode)} {name} '
                             f'{a:.3f}-{a + span / bins:.3f}: {n}</title></rect>')
    for i in range(0, bins + 1, max(1, bins // 5)):
        x = left + i * bw
        parts.append(f'<text x="{x:.1f}" y="{y0 + 14}" text-anchor="middle" fill="{AXIS}">{lo + span * i / bins:.3g}</text>')
    axis = f"{mode} score" + ("" if lo == 0 else f" (axis from {lo:.2f})")
    parts.append(f'<text x="{left + plot_w / 2}" y="{y0 + 28}" text-anchor="middle" fill="{AXIS}">{escape(axis)}</text>')
    for t, (row, a, _b, text) in zip(thresholds, labels):
        x = left + plot_w * pos(t)
        base = top + 20 + 14 * row + 10
        parts.append(f'<line x1="{x:.1f}" y1="{base - 9:.1f}" x2="{x:.1f}" y2="{y0}" stroke="#1a237e" '
                     f'stroke-width="2" stroke-dasharray="5,3"><title>{escape(mode)} threshold {t:.4f}</title></line>')
        parts.append(f'<text x="{a:.1f}" y="{base:.1f}" fill="#1a237e" class="threshold" '
                     f'data-mode="{escape(mode)}">{escape(text)}</text>')
    return y0 + 40


def mode_histograms(modes: Mapping[str, object], title: str, bins: int = 20, width: int = 760,
                    max_panels: int = 8) -> Markup:
    """A histogram per scoring mode, one under the other (scores of different modes are on
    different scales): `modes` maps a mode to its scores (`.match`, `.no_match`, `.thresholds`),
    most scores first; the first `max_panels` are drawn and the rest named."""
    left, right = 44, 10
    plot_w = width - left - right
    parts: list[str] = []
    _legend(parts, left, 14, ("match", "no_match"))
    y = 24.0
    for mode, scores in list(modes.items())[:max_panels]:
        y = _panel(parts, mode, scores, y, left, plot_w, bins, width=width)
    rest = list(modes)[max_panels:]
    if rest:
        parts.append(f'<text x="{left}" y="{y + 4}" fill="{AXIS}">not drawn: {escape(", ".join(rest))}</text>')
        y += 14
    if not modes:
        parts.append(f'<text x="{left + plot_w / 2}" y="{y + 40}" text-anchor="middle" fill="{AXIS}">no scores</text>')
        y += 60
    return _svg(width, math.ceil(y), title, parts)


def horizontal_bars(items: Sequence[tuple[str, float]], title: str, unit: str = "", colour: str = "#5c6bc0",
                    width: int = 520, bar_h: int = 18) -> Markup:
    """Labelled horizontal bars, largest first as given (error codes by count, latency percentiles)."""
    left, right, top = 150, 70, 8
    height = top * 2 + max(len(items), 1) * (bar_h + 6)
    plot_w = width - left - right
    vmax = max((v for _, v in items), default=0) or 1.0
    parts: list[str] = []
    for i, (label, value) in enumerate(items):
        y = top + i * (bar_h + 6)
        w = plot_w * value / vmax
        parts.append(f'<text x="{left - 6}" y="{y + bar_h - 5}" text-anchor="end" fill="#222">{escape(label)}</text>')
        parts.append(f'<rect x="{left}" y="{y}" width="{max(w, 1):.1f}" height="{bar_h}" fill="{colour}"/>')
        shown = f"{value:.1f}" if isinstance(value, float) and not float(value).is_integer() else f"{int(value)}"
        parts.append(f'<text x="{left + w + 4:.1f}" y="{y + bar_h - 5}" fill="#222">{shown}{escape(unit)}</text>')
    if not items:
        parts.append(f'<text x="{left}" y="{top + bar_h - 5}" fill="{AXIS}">none</text>')
    return _svg(width, height, title, parts)
