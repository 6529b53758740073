"""The CLI's subcommands: argument handling around the library calls, nothing more."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quantflow import options_file, outdir, resources, validate
from quantflow.config import (
    DATASETS,
    ZOO_DATASETS,
    CompileConfig,
    DataOptions,
    GateThresholds,
    flags,
)
from quantflow.dataset import Dataset
from quantflow.errors import BudgetExceededError, InputError, PassError, UsageError, in_stage
from quantflow.pipeline import compile
from quantflow.targets import ARTIFACT_FILES, ARTIFACT_SUFFIXES


def _builtin(name: str, limit: int | None) -> Dataset:
    from quantflow.data import builtin_dataset

    x, y = builtin_dataset(name)
    if limit is not None:
        x, y = x[:limit], (y[:limit] if y is not None else None)
    return Dataset(x, y, name)


def _user(path: str, preprocess: str, limit: int | None) -> Dataset:
    from quantflow.data import load_tensor_data

    x, y = load_tensor_data(path, preprocess, limit)  # reads no more than `limit` samples
    return Dataset(x, y, path)


def resolve_data(model: str, calib: str | None, eval_data: str | None, preprocess: str,
                 calib_limit: int, eval_limit: int | None) -> tuple[Dataset, Dataset | None]:
    """Calibration and evaluation sets from the flags, defaulting to the zoo model's dataset."""
    if calib is None and model.startswith("zoo:"):
        calib = _zoo_dataset(model[4:])
    if calib is None:
        raise InputError("no calibration data; fix: pass --calib DATA (a .npy/.pt/.npz file, a "
                         f"folder, or a built-in set: {', '.join(DATASETS)})")
    if calib in DATASETS:
        c_name, e_name = DATASETS[calib]
        c = _builtin(c_name, calib_limit)
        if eval_data:
            return c, _user(eval_data, preprocess, eval_limit)
        return c, _builtin(e_name, eval_limit)
    c = _user(calib, preprocess, calib_limit)
    e = _user(eval_data, preprocess, eval_limit) if eval_data else None
    return c, e


def _zoo_dataset(name: str) -> str | None:
    """The built-in data a zoo model was trained on (its calibration default)."""
    from quantflow.zoo import MODELS

    entry = MODELS.get(name)
    return None if entry is None else ZOO_DATASETS.get(entry.dataset, entry.dataset)


def _zoo_metric(name: str) -> str:
    from quantflow.zoo import MODELS

    entry = MODELS.get(name)
    return "auto" if entry is None else entry.metric


def _options(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """`cls` (CompileConfig or DataOptions) from the flags quantflow/config.py defines; its
    validation errors are usage errors (exit 2)."""
    values = {f.name: getattr(args, f.name) for f, _ in flags(cls)}
    try:
        return cls(**values, **extra)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_compile(args: argparse.Namespace) -> int:
    from quantflow.load import load_model

    # options first: a contradiction is reported before minutes of loading and calibrating
    config: CompileConfig = _options(CompileConfig, args, **options_file.merge(args))
    data: DataOptions = _options(DataOptions, args)
    if args.print_config:
        print(options_file.render(args, config, data), end="")
        return 0
    if not args.model or not args.out:
        raise UsageError(f"compile needs {'a model' if not args.model else '-o DIR'}; fix: "
                         "pass it (or set model / output in the --options file)")
    if config.plan_path:
        _plan(config.plan_path)
    # everything is written beside -o and moved into place when complete; a budget failure
    # (exit 10) still publishes the artifacts and report, which the user needs to see why
    with outdir.staging(args.out, "compile", publish_on=(BudgetExceededError,)) as stage:
        with in_stage("load"):  # the pipeline's own stages name themselves
            loaded = load_model(args.model, arch=args.arch, trust_pickle=args.trust_pickle,
                                input_shape=args.input_shape)
            validate.single_input(loaded)
        if config.metric == "auto" and args.model.startswith("zoo:"):
            config = replace(config, metric=_zoo_metric(args.model[4:]))
        with in_stage("data"):
            calib, evaluation, example = _data(loaded, args)
        report = compile(loaded.module, example, calib, evaluation, stage.tmp, config,
                         name=loaded.name, source=loaded.source)
    report.data = stage.relocate(report.data)
    print(report.render())
    return 0


def _data(loaded: Any, args: argparse.Namespace
          ) -> tuple[Dataset, Dataset | None, tuple[torch.Tensor, ...]]:
    """Calibration set, evaluation set and example inputs from the flags, checked."""
    from quantflow.load import resolve_example_inputs

    if args.calib == "distilled":
        return _distilled(loaded, args)
    calib, evaluation = resolve_data(args.model, args.calib, args.eval_data, args.preprocess,
                                     args.calib_samples, args.eval_samples)
    example = resolve_example_inputs(loaded, args.input_shape, calib.x)
    validate.data_matches_input(calib.x, example[0],
                                f"--calib {args.calib or '(the built-in data)'}")
    if evaluation is not None:
        validate.data_matches_input(evaluation.x, example[0],
                                    f"--eval {args.eval_data or '(the built-in data)'}")
    return calib, evaluation, example


def _plan(path: str) -> None:
    """Read and schema-check --config before any work; a bad plan is a usage error."""
    from quantflow.spec import QuantPlan

    try:
        QuantPlan.load(path)
    except OSError as exc:
        raise UsageError(f"--config {path}: cannot read it ({exc.strerror or exc}); fix: pass "
                         "the plan.json that `quantflow compile` wrote") from None
    except ValueError as exc:
        raise UsageError(f"--config {exc}; fix: pass a plan.json written by `quantflow "
                         "compile` (format quantflow.QuantPlan/1)") from None


def _distilled(loaded: object, args: argparse.Namespace
               ) -> tuple[Dataset, Dataset | None, tuple[torch.Tensor, ...]]:
    """ZeroQ: synthesize calibration inputs from the model's BatchNorm statistics."""
    from quantflow.ir import capture
    from quantflow.load import resolve_example_inputs
    from quantflow.search.zeroq import distill

    example = resolve_example_inputs(loaded, args.input_shape, None)  # type: ignore[arg-type]
    gm = capture(loaded.module, example)  # type: ignore[attr-defined]
    n = min(args.calib_samples, 256)
    # ZeroQ back-propagates through all n samples at once: activations and their gradients
    resources.check_graph(gm, 2 * n, f"distilling {n} calibration samples of shape "
                          f"{list(example[0].shape[1:])}", "pass fewer --calib-samples or a "
                          "smaller --input-shape")
    result = distill(gm, tuple(example[0].shape[1:]), n=n, seed=args.seed or 0)
    calib = Dataset(result.inputs.detach(), None, f"distilled (ZeroQ, {n} samples)")
    evaluation = None
    if args.eval_data:
        evaluation = _user(args.eval_data, args.preprocess, args.eval_samples)
    elif args.model.startswith("zoo:"):
        dataset = _zoo_dataset(args.model[4:])
        if dataset in DATASETS:
            evaluation = _builtin(DATASETS[dataset][1], args.eval_samples)
    return calib, evaluation, example


def cmd_optimize(args: argparse.Namespace) -> int:
    from quantflow.ir import capture, export_program
    from quantflow.load import load_model, resolve_example_inputs
    from quantflow.passes import optimize
    from quantflow.targets.onnx_export import export_onnx
    from quantflow.testing import max_rel_err

    with outdir.staging(args.out, "optimize") as stage:
        with in_stage("load"):
            loaded = load_model(args.model, arch=args.arch, trust_pickle=args.trust_pickle,
                                input_shape=args.input_shape)
            validate.single_input(loaded)
            example = resolve_example_inputs(loaded, args.input_shape, None)
        with in_stage("capture"):
            gm = capture(loaded.module, example)
            batch = int(example[0].shape[0]) if example[0].dim() else 1
            resources.check_graph(gm, batch, f"{loaded.path}: running the model on its "
                                  f"example input {list(example[0].shape)}",
                                  "pass a smaller --input-shape")
            with torch.no_grad():
                before = gm(*example)
        with in_stage("passes"):
            report = optimize(gm)
            with torch.no_grad():
                after = gm(*example)
            b = before[0] if isinstance(before, (tuple, list)) else before
            a = after[0] if isinstance(after, (tuple, list)) else after
            _check_finite_outputs(b, a, loaded.path)
            err = max_rel_err(a, b)
        with in_stage("export"):
            torch.export.save(export_program(gm, example), stage.tmp / "model.pt2")
            export_onnx(gm, example, stage.tmp / "model.onnx")
    out = stage.out
    print(report.summary())
    print(f"passes fired: {report.fired}")
    print(f"max|Δ|/max|y| vs the original on the example input: {err:.2e}")
    print(f"wrote {out / 'model.pt2'} and {out / 'model.onnx'}")
    return 0


def _check_finite_outputs(before: Any, after: Any, where: str) -> None:
    """A NaN compares unequal to everything, so an equivalence check of NaN outputs proves
    nothing: the weights are finite (load checked them), so NaN comes from the model's own
    computation (before the passes) or from a pass (after them)."""
    if isinstance(before, torch.Tensor) and before.is_floating_point() and \
            not bool(torch.isfinite(before).all()):
        raise InputError(f"{where}: the model's output on its example input holds NaN or Inf "
                         "(its weights are finite, so it computes them: log or division of 0, "
                         "overflow); fix: check the model")
    if isinstance(after, torch.Tensor) and after.is_floating_point() and \
            not bool(torch.isfinite(after).all()):
        raise PassError(f"{where}: the graph passes turned finite outputs into NaN/Inf (a "
                        "quantflow bug: please report it with the model)")


def cmd_profile(args: argparse.Namespace) -> int:
    """Latency of a compiled artifact (any target's: see `_runtime_of`). Inputs are random
    normal samples of the artifact's static input shapes."""
    from quantflow.targets import get_target

    validate.count("--runs", args.runs)
    validate.count("--warmup", args.warmup, low=0)
    validate.count("--threads", args.threads)
    path = Path(args.artifact)
    if not path.exists():
        raise InputError(f"artifact {path} does not exist; fix: pass model.onnx, a TVM model.so "
                         "or manifest.json, or the directory `quantflow compile` wrote")
    kind, file = _runtime_of(path)
    if args.target is not None and args.target != kind and \
            file.suffix not in ARTIFACT_SUFFIXES[args.target]:
        raise InputError(f"{path} is a{'' if kind == 'tvm' else 'n'} {kind} artifact, not "
                         f"--target {args.target}; fix: drop --target (it is detected)")
    target = get_target(args.target or kind, **({"threads": args.threads} if args.threads else {}),
                        **_remote_options(args, args.target or kind))
    with in_stage("load"):
        art = target.load_artifact(file)
    warning = target.artifact_warning(art)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    specs = art.meta["input_specs"]
    for s in specs:  # an artifact may declare any shape: price it before allocating
        resources.check_alloc(2 * resources.tensor_bytes(s["shape"], torch.float64),
                              f"{path}: input {s.get('name', '')!r} of shape {s['shape']}",
                              "profile an artifact with a smaller input shape")
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(s["shape"]).astype(s["dtype"]) for s in specs]
    kw: dict[str, Any] = {"warmup": args.warmup, "runs": args.runs}
    if args.per_layer and target.caps.per_layer_profile:
        kw["per_layer"] = True
    elif args.per_layer:
        print(f"warning: --target {target.name} does not profile per layer; timing the whole "
              "model", file=sys.stderr)
    with in_stage("profile"):
        lat = target.profile(art, inputs, **kw)
    print(f"{art.path} ({target.name}, {art.precision}): median {lat.median_ms:.3f} ms, "
          f"p90 {lat.p90_ms:.3f} ms over {lat.runs} runs (warm-up {lat.warmup}), "
          f"{lat.threads} threads, batch {lat.batch}")
    print(f"device: {lat.device}")
    for when in ("untuned_latency", "tuned_latency"):  # TVM: measured by `compile`
        if when in art.meta:
            print(f"at compile time, {when.replace('_', ' ')}: "
                  f"median {art.meta[when]['median_ms']:.3f} ms")
    if lat.per_layer_ms:
        total = sum(lat.per_layer_ms.values())
        print(f"per layer ({len(lat.per_layer_ms)} entries, sum {total:.3f} ms; top 25):")
        for name, ms in sorted(lat.per_layer_ms.items(), key=lambda kv: -kv[1])[:25]:
            print(f"  {ms:9.4f} ms  {name}")
    return 0


def _remote_options(args: argparse.Namespace, kind: str) -> dict[str, object]:
    """`quantflow profile --rpc-tracker/--rpc-key` (TVM RPC) or `--measure-on/--ray` (a Ray
    device node), checked as `compile` checks them: the target's options for them."""
    remote = {"rpc_tracker": args.rpc_tracker, "rpc_key": args.rpc_key,
              "measure_on": args.measure_on, "ray_address": args.ray}
    if all(v is None for v in remote.values()):
        return {}
    try:
        config = CompileConfig(target=kind, **remote)  # type: ignore[arg-type]
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    opts = config.target_options()
    return {k: opts[k] for k in ("rpc_tracker", "rpc_key", "measure_on", "ray_address")
            if k in opts}


def _runtime_of(path: Path) -> tuple[str, Path]:
    """(target, file) of an artifact: by the suffixes each target declares it reads, or, for
    a `quantflow compile` output folder, by the file the folder holds."""
    if path.is_dir():
        for kind, name in ARTIFACT_FILES.items():
            if (path / name).exists():
                return kind, path / name
    else:
        for kind, suffixes in ARTIFACT_SUFFIXES.items():
            if path.suffix in suffixes:
                return kind, path
    raise InputError(f"{path}: not a compiled artifact; fix: pass model.onnx, a TVM model.so "
                     "or manifest.json, or the directory `quantflow compile` wrote")


def cmd_debug(args: argparse.Namespace) -> int:
    """Per-layer parity; its body is quantflow/debug_cmd.py (options and data as compile)."""
    from quantflow.debug_cmd import run
    from quantflow.load import load_model

    out = args.out  # only -o: an options file's `output` is the compile's folder, not ours
    config: CompileConfig = _options(CompileConfig, args, **options_file.merge(args))
    args.out = out
    _options(DataOptions, args)
    validate.count("--samples", args.samples)
    if not args.model:
        raise UsageError("debug needs a model; fix: pass it (or set model in the --options "
                         "file)")
    if args.runtime_isa != "host" and config.target != "ort":
        raise UsageError(f"--runtime-isa applies to --target ort only (the {config.target} "
                         "target is compared on this CPU); fix: drop --runtime-isa")
    with in_stage("load"):
        loaded = load_model(args.model, arch=args.arch, trust_pickle=args.trust_pickle,
                            input_shape=args.input_shape)
        validate.single_input(loaded)
    if config.metric == "auto" and args.model.startswith("zoo:"):
        config = replace(config, metric=_zoo_metric(args.model[4:]))
    with in_stage("data"):
        calib, evaluation, example = _data(loaded, args)
    return run(args, loaded, config, calib, evaluation, example)


def cmd_gate(args: argparse.Namespace) -> int:
    """The CI regression gate; its body is quantflow/regression_gate.py."""
    from quantflow.regression_gate import run

    return run(args, _options(GateThresholds, args))


def cmd_report(args: argparse.Namespace) -> int:
    """Rebuild OUT/report.html; its body is quantflow/report_cmd.py."""
    from quantflow.report_cmd import run

    return run(args)


def cmd_zoo(args: argparse.Namespace) -> int:
    from quantflow.zoo import MODELS

    for name, e in MODELS.items():
        print(f"zoo:{name:28s} {e.input_shape!s:16s} {e.dataset:14s} {e.description}")
    return 0
