"""Small charts drawn with pillow (no matplotlib dependency): scores with intervals, metrics against a setting.

Each chart is one PIL image made of panels side by side (one per metric), with a title, axis ticks at round
numbers, and category or numeric x axes. Deterministic: the same numbers draw the same pixels.
"""
from __future__ import annotations

import math
from typing import Sequence

PANEL_W, PANEL_H = 420, 320
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 58, 16, 40, 64
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
          "#bcbd22"]


def _font(size: int):
    from .images import _font as font

    return font(size)


def nice_ticks(lo: float, hi: float, count: int = 5) -> list:
    """Round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi - lo < 1e-12:
        pad = abs(lo) * 0.05 or 0.5
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(1, count - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = [round(start, 10)]
    while ticks[-1] < hi - step * 1e-9 and len(ticks) < 50:  # the last tick is at or above hi
        ticks.append(round(start + step * len(ticks), 10))
    return ticks


def _fmt(v: float) -> str:
    return f"{v:.4g}"


class _Panel:
    def __init__(self, draw, x0: int, y0: int, title: str, ylo: float, yhi: float, ylabel: str = ""):
        self.draw, self.x0, self.y0 = draw, x0, y0
        self.ticks = nice_ticks(ylo, yhi)
        self.ylo, self.yhi = self.ticks[0], self.ticks[-1]
        self.left, self.right = x0 + MARGIN_L, x0 + PANEL_W - MARGIN_R
        self.top, self.bottom = y0 + MARGIN_T, y0 + PANEL_H - MARGIN_B
        font = _font(13)
        draw.text((x0 + MARGIN_L, y0 + 10), title, fill="black", font=_font(15))
        for t in self.ticks:
            y = self.y(t)
            draw.line([(self.left, y), (self.right, y)], fill="#e6e6e6")
            draw.text((x0 + 4, y - 7), _fmt(t), fill="#444444", font=font)
        draw.rectangle([self.left, self.top, self.right, self.bottom], outline="#888888")
        if ylabel:
            draw.text((x0 + 4, y0 + 24), ylabel, fill="#666666", font=_font(11))

    def y(self, v: float) -> float:
        span = (self.yhi - self.ylo) or 1.0
        return self.bottom - (v - self.ylo) / span * (self.bottom - self.top)


MAX_COLUMNS = 3


def _origin(i: int, n_panels: int) -> tuple:
    """Top-left corner of panel i: rows of at most MAX_COLUMNS panels under the title."""
    cols = min(MAX_COLUMNS, max(1, n_panels))
    return (i % cols) * PANEL_W, 30 + (i // cols) * PANEL_H


def _canvas(n_panels: int, title: str, extra_h: int = 0):
    from PIL import Image, ImageDraw

    cols = min(MAX_COLUMNS, max(1, n_panels))
    rows = -(-max(1, n_panels) // cols)
    img = Image.new("RGB", (cols * PANEL_W, rows * PANEL_H + 30 + extra_h), "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, 6), title, fill="black", font=_font(16))
    return img, draw


def interval_chart(panels: Sequence[dict], title: str = ""):
    """Per-category means with interval bars. `panels`: [{"title", "labels": [...], "means": [...], "lows": [...],
    "highs": [...]}], one panel per metric; categories share colours across panels."""
    from .images import fit_text

    img, draw = _canvas(len(panels), title)
    for p_i, panel in enumerate(panels):
        values = [v for v in list(panel["lows"]) + list(panel["highs"]) + list(panel["means"]) if math.isfinite(v)]
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        pad = (hi - lo) * 0.1
        ax = _Panel(draw, *_origin(p_i, len(panels)), panel["title"], lo - pad, hi + pad, panel.get("ylabel", ""))
        n = len(panel["labels"])
        slot = (ax.right - ax.left) / max(1, n)
        font = _font(11)
        for i, label in enumerate(panel["labels"]):
            cx = ax.left + slot * (i + 0.5)
            color = COLORS[i % len(COLORS)]
            m, l, h = panel["means"][i], panel["lows"][i], panel["highs"][i]
            if all(math.isfinite(v) for v in (m, l, h)):
                draw.line([(cx, ax.y(l)), (cx, ax.y(h))], fill=color, width=3)
                for v in (l, h):
                    draw.line([(cx - 8, ax.y(v)), (cx + 8, ax.y(v))], fill=color, width=2)
                r = 5
                draw.ellipse([cx - r, ax.y(m) - r, cx + r, ax.y(m) + r], fill=color)
                draw.text((cx + 10, ax.y(m) - 7), _fmt(m), fill=color, font=font)
            # the label under the axis: wrapped, and shrunk rather than cut off (images.fit_text)
            label_font, lines, line_h = fit_text(str(label), slot - 4, 11, max_lines=2)
            for j, line in enumerate(lines):
                draw.text((cx - draw.textlength(line, font=label_font) / 2, ax.bottom + 6 + line_h * j), line,
                          fill=color, font=label_font)
    return img


def line_chart(panels: Sequence[dict], title: str = "", xlabel: str = ""):
    """Metrics against a numeric setting. `panels`: [{"title", "series": [{"label", "x": [...], "y": [...]}]}];
    series share colours (by position) across panels, with one legend under the panels."""
    series_labels = []
    for panel in panels:
        for s in panel["series"]:
            if s["label"] not in series_labels:
                series_labels.append(s["label"])
    legend_rows = (len(series_labels) + 2) // 3
    img, draw = _canvas(len(panels), title, extra_h=18 * legend_rows + 8)
    font = _font(11)
    for p_i, panel in enumerate(panels):
        ys = [v for s in panel["series"] for v in s["y"] if v is not None and math.isfinite(v)]
        xs = [v for s in panel["series"] for v in s["x"]]
        lo, hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
        pad = (hi - lo) * 0.08
        ax = _Panel(draw, *_origin(p_i, len(panels)), panel["title"], lo - pad, hi + pad)
        xt = nice_ticks(min(xs), max(xs)) if xs else [0.0, 1.0]
        x_lo, x_hi = (min(xs), max(xs)) if xs and max(xs) > min(xs) else (xt[0], xt[-1])
        pad_x = (x_hi - x_lo) * 0.05 or 0.5
        x_lo, x_hi = x_lo - pad_x, x_hi + pad_x

        def x_of(v):
            return ax.left + (v - x_lo) / (x_hi - x_lo) * (ax.right - ax.left)

        for t in sorted(set(xs)):
            draw.line([(x_of(t), ax.bottom), (x_of(t), ax.bottom + 4)], fill="#888888")
            draw.text((x_of(t) - 8, ax.bottom + 6), _fmt(t), fill="#444444", font=font)
        if xlabel:
            draw.text((ax.left + (ax.right - ax.left) / 2 - 40, ax.bottom + 22), xlabel, fill="#444444", font=font)
        for s in panel["series"]:
            color = COLORS[series_labels.index(s["label"]) % len(COLORS)]
            pts = [(x_of(x), ax.y(y)) for x, y in zip(s["x"], s["y"]) if y is not None and math.isfinite(y)]
            if len(pts) > 1:
                draw.line(pts, fill=color, width=2)
            for px, py in pts:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
    y0 = 30 + -(-max(1, len(panels)) // min(MAX_COLUMNS, max(1, len(panels)))) * PANEL_H + 4
    for i, label in enumerate(series_labels):
        x, y = 12 + (i % 3) * 300, y0 + 18 * (i // 3)
        color = COLORS[i % len(COLORS)]
        draw.rectangle([x, y + 3, x + 14, y + 11], fill=color)
        draw.text((x + 20, y), str(label), fill="black", font=font)
    return img


def message_image(text: str, width: int = 640, height: int = 120):
    """A plain image with a line of text (a node's image output while a sharded run is unfinished)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    y = 10
    for line in str(text).splitlines() or [""]:
        draw.text((10, y), line, fill="black", font=_font(14))
        y += 20
    return img
