"""`compile()`: the whole journey from an nn.Module to a measured, quantized artifact.

Read top to bottom; each stage is one call into its own module:

  capture   torch.export -> GraphModule                        (quantflow.ir)
  passes    BN folding, re-parameterization, clean-up           (quantflow.passes)
  calibrate activation statistics over calibration data         (quantflow.calibrate)
  plan      uniform INT8 with the best calibrator, a --config, or the mixed-precision search
  quantize  Q/DQ + integer weights in the graph (torch simulation)  (quantflow.quantize)
  lower     artifacts for the target, FP32 baseline and quantized   (quantflow.targets)
  evaluate  accuracy / agreement / SQNR of the artifact vs FP32     (quantflow.evaluate)
  profile   latency on this machine with the target's runtime
  report    JSON + text; the gate on --max-drop                     (quantflow.report)

The CLI is a thin layer over this function.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from quantflow import calibrate as cal
from quantflow import evaluate as ev
from quantflow import hostcpu, validate, verify
from quantflow.batch import describe as describe_batch
from quantflow.devices import DEVICES, EMULATED_ISAS
from quantflow.errors import BudgetExceededError, InputError, TargetUnavailableError
from quantflow.ir import capture, count_ops
from quantflow.passes import DEFAULT_PIPELINE, run_pipeline
from quantflow.quantize import model_size_bytes, quantizable_nodes, quantize
from quantflow.report import Report
from quantflow.spec import CALIBRATORS, TRT_ACT, KernelRules, QuantPlan, int8_plan
from quantflow.targets import ort_isa
from quantflow.versions import installed_versions

log = logging.getLogger("quantflow")


@dataclass(frozen=True)
class CompileConfig:
    """Options of one compile; validated on construction, stored in the report."""

    target: str = "ort"
    bits: str = "8"  # "8" or "mixed"
    calibrator: str = "auto"  # "auto" picks the best of CALIBRATORS by output SQNR
    equalize: str = "auto"  # "auto" | "on" | "off": cross-layer equalization
    plan_path: str | None = None  # --config: a saved QuantPlan
    max_drop: float | None = None  # accuracy points (or agreement points without labels)
    max_size_mb: float | None = None  # --bits mixed: weight size budget in MB
    max_size_ratio: float | None = None  # --bits mixed: weight size budget × uniform INT8
    max_latency_ms: float | None = None  # --bits mixed: measured latency budget
    calib_batch: int = 32
    profile_runs: int = 50
    profile_warmup: int = 10
    threads: int | None = None
    tune_trials: int = 0  # tvm: MetaSchedule trials per task (0: untuned)
    #: what the artifact is for (None: the target's default, DEVICES[target][0]); ort: which
    #: CPUs it must be exact on (targets/ort_isa.py); tvm: this machine or an aarch64 bundle
    device: str | None = None
    #: CPU classes the parity gate also checks the artifact on, by emulation (ort only;
    #: targets/emulate.py): e.g. ("x86-avx2", "arm64"); the host is always checked
    verify_isas: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.target not in ("ort", "tvm", "trt"):
            raise ValueError(f"target must be ort, tvm or trt, got {self.target!r}")
        if self.bits not in ("8", "mixed"):
            raise ValueError(f"bits must be '8' or 'mixed', got {self.bits!r}")
        if self.calibrator not in ("auto", *CALIBRATORS):
            raise ValueError(f"calibrator must be auto or one of {CALIBRATORS}")
        if self.equalize not in ("auto", "on", "off"):
            raise ValueError("equalize must be auto, on or off")
        if self.device is not None and self.device not in DEVICES[self.target]:
            raise ValueError(f"--device for --target {self.target} must be one of "
                             f"{DEVICES[self.target]}, got {self.device!r}")
        if self.tune_trials and self.target != "tvm":
            raise ValueError("--tune-trials applies to --target tvm only")
        if self.verify_isas and self.target != "ort":
            raise ValueError("--verify-on applies to --target ort only (TVM and TensorRT "
                             "check their own numerics)")
        for isa in self.verify_isas:
            if isa not in EMULATED_ISAS:
                raise ValueError(f"--verify-on: {isa!r} is not an emulated CPU; choose from "
                                 f"{EMULATED_ISAS}")
            if self.target == "ort" and not ort_isa.exact_on(self.resolved_device, isa):
                raise ValueError(f"--verify-on {isa}: an artifact for --device "
                                 f"{self.resolved_device} is not meant to be exact there; "
                                 "use --device portable")
        # numbers: NaN compares false with everything, so `nan < 0` lets a gate of NaN
        # pass every compile; bounds are checked as `not (ok)` to catch it
        if self.max_drop is not None and not (math.isfinite(self.max_drop)
                                              and 0 <= self.max_drop <= 100):
            raise ValueError(f"--max-drop (max_drop) must be a finite number of points in "
                             f"[0, 100], got {self.max_drop}")
        for name in ("max_size_mb", "max_size_ratio", "max_latency_ms"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v}")
        for name, low in (("calib_batch", 1), ("profile_runs", 1), ("profile_warmup", 0),
                          ("tune_trials", 0), ("threads", 1)):
            v = getattr(self, name)
            if v is not None and not v >= low:
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be >= {low}, "
                                 f"got {v}")

    @property
    def placement(self) -> str:
        return "trt" if self.target == "trt" else "ort"

    @property
    def resolved_device(self) -> str:
        """The device, with the target's default filled in and `host` made concrete (ort)."""
        device = self.device or DEVICES[self.target][0]
        if self.target == "ort":
            return ort_isa.resolve_device(device, hostcpu.host_cpu().isa_class)
        return device

    @property
    def kernel_rules(self) -> KernelRules:
        """What the target's kernels need from the quantizer on the chosen device."""
        limit = ort_isa.pair_limit(self.resolved_device) if self.target == "ort" else None
        return KernelRules(placement=self.placement, pair_limit=limit)


@dataclass(frozen=True)
class Dataset:
    """Inputs (N, ...) and optional labels; `name` says where they came from."""

    x: torch.Tensor
    y: torch.Tensor | None = None
    name: str = "data"


class _Stages:
    """Wall time per stage, for the report (and a log line per stage)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        log.info("stage: %s", name)
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 3)


def _base_plan(config: CompileConfig, calibrator: str) -> QuantPlan:
    if config.placement == "trt":
        return int8_plan(calibrator, act=TRT_ACT)
    return int8_plan(calibrator)


def choose_plan(gm: fx.GraphModule, calib: Dataset, config: CompileConfig
                ) -> tuple[fx.GraphModule, QuantPlan, dict[str, cal.TensorStats], dict[str, float]]:
    """Uniform INT8: try calibrators (and equalization) and keep the most faithful.

    Fidelity is the output SQNR of the torch simulation against FP32 on the calibration data
    (no evaluation data is used, so the evaluation stays unbiased).
    """
    from quantflow.passes.equalize import equalize as cle

    if config.plan_path:
        plan = QuantPlan.load(config.plan_path)
        validate.plan_layers(plan, gm, config.plan_path)  # never apply a plan in part
        g = copy.deepcopy(gm)
        if plan.equalize and cle(g):
            g.recompile()  # a pass leaves recompiling to its caller (run_pipeline does)
        stats = cal.collect_stats(g, cal.batched(calib.x, config.calib_batch), progress=True)
        return g, plan, stats, {}
    rules = config.kernel_rules
    variants: list[tuple[bool, fx.GraphModule]] = [(False, gm)]
    if config.equalize != "off":
        g_eq = copy.deepcopy(gm)
        if cle(g_eq):
            g_eq.recompile()
            variants = [(True, g_eq)] if config.equalize == "on" else [(False, gm), (True, g_eq)]
    calibrators = CALIBRATORS if config.calibrator == "auto" else (config.calibrator,)
    scores: dict[str, float] = {}
    best: tuple[float, fx.GraphModule, QuantPlan, dict[str, cal.TensorStats]] | None = None
    batches = cal.batched(calib.x, config.calib_batch)
    for eq, g in variants:
        stats = cal.collect_stats(g, batches, progress=True)
        ref = ev.predict(g, calib.x)
        for c in calibrators:
            plan = replace(_base_plan(config, c), equalize=eq)
            out = ev.predict(quantize(g, plan, stats, rules), calib.x)
            s = ev.sqnr_db(ref, out)
            scores[f"{c}{'+cle' if eq else ''}"] = round(s, 3)
            if best is None or s > best[0]:
                best = (s, g, plan, stats)
    assert best is not None
    return best[1], best[2], best[3], scores


def compile(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    calib: Dataset,
    evaluation: Dataset | None,
    out_dir: str | Path,
    config: CompileConfig = CompileConfig(),
    *,
    name: str = "model",
    source: str = "module",
) -> Report:
    """Compile `model` for `config.target`; write artifacts + report.json under `out_dir`.

    Raises BudgetExceededError (after writing everything) when the accuracy drop exceeds
    `config.max_drop`.
    """
    from quantflow.targets import get_target
    from quantflow.targets.base import profiles_per_layer

    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stage = _Stages()
    report = Report()
    report["model"] = {"name": name, "source": source,
                       "input_shape": list(example_inputs[0].shape)}
    report["target"], report["bits"] = config.target, config.bits
    report["config"] = asdict(config)
    report["host"] = hostcpu.host_cpu().to_dict()  # the CPU every measurement below was taken on
    report["versions"] = installed_versions()
    if calib.x.shape[1:] != example_inputs[0].shape[1:]:
        raise InputError(f"calibration data {calib.name!r} has samples of shape "
                         f"{tuple(calib.x.shape[1:])}, the model expects "
                         f"{tuple(example_inputs[0].shape[1:])}; fix --calib or --input-shape")

    with stage("capture"):
        gm = capture(model, example_inputs)
    # before anything runs data through it: memory at the largest batch, labels vs classes
    validate.run_fits(gm, max(config.calib_batch, ev.PREDICT_BATCH), calib, evaluation)
    report["model"]["batch"] = describe_batch(gm)  # dynamic, rewritten or static (chunked)
    with stage("passes"):
        pass_report = run_pipeline(gm, DEFAULT_PIPELINE)
    report["passes"] = {"before": pass_report.before, "after": pass_report.after,
                        "fired": pass_report.fired, "seconds": round(pass_report.seconds, 3)}
    log.info(pass_report.summary())

    with stage("calibrate"):
        if config.bits == "mixed":
            from quantflow.search.compile import mixed_plan  # lazy: xgboost etc.

            gm, plan, stats, scores, search_summary = mixed_plan(
                gm, calib, evaluation, config, out)
            report["search"] = search_summary
        else:
            gm, plan, stats, scores = choose_plan(gm, calib, config)
    plan.save(out / "plan.json")
    chosen = plan.default.act.calibrator if plan.default.act else "none"
    report["calibration"] = {"calibrator": chosen, "equalize": plan.equalize,
                             "samples": int(calib.x.shape[0]), "data": calib.name,
                             "candidates": scores}

    rules = config.kernel_rules
    with stage("quantize"):
        qgm = quantize(gm, plan, stats, rules)

    target = get_target(config.target, **target_options(config))
    precision = "mixed" if config.bits == "mixed" else "int8"
    with stage("lower"):
        art_fp32 = target.lower(gm, example_inputs, out, precision="fp32")
        art_q = target.lower(qgm, example_inputs, out, precision=precision)
    report["device"] = _device_section(config)
    if hasattr(target, "tensor_codes"):  # the target can show its per-layer integer codes
        with stage("verify"):
            qgm, art_q, rules, parity = _verify(gm, plan, stats, rules, qgm, art_q, target,
                                                calib, example_inputs, out, precision, config)
        report["parity"] = parity.to_dict()
    report["portability"] = _portability(gm, plan, stats, qgm, calib, config)
    plan.save(out / "plan.json", compiled={"device": config.resolved_device,
                                           "kernel_rules": rules.to_dict(),
                                           "portability": qgm.meta["quantflow"].portability})
    report["artifacts"] = {"fp32": str(art_fp32.path), "quantized": str(art_q.path),
                           "plan": str(out / "plan.json"), "report": str(out / "report.json")}
    report["runtime"] = {k: v for k, v in art_q.meta.items() if _jsonable(v)}

    with stage("evaluate"):
        report["quality"] = _evaluate(gm, qgm, target, art_fp32, art_q, evaluation or calib,
                                      int(example_inputs[0].shape[0]))
    with stage("profile"):
        x0 = [t.numpy() for t in example_inputs]
        kw = {"warmup": config.profile_warmup, "runs": config.profile_runs}
        try:
            lat_f = target.profile(art_fp32, x0, **kw)
            # per-layer times where the runtime offers them (a separate, profiled pass: they
            # never enter the wall-clock numbers)
            per_layer = profiles_per_layer(target)
            lat_q = target.profile(art_q, x0, **kw, **({"per_layer": True} if per_layer else {}))
            report["latency"] = {"fp32": lat_f.to_dict(), "quantized": lat_q.to_dict(),
                                 "speedup": round(lat_f.median_ms / max(lat_q.median_ms, 1e-9),
                                                  3)}
        except TargetUnavailableError as exc:  # e.g. TensorRT: latency only on the device
            log.warning("latency not measured: %s", exc)
            report["latency"] = {"unavailable": str(exc)}
    size_f, size_q = art_fp32.size_bytes(), art_q.size_bytes()
    report["size"] = {"fp32_bytes": size_f, "quantized_bytes": size_q,
                      "ratio": round(size_f / max(size_q, 1), 3),
                      "weights_fp32_bytes": model_size_bytes(gm),
                      "weights_quantized_bytes": model_size_bytes(qgm)}
    report["layers"] = _layers(qgm, plan, art_q.meta)
    report["stages"] = stage.seconds
    report["compile_seconds"] = round(time.perf_counter() - t_start, 2)
    if "search" in report and "median_ms" in report["latency"].get("quantized", {}):
        # the search priced candidates with per-layer tables: say how the real model compares
        predicted = report["search"]["best"]["latency_ms"]
        measured = report["latency"]["quantized"]["median_ms"]
        report["search"]["latency_check"] = {
            "table_ms": predicted, "measured_ms": measured,
            "measured_over_table": (round(measured / predicted, 3) if predicted else None)}
    report["gate"] = _gate(report["quality"], config.max_drop,
                           report["latency"].get("quantized", {}).get("median_ms"),
                           config.max_latency_ms)
    report.save(out / "report.json")
    if not report["gate"]["passed"]:
        raise BudgetExceededError(report["gate"]["reason"] + f" (report: {out / 'report.json'})")
    return report


def target_options(config: CompileConfig) -> dict[str, object]:
    """Keyword options for `get_target` from the compile configuration."""
    opts: dict[str, object] = {"threads": config.threads} if config.threads else {}
    if config.target == "tvm":
        opts.update(tune_trials=config.tune_trials, device=config.resolved_device)
    if config.target == "ort":
        opts.update(device=config.resolved_device)
    return opts


def _device_section(config: CompileConfig) -> dict[str, object]:
    """What the artifact is for, and whether this host runs it exactly (report.json)."""
    cpu = hostcpu.host_cpu()
    section: dict[str, object] = {"requested": config.device or DEVICES[config.target][0],
                                  "resolved": config.resolved_device}
    if config.target == "ort":
        device = config.resolved_device
        limit = ort_isa.pair_limit(device)
        section.update(
            exact_on=[c for c in ort_isa.ISA_CLASSES if ort_isa.exact_on(device, c)],
            pair_limit=limit.to_dict() if limit else None,
            host_exact=ort_isa.exact_on(device, cpu.isa_class))
        warning = ort_isa.host_warning(device, cpu.isa_class)
        if warning:
            log.warning(warning)
            section["warning"] = warning
    return section


def _verify(gm: fx.GraphModule, plan: QuantPlan, stats: dict[str, cal.TensorStats],
            rules: KernelRules, qgm: fx.GraphModule, art_q: Any, target: Any, calib: Dataset,
            example_inputs: Sequence[torch.Tensor], out: Path, precision: str,
            config: CompileConfig) -> tuple[fx.GraphModule, Any, KernelRules,
                                            verify.ParityCheck]:
    """The parity gate (quantflow.verify) on the host and the --verify-on CPUs."""
    isas = list(config.verify_isas)
    skipped = {}
    if ort_isa.exact_on(config.resolved_device, hostcpu.host_cpu().isa_class):
        isas.insert(0, "host")
    else:  # the artifact is not meant for this CPU: nothing to hold it to here
        skipped["host"] = (f"this CPU ({hostcpu.host_cpu().isa_class}) is not one the --device "
                           f"{config.resolved_device} artifact is exact on")
    batch = int(example_inputs[0].shape[0])

    def requantize(r: KernelRules) -> tuple[fx.GraphModule, Any]:
        q = quantize(gm, plan, stats, r)
        return q, target.lower(q, example_inputs, out, precision=precision)

    def run_check(q: fx.GraphModule, art: Any) -> verify.ParityCheck:
        return verify.check(q, art, target, calib.x, batch, isas)

    weighted = set(quantizable_nodes(gm))
    qgm, art_q, rules, parity = verify.gate(requantize, rules, (qgm, art_q), run_check, weighted)
    parity.skipped = skipped
    return qgm, art_q, rules, parity


#: calibration samples the fidelity cost of portability is measured on
PORTABILITY_SAMPLES = 256


def _portability(gm: fx.GraphModule, plan: QuantPlan, stats: dict[str, cal.TensorStats],
                 qgm: fx.GraphModule, calib: Dataset, config: CompileConfig
                 ) -> dict[str, object]:
    """The layers changed so the kernels cannot saturate, why, and what it cost in fidelity:
    output SQNR (vs FP32, calibration data) of the simulation with and without the change."""
    info = qgm.meta["quantflow"]
    section: dict[str, object] = {"device": config.resolved_device,
                                  "layers": info.portability}
    if not info.portability:
        return section
    x = calib.x[:PORTABILITY_SAMPLES]
    ref = ev.predict(gm, x)
    free = quantize(gm, plan, stats, KernelRules(placement=config.placement))
    with_fix, without = ev.sqnr_db(ref, ev.predict(qgm, x)), ev.sqnr_db(ref, ev.predict(free, x))
    section["simulation_sqnr_db"] = {"portable": round(with_fix, 3),
                                     "unconstrained": round(without, 3),
                                     "cost": round(without - with_fix, 3),
                                     "samples": int(x.shape[0])}
    return section


def _jsonable(v: object) -> bool:
    return isinstance(v, (int, float, str, bool, list, dict, type(None)))


#: samples of the evaluation data the torch simulation runs on (see `_evaluate`)
SIM_SAMPLES = 1000


def _evaluate(gm: fx.GraphModule, qgm: fx.GraphModule, target: object, art_fp32: object,
              art_q: object, data: Dataset, batch: int) -> dict[str, object]:
    """FP32 reference (torch), torch simulation, and the real artifact on the target.

    The simulation runs on the first `SIM_SAMPLES` samples only: it exists to check the
    artifact against it (runtime-vs-simulation SQNR), and fake-quant in torch is the slowest
    part of an evaluation (Fashion-MNIST test set: ~60 s of 10k vs ~6 s for the ORT artifact).
    """
    ref = ev.predict(gm, data.x)
    n_sim = min(SIM_SAMPLES, int(data.x.shape[0]))
    sim = ev.predict(qgm, data.x[:n_sim])
    run_f = lambda xs: target.run(art_fp32, xs)  # type: ignore[attr-defined]
    run_q = lambda xs: target.run(art_q, xs)  # type: ignore[attr-defined]
    rt_f = ev.predict_runtime(run_f, data.x, batch)
    rt_q = ev.predict_runtime(run_q, data.x, batch)
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


def _gate(quality: dict[str, object], max_drop: float | None, latency_ms: float | None = None,
          max_latency_ms: float | None = None) -> dict[str, object]:
    """The CI gate: accuracy drop in points when labels exist, else 100·(1 − top-1 agreement),
    within `max_drop`; and the MEASURED latency (not the search's table) within
    `max_latency_ms` when both are given."""
    out: dict[str, object] = {"max_drop": max_drop, "passed": True, "reason": None}
    reasons = []
    if max_drop is not None:
        drop = quality.get("accuracy_drop")
        measure = "accuracy drop"
        if drop is None:
            agreement = quality["quantized"]["agreement"]  # type: ignore[index]
            drop, measure = 100.0 * (1.0 - float(agreement)), "top-1 disagreement with FP32"
        out.update(measure=measure, value=drop)
        if float(drop) > max_drop:  # type: ignore[arg-type]
            reasons.append(f"{measure} {float(drop):.2f} points > --max-drop {max_drop}")  # type: ignore[arg-type]
    if max_latency_ms is not None:
        out.update(max_latency_ms=max_latency_ms, latency_ms=latency_ms)
        if latency_ms is None:
            reasons.append("latency could not be measured here, so --max-latency "
                           f"{max_latency_ms} ms is unchecked")
        elif latency_ms > max_latency_ms:
            reasons.append(f"measured latency {latency_ms:.3f} ms > --max-latency "
                           f"{max_latency_ms} ms")
    if reasons:
        out.update(passed=False, reason="; ".join(reasons))
    return out


def _layers(qgm: fx.GraphModule, plan: QuantPlan, meta: dict[str, object]) -> list[dict[str, object]]:
    info = qgm.meta.get("quantflow")
    float_ops: set[str] = set(meta.get("float_compute_ops", []) or [])  # type: ignore[call-overload]
    rows = []
    for n in qgm.graph.nodes:
        if info is not None and n.name in info.layers:
            lp = info.layers[n.name]
            rows.append({"name": n.name, "op": str(n.target).split(".")[-2],
                         "plan": lp.label(), "weight_bits": lp.weight.bits if lp.weight else 32,
                         "runs_integer": n.name not in float_ops and not lp.is_float,
                         "params": info.weight_bits.get(n.name, (32, 0))[1]})
    return rows


__all__ = ["CompileConfig", "Dataset", "choose_plan", "compile", "count_ops"]
