"""The compile pipeline's entry into the search: `mixed_plan` (called by quantflow.pipeline).

Quality during the search is measured on the CALIBRATION data (accuracy with its labels, else
top-1 agreement with FP32 in percent, or 100 × mean cosine similarity with `--metric cosine`), never on the evaluation data: the report's accuracy on
the evaluation data then stays an unbiased estimate of the chosen plan, as for uniform INT8.
Budget (`search_budget`):
- `--max-size` / `--max-latency` given: the best quality within them (`--max-drop`, if
  given, is the acceptance gate); the flags map onto `quantflow.search.Budget` one to one.
- only `--max-drop`: the SMALLEST weights whose drop on the calibration data is within
  `SEARCH_DROP_MARGIN` × the budget, never larger than uniform INT8 and, where the target
  measured a latency table, never slower than uniform INT8 by that table (on onnxruntime
  without W8A16, which runs float convs there and cannot be that fast). (Minimizing
  latency instead would pick mostly FP32 on ORT for small inputs, where float kernels beat
  int8 ones: right by the table, but not what `--bits mixed` is for.)
- neither: the best quality at the size of uniform INT8.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import fx

from quantflow.batch import chunks, run_size
from quantflow.config import CompileConfig
from quantflow.dataset import Dataset
from quantflow.errors import QuantflowError
from quantflow.plan import PlanResult, choose_uniform
from quantflow.ray_cluster import ray_module
from quantflow.search.hawq import layer_weights
from quantflow.search.learned import w4_rounding
from quantflow.search.mixed import search_mixed
from quantflow.search.options import HawqOptions, LatencyOptions, SearchOptions
from quantflow.search.quantune import Budget
from quantflow.search.space import OPTIONS, GlobalConfig

log = logging.getLogger("quantflow.search")


#: the search aims at this fraction of --max-drop on the calibration data: the cheapest of
#: many candidates that pass on a few hundred images tends to lose more on unseen data
#: (winner's curse), and the gate is applied on the evaluation data
SEARCH_DROP_MARGIN = 0.5
#: "never slower than uniform INT8" with room for timing noise: W4A8 and W8A8 run the same
#: int8 kernels on ORT, yet their per-layer table entries differ by a few percent
LATENCY_SLACK = 1.05
#: with --optimize-time, the share spent learning the 4-bit rounding the search prices with
#: (the rest: worst-tensor repair and learned rounding of the chosen plan, pipeline.py)
MIXED_ROUNDING_SHARE = 1 / 3


def search_budget(config: CompileConfig, *, measured: bool) -> Budget:
    """The search budget for a CompileConfig (module docstring)."""
    size_bytes = config.max_size_mb * 1e6 if config.max_size_mb else None
    if any(v is not None for v in (size_bytes, config.max_size_ratio, config.max_latency_ms)):
        return Budget(max_drop=config.max_drop, max_size_bytes=size_bytes,
                      max_size_ratio=config.max_size_ratio,
                      max_latency_ms=config.max_latency_ms)
    if config.max_drop is not None:  # smallest within the drop, never slower than INT8
        return Budget(max_drop=config.max_drop * SEARCH_DROP_MARGIN, minimize="size",
                      max_size_ratio=1.0,
                      max_latency_ratio=LATENCY_SLACK if measured else None)
    return Budget(max_size_ratio=1.0)  # best quality at the size of uniform INT8


@dataclass(frozen=True)
class Fidelity:
    """The search's quality of a quantized graph on the calibration data: accuracy with
    labels, else agreement (or cosine) with the float logits. A class, not a closure, so
    search workers (other processes, Ray) receive it by pickle."""

    x: torch.Tensor
    y: torch.Tensor | None
    ref_logits: torch.Tensor
    metric: str

    def __call__(self, g: fx.GraphModule) -> float:
        from quantflow.evaluate import cosine, predict

        logits = predict(g, self.x)
        if self.y is not None:
            return 100.0 * float((logits.argmax(-1) == self.y).double().mean())
        if self.metric == "cosine":
            return 100.0 * cosine(self.ref_logits, logits)
        return 100.0 * float((logits.argmax(-1) == self.ref_logits.argmax(-1)).double().mean())


def mixed_plan(gm: fx.GraphModule, calib: Dataset, evaluation: Dataset | None,
               config: CompileConfig, out: Path, fixed: dict[str, str] | None = None
               ) -> PlanResult:
    """The plan for `--bits mixed`, with the search's summary for the report. `fixed`: node
    -> option the search keeps (quantflow/overrides.py)."""
    from quantflow.evaluate import predict
    from quantflow.targets import get_target

    ray_address = config.resolved_ray_address
    if ray_address:
        ray_module()  # Ray missing: one line now, not after calibration

    # start where uniform INT8 would: its calibrator and cross-layer equalization choice
    # (the search space has no equalization axis; MobileNetV2 on ImageNet needs it), and the
    # uniform INT8 plan is the search's first candidate, so mixed is never worse on the
    # calibration data than what --bits 8 would ship
    int8 = choose_uniform(gm, calib, config)
    gm = int8.gm
    act = int8.plan.default.act
    int8_calibrator = act.calibrator if act else None
    x, y = calib.x, calib.y
    ref_logits = predict(gm, x)

    eval_fn = Fidelity(x, y, ref_logits, config.metric)

    # a static-batch graph (quantflow.batch) runs chunks of its batch; labels are cut alike
    batches = [(xb,) for xb in chunks(gm, x, config.calib_batch)]
    labels = chunks(gm, y, config.calib_batch) if y is not None else None
    target: Any = None
    latency = "proxy"
    try:
        # one thread unless --threads says otherwise: with two threads on a 2-core machine
        # any other process stalls the thread barrier, and the tables and end-to-end checks
        # varied 40x (10 ms vs 0.25 ms for resnet_fmnist); one thread ranks the same way
        opts = config.target_options()
        opts.setdefault("threads", 1)
        target = get_target(config.target, **opts)
        latency = "measured"
    except (QuantflowError, ImportError) as exc:
        log.warning("search: target %s unavailable for latency tables (%s); using the BOPs "
                    "proxy", config.target, exc)
    budget = search_budget(config, measured=latency == "measured")
    options: tuple[str, ...] = OPTIONS
    if target is not None and budget.max_latency_ratio is not None:
        # "never slower than INT8": an option the target runs in float kernels between Q/DQ
        # nodes (W8A16 on onnxruntime, which has no int16 conv) is the size of W8A8 and slower
        # than FP32, so it cannot pay; the per-layer tables do not see that (measured: every
        # W8A16 candidate of mobilenetv2_fmnist failed the end-to-end check on ORT)
        options = tuple(o for o in OPTIONS if o in target.caps.integer_options or o == "FP32")
    # TensorRT: symmetric int8 activations only; onnxruntime runs int8 (symmetric)
    # activations through float kernels: measured 0.85-1.33x FP32 vs 0.5-0.7x for uint8
    # (benchmarks.md), so it gets uint8 only
    search = SearchOptions(options=options, seed=config.resolved_seed,
                           schemes=(True,) if config.placement == "trt" else (False,))
    learned = None
    if config.optimize_seconds:  # price and evaluate 4-bit layers with learned rounding
        glob = GlobalConfig(int8_calibrator or "minmax", config.placement == "trt", "channel")
        learned = w4_rounding(gm, int8.stats, x, glob, list(layer_weights(gm)), config.kernel_rules,
                              MIXED_ROUNDING_SHARE * config.optimize_seconds,
                              seed=config.resolved_seed)
    hawq = HawqOptions()
    size = run_size(gm, config.calib_batch)
    if size < config.calib_batch:  # as many Hessian samples as with calibration batches
        hawq = replace(hawq, batches=hawq.batches * -(-config.calib_batch // size))
    # a target that fails to time a variant makes search_mixed fall back to the BOPs proxy
    # itself (TargetRuntimeError); anything else is a bug and must surface
    res = search_mixed(gm, batches, eval_fn, budget, target, labels=labels, stats=int8.stats,
                       search=search, hawq=hawq, latency=LatencyOptions(mode=latency),
                       placement=config.kernel_rules,
                       data_key=f"{calib.name}|cle={int8.plan.equalize}",
                       baseline_calibrator=int8_calibrator, learned=learned, fixed=fixed,
                       workers=config.workers, ray_address=ray_address)
    res.save(out)
    summary = {k: v for k, v in res.to_dict().items() if k not in ("trials", "hessian")}
    summary["files"] = {"search": str(out / "search.json"),
                        "layers": str(out / "search_layers.md")}
    summary["int8_baseline"] = {"calibrator": int8_calibrator, "equalize": int8.plan.equalize}
    if learned is not None:
        summary["learned_w4"] = learned.summary()
    return PlanResult(gm, replace(res.plan, equalize=int8.plan.equalize,
                                  smooth=int8.plan.smooth), res.stats,
                      candidates={t.candidate.label(): round(t.quality, 3) for t in res.trials},
                      search=summary)
