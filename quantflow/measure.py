"""The evaluate and profile stages: what the artifact computes and how fast, on this machine.

`evaluate` runs the FP32 reference (torch), the torch simulation and both runtime artifacts
over the evaluation data; `profile` times both artifacts with the target's own runtime;
`sizes` and `layer_rows` describe what was built. Each returns the plain sections of
report.json (quantflow/report.py documents them).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from quantflow import evaluate as ev
from quantflow.dataset import Dataset
from quantflow.errors import TargetUnavailableError
from quantflow.progress import bar
from quantflow.quantize import model_size_bytes
from quantflow.spec import QuantPlan

log = logging.getLogger("quantflow")

#: samples of the evaluation data the torch simulation runs on (see `evaluate`)
SIM_SAMPLES = 1000


def evaluate(gm: fx.GraphModule, qgm: fx.GraphModule, target: Any, art_fp32: Any, art_q: Any,
             data: Dataset, batch: int) -> dict[str, Any]:
    """FP32 reference (torch), torch simulation, and the real artifact on the target.

    The simulation runs on the first `SIM_SAMPLES` samples only: it exists to check the
    artifact against it (runtime-vs-simulation SQNR), and fake-quant in torch is the slowest
    part of an evaluation (Fashion-MNIST test set: ~60 s of 10k vs ~6 s for the ORT artifact).
    """
    ref = ev.predict(gm, data.x, desc="evaluate: FP32 reference (torch)")
    n_sim = min(SIM_SAMPLES, int(data.x.shape[0]))
    sim = ev.predict(qgm, data.x[:n_sim], desc="evaluate: simulation (torch)")
    rt_f = ev.predict_runtime(lambda xs: target.run(art_fp32, xs), data.x, batch,
                              desc=f"evaluate: FP32 artifact ({target.name})")
    rt_q = ev.predict_runtime(lambda xs: target.run(art_q, xs), data.x, batch,
                              desc=f"evaluate: quantized artifact ({target.name})")
    q_fp32 = ev.quality(rt_f, data.y, ref)
    q_quant = ev.quality(rt_q, data.y, rt_f)
    q_sim = ev.quality(sim, None if data.y is None else data.y[:n_sim], ref[:n_sim])
    drop = None
    if q_fp32.accuracy is not None and q_quant.accuracy is not None:
        drop = round(q_fp32.accuracy - q_quant.accuracy, 4)
    return {"fp32": q_fp32.to_dict(), "quantized": q_quant.to_dict(),
            "simulation": q_sim.to_dict(), "accuracy_drop": drop,
            "runtime_vs_simulation_sqnr_db": round(ev.sqnr_db(sim, rt_q[:n_sim]), 2),
            "eval_data": data.name, "eval_samples": int(data.x.shape[0])}


@dataclass(frozen=True)
class Timing:
    """The profile stage's result: report.json's `latency`."""

    section: dict[str, Any]

    @property
    def quantized_ms(self) -> float | None:
        q = self.section.get("quantized")
        return None if q is None else float(q["median_ms"])


def profile(target: Any, art_fp32: Any, art_q: Any, example_inputs: Sequence[torch.Tensor],
            runs: int, warmup: int) -> Timing:
    """Latency of both artifacts; per-layer times of the quantized one where the target
    declares it can (a separate, profiled pass: they never enter the wall-clock numbers)."""
    x0 = [t.numpy() for t in example_inputs]
    kw: dict[str, Any] = {"warmup": warmup, "runs": runs}
    # the runs happen inside each target's own timing loop: the bar counts the artifacts
    shown = bar(2, f"profile: {runs} runs per artifact ({target.name})", "artifact")
    try:
        lat_f = target.profile(art_fp32, x0, **kw)
        shown.update(1)
        if target.caps.per_layer_profile:
            kw["per_layer"] = True
        lat_q = target.profile(art_q, x0, **kw)
    except TargetUnavailableError as exc:  # e.g. TensorRT: latency only on the device
        log.warning("latency not measured: %s", exc)
        return Timing({"unavailable": str(exc)})
    finally:
        shown.close()
    return Timing({"fp32": lat_f.to_dict(), "quantized": lat_q.to_dict(),
                   "speedup": round(lat_f.median_ms / max(lat_q.median_ms, 1e-9), 3)})


def sizes(gm: fx.GraphModule, qgm: fx.GraphModule, art_fp32: Any, art_q: Any
          ) -> dict[str, Any]:
    """report.json's `size`: artifact files on disk and the weights they hold."""
    size_f, size_q = art_fp32.size_bytes(), art_q.size_bytes()
    return {"fp32_bytes": size_f, "quantized_bytes": size_q,
            "ratio": round(size_f / max(size_q, 1), 3),
            "weights_fp32_bytes": model_size_bytes(gm),
            "weights_quantized_bytes": model_size_bytes(qgm)}


def layer_rows(qgm: fx.GraphModule, plan: QuantPlan, meta: dict[str, Any]
               ) -> list[dict[str, Any]]:
    """report.json's `layers`: per weighted layer, its plan and whether it runs integer."""
    info = qgm.meta.get("quantflow")
    float_ops = set(meta.get("float_compute_ops", []) or [])
    rows = []
    for n in qgm.graph.nodes:
        if info is not None and n.name in info.layers:
            lp = info.layers[n.name]
            rows.append({"name": n.name, "op": str(n.target).split(".")[-2],
                         "plan": lp.label(), "weight_bits": lp.weight.bits if lp.weight else 32,
                         "runs_integer": n.name not in float_ops and not lp.is_float,
                         "params": info.weight_bits.get(n.name, (32, 0))[1]})
    return rows
