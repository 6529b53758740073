"""The per-layer sections of report.html: layers (table + plots), ranges (histograms of the
worst layers), debug (first divergent layer, worst layers with cause and fix).

Inputs (report.json): `layers` [{name, op, plan, weight_bits, runs_integer, params}],
`search.layers` [{layer, trace_per_param, act_bits, ...}] (mixed precision),
`latency.quantized.per_layer_ms`, and `analysis` (the parity debugger, `quantflow debug`):
{samples, runtime, runtime_skipped, first_divergent, worst, seconds, layers [{name, op, bits,
sqnr_sim_db, local_sqnr_db, bound_db, sqnr_runtime_db, runtime_steps, hessian_trace, diverged,
cause, fix}], histograms {layer: {weight, activation: {edges, counts}, range, clipped}}}.
Each part that is missing renders "not available" rather than failing the page.
"""

from __future__ import annotations

import re
from typing import Any

from quantflow import svg_plots
from quantflow.report_html_parts import esc, grid, kv, na, num, section, table

#: how many layers the latency-share plot shows (the rest are summed in the table)
TOP_LATENCY = 20


def analysis_of(report: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The analysis section when usable, else None and why not."""
    a = report.get("analysis")
    if not isinstance(a, dict):
        return None, "not available: this compile ran no parity analysis (`quantflow debug`)"
    if "error" in a:
        return None, f"not available: the analysis failed ({a['error']})"
    return a, ""


def _sensitivity(report: dict[str, Any], a: dict[str, Any] | None
                 ) -> tuple[dict[str, float], str]:
    """Per-layer Hessian trace: the search's per-parameter trace when mixed, else the
    analysis'."""
    search = report.get("search") or {}
    s = {r["layer"]: r["trace_per_param"] for r in search.get("layers") or []
         if isinstance(r, dict) and r.get("trace_per_param") is not None}
    if s:
        return s, "Hessian trace per parameter (mixed-precision search)"
    s = {r["name"]: r["hessian_trace"] for r in (a or {}).get("layers") or []
         if r.get("hessian_trace") is not None}
    return s, "Hessian trace per weight (Fisher estimate of the parity analysis)"


def _rows(report: dict[str, Any], a: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One merged dict per layer: report.layers order, then analysis-only layers."""
    rows: dict[str, dict[str, Any]] = {}
    for r in report.get("layers") or []:
        rows[r["name"]] = dict(r)
        m = re.fullmatch(r"W(\d+)A(\d+)", str(r.get("plan") or ""))
        if m:  # uniform plans name the activation bits only in the option label
            rows[r["name"]]["act_bits"] = int(m.group(2))
    for r in (report.get("search") or {}).get("layers") or []:
        if isinstance(r, dict) and "layer" in r:
            rows.setdefault(r["layer"], {"name": r["layer"]})["act_bits"] = r.get("act_bits")
    for r in (a or {}).get("layers") or []:
        row = rows.setdefault(r["name"], {"name": r["name"], "op": r.get("op")})
        for k in ("sqnr_sim_db", "sqnr_runtime_db", "diverged", "bits"):
            row[k] = r.get(k)
    return list(rows.values())


def layers_section(report: dict[str, Any]) -> str:
    a, why = analysis_of(report)
    rows = _rows(report, a)
    if not rows:
        return section("layers", "Layers", na("no per-layer data in this report"))
    sens, sens_label = _sensitivity(report, a)
    lat = ((report.get("latency") or {}).get("quantized") or {}).get("per_layer_ms") or {}
    total = sum(float(v) for v in lat.values()) or None
    head = ["layer", "op", "plan", "W bits", "A bits", "params", "runs", "Hessian trace",
            "SQNR sim vs FP32 dB", "SQNR runtime vs sim dB", "latency ms", "latency share"]
    body = []
    for r in rows:
        ms = lat.get(r["name"])
        integer = r.get("runs_integer")
        body.append([
            f'<span class="mono">{esc(r["name"])}</span>', esc(r.get("op") or "—"),
            esc(r.get("plan") or r.get("bits") or "—"), num(r.get("weight_bits")),
            num(r.get("act_bits")), num(r.get("params")),
            "—" if integer is None else ('<span class="ok">integer</span>' if integer
                                         else '<span class="warn">float</span>'),
            num(sens.get(r["name"])), num(r.get("sqnr_sim_db")), num(r.get("sqnr_runtime_db")),
            num(ms), "—" if ms is None or not total else esc(f"{100 * float(ms) / total:.1f}%")])
    n_int = sum(1 for r in rows if r.get("runs_integer") is True)
    n_float = sum(1 for r in rows if r.get("runs_integer") is False)
    intro = (f"<p>{len(rows)} layer(s): {n_int} run integer kernels, {n_float} run in float "
             "on the target.</p>")
    return section("layers", "Layers", intro + table(head, body, cls="layers")
                   + _layer_plots(rows, sens, sens_label, lat, total)
                   + ("" if a else na(f"SQNR per layer {why}")))


def _layer_plots(rows: list[dict[str, Any]], sens: dict[str, float], sens_label: str,
                 lat: dict[str, float], total: float | None) -> str:
    names = [r["name"] for r in rows]
    figs = []
    wbits = [r.get("weight_bits") for r in rows]
    if any(b is not None for b in wbits):
        cls = ["bar" if r.get("runs_integer") is not False else "bar float" for r in rows]
        figs.append(svg_plots.bar(names, wbits, title="Weight bits per layer", unit="bits",
                                  classes=cls, caption="Weight bits; orange bars: the layer "
                                  "runs in float on the target, blue: integer kernels"))
    if sens:
        figs.append(svg_plots.bar(names, [sens.get(n) for n in names],
                                  title="Sensitivity per layer", unit="Hessian trace",
                                  caption=sens_label + "; higher: more sensitive to "
                                  "quantization noise"))
    sim = [r.get("sqnr_sim_db") for r in rows]
    if any(v is not None for v in sim):
        figs.append(svg_plots.bar(names, sim, title="SQNR: simulation vs FP32", unit="dB",
                                  highlight=[r["name"] for r in rows if r.get("diverged")],
                                  caption="SQNR of each layer's output, torch simulation "
                                  "vs FP32 (higher is better; red: diverged beyond its bound)"))
    rt = [r.get("sqnr_runtime_db") for r in rows]
    if any(v is not None for v in rt):
        figs.append(svg_plots.bar(names, rt, title="SQNR: runtime vs simulation", unit="dB",
                                  caption="SQNR of each layer's output, runtime artifact vs "
                                  "the torch simulation (higher is better)"))
    if lat and total:
        top = sorted(lat.items(), key=lambda kv: -float(kv[1]))[:TOP_LATENCY]
        figs.append(svg_plots.bar([k for k, _ in top], [100 * float(v) / total for _, v in top],
                                  title="Share of latency", unit="% of summed layer time",
                                  caption=f"Quantized artifact, per layer (top {len(top)} of "
                                  f"{len(lat)}; profiler times on this machine)"))
    return grid(figs)


def ranges_section(report: dict[str, Any]) -> str:
    a, why = analysis_of(report)
    hists = (a or {}).get("histograms") or {}
    if not a or not hists:
        return section("ranges", "Ranges", na(why or "not available: no histograms in the "
                                              "analysis"))
    worst = [n for n in a.get("worst") or [] if n in hists]
    order = worst + [n for n in hists if n not in worst]
    parts = [("<p>Weight and activation value histograms of the worst layers, with the "
             "quantization range (lo, hi) of the activation marked; values outside it clip."
             "</p>")]
    for name in order:
        h = hists[name]
        rng = h.get("range") or []
        marks = [(float(rng[0]), "lo"), (float(rng[1]), "hi")] if len(rng) == 2 else []
        figs = []
        for kind, m in (("weight", []), ("activation", marks)):
            d = h.get(kind) or {}
            figs.append(svg_plots.histogram(d.get("edges") or [], d.get("counts") or [],
                                            title=f"{name}: {kind} values", xlabel=kind,
                                            marks=m))
        clipped = h.get("clipped")
        parts.append(f'<h3 class="mono">{esc(name)}</h3>'
                     + kv([("activation range", esc(", ".join(num(v) for v in rng)) or "—"),
                           ("clipped", "—" if clipped is None
                            else esc(f"{100 * float(clipped):.3f}% of activations"))])
                     + grid(figs))
    return section("ranges", "Ranges", "".join(parts))


def debug_section(report: dict[str, Any]) -> str:
    a, why = analysis_of(report)
    if not a:
        return section("debug", "Parity debugger", na(why))
    layers = {r["name"]: r for r in a.get("layers") or []}
    first = a.get("first_divergent")
    runtime = a.get("runtime")
    facts = [("first divergent layer", f'<strong class="mono bad">{esc(first)}</strong>'
              if first else '<span class="ok">none: every layer within its bound</span>'),
             ("samples", num(a.get("samples"))),
             ("runtime compared", esc(runtime) if runtime else
              esc(f"none ({a.get('runtime_skipped') or 'skipped'})")),
             ("analysis time", num(a.get("seconds"), unit="s"))]
    head = ["layer", "op", "bits", "SQNR sim dB", "local SQNR dB", "bound dB",
            "SQNR runtime dB", "runtime steps", "diverged", "cause", "fix"]
    body = []
    for name in a.get("worst") or []:
        r = layers.get(name, {"name": name})
        body.append([f'<span class="mono">{esc(name)}</span>', esc(r.get("op") or "—"),
                     esc(r.get("bits") if r.get("bits") is not None else "—"),
                     num(r.get("sqnr_sim_db")), num(r.get("local_sqnr_db")),
                     num(r.get("bound_db")), num(r.get("sqnr_runtime_db")),
                     num(r.get("runtime_steps")),
                     '<span class="bad">yes</span>' if r.get("diverged") else "no",
                     esc(r.get("cause") or "—"), esc(r.get("fix") or "—")])
    worst = (table(head, body, cls="worst") if body
             else na("no worst layers listed"))
    return section("debug", "Parity debugger", kv(facts) + "<h3>Worst layers</h3>" + worst)
