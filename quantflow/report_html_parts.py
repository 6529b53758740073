"""Small HTML building blocks shared by the report.html sections (quantflow/report_html.py,
quantflow/report_html_layers.py): escaped tables, sections, number formats.

Every string that comes from a report (layer names, causes, fixes, versions, paths) passes
through `esc`; a model file can name its layers anything, including markup.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from quantflow.svg_plots import esc

__all__ = ["card", "esc", "kv", "mb", "na", "num", "pct", "section", "table"]


def na(why: str = "not available") -> str:
    return f'<p class="na">{esc(why)}</p>'


def num(v: Any, digits: int = 3, unit: str = "") -> str:
    """A number with `digits` significant digits (escaped), or an em dash for a missing one."""
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        return "—" if v is None else esc(v)
    if isinstance(v, float) and not math.isfinite(v):
        return esc(v)
    text = f"{v:.{digits}g}" if isinstance(v, float) else f"{v:,}"
    return esc(text + (f" {unit}" if unit else ""))


def pct(v: Any, digits: int = 2) -> str:
    return "—" if v is None else esc(f"{float(v):.{digits}f}%")


def mb(v: Any) -> str:
    return "—" if v is None else esc(f"{float(v) / 1e6:.3f} MB")


def table(head: Sequence[str], rows: Sequence[Sequence[str]], *, cls: str = "",
          raw: bool = True) -> str:
    """A table in a horizontally scrolling box (wide per-layer tables on a phone). Cells
    are already-escaped HTML when `raw`, else they are escaped here."""
    def cell(c: object) -> str:
        return str(c) if raw else esc(c)

    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>" for r in rows)
    return (f'<div class="scroll"><table class="{esc(cls)}"><thead><tr>{th}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def kv(pairs: Sequence[tuple[str, str]]) -> str:
    """A definition list of (label, already-escaped HTML value)."""
    items = "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in pairs)
    return f'<dl class="kv">{items}</dl>'


def card(label: str, value: str, note: str = "", cls: str = "") -> str:
    """One headline number (value is already-escaped HTML)."""
    n = f'<span class="note">{note}</span>' if note else ""
    return (f'<div class="card {esc(cls)}"><span class="lbl">{esc(label)}</span>'
            f'<span class="val">{value}</span>{n}</div>')


def section(sid: str, title: str, body: str) -> str:
    return f'<section id="{esc(sid)}"><h2>{esc(title)}</h2>{body}</section>'


def grid(figures: Sequence[str]) -> str:
    """Plots side by side on a laptop, stacked on a phone."""
    return '<div class="grid">' + "".join(figures) + "</div>" if figures else ""
