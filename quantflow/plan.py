"""Which plan ships: the uniform INT8 choice, or a saved plan (`--config`).

`choose_uniform` tries the activation calibrators (and cross-layer equalization, run as a
pass pipeline, and SmoothQuant where LayerNorms feed linears) and keeps the most faithful: the output SQNR of the torch simulation against
FP32 on the CALIBRATION data (statistics from all of it, scores on `evaluate.scoring_subset`),
so the evaluation data stays unbiased. `load_saved` applies a
plan file after checking that every layer it names exists. Both return a `PlanResult`, the
same type the mixed-precision search returns (quantflow/search/compile.py, which starts from
`choose_uniform`); `pipeline.compile` only picks which of the two to call.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import fx

from quantflow import calibrate as cal
from quantflow import evaluate as ev
from quantflow import validate
from quantflow.config import CompileConfig
from quantflow.dataset import Dataset
from quantflow.passes import EQUALIZE_PIPELINE, run_pipeline
from quantflow.passes.smooth import smooth
from quantflow.placement import observed_tensors
from quantflow.quantize import quantize
from quantflow.spec import CALIBRATORS, TRT_ACT, KernelRules, QuantPlan, int8_plan


@dataclass(frozen=True)
class PlanResult:
    """The plan that ships, the graph it applies to and the statistics it was calibrated with.

    `gm` is the graph the plan's tensors are named in (equalized when `plan.equalize`).
    `candidates`: what was compared on the way (calibrator label -> output SQNR in dB for
    uniform INT8; search candidate label -> quality for mixed). `search`: the mixed-precision
    search's summary for the report (None for uniform INT8).
    """

    gm: fx.GraphModule
    plan: QuantPlan
    stats: dict[str, cal.TensorStats]
    candidates: dict[str, float] = field(default_factory=dict)
    search: dict[str, Any] | None = None
    #: learned integer codes per layer (quantflow.rounding), None: round to nearest
    rounding: dict[str, torch.Tensor] | None = None
    rounding_summary: dict[str, Any] | None = None  # report.json's `rounding`
    #: (scale, zero point) per repaired activation tensor (quantflow.repair), None: calibrated
    act_qparams: dict[str, tuple[float, int]] | None = None
    repair_summary: dict[str, Any] | None = None  # report.json's `repair`
    #: layers fixed by --keep-float / --bits-for: {node: {option, by}} (plan.json, report)
    overrides: dict[str, Any] | None = None

    def quantize(self, rules: KernelRules) -> fx.GraphModule:
        """The torch simulation of this plan: learned codes and repaired scales included."""
        return quantize(self.gm, self.plan, self.stats, rules, rounding=self.rounding,
                        act_qparams=self.act_qparams)

    def calibration_section(self, calib: Dataset) -> dict[str, Any]:
        """report.json's `calibration`."""
        act = self.plan.default.act
        return {"calibrator": act.calibrator if act else "none",
                "equalize": self.plan.equalize, "smooth": self.plan.smooth,
                "samples": int(calib.x.shape[0]),
                "data": calib.name, "candidates": self.candidates}


def base_plan(placement: str, calibrator: str) -> QuantPlan:
    """Uniform INT8 for a placement: TensorRT takes symmetric int8 activations only."""
    if placement == "trt":
        return int8_plan(calibrator, act=TRT_ACT)
    return int8_plan(calibrator)


def equalized(gm: fx.GraphModule) -> fx.GraphModule | None:
    """A copy of `gm` after cross-layer equalization, None when it changed nothing."""
    g = copy.deepcopy(gm)
    return g if run_pipeline(g, EQUALIZE_PIPELINE).fired else None


#: SmoothQuant migration strengths tried (scored like the calibrators): the paper's default
#: 0.5, and 0.8 for models whose outliers need more migrated into the weights (MiniLM,
#: simulation on 200 sentences: 0.5 0.9893, 0.7 0.9963, 0.8 0.9968, 0.85 0.9965 cosine)
SMOOTH_ALPHAS = (0.5, 0.8)


def smoothed(gm: fx.GraphModule, stats: dict[str, cal.TensorStats],
             alpha: float) -> fx.GraphModule | None:
    """A copy of `gm` with LayerNorm outliers migrated into the linears that read them
    (passes.smooth, scales from `stats`), None when the graph has no such group."""
    absmax = {k: v.channel_absmax for k, v in stats.items() if v.channel_absmax is not None}
    g = copy.deepcopy(gm)
    return g if smooth(g, absmax, alpha) else None


def load_saved(gm: fx.GraphModule, calib: Dataset, config: CompileConfig) -> PlanResult:
    """`--config PLAN.json`: the saved plan on this graph (equalized if the plan says so)."""
    assert config.plan_path is not None
    plan = QuantPlan.load(config.plan_path)
    validate.plan_layers(plan, gm, config.plan_path)  # never apply a plan in part
    g = (equalized(gm) or gm) if plan.equalize else gm
    batches = cal.batched(calib.x, config.calib_batch)
    stats = cal.collect_stats(g, batches, progress=True)
    if plan.smooth > 0:
        g_sm = smoothed(g, stats, plan.smooth)
        if g_sm is not None:
            g, stats = g_sm, cal.collect_stats(g_sm, batches, progress=True)
    return PlanResult(g, plan, stats)


def choose_uniform(gm: fx.GraphModule, calib: Dataset, config: CompileConfig,
                   rules: KernelRules | None = None) -> PlanResult:
    """Uniform INT8 with the most faithful calibrator (and equalization where it helps)."""
    if config.plan_path:
        return load_saved(gm, calib, config)
    rules = rules or config.kernel_rules
    # candidates are scored without the kernels' weight limits (the int16 pair limit of
    # --device portable): those constrain weights the same way whatever the activation
    # calibrator, cost MobileNetV2 0.2 dB, and fitting them took 40 of the 100 s this choice
    # took there; the shipped plan is quantized with them (pipeline's quantize stage)
    scoring = KernelRules(placement=rules.placement)
    variants: list[tuple[bool, fx.GraphModule]] = [(False, gm)]
    if config.equalize != "off":
        g_eq = equalized(gm)
        if g_eq is not None:
            variants = [(True, g_eq)] if config.equalize == "on" else [(False, gm), (True, g_eq)]
    calibrators = CALIBRATORS if config.calibrator == "auto" else (config.calibrator,)
    scores: dict[str, float] = {}
    best: tuple[float, PlanResult] | None = None
    best_label, best_ref = "", torch.empty(0)
    batches = cal.batched(calib.x, config.calib_batch)
    x = ev.scoring_subset(calib.x)  # statistics from all the data, scores from a subset
    # (equalize, smooth α, graph); the SmoothQuant variant needs the plain graph's statistics
    todo: list[tuple[bool, float, fx.GraphModule]] = [(eq, 0.0, g) for eq, g in variants]
    while todo:
        eq, alpha, g = todo.pop(0)
        stats = cal.collect_stats(g, batches, nodes=observed_tensors(g), progress=True)
        if not eq and alpha == 0.0:
            for a in SMOOTH_ALPHAS:
                g_sm = smoothed(g, stats, a)
                if g_sm is None:
                    break  # nothing to smooth in this graph
                todo.append((False, a, g_sm))
        ref = ev.predict(g, x)
        for c in calibrators:
            plan = replace(base_plan(config.placement, c), equalize=eq, smooth=alpha)
            s = ev.sqnr_db(ref, ev.predict(quantize(g, plan, stats, scoring), x))
            label = f"{c}{'+cle' if eq else ''}{f'+smooth{alpha}' if alpha else ''}"
            scores[label] = round(s, 3)
            if best is None or s > best[0]:
                best, best_label, best_ref = (s, PlanResult(g, plan, stats)), label, ref
    assert best is not None
    best = _without_bias_correction(best, best_label, scores, x, best_ref, scoring)
    return replace(best[1], candidates=scores)


def _without_bias_correction(best: tuple[float, PlanResult], label: str,
                             scores: dict[str, float], x: torch.Tensor, ref: torch.Tensor,
                             scoring: KernelRules) -> tuple[float, PlanResult]:
    """The winner scored once more without bias correction, kept if that scores better.

    Bias correction subtracts (W_q − W)·E[x] with E[x] over every calibration position. On
    CNNs that is the shift the layer sees; on a transformer it also averages padding tokens
    and positions the model pools away (MiniLM, 200 sentences: cosine 0.99735 with, 0.99759
    without). One extra scoring decides it for the model at hand (`ref`: the winner's float
    outputs on `x`, already computed for its score)."""
    s0, res = best
    plan = replace(res.plan, bias_correction=False)
    s = ev.sqnr_db(ref, ev.predict(quantize(res.gm, plan, res.stats, scoring), x))
    scores[f"{label}-bias_correction"] = round(s, 3)
    return (s, replace(res, plan=plan)) if s > s0 else best
