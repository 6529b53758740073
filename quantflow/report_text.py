"""The human-readable summary of a report: what `quantflow compile` prints."""

from __future__ import annotations

from typing import Any


def _fmt(v: Any, spec: str = ".2f", unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:{spec}}{unit}"
    return f"{v}{unit}"


def _render_portability(d: dict[str, Any]) -> list[str]:
    """Device, the layers changed for it, and the parity gate's verdict."""
    lines = []
    dev, port, par = d.get("device") or {}, d.get("portability") or {}, d.get("parity")
    if dev:
        changed = port.get("layers") or {}
        cost = port.get("simulation_sqnr_db")
        text = f"  target cpu  --device {dev.get('resolved')}"
        if changed:
            text += (f": {len(changed)} layers' weights kept within the int16 pair limit")
            if cost:
                text += (f" (simulation SQNR {cost['portable']:.2f} dB vs {cost['unconstrained']:.2f}"
                         " dB without)")
        elif dev.get("pair_limit"):
            text += ": no layer needed a change"
        lines.append(text)
        if dev.get("warning"):
            lines.append(f"  warning     {dev['warning']}")
    if par:
        worst = ", ".join(f"{isa} {n} step(s)" for isa, n in par.get("max_steps", {}).items())
        text = (f"  parity      {'passed' if par.get('passed') else 'FAILED'}: per layer vs the "
                f"simulation, worst {worst or '-'} (bound {par.get('bound_steps')}) on "
                f"{par.get('samples')} samples")
        if par.get("repaired"):
            text += "; repaired " + ", ".join(f"{k} ({v})" for k, v in par["repaired"].items())
        lines.append(text)
        for isa, why in (par.get("skipped") or {}).items():
            lines.append(f"  parity      not checked on {isa}: {why}")
    return lines


def _render_fidelity(d: dict[str, Any]) -> list[str]:
    """--optimize-time: what worst-tensor repair and learned rounding did."""
    lines = []
    rp = d.get("repair")
    if rp:
        fixed = ", ".join(f"{r['tensor']} {r['gain_db']:+.2f} dB" for r in rp["repaired"])
        lines.append(f"  repair      {rp['sqnr_db_before']:.2f} -> {rp['sqnr_db_after']:.2f} dB "
                     f"in {rp['seconds']:.0f} s: {fixed or 'nothing worth repairing'}")
    ro = d.get("rounding")
    if ro:
        gains = [g for g in ro["output_mse_gain_db"].values() if g is not None]
        mean = sum(gains) / len(gains) if gains else 0.0
        lines.append(f"  rounding    learned for {ro['layers']} layers in {ro['seconds']:.0f} s, "
                     f"layer output error {mean:+.2f} dB on average vs nearest")
        val = ro.get("validation")
        if val:
            verdict = "kept" if val["kept"] else "NOT kept: nearest rounding ships"
            lines.append(f"  rounding    held-out check on {val['samples']} calibration samples: "
                         f"{val['learned_sqnr_db']:.2f} dB learned vs {val['nearest_sqnr_db']:.2f}"
                         f" dB nearest, {verdict}")
    return lines


def render(d: dict[str, Any]) -> str:
    """A compact human-readable summary of a report dict."""
    lines = []
    m = d.get("model", {})
    lines.append(f"quantflow: {m.get('name')} -> {d.get('target')} ({d.get('bits')}-bit)")
    batch = m.get("batch") or {}
    if batch.get("mode") == "static":
        lines.append(f"  batch       the graph only runs at batch {batch.get('exported_batch')} "
                     f"({batch.get('reason')}): run in chunks of it")
    elif batch.get("mode") == "rewritten":
        lines.append(f"  batch       hard-coded batch {batch.get('exported_batch')} made dynamic "
                     f"(rewrote {', '.join(batch.get('rewritten', []))}; proven)")
    if "passes" in d:
        p = d["passes"]
        b, a = p["before"], p["after"]
        lines.append(f"  passes      {b['conv']} convs / {b['batch_norm']} BN before -> "
                     f"{a['conv']} convs / {a['batch_norm']} BN after ({p['seconds']:.2f} s)")
    if "calibration" in d:
        c = d["calibration"]
        lines.append(f"  calibration {c['calibrator']} on {c['samples']} samples of {c['data']}"
                     f"{' + equalization' if c.get('equalize') else ''}")
    lines += _render_fidelity(d)
    q = d.get("quality", {})
    if q:
        f32, qq = q.get("fp32", {}), q.get("quantized", {})
        lines.append(f"  quality     on {q.get('eval_samples')} samples of {q.get('eval_data')}")
        lines.append("                    FP32      quantized")
        if f32.get("accuracy") is not None:
            lines.append(f"  accuracy    {_fmt(f32['accuracy'], '8.2f', '%')}  "
                         f"{_fmt(qq.get('accuracy'), '8.2f', '%')}   "
                         f"drop {_fmt(q.get('accuracy_drop'), '+.2f')} points")
        lines.append(f"  agreement   {'':9}  {_fmt(qq.get('agreement'), '9.4f')}   "
                     f"SQNR {_fmt(qq.get('sqnr_db'), '.1f', ' dB')}")
        if d.get("config", {}).get("metric") == "cosine":
            lines.append(f"  cosine      {'':9}  {_fmt(qq.get('cosine'), '9.5f')}   "
                         "(mean over samples, vs FP32)")
    s = d.get("size")
    if s:
        lines.append(f"  size        {s['fp32_bytes'] / 1e6:8.3f} MB {s['quantized_bytes'] / 1e6:8.3f}"
                     f" MB   {times(s['ratio'], 'smaller', 'larger')}")
    lat = d.get("latency")
    if lat and "unavailable" in lat:
        lines.append(f"  latency     not measured here: {lat['unavailable']}")
    elif lat:
        f, qz = lat["fp32"], lat["quantized"]
        lines.append(f"  latency     {f['median_ms']:8.3f} ms {qz['median_ms']:8.3f} ms   "
                     f"(median; p90 {f['p90_ms']:.3f} / {qz['p90_ms']:.3f}) "
                     f"{times(lat['speedup'], 'faster', 'slower')}, {qz['threads']} threads")
        isa = (d.get("host") or {}).get("isa_class")
        lines.append(f"  host        {qz['device']}{f' [{isa}]' if isa else ''}")
        per = qz.get("per_layer_ms") or {}
        if per:
            top = sorted(per.items(), key=lambda kv: -kv[1])[:5]
            lines.append("  slowest     " + ", ".join(f"{k} {v:.3f} ms" for k, v in top)
                         + " (quantized, per layer)")
    lines += _render_portability(d)
    rt = d.get("runtime", {})
    if rt.get("float_compute_ops"):
        lines.append(f"  warning     layers left in float by the runtime: "
                     f"{', '.join(rt['float_compute_ops'][:8])}")
    for op, why in list((rt.get("float_op_reasons") or {}).items())[:8]:
        lines.append(f"  float op    {op}: {why}")
    lines += _render_tvm_kernels(rt)
    if "compile_seconds" in d:
        lines.append(f"  compile     {d['compile_seconds']:.1f} s  "
                     + "  ".join(f"{k} {v:.1f}s" for k, v in d.get("stages", {}).items()))
    sr = d.get("search")
    if sr:
        best = sr["best"]
        lines.append(f"  search      {sr['real_evaluations']} evaluations "
                     f"({sr['reused_evaluations']} from the database) in {sr['seconds']:.0f} s; "
                     f"chosen {best['config']}, {best['size_bytes'] / 1e6:.3f} MB weights")
        lc = sr.get("latency_check")
        if lc and lc.get("table_ms") is not None:
            lines.append(f"  search lat  table predicted {lc['table_ms']:.3f} ms, measured "
                         f"{lc['measured_ms']:.3f} ms")
    g = d.get("gate")
    if g and (g.get("max_drop") is not None or not g.get("passed", True)):
        what = f"max drop {g['max_drop']} points" if g.get("max_drop") is not None \
            else "budget"
        lines.append(f"  gate        {what}: "
                     f"{'PASSED' if g['passed'] else 'FAILED — ' + str(g.get('reason'))}")
    if "artifacts" in d:
        lines.append("  artifacts   " + "  ".join(f"{k}={v}" for k, v in d["artifacts"].items()))
    return "\n".join(lines)


def _render_tvm_kernels(rt: dict[str, Any]) -> list[str]:
    """TVM: the int8 path and target string, and where each kernel's schedule came from
    (tuning records by source, else quantflow's default schedules: targets/tvm_schedules)."""
    if "int8_path" not in rt:
        return []
    out = [f"  int8 path   {rt['int8_path']}",
           f"  tvm target  {rt.get('target_string') or rt.get('target', '?')}"]
    rec = rt.get("records") or {}
    if rec:
        found = ", ".join(f"{n} from {src}" for src, n in (rec.get("records") or {}).items())
        out.append(f"  schedules   {found or 'no tuning records'}; default schedules: "
                   f"{rec.get('packed', 0)} packed int8, {rec.get('reduction', 0)} other "
                   f"reductions, {rec.get('elementwise', 0)} elementwise, "
                   f"{rec.get('none', 0)} left to TVM")
    return out


def times(ratio: float, better: str, worse: str) -> str:
    """`ratio` = FP32 / quantized as words that stay true when the quantized artifact is the
    worse one: 4.0 -> "4.00x smaller", 0.64 -> "1.56x larger" (never "x0.64 smaller")."""
    if ratio >= 1.0:
        return f"{ratio:.2f}x {better}"
    if ratio <= 0.0:
        return f"? ({worse})"
    return f"{1.0 / ratio:.2f}x {worse}"
