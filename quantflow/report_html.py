"""report.html: the compile report as one self-contained page, beside report.json.

Written on every compile (pipeline.py, after report.json), rebuilt by `quantflow report OUT/`
and redrawn with the run history by `quantflow gate --record`. No network, no script, no
external file: the CSS is inline and every plot is inline SVG (quantflow/svg_plots.py says
why), so the file opens anywhere, offline, and stays small (KBs, not MBs). Responsive: plots
scale with the page, plot grids stack on a phone, wide tables scroll sideways.

Sections (each a <section id=...>): summary, layers, ranges, debug, pareto (mixed precision
only), passes, stages, history (when given). The per-layer ones live in
quantflow/report_html_layers.py.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from quantflow import svg_plots
from quantflow.errors import InputError
from quantflow.report_html_layers import debug_section, layers_section, ranges_section
from quantflow.report_html_parts import card, esc, grid, kv, mb, na, num, pct, section, table

FILE = "report.html"

CSS = """
:root{--fg:#1b1f24;--mut:#5b6470;--bg:#fff;--bd:#d8dde3;--acc:#2a6fdb;--ok:#1a7f37;
--bad:#c62828;--warn:#c76a00;--alt:#f5f7fa}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);
background:var(--bg)}
header,main{max-width:1180px;margin:0 auto;padding:0 14px}
header{padding-top:14px}
h1{font-size:1.35em;margin:.3em 0}h2{font-size:1.15em;margin:1.4em 0 .5em;
border-bottom:2px solid var(--bd);padding-bottom:.2em}h3{font-size:1em;margin:1em 0 .4em}
nav{display:flex;flex-wrap:wrap;gap:4px 12px;font-size:.92em;margin:.4em 0 .8em}
nav a{color:var(--acc);text-decoration:none}
.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.92em}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch;margin:.5em 0;max-width:100%}
table{border-collapse:collapse;font-size:.9em;white-space:nowrap}
th,td{border:1px solid var(--bd);padding:3px 8px;text-align:right}
th{background:var(--alt);position:sticky;top:0}
td:first-child,th:first-child{text-align:left}
tbody tr:nth-child(even){background:var(--alt)}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:10px;
margin:.6em 0}
.card{border:1px solid var(--bd);border-radius:8px;padding:8px 10px;background:var(--alt)}
.card .lbl{display:block;font-size:.8em;color:var(--mut);text-transform:uppercase}
.card .val{display:block;font-size:1.35em;font-weight:600}
.card .note{display:block;font-size:.8em;color:var(--mut)}
.card.pass{border-color:var(--ok)}.card.fail{border-color:var(--bad)}
.kv{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:.5em 0}
.kv dt{color:var(--mut)}.kv dd{margin:0;overflow-wrap:anywhere}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,420px),1fr));
gap:12px}
figure{margin:.5em 0;min-width:0;max-width:760px}figure svg{width:100%;height:auto;display:block}
figcaption{font-size:.82em;color:var(--mut)}
.na{color:var(--mut);font-style:italic}
.ok{color:var(--ok)}.bad{color:var(--bad)}.warn{color:var(--warn)}
svg text{font:11px system-ui,sans-serif;fill:var(--fg)}svg .tick{fill:var(--mut)}
svg .ax{stroke:#6b7480;stroke-width:1}svg .grid{stroke:#e6e9ee;stroke-width:1}
svg .bar{fill:#4c8bf5}svg .bar.hi{fill:var(--bad)}svg .bar.float{fill:#f0a030}
svg .ln{fill:none;stroke-width:2}svg .ln.s0,svg .ln.front{stroke:#2a6fdb}
svg .ln.s1{stroke:#8e44ad}svg circle.s0{fill:#2a6fdb}svg circle.s1{fill:#8e44ad}
svg circle.pt{fill:#9aa5b1}svg circle.front{fill:#2a6fdb}
svg circle.chosen{fill:none;stroke:var(--bad);stroke-width:3}
svg .fail{stroke:var(--bad);stroke-width:2.5;fill:none}
svg .mark{stroke:var(--bad);stroke-dasharray:4 3}svg .mk{fill:var(--bad)}
footer{max-width:1180px;margin:2em auto;padding:0 14px;color:var(--mut);font-size:.85em}
@media (max-width:600px){body{font-size:14px}.card .val{font-size:1.15em}}
"""


def read(out_dir: Path) -> dict[str, Any]:
    """OUT/report.json, or an InputError naming it and the fix."""
    path = Path(out_dir) / "report.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no report.json here; fix: pass the output directory of "
                         "`quantflow compile -o DIR`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable JSON report ({exc}); fix: compile again "
                         "with `quantflow compile -o DIR`") from None
    if not isinstance(data, dict) or not str(data.get("schema", "")).startswith(
            "quantflow.report/"):
        raise InputError(f"{path}: not a quantflow report (no quantflow.report schema); fix: "
                         "pass the output directory of `quantflow compile -o DIR`")
    return data


def write_html(out_dir: Path, *, history: list[dict[str, Any]] | None = None) -> Path:
    """Render OUT/report.json (and the history records, quantflow/history.py, when given) to
    OUT/report.html, atomically (a reader never sees half a page); return its path."""
    out_dir = Path(out_dir)
    page = render(_with_trials(read(out_dir), out_dir), history)
    path = out_dir / FILE
    fd, tmp = tempfile.mkstemp(prefix=".report.html.", dir=out_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the page is as public as report.json
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _with_trials(report: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """The report with every search trial for the Pareto plot: report.json keeps only the
    front, OUT/search.json (written by the mixed search) has them all."""
    search = report.get("search")
    if not isinstance(search, dict) or search.get("trials"):
        return report
    try:
        trials = json.loads((out_dir / "search.json").read_text()).get("trials")
    except (OSError, ValueError, AttributeError):
        return report  # no trials to add: the front alone is plotted
    if not isinstance(trials, list):
        return report
    return {**report, "search": {**search, "trials": trials}}


def render(report: dict[str, Any], history: list[dict[str, Any]] | None = None) -> str:
    """The whole page as a string."""
    model = (report.get("model") or {}).get("name", "?")
    sections = [summary_section(report), layers_section(report), ranges_section(report),
                debug_section(report)]
    if report.get("search"):
        sections.append(pareto_section(report))
    sections += [passes_section(report), stages_section(report)]
    if history:
        sections.append(history_section(history))
    ids = [("summary", "Summary"), ("layers", "Layers"), ("ranges", "Ranges"),
           ("debug", "Debug"), *([("pareto", "Pareto")] if report.get("search") else []),
           ("passes", "Passes"), ("stages", "Stages"),
           *([("history", "History")] if history else [])]
    nav = "".join(f'<a href="#{i}">{esc(t)}</a>' for i, t in ids)
    title = f"quantflow report: {model} → {report.get('target', '?')}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{esc(title)}</h1><nav>{nav}</nav></header><main>"
            + "".join(sections) + "</main>"
            f"<footer>{esc(report.get('schema', ''))} · written by quantflow "
            f"{esc((report.get('versions') or {}).get('quantflow', ''))}</footer>"
            "</body></html>\n")


def _quality_rows(q: dict[str, Any]) -> list[list[str]]:
    rows = []
    for key, label, f in (("accuracy", "accuracy", pct), ("agreement", "top-1 agreement", num),
                          ("cosine", "cosine", num), ("sqnr_db", "output SQNR dB", num),
                          ("kl", "KL divergence", num)):
        vals = [(q.get(k) or {}).get(key) for k in ("fp32", "quantized", "simulation")]
        if any(v is not None for v in vals):
            rows.append([esc(label), *(f(v) for v in vals)])
    return rows


def summary_section(r: dict[str, Any]) -> str:
    q = r.get("quality") or {}
    size = r.get("size") or {}
    lat = r.get("latency") or {}
    gate = r.get("gate") or {}
    qq = q.get("quantized") or {}
    drop = q.get("accuracy_drop")
    if drop is not None:
        quality = card("accuracy drop", esc(f"{float(drop):+.2f} pts"),
                       f"{pct(qq.get('accuracy'))} quantized")
    elif qq.get("agreement") is not None:
        quality = card("agreement", esc(f"{100 * float(qq['agreement']):.2f}%"),
                       "top-1 with FP32")
    else:
        quality = card("quality", "—", "no evaluation data")
    passed = gate.get("passed")
    cards = [quality,
             card("size", esc(f"{size.get('ratio', 0):.2f}x smaller" if size.get("ratio", 0)
                              >= 1 else f"{1 / size['ratio']:.2f}x larger")
                  if size.get("ratio") else "—", f"{mb(size.get('quantized_bytes'))}"),
             card("speedup", esc(f"{lat['speedup']:.2f}x faster" if lat["speedup"] >= 1
                                 else f"{1 / lat['speedup']:.2f}x slower")
                  if lat.get("speedup") else "—",
                  f"median {num((lat.get('quantized') or {}).get('median_ms'), unit='ms')}"),
             card("gate", "passed" if passed else ("FAILED" if passed is False else "—"),
                  esc(gate.get("reason") or ""), "pass" if passed else "fail")]
    qrows = _quality_rows(q)
    sim_n = (q.get("simulation") or {}).get("samples")
    sim_head = ("simulation (torch)" if sim_n in (None, q.get("eval_samples"))
                else f"simulation (torch, first {sim_n})")
    qtable = (table(["metric", "FP32", "quantized (runtime)", sim_head], qrows)
              if qrows else na("quality not measured (no evaluation data)"))
    sizes = table(["", "FP32", "quantized", "ratio"], [
        ["model file", mb(size.get("fp32_bytes")), mb(size.get("quantized_bytes")),
         num(size.get("ratio"))],
        ["weights", mb(size.get("weights_fp32_bytes")), mb(size.get("weights_quantized_bytes")),
         "—"]])
    return section("summary", "Summary", '<div class="cards">' + "".join(cards) + "</div>"
                   + kv(_facts(r)) + "<h3>Quality</h3>" + qtable
                   + (f"<p>evaluated on {num(q.get('eval_samples'))} sample(s) of "
                      f"{esc(q.get('eval_data') or '?')}; runtime vs simulation output SQNR "
                      f"{num(q.get('runtime_vs_simulation_sqnr_db'), unit='dB')}</p>"
                      if q else "")
                   + "<h3>Size</h3>" + sizes + "<h3>Latency</h3>" + _latency(lat))


def _facts(r: dict[str, Any]) -> list[tuple[str, str]]:
    m = r.get("model") or {}
    host = r.get("host") or {}
    dev = r.get("device") or {}
    gate = r.get("gate") or {}
    versions = ", ".join(f"{k} {v}" for k, v in (r.get("versions") or {}).items())
    verdict = ("passed" if gate.get("passed") else "failed") if gate else "—"
    limits = [] if gate.get("max_drop") is None else [f"--max-drop {gate['max_drop']}"]
    if gate.get("max_latency_ms") is not None:
        limits.append(f"--max-latency {gate['max_latency_ms']} ms")
    cls = "ok" if gate.get("passed") else "bad"
    return [("model", (f'<span class="mono">{esc(m.get("name", "?"))}</span> '
             f'({esc(m.get("source", "?"))}, input {esc(m.get("input_shape", "?"))})')),
            ("target", esc(f"{r.get('target', '?')}, bits {r.get('bits', '?')}")),
            ("device", esc(f"{dev.get('resolved', '?')} (requested {dev.get('requested', '?')})"
                           + (f"; exact on {', '.join(dev['exact_on'])}"
                              if dev.get("exact_on") else ""))),
            ("host CPU", esc(f"{host.get('model', '?')}, {host.get('cores', '?')} cores, "
                             f"{host.get('machine', '?')}") +
             f' <strong>[{esc(host.get("isa_class", "?"))}]</strong>'),
            ("gate", f'<span class="{cls}">{esc(verdict)}</span>'
             + esc(f" ({'; '.join(limits) or 'no limits set'})"
                   + (f": {gate['reason']}" if gate.get("reason") else ""))),
            ("compile time", num(r.get("compile_seconds"), unit="s")),
            ("versions", f'<span class="mono">{esc(versions) or "—"}</span>')]


def _latency(lat: dict[str, Any]) -> str:
    if "unavailable" in lat or not lat:
        return na(f"not measured: {lat.get('unavailable', 'no latency section')}")
    rows = []
    for k in ("fp32", "quantized"):
        s = lat.get(k) or {}
        rows.append([esc(k), num(s.get("median_ms"), 4), num(s.get("iqr_ms"), 3),
                     num(s.get("mad_ms"), 3), num(s.get("p90_ms"), 4), num(s.get("runs")),
                     num(s.get("threads")), num(s.get("batch"))])
    dev = (lat.get("quantized") or {}).get("device")
    return (table(["artifact", "median ms", "IQR ms", "MAD ms", "p90 ms", "runs", "threads",
                   "batch"], rows)
            + f"<p>speedup {num(lat.get('speedup'))}x (FP32 median / quantized median)"
            + (f", measured on {esc(dev)}" if dev else "") + "</p>")


def pareto_section(r: dict[str, Any]) -> str:
    s = r.get("search") or {}
    front, trials, best = s.get("pareto") or [], s.get("trials") or [], s.get("best") or {}

    def tip(t: dict[str, Any]) -> str:
        return (f"{t.get('config')}: quality {num(t.get('quality'))}, "
                f"{mb(t.get('size_bytes'))}, latency {num(t.get('latency_ms'))} ms")

    pts = [(float(t["size_bytes"]) / 1e6, float(t["quality"]), tip(t), "pt") for t in trials
           if t.get("size_bytes") is not None and t.get("quality") is not None]
    pts += [(float(t["size_bytes"]) / 1e6, float(t["quality"]), tip(t), "front") for t in front
            if t.get("size_bytes") is not None and t.get("quality") is not None]
    if best.get("size_bytes") is not None and best.get("quality") is not None:
        pts.append((float(best["size_bytes"]) / 1e6, float(best["quality"]),
                    "chosen: " + tip(best), "chosen"))
    plot = svg_plots.scatter(pts, title="Pareto front: size vs quality", xlabel="weights MB",
                             ylabel="quality", caption="Blue: the Pareto front; grey: other "
                             "trials; red ring: the chosen plan") if pts else na(
        "no Pareto points in the search summary")
    rows = [[esc(t.get("config")), num(t.get("quality")), num(t.get("drop")),
             mb(t.get("size_bytes")), num(t.get("latency_ms")),
             '<strong class="bad">chosen</strong>' if t.get("key") == best.get("key")
             and t.get("config") == best.get("config") else ""] for t in front]
    budget = s.get("budget") or {}
    facts = kv([("chosen plan", f'<span class="mono">{esc(best.get("config", "—"))}</span>'),
                ("budget", esc(", ".join(f"{k}={v}" for k, v in budget.items()
                                         if v is not None) or "—")),
                ("budget met", esc(s.get("satisfied"))),
                ("evaluations", esc(f"{s.get('real_evaluations')} real, "
                                    f"{s.get('reused_evaluations')} reused")),
                ("search time", num(s.get("seconds"), unit="s"))])
    return section("pareto", "Mixed-precision Pareto front", facts + plot + table(
        ["plan", "quality", "drop", "size", "latency ms", ""], rows))


def passes_section(r: dict[str, Any]) -> str:
    p = r.get("passes") or {}
    if not p:
        return section("passes", "Graph passes", na())
    before, after, fired = p.get("before") or {}, p.get("after") or {}, p.get("fired") or {}
    counts = table(["ops", "before", "after"],
                   [[esc(k), num(before.get(k)), num(after.get(k))]
                    for k in dict.fromkeys([*before, *after])])
    plot = (svg_plots.bar(list(fired), [float(v) for v in fired.values()],
                          title="Passes fired", unit="times fired") if fired
            else na("no pass changed the graph"))
    return section("passes", "Graph passes", counts + grid([plot]) + (
        f"<p>passes ran to a fixpoint in {num(p.get('seconds'), unit='s')}</p>"))


def stages_section(r: dict[str, Any]) -> str:
    st = r.get("stages") or {}
    if not st:
        return section("stages", "Stages", na())
    plot = svg_plots.bar(list(st), [float(v) for v in st.values()], title="Stage times",
                         unit="seconds", caption=f"compile wall time "
                         f"{r.get('compile_seconds', '?')} s")
    return section("stages", "Stages", grid([plot]))


def history_section(records: list[dict[str, Any]]) -> str:
    """quality, quantized_bytes and latency_ms of each gated run, oldest first; failing runs
    marked (red crosses) so a regression stands out."""
    # month-day hour:minute: runs of one day stay apart, the year is in the table
    labels = [str(rec.get("date", "?"))[5:16].replace("T", " ") for rec in records]
    mets = [rec.get("metrics") or {} for rec in records]
    failed = [i for i, rec in enumerate(records) if not rec.get("passed")]
    measure = next((m.get("measure") for m in reversed(mets) if m.get("measure")), "quality")
    figs = [svg_plots.line(labels, {measure: [m.get("quality") for m in mets]},
                           title=f"{measure} per run", ylabel=f"{measure} %", marked=failed,
                           mark_label="gate failed"),
            svg_plots.line(labels, {"MB": [None if m.get("quantized_bytes") is None
                                           else m["quantized_bytes"] / 1e6 for m in mets]},
                           title="quantized size per run", ylabel="MB", marked=failed,
                           mark_label="gate failed"),
            svg_plots.line(labels, {"median ms": [m.get("latency_ms") for m in mets]},
                           title="median latency per run", ylabel="ms", marked=failed,
                           mark_label="gate failed")]
    rows = [[esc(rec.get("date", "?")),
             f'<span class="mono">{esc((rec.get("commit") or "—")[:10])}</span>',
             '<span class="ok">pass</span>' if rec.get("passed")
             else '<strong class="bad">FAIL</strong>',
             num(m.get("quality")), mb(m.get("quantized_bytes")), num(m.get("latency_ms"), 4),
             num(m.get("iqr_ms"), 3), esc((rec.get("host") or {}).get("isa_class") or "—")]
            for rec, m in zip(records, mets, strict=True)]
    return section("history", "Run history", f"<p>{len(records)} run(s), {len(failed)} "
                   "failing (red crosses)</p>" + grid(figs) + table(
                       ["date", "commit", "gate", measure, "size", "median ms", "IQR ms",
                        "CPU class"], rows[::-1]))
