"""Per-layer parity of FP32, the torch simulation and the runtime artifact: the `analyze`
stage of every compile (report.json "analysis") and `quantflow debug`.

  simulation vs FP32   quantflow/layer_local.py: each layer's accumulated and local SQNR
  runtime vs simulation the target's tensor taps (caps.layer_taps: ORT, TVM) replayed on the
                       simulation as quantflow/parity.py does, so each layer is judged on the
                       runtime's own inputs: max steps off and SQNR of its output codes
  bounds, cause, fix   quantflow/layer_fix.py

The result (schema of report.json "analysis"):
  {samples, runtime: target | null, isa: CPU class the runtime ran as, device: what the
   artifact is for (--device), runtime_skipped: why | null, first_divergent: layer |
   null, worst: [5 layers, lowest local SQNR first], seconds,
   layers: [{name, op, bits, sqnr_sim_db, local_sqnr_db, bound_db, sqnr_runtime_db,
             runtime_steps, hessian_trace (Tr(H)/n of the weights), diverged, cause, fix,
             weight_only_db, act_only_db, clipped, codes_used}] in graph order,
   histograms: {layer (the 3 worst): {weight: {edges, counts}, activation: {edges, counts},
                range: [lo, hi] of the input quantizer, clipped}}}
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import fx

from quantflow import layer_fix
from quantflow.layer_local import Energy, LayerStats, layer_stats
from quantflow.parity import Replay, layer_of, quantized_tensors

log = logging.getLogger("quantflow")
WORST = 5
HISTOGRAMS = 3


class _RuntimeEnergy(Replay):
    """parity's replay that also sums, per tapped tensor, the simulation's codes against the
    runtime's (on the runtime's inputs) for an SQNR."""

    def __init__(self, gm: fx.GraphModule, runtime: Mapping[str, np.ndarray],
                 energy: dict[str, Energy]) -> None:
        super().__init__(gm, runtime)
        self.energy = energy

    def run_node(self, n: fx.Node) -> Any:
        if n.name in self.runtime:
            sim = fx.Interpreter.run_node(self, n)
            rt = torch.from_numpy(np.ascontiguousarray(self.runtime[n.name]))
            zp = float(n.args[2])  # type: ignore[arg-type]
            self.energy.setdefault(n.name, Energy()).add(sim.double() - zp, rt.double() - zp)
        return super().run_node(n)


def runtime_columns(qgm: fx.GraphModule, target: Any, artifact: Any,
                    runs: Sequence[Sequence[torch.Tensor]], isa: str
                    ) -> dict[str, tuple[float, float]]:
    """layer -> (max steps off, SQNR dB) of the runtime's codes vs the simulation's."""
    names = quantized_tensors(qgm)
    feeds = [[t.numpy() for t in r] for r in runs]
    codes = target.layer_codes(artifact, qgm, names, feeds, isa=isa)
    energy: dict[str, Energy] = {}
    steps: dict[str, int] = {}
    nodes = {n.name: n for n in qgm.graph.nodes}
    with torch.no_grad():
        for xs, rt in zip(runs, codes):
            replay = _RuntimeEnergy(qgm, rt, energy)
            replay.run(*xs)
            for tensor, (mx, _, _) in replay.diff.items():
                steps[tensor] = max(steps.get(tensor, 0), mx)
    out: dict[str, tuple[float, float]] = {}
    for tensor, mx in steps.items():
        layer, _ = layer_of(nodes[tensor])
        prev = out.get(layer)
        db = energy[tensor].db
        out[layer] = (max(prev[0], mx), min(prev[1], db)) if prev else (float(mx), db)
    return out


def _runs(x: torch.Tensor, batch: int | None, samples: int) -> list[list[torch.Tensor]]:
    """`samples` inputs as runs of `batch` (an artifact's static batch), at least one run."""
    n = min(samples, int(x.shape[0]))
    b = batch or n
    n = max(b, n // b * b)
    return [[x[i:i + b]] for i in range(0, n, b) if x[i:i + b].shape[0] == b]


def _rows(stats: list[LayerStats], runtime: dict[str, tuple[float, float]] | None,
          hessian: Mapping[str, float], isa_class: str, device: str | None
          ) -> list[dict[str, Any]]:
    rows = []
    for st in stats:
        row = st.to_dict()
        row["bound_db"] = layer_fix.bound_db(st.bits)
        rt = runtime.get(st.name) if runtime is not None else None
        row["runtime_steps"] = rt[0] if rt else None
        row["sqnr_runtime_db"] = rt[1] if rt else None
        row["hessian_trace"] = hessian.get(st.name)
        row["diverged"] = layer_fix.local_diverged(row) or layer_fix.runtime_diverged(row)
        row["cause"] = row["fix"] = None
        rows.append(row)
    worst = {r["name"] for r in sorted(rows, key=lambda r: r["local_sqnr_db"])[:WORST]}
    for row in rows:  # a cause and a fix where someone will read them
        if row["diverged"] or row["name"] in worst:
            row["cause"], row["fix"] = layer_fix.diagnose(row, isa_class=isa_class,
                                                          device=device)
    return rows


def _histograms(stats: list[LayerStats], worst: list[str]) -> dict[str, Any]:
    by_name = {s.name: s for s in stats}
    out: dict[str, Any] = {}
    for name in worst[:HISTOGRAMS]:
        s = by_name[name]
        if s.weight_hist is None or s.act_hist is None:
            continue
        out[name] = {"weight": {"edges": s.weight_hist[0], "counts": s.weight_hist[1]},
                     "activation": {"edges": s.act_hist[0], "counts": s.act_hist[1]},
                     "range": list(s.act_range) if s.act_range else None,
                     "clipped": round(s.clipped / max(s.elements, 1), 6)}
    return out


def analyze(fp_gm: fx.GraphModule, qgm: fx.GraphModule, x: torch.Tensor, *,
            target: Any = None, artifact: Any = None, batch: int | None = None,
            samples: int = 8, isa: str = "host", isa_class: str = "unknown",
            device: str | None = None, hessian: Mapping[str, float] | None = None,
            runtime_why_not: str | None = None) -> dict[str, Any]:
    """The analysis of one quantized graph (and its artifact, when the target can be tapped
    and `runtime_why_not` gives no reason to skip it) on the first `samples` inputs of `x`."""
    t0 = time.perf_counter()
    runs = _runs(x, batch, samples)
    stats = layer_stats(fp_gm, qgm, runs)
    runtime = None
    skipped = None
    if target is None or artifact is None:
        skipped = "no runtime artifact"
    elif runtime_why_not:
        skipped = runtime_why_not
    elif not target.caps.layer_taps or artifact.meta.get("layer_taps") is False:
        skipped = (f"the {target.name} artifact cannot report per-layer tensors here (no "
                   "taps); only simulation vs FP32 is compared")
    else:
        runtime = runtime_columns(qgm, target, artifact, runs, isa)
    rows = _rows(stats, runtime, hessian or {}, isa_class, device)
    diverged = [r["name"] for r in rows if r["diverged"]]
    worst = [r["name"] for r in sorted(rows, key=lambda r: r["local_sqnr_db"])][:WORST]
    return {"samples": sum(int(r[0].shape[0]) for r in runs),
            "runtime": target.name if runtime is not None else None,
            "isa": isa_class, "device": device,
            "runtime_skipped": skipped, "first_divergent": diverged[0] if diverged else None,
            "worst": worst, "seconds": round(time.perf_counter() - t0, 3), "layers": rows,
            "histograms": _histograms(stats, worst)}


def hessian_of(search: Mapping[str, Any] | None) -> dict[str, float]:
    """Tr(H)/n per layer from a mixed-precision search's summary (empty without a search)."""
    if not search:
        return {}
    return {r["layer"]: float(r["trace_per_param"]) for r in search.get("layers", [])
            if r.get("trace_per_param") is not None}


def estimate_hessian(gm: fx.GraphModule, x: torch.Tensor, batch: int | None = None,
                     samples: int = 8) -> dict[str, float]:
    """Tr(H)/n per layer for compiles without a search: the Fisher trace on `samples` inputs
    (quantflow/fisher.py; never negative, ~0.1 s for resnet_fmnist)."""
    from quantflow.fisher import fisher_traces
    from quantflow.search.hawq import layer_weights

    try:
        return fisher_traces(gm, layer_weights(gm), _runs(x, batch, samples))
    except Exception as exc:  # noqa: BLE001 - an optional column; the analysis goes on
        log.info("analysis: no curvature estimate (%s: %s)", type(exc).__name__, exc)
        return {}
