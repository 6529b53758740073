"""Hand-written inline SVG plots for report.html: bar, line, scatter, histogram.

Why SVG strings rather than matplotlib, Bokeh or a JS chart library:
- no dependency: nothing to install or pin, and no plotting backend state to configure;
- crisp at any size: vector graphics scale with the page (phone or laptop, and zoom) since
  every plot draws in a viewBox and takes the width of its container;
- tiny files: a plot is a few KB of text, so a report with dozens of plots stays far below
  the 2 MB budget, where embedded PNGs or a bundled JS library would not;
- testable text: a test can read labels, titles and marks in the HTML (or the browser's DOM)
  directly, without decoding images;
- nothing to load: no script, no font, no network; the file renders offline and without JS.

Every function returns one `<figure>` string; every piece of text goes through html.escape.
Colours come from CSS classes (report_html.CSS), so the page styles them in one place.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

W, H = 640, 300  # viewBox of a plot; the page scales it to the container's width
PAD_L, PAD_R, PAD_T, PAD_B = 64, 16, 14, 46


def esc(x: object) -> str:
    return html.escape(str(x), quote=True)


def fmt(v: float) -> str:
    """A short number for an axis or a label: 3 significant digits, no exponent when sane."""
    if v == 0 or not math.isfinite(v):
        return "0" if v == 0 else str(v)
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        return f"{v:.2e}"
    return f"{v:.3g}"


def ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n 'nice' tick values (1, 2, 5 x 10^k steps) from at or below lo to at or above
    hi (the axes then span whole steps)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start, end = math.floor(lo / step) * step, math.ceil(hi / step) * step
    out, v = [], start
    while v <= end + step * 1e-9:
        out.append(round(v, 12))
        v += step
    return out


class _Axes:
    """Linear maps from data to the plot area of the viewBox, and the axes' SVG."""

    def __init__(self, xlo: float, xhi: float, ylo: float, yhi: float,
                 w: int = W, h: int = H) -> None:
        self.w, self.h = w, h
        self.xt, self.yt = ticks(xlo, xhi), ticks(ylo, yhi)
        self.xlo, self.xhi = min(self.xt[0], xlo), max(self.xt[-1], xhi)
        self.ylo, self.yhi = min(self.yt[0], ylo), max(self.yt[-1], yhi)

    def x(self, v: float) -> float:
        span = (self.xhi - self.xlo) or 1.0
        return PAD_L + (v - self.xlo) / span * (self.w - PAD_L - PAD_R)

    def y(self, v: float) -> float:
        span = (self.yhi - self.ylo) or 1.0
        return self.h - PAD_B - (v - self.ylo) / span * (self.h - PAD_T - PAD_B)

    def draw(self, xlabel: str, ylabel: str, *, xticks: bool = True) -> str:
        parts = [(f'<line class="ax" x1="{PAD_L}" y1="{self.h - PAD_B}" x2="{self.w - PAD_R}" '
                 f'y2="{self.h - PAD_B}"/>'),
                 (f'<line class="ax" x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" '
                 f'y2="{self.h - PAD_B}"/>')]
        for t in self.yt:
            y = self.y(t)
            parts.append(f'<line class="grid" x1="{PAD_L}" y1="{y:.1f}" x2="{self.w - PAD_R}" '
                         f'y2="{y:.1f}"/><text class="tick" x="{PAD_L - 6}" y="{y + 4:.1f}" '
                         f'text-anchor="end">{esc(fmt(t))}</text>')
        if xticks:
            for t in self.xt:
                x = self.x(t)
                parts.append(f'<text class="tick" x="{x:.1f}" y="{self.h - PAD_B + 16}" '
                             f'text-anchor="middle">{esc(fmt(t))}</text>')
        parts.append(f'<text class="lab" x="{(PAD_L + self.w - PAD_R) / 2:.0f}" '
                     f'y="{self.h - 6}" text-anchor="middle">{esc(xlabel)}</text>')
        parts.append(f'<text class="lab" x="14" y="{(PAD_T + self.h - PAD_B) / 2:.0f}" '
                     f'text-anchor="middle" transform="rotate(-90 14 '
                     f'{(PAD_T + self.h - PAD_B) / 2:.0f})">{esc(ylabel)}</text>')
        return "".join(parts)


def _figure(title: str, body: str, w: int = W, h: int = H, caption: str = "",
            cls: str = "plot") -> str:
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return (f'<figure class="{esc(cls)}"><svg viewBox="0 0 {w} {h}" role="img" '
            f'aria-label="{esc(title)}" preserveAspectRatio="xMidYMid meet">'
            f"<title>{esc(title)}</title>{body}</svg>{cap}</figure>")


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def bar(labels: Sequence[str], values: Sequence[float | None], *, title: str, unit: str,
        highlight: Sequence[str] = (), caption: str = "", classes: Sequence[str] = ()) -> str:
    """Horizontal bars, one row per label (long layer names stay readable on a phone).
    None values draw no bar and say "n/a"; `highlight` labels (or per-bar `classes`) get
    their own CSS class."""
    vals = _finite(values)
    lo, hi = min([0.0, *vals]), max([0.0, *vals]) or 1.0
    row = 18
    h = PAD_T + PAD_B + row * max(len(labels), 1)
    ax = _Axes(lo, hi, 0, 1, h=h)
    parts = []
    for t in ax.xt:
        x = ax.x(t)
        parts.append(f'<line class="grid" x1="{x:.1f}" y1="{PAD_T}" x2="{x:.1f}" '
                     f'y2="{h - PAD_B}"/><text class="tick" x="{x:.1f}" y="{h - PAD_B + 16}" '
                     f'text-anchor="middle">{esc(fmt(t))}</text>')
    x0 = ax.x(0.0)
    for i, (lab, v) in enumerate(zip(labels, values, strict=True)):
        y = PAD_T + i * row
        cls = classes[i] if i < len(classes) else ("bar hi" if lab in highlight else "bar")
        name = lab if len(lab) <= 14 else lab[:13] + "…"
        parts.append(f'<text class="tick" x="{PAD_L - 4}" y="{y + 13}" text-anchor="end">'
                     f"{esc(name)}</text>")
        if v is None or not math.isfinite(float(v)):
            parts.append(f'<text class="tick" x="{x0 + 4:.1f}" y="{y + 13}">n/a</text>')
            continue
        x1 = ax.x(float(v))
        parts.append(f'<rect class="{esc(cls)}" x="{min(x0, x1):.1f}" y="{y + 3}" '
                     f'width="{max(abs(x1 - x0), 0.5):.1f}" height="{row - 5}">'
                     f"<title>{esc(lab)}: {esc(fmt(float(v)))} {esc(unit)}</title></rect>")
    parts.append(f'<line class="ax" x1="{x0:.1f}" y1="{PAD_T}" x2="{x0:.1f}" '
                 f'y2="{h - PAD_B}"/>')
    parts.append(f'<text class="lab" x="{(PAD_L + W - PAD_R) / 2:.0f}" y="{h - 6}" '
                 f'text-anchor="middle">{esc(unit)}</text>')
    return _figure(title, "".join(parts), h=h, caption=caption)


def line(x_labels: Sequence[str], series: dict[str, Sequence[float | None]], *, title: str,
         ylabel: str, marked: Sequence[int] = (), mark_label: str = "", caption: str = ""
         ) -> str:
    """One line per series over categorical x positions (e.g. runs in time order); points at
    the `marked` indices are drawn as red crosses (e.g. failing runs)."""
    n = len(x_labels)
    vals = [v for s in series.values() for v in _finite(s)]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    if hi == lo:
        lo, hi = lo - (abs(lo) * 0.05 or 1.0), hi + (abs(hi) * 0.05 or 1.0)
    ax = _Axes(0, max(n - 1, 1), lo, hi)
    parts = [ax.draw("run", ylabel, xticks=False)]
    step = max(1, math.ceil(n / 8))
    for i in range(0, n, step):
        parts.append(f'<text class="tick" x="{ax.x(i):.1f}" y="{H - PAD_B + 16}" '
                     f'text-anchor="middle">{esc(x_labels[i])}</text>')
    for k, (name, ys) in enumerate(series.items()):
        pts = [(ax.x(i), ax.y(float(v))) for i, v in enumerate(ys)
               if v is not None and math.isfinite(float(v))]
        d = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        parts.append(f'<polyline class="ln s{k}" points="{d}"/>')
        for i, v in enumerate(ys):
            if v is None or not math.isfinite(float(v)):
                continue
            x, y = ax.x(i), ax.y(float(v))
            tip = f"{x_labels[i]}: {fmt(float(v))}"
            if i in marked:
                parts.append(f'<path class="fail" d="M{x - 5:.1f},{y - 5:.1f}l10,10m0,-10'
                             f'l-10,10"><title>{esc(tip)} ({esc(mark_label)})</title></path>')
            else:
                parts.append(f'<circle class="pt s{k}" cx="{x:.1f}" cy="{y:.1f}" r="3">'
                             f"<title>{esc(tip)}</title></circle>")
    return _figure(title, "".join(parts), caption=caption)


def scatter(points: Sequence[tuple[float, float, str, str]], *, title: str, xlabel: str,
            ylabel: str, caption: str = "") -> str:
    """(x, y, tooltip, kind) points; kind is a CSS class: "pt" (plain), "front" (joined by
    a line in x order: a Pareto front), "chosen" (a larger ringed marker)."""
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    if not points:
        return _figure(title, '<text class="lab" x="320" y="150" text-anchor="middle">'
                       "no points</text>", caption=caption)
    ypad = (max(ys) - min(ys)) * 0.05 or 0.5
    ax = _Axes(min(xs), max(xs), min(ys) - ypad, max(ys) + ypad)
    parts = [ax.draw(xlabel, ylabel)]
    front = sorted((p for p in points if p[3] == "front"), key=lambda p: (p[0], p[1]))
    if len(front) > 1:
        d = " ".join(f"{ax.x(p[0]):.1f},{ax.y(p[1]):.1f}" for p in front)
        parts.append(f'<polyline class="ln front" points="{d}"/>')
    order = {"pt": 0, "front": 1, "chosen": 2}
    for x, y, tip, kind in sorted(points, key=lambda p: order.get(p[3], 0)):
        r = 7 if kind == "chosen" else 3.5
        parts.append(f'<circle class="{esc(kind)}" cx="{ax.x(x):.1f}" cy="{ax.y(y):.1f}" '
                     f'r="{r}"><title>{esc(tip)}</title></circle>')
    return _figure(title, "".join(parts), caption=caption)


def histogram(edges: Sequence[float], counts: Sequence[float], *, title: str, xlabel: str,
              marks: Sequence[tuple[float, str]] = (), caption: str = "") -> str:
    """Bars between consecutive edges (log-scaled counts: range tails are what matter, and
    they are small next to the bulk); `marks` are vertical lines with a label (e.g. the
    quantization range)."""
    if len(edges) != len(counts) + 1 or not counts:
        return _figure(title, '<text class="lab" x="320" y="150" text-anchor="middle">'
                       "no data</text>", caption=caption)
    logc = [math.log10(1 + max(float(c), 0.0)) for c in counts]
    xlo = min([float(edges[0]), *(m[0] for m in marks)])
    xhi = max([float(edges[-1]), *(m[0] for m in marks)])
    ax = _Axes(xlo, xhi, 0, max(logc) or 1.0)
    parts = [ax.draw(xlabel, "log10(1 + count)")]
    base = ax.y(0)
    for i, c in enumerate(logc):
        if c <= 0:
            continue
        x0, x1 = ax.x(float(edges[i])), ax.x(float(edges[i + 1]))
        parts.append(f'<rect class="bar" x="{x0:.1f}" y="{ax.y(c):.1f}" '
                     f'width="{max(x1 - x0, 0.5):.1f}" height="{base - ax.y(c):.1f}">'
                     f"<title>[{esc(fmt(float(edges[i])))}, {esc(fmt(float(edges[i + 1])))}): "
                     f"{esc(fmt(float(counts[i])))}</title></rect>")
    for v, lab in marks:
        x = ax.x(v)
        parts.append(f'<line class="mark" x1="{x:.1f}" y1="{PAD_T}" x2="{x:.1f}" '
                     f'y2="{H - PAD_B}"/><text class="tick mk" x="{x + 3:.1f}" '
                     f'y="{PAD_T + 10}">{esc(lab)}</text>')
    return _figure(title, "".join(parts), caption=caption, cls="plot hist")
