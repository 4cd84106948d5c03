"""Small SVG chart builders: scatter, step CDF, histogram, horizontal bars.

Pure functions from numbers to an `<svg>` string (standard library only): axes with ticks,
axis labels with units, a title and a legend on every chart, so the report is one file that
any browser renders offline. Every data mark carries class "mark" (and its kind), and a
<title> child, which a browser shows as a tooltip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape
from typing import Dict, List, Optional, Sequence, Tuple

# Okabe-Ito: distinguishable with the common colour-vision deficiencies (yellow left out: too
# light on white), then a few darker extras for long lists.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000",
           "#8C564B", "#7F7F7F", "#17BECF", "#BCBD22", "#9467BD")
SHAPES = ("circle", "square", "triangle", "diamond")
FONT = "font-family:system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif"
CHAR_W = 6.6  # average width of a 12 px sans-serif character, for layout only


def colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _f(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".") if abs(v) < 1e6 else f"{v:.0f}"


def fmt_tick(v: float) -> str:
    """A tick label: no trailing zeros, thousands as k, small numbers with enough digits."""
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 10000:
        return f"{v / 1000:g}k"
    if a >= 1:
        return f"{v:.6g}"
    return f"{v:.3g}"


def nice_ticks(lo: float, hi: float, n: int = 5) -> List[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k steps) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"ticks need finite bounds, not {lo}, {hi}")
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step + 1e-9) * step
    ticks, t = [], start
    while t <= hi + step * 1e-9 + step:
        ticks.append(round(t, 12))
        if t >= hi - step * 1e-9:
            break
        t += step
    return ticks


def log_ticks(lo: float, hi: float) -> List[float]:
    """1-2-5 ticks per decade covering [lo, hi] (lo > 0); thinned to decades when many."""
    if lo <= 0 or hi <= 0:
        raise ValueError("a log axis needs positive values")
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    ticks = [m * 10 ** e for e in range(a, b + 1) for m in (1, 2, 5)]
    ticks = [t for t in ticks if lo / 1.0001 <= t <= hi * 1.0001]
    if len(ticks) > 9:
        ticks = [10 ** e for e in range(a, b + 1) if lo / 1.0001 <= 10 ** e <= hi * 1.0001]
        every = math.ceil(len(ticks) / 7)
        ticks = ticks[::-1][::every][::-1]  # keep the top decade, thin below it
    if len(ticks) < 2:
        ticks = sorted({lo, hi})
    return ticks


@dataclass
class Axis:
    lo: float
    hi: float
    px0: float
    px1: float
    log: bool = False

    @classmethod
    def fit(cls, values: Sequence[float], px0: float, px1: float, log: bool = False,
            zero: bool = False, pad: float = 0.06) -> "Axis":
        vals = [v for v in values if v is not None and math.isfinite(v) and (v > 0 or not log)]
        if not vals:
            vals = [1.0] if log else [0.0, 1.0]
        lo, hi = min(vals), max(vals)
        if log:
            if hi / lo < 1.5:
                lo, hi = lo / 1.25, hi * 1.25
            ticks = log_ticks(lo / (1 + pad * 3), hi * (1 + pad * 3))
            return cls(min(lo / (1 + pad), ticks[0]), max(hi * (1 + pad), ticks[-1]), px0, px1, True)
        if zero:
            lo = min(lo, 0.0)
        span = (hi - lo) or (abs(hi) * 0.2 or 1.0)
        lo2 = lo if (zero and lo == 0) else lo - span * pad
        if lo >= 0:  # sizes, latencies, counts: the axis does not go below zero
            lo2 = max(0.0, lo2)
        ticks = nice_ticks(lo2, hi + span * pad)
        return cls(ticks[0], ticks[-1], px0, px1)

    def ticks(self) -> List[float]:
        if self.log:
            return log_ticks(self.lo, self.hi)
        eps = (self.hi - self.lo) * 1e-6
        return [t for t in nice_ticks(self.lo, self.hi) if self.lo - eps <= t <= self.hi + eps]

    def __call__(self, v: float) -> float:
        if self.log:
            t = (math.log10(v) - math.log10(self.lo)) / ((math.log10(self.hi) - math.log10(self.lo)) or 1)
        else:
            t = (v - self.lo) / ((self.hi - self.lo) or 1)
        return self.px0 + t * (self.px1 - self.px0)


class Canvas:
    """An SVG under construction: plot area, axes, title, legend."""

    def __init__(self, width: int, height: int, title: str, *, left: int = 64, right: int = 16,
                 top: int = 34, bottom: int = 50, chart_id: str = "", kind: str = ""):
        self.w, self.h = width, height
        self.left, self.right, self.top, self.bottom = left, right, top, bottom
        self.title, self.id, self.kind = title, chart_id, kind
        self.parts: List[str] = []

    @property
    def x0(self) -> float:
        return self.left

    @property
    def x1(self) -> float:
        return self.w - self.right

    @property
    def y0(self) -> float:  # bottom of the plot area (pixel y grows downwards)
        return self.h - self.bottom

    @property
    def y1(self) -> float:
        return self.top

    def add(self, s: str) -> None:
        self.parts.append(s)

    def text(self, x: float, y: float, s: str, *, anchor: str = "start", size: int = 12,
             weight: str = "normal", cls: str = "", rotate: Optional[float] = None, fill: str = "#222") -> None:
        rot = f' transform="rotate({_f(rotate)} {_f(x)} {_f(y)})"' if rotate is not None else ""
        c = f' class="{cls}"' if cls else ""
        self.add(f'<text x="{_f(x)}" y="{_f(y)}" text-anchor="{anchor}" font-size="{size}" '
                 f'font-weight="{weight}" fill="{fill}"{c}{rot}>{escape(s)}</text>')

    def axes(self, xa: Axis, ya: Axis, x_label: str, y_label: str, *, x_tick_fmt=fmt_tick,
             y_tick_fmt=fmt_tick, grid: bool = True) -> None:
        for t in xa.ticks():
            x = xa(t)
            if grid:
                self.add(f'<line x1="{_f(x)}" y1="{_f(self.y1)}" x2="{_f(x)}" y2="{_f(self.y0)}" '
                         f'stroke="#e6e6e6"/>')
            self.add(f'<line x1="{_f(x)}" y1="{_f(self.y0)}" x2="{_f(x)}" y2="{_f(self.y0 + 5)}" stroke="#444"/>')
            self.text(x, self.y0 + 18, x_tick_fmt(t), anchor="middle", size=11, cls="tick")
        for t in ya.ticks():
            y = ya(t)
            if grid:
                self.add(f'<line x1="{_f(self.x0)}" y1="{_f(y)}" x2="{_f(self.x1)}" y2="{_f(y)}" '
                         f'stroke="#e6e6e6"/>')
            self.add(f'<line x1="{_f(self.x0 - 5)}" y1="{_f(y)}" x2="{_f(self.x0)}" y2="{_f(y)}" stroke="#444"/>')
            self.text(self.x0 - 8, y + 4, y_tick_fmt(t), anchor="end", size=11, cls="tick")
        self.add(f'<path d="M{_f(self.x0)},{_f(self.y1)} V{_f(self.y0)} H{_f(self.x1)}" fill="none" '
                 f'stroke="#444"/>')
        self.text((self.x0 + self.x1) / 2, self.h - 10, x_label, anchor="middle", cls="axis-label")
        self.text(16, (self.y0 + self.y1) / 2, y_label, anchor="middle", rotate=-90, cls="axis-label")

    def legend(self, entries: Sequence[Tuple[str, str, str]], *, x: Optional[float] = None,
               y: Optional[float] = None, title: str = "") -> None:
        """entries: (label, colour, shape: one of SHAPES, 'line' or 'bar'); drawn in a column."""
        x = self.x1 + 14 if x is None else x
        y = self.y1 + 4 if y is None else y
        g = ['<g class="legend">']
        if title:
            g.append(f'<text x="{_f(x)}" y="{_f(y + 10)}" font-size="12" font-weight="bold" '
                     f'fill="#222">{escape(title)}</text>')
            y += 18
        for i, (label, col, shape) in enumerate(entries):
            cy = y + i * 18 + 6
            if shape in ("line", "dashed"):
                da = ' stroke-dasharray="5 3"' if shape == "dashed" else ""
                g.append(f'<line x1="{_f(x)}" y1="{_f(cy)}" x2="{_f(x + 16)}" y2="{_f(cy)}" stroke="{col}" '
                         f'stroke-width="2.5"{da}/>')
            elif shape == "bar":
                g.append(f'<rect x="{_f(x + 2)}" y="{_f(cy - 6)}" width="12" height="12" fill="{col}"/>')
            else:
                g.append(marker(x + 8, cy, shape, col, 5))
            g.append(f'<text x="{_f(x + 22)}" y="{_f(cy + 4)}" font-size="12" fill="#222">{escape(label)}</text>')
        g.append("</g>")
        self.add("".join(g))

    def note(self, s: str) -> None:
        self.text((self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2, s, anchor="middle", fill="#777", cls="empty")

    def svg(self) -> str:
        head = (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart-svg" width="{self.w}" height="{self.h}" '
                f'viewBox="0 0 {self.w} {self.h}" role="img" aria-label="{escape(self.title)}" '
                f'style="{FONT}"' + (f' id="{escape(self.id)}"' if self.id else "")
                + (f' data-kind="{escape(self.kind)}"' if self.kind else "") + ">")
        t = f'<title>{escape(self.title)}</title><rect width="100%" height="100%" fill="#fff"/>'
        self.text(self.left, 20, self.title, size=14, weight="bold", cls="chart-title")
        return head + t + "".join(self.parts) + "</svg>"


def marker(x: float, y: float, shape: str, col: str, r: float = 5.5, cls: str = "", tip: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    t = f"<title>{escape(tip)}</title>" if tip else ""
    if shape == "square":
        body = f'<rect{c} x="{_f(x - r)}" y="{_f(y - r)}" width="{_f(2 * r)}" height="{_f(2 * r)}" fill="{col}"'
    elif shape == "triangle":
        pts = f"{_f(x)},{_f(y - r * 1.2)} {_f(x - r * 1.1)},{_f(y + r * 0.8)} {_f(x + r * 1.1)},{_f(y + r * 0.8)}"
        body = f'<polygon{c} points="{pts}" fill="{col}"'
    elif shape == "diamond":
        d = r * 1.25
        pts = f"{_f(x)},{_f(y - d)} {_f(x + d)},{_f(y)} {_f(x)},{_f(y + d)} {_f(x - d)},{_f(y)}"
        body = f'<polygon{c} points="{pts}" fill="{col}"'
    else:
        body = f'<circle{c} cx="{_f(x)}" cy="{_f(y)}" r="{_f(r)}" fill="{col}"'
    body += ' stroke="#fff" stroke-width="1" fill-opacity="0.9"'
    return body + (f">{t}</{body.split()[0][1:]}>" if t else "/>")


def _legend_width(labels: Sequence[str], title: str = "") -> int:
    longest = max([len(s) for s in labels] + [len(title) * 1.1], default=0)
    return int(30 + longest * CHAR_W)


# --- charts --------------------------------------------------------------------------

@dataclass
class Point:
    x: float
    y: float
    series: str      # colour (e.g. target)
    shape_key: str   # marker shape (e.g. format)
    tip: str = ""


def scatter(points: Sequence[Point], *, title: str, x_label: str, y_label: str, x_log: bool = False,
            y_percent: bool = False, chart_id: str = "", width: int = 440, height: int = 330,
            series_title: str = "", shape_title: str = "", series_order: Sequence[str] = (),
            shape_order: Sequence[str] = ()) -> str:
    """One marker per point: colour by `series`, shape by `shape_key`, both in the legend. The
    orders fix which colour and shape each key gets (the same across charts); the legend lists
    the keys present."""
    series = list(dict.fromkeys([*series_order, *(p.series for p in points)]))
    shapes = list(dict.fromkeys([*shape_order, *(p.shape_key for p in points)]))
    present_s = {p.series for p in points}
    present_k = {p.shape_key for p in points}
    legend_w = _legend_width([x for x in series if x in present_s] + [k for k in shapes if k in present_k],
                             max(series_title, shape_title, key=len))
    c = Canvas(width + legend_w, height, title, right=legend_w + 12, chart_id=chart_id, kind="scatter")
    ok = [p for p in points if p.x is not None and p.y is not None and math.isfinite(p.x) and math.isfinite(p.y)
          and (p.x > 0 or not x_log)]
    xa = Axis.fit([p.x for p in ok], c.x0 + 8, c.x1 - 8, log=x_log)
    ya = Axis.fit([p.y for p in ok], c.y0 - 6, c.y1 + 6)
    if y_percent:  # fractions shown as percent: the axis stays within 0..100 %
        ya = Axis(max(0.0, ya.lo), min(1.0, ya.hi), ya.px0, ya.px1)
    ytf = (lambda v: f"{v * 100:.4g}") if y_percent else fmt_tick
    c.axes(xa, ya, x_label, y_label, y_tick_fmt=ytf)
    if not ok:
        c.note("no data")
    # overlapping points (same build shared by targets): jitter them sideways a little, in order
    seen: Dict[Tuple[int, int], int] = {}
    for p in ok:
        px, py = xa(p.x), ya(p.y)
        k = (round(px / 3), round(py / 3))
        n = seen.get(k, 0)
        seen[k] = n + 1
        px += (n % 2 * 2 - 1) * math.ceil(n / 2) * 7 if n else 0
        c.add(marker(px, py, SHAPES[shapes.index(p.shape_key) % len(SHAPES)], colour(series.index(p.series)),
                     cls="mark point", tip=p.tip))
    entries = [(s, colour(i), "circle") for i, s in enumerate(series) if s in present_s]
    c.legend(entries, title=series_title if entries else "")
    if present_k:
        y = c.y1 + 4 + (18 if series_title else 0) + len(entries) * 18 + 12
        c.legend([(s, "#555", SHAPES[i % len(SHAPES)]) for i, s in enumerate(shapes) if s in present_k], y=y,
                 title=shape_title)
    return c.svg()


def cdf(series: Sequence[Tuple[str, Sequence[float]]], *, title: str, x_label: str,
        chart_id: str = "", width: int = 640, height: int = 340, x_log: Optional[bool] = None,
        colours: Optional[Sequence[str]] = None, dashes: Optional[Sequence[str]] = None) -> str:
    """Empirical CDF of each series' samples as a step line; x on a log axis when they span
    more than 20x (so a fast and a slow bundle both stay readable)."""
    cols = list(colours) if colours else [colour(i) for i in range(len(series))]
    dash = {lab: d for (lab, _), d in zip(series, dashes or [])}
    data = [(lab, sorted(v for v in s if math.isfinite(v)), col) for (lab, s), col in zip(series, cols)]
    data = [(lab, s, col) for lab, s, col in data if s]
    allv = [v for _, s, _ in data for v in s]
    if x_log is None:
        x_log = bool(allv) and min(allv) > 0 and max(allv) / min(allv) > 20
    legend_w = _legend_width([lab for lab, _, _ in data])
    c = Canvas(width + legend_w, height, title, right=legend_w + 12, chart_id=chart_id, kind="cdf")
    xa = Axis.fit(allv, c.x0 + 4, c.x1 - 4, log=x_log)
    ya = Axis(0.0, 1.0, c.y0, c.y1)
    c.axes(xa, ya, x_label + (" (log scale)" if x_log else ""), "fraction of runs ≤ x",
           y_tick_fmt=lambda v: f"{v:g}")
    if not data:
        c.note("no samples")
    for lab, s, col in data:
        n = len(s)
        pts = [f"M{_f(xa(s[0]))},{_f(ya(0))}"]
        for j, v in enumerate(s):
            pts.append(f"H{_f(xa(v))}V{_f(ya((j + 1) / n))}")
        p50 = s[(n - 1) // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
        da = f' stroke-dasharray="{dash[lab]}"' if dash.get(lab) else ""
        c.add(f'<path class="mark line" d="{"".join(pts)}" fill="none" stroke="{col}" stroke-width="2"{da}>'
              f'<title>{escape(lab)}: {n} runs, p50 {p50:.4g} ms</title></path>')
    c.legend([(lab, col, "dashed" if dash.get(lab) else "line") for lab, _, col in data])
    return c.svg()


def histogram(samples: Sequence[float], *, title: str, x_label: str, chart_id: str = "", col: str = PALETTE[0],
              bins: Optional[int] = None, width: int = 340, height: int = 222) -> str:
    """Counts per bin, p50 and p99 as dashed lines. The axis ends at the upper outer fence
    (Q3 + 3 IQR, at least p90): slower runs are counted in the last bar and said in a note, so a
    few outliers (a busy machine) do not squeeze the distribution into one bar."""
    s = sorted(v for v in samples if math.isfinite(v))
    c = Canvas(width, height, title, left=50, top=48, bottom=44, chart_id=chart_id, kind="histogram")
    if not s:
        xa, ya = Axis(0, 1, c.x0, c.x1), Axis(0, 1, c.y0, c.y1)
        c.axes(xa, ya, x_label, "runs")
        c.note("no samples")
        return c.svg()
    n = len(s)
    q = lambda p: s[min(n - 1, max(0, int(math.ceil(p * n)) - 1))]  # noqa: E731
    q1, q3 = q(0.25), q(0.75)
    lo, hi = s[0], min(s[-1], max(q(0.9), q3 + 3 * (q3 - q1))) if n >= 20 else s[-1]
    if hi <= lo:
        hi = lo + (abs(lo) * 0.01 or 1e-3)
    k = bins or max(5, min(40, int(math.sqrt(n) * 1.5)))
    w = (hi - lo) / k
    counts = [0] * k
    for v in s:
        counts[min(k - 1, int((v - lo) / w)) if v < hi else k - 1] += 1
    over = sum(1 for v in s if v > hi)
    xa = Axis.fit([lo, hi], c.x0 + 2, c.x1 - 2, pad=0.02)
    ya = Axis.fit(counts, c.y0, c.y1, zero=True, pad=0.05)
    c.axes(xa, ya, x_label, "runs", grid=False)
    for i, cnt in enumerate(counts):
        x0, x1 = xa(lo + i * w), xa(lo + (i + 1) * w)
        y = ya(cnt)
        rng = f"{lo + i * w:.4g}–{lo + (i + 1) * w:.4g} ms" + (f" (incl. {over} slower)" if i == k - 1 and over else "")
        c.add(f'<rect class="mark bar" x="{_f(x0)}" y="{_f(y)}" width="{_f(max(0.5, x1 - x0 - 1))}" '
              f'height="{_f(max(0, c.y0 - y))}" fill="{col}"><title>{rng}: {cnt} runs</title></rect>')
    p50, p99 = q(0.5), q(0.99)
    for i, (v, lab) in enumerate(((p50, "p50"), (p99, "p99"))):
        if lo <= v <= hi:
            x = xa(v)
            c.add(f'<line x1="{_f(x)}" y1="{_f(c.y1)}" x2="{_f(x)}" y2="{_f(c.y0)}" stroke="#222" '
                  f'stroke-dasharray="4 3"/>')
            right = x > (c.x0 + c.x1) / 2
            c.text(x + (-3 if right else 3), c.y1 + 10 + 12 * i, f"{lab} {v:.3g}", size=10,
                   anchor="end" if right else "start")
    tail = [f"p99 {p99:.3g}"] if p99 > hi else []
    if over:
        tail.append(f"{over} slower (to {s[-1]:.3g}) in the last bar")
    if tail:
        c.text(c.x1, 36, "; ".join(tail), anchor="end", size=10, fill="#666")
    return c.svg()


def hbars(items: Sequence[Tuple[str, float, bool]], *, title: str, x_label: str, chart_id: str = "",
          legend: Tuple[str, str] = ("kept in float", "quantized"), width: int = 640,
          x_log: Optional[bool] = None) -> str:
    """One horizontal bar per (label, value, highlighted), in the given order; highlighted bars
    in the accent colour. Values over more than 3 decades go on a log axis."""
    vals = [v for _, v, _ in items if v is not None and math.isfinite(v)]
    pos = [v for v in vals if v > 0]
    if x_log is None:
        x_log = bool(pos) and len(pos) == len(vals) and max(pos) / min(pos) > 1000
    label_w = int(min(220, max([len(lab) for lab, _, _ in items] + [4]) * CHAR_W + 16))
    bar_h, gap = 16, 6
    lw = _legend_width(list(legend))
    height = 34 + 50 + max(1, len(items)) * (bar_h + gap)
    c = Canvas(width + lw, height, title, left=label_w, right=lw + 12, chart_id=chart_id, kind="bars")
    xa = Axis.fit(vals + ([] if x_log else [0.0]), c.x0, c.x1, log=x_log, zero=not x_log, pad=0.03)
    ya = Axis(0, 1, c.y0, c.y1)
    for t in xa.ticks():
        x = xa(t)
        c.add(f'<line x1="{_f(x)}" y1="{_f(c.y1)}" x2="{_f(x)}" y2="{_f(c.y0)}" stroke="#e6e6e6"/>')
        c.text(x, c.y0 + 18, fmt_tick(t), anchor="middle", size=11, cls="tick")
    c.add(f'<path d="M{_f(c.x0)},{_f(c.y1)} V{_f(c.y0)} H{_f(c.x1)}" fill="none" stroke="#444"/>')
    c.text((c.x0 + c.x1) / 2, c.h - 10, x_label + (" (log scale)" if x_log else ""), anchor="middle",
           cls="axis-label")
    del ya
    base = xa(xa.lo)
    for i, (lab, v, hl) in enumerate(items):
        y = c.y1 + 4 + i * (bar_h + gap)
        col = PALETTE[3] if hl else PALETTE[0]
        c.text(c.x0 - 6, y + bar_h - 4, lab if len(lab) * CHAR_W < label_w - 10
               else lab[: int((label_w - 10) / CHAR_W) - 1] + "…", anchor="end", size=11)
        if v is None or not math.isfinite(v) or (x_log and v <= 0):
            c.text(c.x0 + 4, y + bar_h - 4, "n/a", size=11, fill="#777")
            continue
        x1 = xa(v)
        c.add(f'<rect class="mark bar" x="{_f(base)}" y="{_f(y)}" width="{_f(max(1, x1 - base))}" '
              f'height="{bar_h}" fill="{col}"><title>{escape(lab)}: {v:.4g}'
              f'{" (" + legend[0] + ")" if hl else ""}</title></rect>')
    c.legend([(legend[0], PALETTE[3], "bar"), (legend[1], PALETTE[0], "bar")])
    return c.svg()
