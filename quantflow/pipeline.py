"""`compile()`: the whole journey from an nn.Module to a measured, quantized artifact.

The stages, in the order `compile` runs them; each is one call into the module named:

  capture   torch.export -> GraphModule, batch made dynamic where exact   ir.py, batch.py
  passes    BN folding, re-parameterization, clean-up, to a fixpoint      passes/
  plan      uniform INT8 | a saved plan (--config) | mixed search         plan.py, search/compile.py
  repair    --optimize-time: rescale the worst activation tensors          fidelity.py, repair.py
  round     --optimize-time: learned rounding, checked on held-out data   fidelity.py, rounding.py
  quantize  Q/DQ + integer weights in the graph = the torch simulation    quantize.py
  lower     FP32 + quantized artifacts for the target                     lowering.py, targets/
  verify    per-layer parity with the simulation (ORT), repair, re-lower  lowering.py, verify.py
  evaluate  quality of the artifacts (and the simulation) vs FP32          measure.py
  profile   latency of both artifacts on this machine                      measure.py
  analyze   per-layer parity FP32 / simulation / runtime, cause and fix      layer_debug.py
  gate      --max-drop / --max-latency on the measured numbers             gate.py
  report    report.json (schema-checked), plan.json, the text summary      report.py
            + report.html (report_html.py)

Each stage is timed under its name (`report.stages`). The CLI (cli.py, commands.py) is a thin
layer over this function and publishes `out_dir` atomically (outdir.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import fx, nn

from quantflow import evaluate as ev
from quantflow import (
    hostcpu,
    layer_debug,
    lowering,
    measure,
    overrides,
    progress,
    seeding,
    validate,
)
from quantflow.batch import describe as describe_batch
from quantflow.config import CompileConfig
from quantflow.dataset import Dataset
from quantflow.errors import BudgetExceededError, InputError, in_stage
from quantflow.fidelity import repair_stage, round_stage
from quantflow.gate import gate
from quantflow.ir import capture
from quantflow.passes import DEFAULT_PIPELINE, run_pipeline
from quantflow.plan import PlanResult, choose_uniform
from quantflow.report import Report, Sections, assemble
from quantflow.versions import installed_versions

log = logging.getLogger("quantflow")

STAGES = ("capture", "passes", "plan", "repair", "round", "quantize", "lower", "verify", "evaluate",
          "profile", "analyze", "gate", "report")
T = TypeVar("T")
#: evaluation samples the per-layer analysis of every compile runs (`quantflow debug` takes more)
ANALYSIS_SAMPLES = 8


class StageClock:
    """Runs a stage, logs it, records its wall time under its name and shows where the run is
    (`[3/13] plan ... 4.1 s` on a terminal, quantflow.progress). A user error raised inside
    names the stage (`stage plan: ...`, errors.in_stage)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn: Callable[..., T], *args: Any) -> T:
        assert name in STAGES, name
        log.info("stage: %s", name)
        line = progress.StageLine(STAGES.index(name) + 1, len(STAGES), name,
                                  inline=not log.isEnabledFor(logging.INFO))
        t0 = time.perf_counter()
        try:
            with in_stage(name):
                result = fn(*args)
        except BaseException:
            line.done(time.perf_counter() - t0, failed=True)
            raise
        self.seconds[name] = round(time.perf_counter() - t0, 3)
        line.done(self.seconds[name])
        return result


def capture_stage(model: nn.Module, example_inputs: Sequence[torch.Tensor], calib: Dataset,
                  evaluation: Dataset | None, config: CompileConfig) -> fx.GraphModule:
    """torch.export, then (before any data runs through it) memory and labels checked."""
    gm = capture(model, example_inputs)
    validate.run_fits(gm, max(config.calib_batch, ev.PREDICT_BATCH), calib, evaluation)
    return gm


def plan_stage(gm: fx.GraphModule, calib: Dataset, evaluation: Dataset | None,
               config: CompileConfig, out: Path) -> PlanResult:
    """Which plan ships: the mixed-precision search, or uniform INT8 / a saved plan; the
    layers --keep-float / --bits-for fix keep their option in either (quantflow/overrides.py)."""
    fixed = overrides.resolve(gm, config.keep_float, config.bits_for, config.placement)
    if config.bits == "mixed":
        from quantflow.search.compile import mixed_plan  # lazy: xgboost and the search

        res = mixed_plan(gm, calib, evaluation, config, out, dict(fixed.options))
    else:
        res = choose_uniform(gm, calib, config)
        res = replace(res, plan=overrides.apply(res.plan, fixed))
    return replace(res, overrides=fixed.to_dict()) if fixed else res


def compile(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    calib: Dataset,
    evaluation: Dataset | None,
    out_dir: str | Path,
    config: CompileConfig | None = None,
    *,
    name: str = "model",
    source: str = "module",
) -> Report:
    """Compile `model` for `config.target`; write artifacts, plan.json and report.json under
    `out_dir` and return the report.

    Raises BudgetExceededError (after writing everything) when the gate fails.
    """
    config = config or CompileConfig()
    # the seed used is recorded (report.config.seed) even when none was given
    config = replace(config, seed=seeding.seed_everything(config.seed))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if calib.x.shape[1:] != example_inputs[0].shape[1:]:
        raise InputError(f"stage capture: calibration data {calib.name!r} has samples of shape "
                         f"{tuple(calib.x.shape[1:])}, the model expects "
                         f"{tuple(example_inputs[0].shape[1:])}; fix --calib or --input-shape")
    clock = StageClock()
    gm = clock.run("capture", capture_stage, model, example_inputs, calib, evaluation, config)
    batch_info = describe_batch(gm)  # dynamic, rewritten or static (chunked)
    passes = clock.run("passes", run_pipeline, gm, DEFAULT_PIPELINE)
    log.info(passes.summary())
    planned = clock.run("plan", plan_stage, gm, calib, evaluation, config, out)
    planned = clock.run("repair", repair_stage, planned, calib, config)
    planned = clock.run("round", round_stage, planned, calib, config)
    rules = config.kernel_rules
    qgm = clock.run("quantize", planned.quantize, rules)
    lowered = clock.run("lower", lowering.lower, planned, qgm, rules, example_inputs, config,
                        out)
    lowered, parity, portability = clock.run("verify", lowering.verify_stage, planned,
                                             lowered, calib, example_inputs, config, out)
    quality = clock.run("evaluate", measure.evaluate, planned.gm, lowered.qgm, lowered.target,
                        lowered.fp32, lowered.quantized, evaluation or calib,
                        int(example_inputs[0].shape[0]))
    timing = clock.run("profile", measure.profile, lowered.target, lowered.fp32,
                       lowered.quantized, example_inputs, config.profile_runs,
                       config.profile_warmup)
    analysis = clock.run("analyze", analyze_stage, planned, lowered, evaluation or calib,
                         int(example_inputs[0].shape[0]), config)
    verdict = clock.run("gate", gate, quality, config.max_drop, timing.quantized_ms,
                        config.max_latency_ms, config.metric)

    def write_report() -> Report:
        planned.plan.save(out / "plan.json", compiled={
            "device": config.resolved_device, "kernel_rules": lowered.rules.to_dict(),
            "portability": lowered.qgm.meta["quantflow"].portability,
            "overrides": planned.overrides or {}})
        report = assemble(Sections(
            model={"name": name, "source": source, "input_shape": list(example_inputs[0].shape),
                   "batch": batch_info},
            target=config.target, bits=config.bits, config=config.to_dict(),
            host=hostcpu.host_cpu().to_dict(), versions=installed_versions(),
            passes={"before": passes.before, "after": passes.after, "fired": passes.fired,
                    "seconds": round(passes.seconds, 3)},
            calibration=planned.calibration_section(calib), search=planned.search,
            rounding=planned.rounding_summary, repair=planned.repair_summary,
            device=lowered.device, parity=parity.to_dict() if parity else None,
            portability=portability,
            artifacts={"fp32": str(lowered.fp32.path), "quantized": str(lowered.quantized.path),
                       "plan": str(out / "plan.json"), "report": str(out / "report.json")},
            runtime={k: v for k, v in lowered.quantized.meta.items() if _jsonable(v)},
            quality=quality, latency=timing.section,
            size=measure.sizes(planned.gm, lowered.qgm, lowered.fp32, lowered.quantized),
            layers=measure.layer_rows(lowered.qgm, planned.plan, lowered.quantized.meta),
            analysis=analysis,
            gate=verdict.to_dict(), stages=clock.seconds,
            compile_seconds=round(time.perf_counter() - clock.t0, 2)))
        report.save(out / "report.json")
        return report

    report = clock.run("report", write_report)
    report.save(out / "report.json")  # again, now with the report stage's own time
    _write_html(out)
    if not verdict.passed:
        raise BudgetExceededError(f"{verdict.reason} (report: {out / 'report.json'})")
    return report


def debug(model: nn.Module, example_inputs: Sequence[torch.Tensor], calib: Dataset,
          evaluation: Dataset | None, out_dir: str | Path, config: CompileConfig, *,
          samples: int, isa: str = "host") -> dict[str, Any]:
    """`quantflow debug`: the compile's stages up to the artifact (no parity repair,
    evaluation or timing), then the analysis on `samples` inputs; errors propagate."""
    config = replace(config, seed=seeding.seed_everything(config.seed))
    out = Path(out_dir)
    clock = StageClock()
    gm = clock.run("capture", capture_stage, model, example_inputs, calib, evaluation, config)
    clock.run("passes", run_pipeline, gm, DEFAULT_PIPELINE)
    planned = clock.run("plan", plan_stage, gm, calib, evaluation, config, out)
    planned = clock.run("repair", repair_stage, planned, calib, config)
    planned = clock.run("round", round_stage, planned, calib, config)
    qgm = clock.run("quantize", planned.quantize, config.kernel_rules)
    lowered = clock.run("lower", lowering.lower, planned, qgm, config.kernel_rules,
                        example_inputs, config, out)
    data = evaluation or calib
    hessian = layer_debug.hessian_of(planned.search) or layer_debug.estimate_hessian(
        planned.gm, data.x, int(example_inputs[0].shape[0]))
    isa_class = hostcpu.host_cpu().isa_class if isa == "host" else isa

    def analyze() -> dict[str, Any]:
        return layer_debug.analyze(
            planned.gm, lowered.qgm, data.x, target=lowered.target,
            artifact=lowered.quantized, batch=int(example_inputs[0].shape[0]),
            samples=samples, isa=isa, isa_class=isa_class, device=config.resolved_device,
            hessian=hessian)

    return clock.run("analyze", analyze)


def analyze_stage(planned: PlanResult, lowered: lowering.Lowered, data: Dataset, batch: int,
                  config: CompileConfig) -> dict[str, Any]:
    """The parity debugger's analysis for the report (quantflow/layer_debug.py). It explains
    an artifact that already passed or failed on its own numbers, so a failure here is
    recorded (`{"error": ...}`) and the compile goes on."""
    try:
        hessian = layer_debug.hessian_of(planned.search) or layer_debug.estimate_hessian(
            planned.gm, data.x, batch)
        return layer_debug.analyze(
            planned.gm, lowered.qgm, data.x, target=lowered.target, artifact=lowered.quantized,
            batch=batch, samples=ANALYSIS_SAMPLES, isa_class=hostcpu.host_cpu().isa_class,
            device=config.resolved_device, hessian=hessian,
            runtime_why_not=None if lowered.target.caps.parity_taps else (
                f"the {lowered.target.name} runtime is compared per layer by `quantflow debug` "
                "only: its taps rebuild the library (~20 s)"))
    except Exception as exc:  # noqa: BLE001 - a diagnostic must not fail the compile
        log.warning("per-layer analysis failed (%s: %s); the report has no analysis section",
                    type(exc).__name__, exc)
        return {"error": f"{type(exc).__name__}: {exc}"}


def _write_html(out: Path) -> None:
    """report.html beside report.json; the compile already succeeded, so a page that cannot
    be drawn is a warning, not a failed compile (`quantflow report OUT/` retries it)."""
    try:
        from quantflow.report_html import write_html

        write_html(out)
    except Exception as exc:  # noqa: BLE001 - any rendering bug must not lose the artifacts
        log.warning("could not write %s (%s: %s); the compile is fine, rebuild the page with "
                    "`quantflow report %s`", out / "report.html", type(exc).__name__, exc, out)


def _jsonable(v: object) -> bool:
    return isinstance(v, (int, float, str, bool, list, dict, type(None)))


__all__ = ["STAGES", "CompileConfig", "Dataset", "compile", "debug", "plan_stage"]
