"""Small inline SVG charts for the compliance report (agent/report.py): stacked bars and a histogram. No I/O,
no dependency: the report must open offline, so every chart is drawn here as SVG text.

Every value written into the SVG goes through `html.escape`. Bars carry `data-*` attributes (label, series,
value) and a `<title>` tooltip, so the numbers can be read back from the page as well as seen.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

FONT = "font-family:system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif"
AXIS = "#6b7280"
GRID = "#e5e7eb"


@dataclass(frozen=True)
class Series:
    name: str
    colour: str
    values: Sequence[float]


@dataclass(frozen=True)
class Marker:
    """A vertical line on a histogram at `value` (e.g. p50), labelled `label`."""

    label: str
    value: float
    colour: str


def nice_step(span: float, *, ticks: int = 5) -> float:
    """A 1/2/5 x 10^k step that cuts `span` into at most about `ticks` parts."""
    if span <= 0:
        return 1.0
    raw = span / ticks
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1.0, 2.0, 5.0, 10.0) if m * power >= raw)


def _num(value: float) -> str:
    return f"{value:g}" if abs(value) < 1e6 else f"{value:.3g}"


def _frame(width: int, height: int, label: str, body: list[str]) -> str:
    return (f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"'
            f' viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}" style="{FONT}">'
            f'<title>{escape(label)}</title>{"".join(body)}</svg>')


def _y_axis(body: list[str], *, top: float, left: float, plot_w: float, plot_h: float, ymax: float) -> float:
    """Gridlines and labels for counts (whole steps); returns the value at the top of the plot."""
    step = max(nice_step(ymax), 1.0)
    top_value = max(step, math.ceil(ymax / step) * step)
    tick = 0.0
    while tick <= top_value + step / 2:
        y = top + plot_h - tick / top_value * plot_h
        body.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="{GRID}"/>')
        body.append(f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end" fill="{AXIS}">'
                    f'{escape(_num(tick))}</text>')
        tick += step
    return top_value


def stacked_bars(labels: Sequence[str], series: Sequence[Series], *, title: str, width: int = 960,
                 height: int = 280) -> str:
    """Bars per label (e.g. per day), each stacked from `series` (one value per label)."""
    left, right, top, bottom = 48, 24, 14, 46
    plot_w, plot_h = width - left - right, height - top - bottom
    body: list[str] = []
    n = max(len(labels), 1)
    totals = [sum(s.values[i] for s in series) for i in range(len(labels))]
    top_value = _y_axis(body, top=top, left=left, plot_w=plot_w, plot_h=plot_h, ymax=max(totals, default=0))
    slot = plot_w / n
    bar_w = max(slot * 0.78, 1.0)
    label_every = max(1, math.ceil(n / max(1, plot_w // 70)))
    for i, label in enumerate(labels):
        x = left + i * slot + (slot - bar_w) / 2
        base = 0.0
        for s in series:
            value = s.values[i]
            if value <= 0:
                continue
            y0 = top + plot_h - base / top_value * plot_h
            h = value / top_value * plot_h
            body.append(
                f'<rect class="bar" x="{x:.2f}" y="{y0 - h:.2f}" width="{bar_w:.2f}" height="{h:.2f}"'
                f' fill="{escape(s.colour)}" data-label="{escape(label)}" data-series="{escape(s.name)}"'
                f' data-value="{escape(_num(value))}"><title>{escape(label)} {escape(s.name)}: '
                f'{escape(_num(value))}</title></rect>')
            base += value
        if i % label_every == 0:
            cx = left + i * slot + slot / 2
            body.append(f'<text x="{cx:.1f}" y="{top + plot_h + 16}" font-size="11" text-anchor="middle"'
                        f' fill="{AXIS}">{escape(label)}</text>')
    if not labels:
        body.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h / 2}" text-anchor="middle" fill="{AXIS}">'
                    'nothing in this period</text>')
    body.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="{AXIS}"/>')
    x = float(left)
    for s in series:
        body.append(f'<rect x="{x:.1f}" y="{height - 16}" width="10" height="10" fill="{escape(s.colour)}"/>'
                    f'<text x="{x + 14:.1f}" y="{height - 7}" font-size="12" fill="#111827">{escape(s.name)}'
                    f' ({escape(_num(sum(s.values)))})</text>')
        x += 34 + 8 * (len(s.name) + len(_num(sum(s.values))))
    return _frame(width, height, title, body)


def histogram(edges: Sequence[float], counts: Sequence[int], *, title: str, unit: str, markers: Sequence[Marker] = (),
              overflow: int = 0, width: int = 960, height: int = 260) -> str:
    """Bars of `counts` between consecutive `edges` (len(edges) == len(counts) + 1), the last bar open-ended
    when `overflow` values lay beyond the last edge (drawn as its own bar), with vertical `markers`."""
    left, right, top, bottom = 48, 24, 20 + 14 * len(markers), 40
    plot_w, plot_h = width - left - right, height - top - bottom
    body: list[str] = []
    bars = [*counts, overflow] if overflow else list(counts)
    top_value = _y_axis(body, top=top, left=left, plot_w=plot_w, plot_h=plot_h, ymax=max(bars, default=0))
    slot = plot_w / max(len(bars), 1)
    hi = edges[-1] if edges else 1.0
    for i, count in enumerate(bars):
        label = f"{_num(edges[i])} to {_num(edges[i + 1])} {unit}" if i < len(counts) else f"≥ {_num(hi)} {unit}"
        h = count / top_value * plot_h
        colour = "#2563eb" if i < len(counts) else "#9ca3af"
        body.append(
            f'<rect class="bar" x="{left + i * slot + 1:.2f}" y="{top + plot_h - h:.2f}" width="{max(slot - 2, 1):.2f}"'
            f' height="{h:.2f}" fill="{colour}" data-label="{escape(label)}" data-value="{count}">'
            f'<title>{escape(label)}: {count}</title></rect>')
    every = max(1, math.ceil((len(counts) + 1) / 10))
    for i, edge in enumerate(edges):
        if i % every == 0 or i == len(edges) - 1:
            body.append(f'<text x="{left + i * slot:.1f}" y="{top + plot_h + 15}" font-size="11" text-anchor="middle"'
                        f' fill="{AXIS}">{escape(_num(edge))}</text>')
    body.append(f'<text x="{left + plot_w / 2}" y="{height - 6}" font-size="11" text-anchor="middle" fill="{AXIS}">'
                f'{escape(unit)}</text>')
    body.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="{AXIS}"/>')
    for n, m in enumerate(markers):
        x = left + _slot_position(edges, m.value, overflow=bool(overflow)) * slot
        label_y = 16 + 14 * n
        body.append(f'<line class="marker" x1="{x:.1f}" x2="{x:.1f}" y1="{label_y - 10}" y2="{top + plot_h}"'
                    f' stroke="{escape(m.colour)}" stroke-width="2" stroke-dasharray="5 3"/>')
        anchor = "end" if x > left + plot_w * 0.8 else "start"
        dx = -5 if anchor == "end" else 5
        body.append(f'<text x="{x + dx:.1f}" y="{label_y}" font-size="12" font-weight="600" text-anchor="{anchor}"'
                    f' fill="{escape(m.colour)}" stroke="#fff" stroke-width="3" paint-order="stroke">'
                    f'{escape(m.label)}</text>')
    return _frame(width, height, title, body)


def _slot_position(edges: Sequence[float], value: float, *, overflow: bool) -> float:
    """Where `value` falls, in bar slots from the left: bins take equal widths whatever their spans (so
    log-spaced edges draw as a log axis), interpolated within its bin."""
    if not edges or value < edges[0]:
        return 0.0
    if value >= edges[-1]:
        return len(edges) - 0.5 if overflow else len(edges) - 1.0
    i = bisect_right(edges, value) - 1
    return i + (value - edges[i]) / (edges[i + 1] - edges[i])
