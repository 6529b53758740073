"""The CLI's subcommands: argument handling around the library calls, nothing more."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quantflow import outdir, resources, validate
from quantflow.errors import BudgetExceededError, InputError, PassError, UsageError
from quantflow.pipeline import CompileConfig, Dataset, compile
from quantflow.targets.base import Artifact

#: zoo dataset -> (built-in calibration set, built-in evaluation set)
DATASET_SPLITS = {
    "fashion-mnist": ("fashion-mnist-calib", "fashion-mnist"),
    "imagenet": ("natural-images-calib", "natural-images"),
    "natural-images": ("natural-images-calib", "natural-images"),
}


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
        from quantflow.zoo import MODELS

        name = model[4:]
        if name in MODELS:
            calib = MODELS[name].dataset
    if calib is None:
        raise InputError("no calibration data: pass --calib DATA (a .npy/.pt/.npz file, a "
                         "folder, or a built-in set: fashion-mnist, natural-images)")
    if calib in DATASET_SPLITS:
        c_name, e_name = DATASET_SPLITS[calib]
        c = _builtin(c_name, calib_limit)
        if eval_data:
            return c, _user(eval_data, preprocess, eval_limit)
        return c, _builtin(e_name, eval_limit)
    c = _user(calib, preprocess, calib_limit)
    e = _user(eval_data, preprocess, eval_limit) if eval_data else None
    return c, e


def cmd_compile(args: argparse.Namespace) -> int:
    from quantflow.load import load_model, resolve_example_inputs

    validate.count("--calib-samples", args.calib_samples)
    validate.count("--eval-samples", args.eval_samples)
    size_kind, size = args.max_size or (None, None)
    # options first: a contradiction is reported before minutes of loading and calibrating
    config = _config(target=args.target, bits=args.bits, calibrator=args.calibrator,
                     equalize=args.equalize, plan_path=args.config,
                     max_drop=args.max_drop, threads=args.threads,
                     profile_runs=args.profile_runs,
                     max_size_mb=size if size_kind == "mb" else None,
                     max_size_ratio=size if size_kind == "ratio" else None,
                     max_latency_ms=args.max_latency, tune_trials=args.tune_trials,
                     device=args.device, verify_isas=args.verify_on)
    if args.config:
        _plan(args.config)
    # everything is written beside -o and moved into place when complete; a budget failure
    # (exit 10) still publishes the artifacts and report, which the user needs to see why
    with outdir.staging(args.out, "compile", publish_on=(BudgetExceededError,)) as stage:
        loaded = load_model(args.model, arch=args.arch, trust_pickle=args.trust_pickle,
                            input_shape=args.input_shape)
        validate.single_input(loaded)
        if args.calib == "distilled":
            calib, evaluation, example = _distilled(loaded, args)
        else:
            calib, evaluation = resolve_data(args.model, args.calib, args.eval_data,
                                             args.preprocess, args.calib_samples,
                                             args.eval_samples)
            example = resolve_example_inputs(loaded, args.input_shape, calib.x)
        report = compile(loaded.module, example, calib, evaluation, stage.tmp, config,
                         name=loaded.name, source=loaded.source)
    report.data = stage.relocate(report.data)
    print(report.render())
    return 0


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


def _config(**options: Any) -> CompileConfig:
    """CompileConfig from CLI options; its validation errors are usage errors (exit 2)."""
    try:
        return CompileConfig(**options)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


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
    result = distill(gm, tuple(example[0].shape[1:]), n=n)
    calib = Dataset(result.inputs.detach(), None, f"distilled (ZeroQ, {n} samples)")
    evaluation = None
    if args.eval_data:
        evaluation = _user(args.eval_data, args.preprocess, args.eval_samples)
    elif args.model.startswith("zoo:"):
        from quantflow.zoo import MODELS

        entry = MODELS.get(args.model[4:])
        if entry is not None and entry.dataset in DATASET_SPLITS:
            evaluation = _builtin(DATASET_SPLITS[entry.dataset][1], args.eval_samples)
    return calib, evaluation, example


def cmd_optimize(args: argparse.Namespace) -> int:
    from quantflow.ir import capture, export_program
    from quantflow.load import load_model, resolve_example_inputs
    from quantflow.passes import optimize
    from quantflow.targets.onnx_export import export_onnx
    from quantflow.testing import max_rel_err

    with outdir.staging(args.out, "optimize") as stage:
        loaded = load_model(args.model, arch=args.arch, trust_pickle=args.trust_pickle,
                            input_shape=args.input_shape)
        validate.single_input(loaded)
        example = resolve_example_inputs(loaded, args.input_shape, None)
        gm = capture(loaded.module, example)
        batch = int(example[0].shape[0]) if example[0].dim() else 1
        resources.check_graph(gm, batch, f"{loaded.path}: running the model on its example "
                              f"input {list(example[0].shape)}", "pass a smaller --input-shape")
        with torch.no_grad():
            before = gm(*example)
        report = optimize(gm)
        with torch.no_grad():
            after = gm(*example)
        b = before[0] if isinstance(before, (tuple, list)) else before
        a = after[0] if isinstance(after, (tuple, list)) else after
        _check_finite_outputs(b, a, loaded.path)
        err = max_rel_err(a, b)
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
    """Latency of a compiled artifact: QDQ .onnx (ort, trt) or a TVM library with its
    manifest (`model.so`, `manifest.json`, or the `quantflow compile --target tvm` directory).
    Inputs are random normal samples of the artifact's static input shapes."""
    from quantflow.targets import get_target

    validate.count("--runs", args.runs)
    validate.count("--warmup", args.warmup, low=0)
    validate.count("--threads", args.threads)
    path = Path(args.artifact)
    if not path.exists():
        raise InputError(f"artifact {path} does not exist")
    kind = _artifact_kind(path)
    if args.target is not None and (args.target == "tvm") != (kind == "tvm"):
        raise InputError(f"{path} is a{'' if kind == 'tvm' else 'n'} {kind} artifact, not "
                         f"--target {args.target}; fix: drop --target (it is detected)")
    target_name = args.target or kind
    if kind == "tvm":
        from quantflow.targets.tvm import load_artifact

        art = load_artifact(path)
        specs = art.meta["input_specs"]
    else:
        art, specs = _onnx_artifact(path if path.suffix == ".onnx" else path / "model.onnx",
                                    target_name)
        if target_name == "ort":
            _warn_device(art)
    for s in specs:  # an artifact may declare any shape: price it before allocating
        resources.check_alloc(2 * resources.tensor_bytes(s["shape"], torch.float64),
                              f"{path}: input {s.get('name', '')!r} of shape {s['shape']}",
                              "profile an artifact with a smaller input shape")
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(s["shape"]).astype(s["dtype"]) for s in specs]
    target = get_target(target_name, **({"threads": args.threads} if args.threads else {}))
    kw: dict[str, Any] = {"warmup": args.warmup, "runs": args.runs}
    if args.per_layer:
        kw["per_layer"] = True
    lat = target.profile(art, inputs, **kw)
    print(f"{art.path} ({target_name}, {art.precision}): median {lat.median_ms:.3f} ms, "
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


def _warn_device(art: Artifact) -> None:
    """Warn when this CPU cannot run the artifact exactly (an x86-vnni or arm64 artifact on
    x86 without VNNI): its latency is real, its outputs may not be."""
    import onnx

    from quantflow.hostcpu import host_cpu
    from quantflow.targets import ort_isa
    from quantflow.targets.ort import artifact_device

    device = artifact_device(onnx.load(str(art.path), load_external_data=False))
    warning = ort_isa.host_warning(device, host_cpu().isa_class) if device else None
    if warning:
        print(f"warning: {warning}", file=sys.stderr)


def _artifact_kind(path: Path) -> str:
    """ort for QDQ ONNX, tvm for a TVM library / manifest / compile directory."""
    if path.suffix == ".onnx":
        return "ort"
    if path.suffix in (".so", ".json"):
        return "tvm"
    if path.is_dir():
        if (path / "manifest.json").exists():
            return "tvm"
        if (path / "model.onnx").exists():
            return "ort"
    raise InputError(f"{path}: not a compiled artifact; fix: pass model.onnx, a TVM model.so "
                     "or manifest.json, or the directory `quantflow compile` wrote")


def _onnx_artifact(path: Path, target: str) -> tuple[Artifact, list[dict[str, Any]]]:
    import onnx

    if not path.is_file():
        raise InputError(f"{path} does not exist; fix: pass the model.onnx that `quantflow "
                         "compile` wrote, or its directory")
    try:
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(model)
    except Exception as exc:  # protobuf DecodeError, onnx ValidationError, ...
        first = str(exc).strip().splitlines()
        raise InputError(f"{path}: not a valid ONNX model ({type(exc).__name__}: "
                         f"{first[0][:200] if first else ''}); the file is corrupt, truncated "
                         "or not ONNX; fix: compile it again with `quantflow compile`") from exc
    specs: list[dict[str, Any]] = [
        {"name": i.name, "dtype": "float32",
         "shape": [d.dim_value if d.dim_value > 0 else 1 for d in i.type.tensor_type.shape.dim]}
        for i in model.graph.input]
    art = Artifact(target=target, precision="unknown", files={"model": str(path)},
                   input_names=tuple(s["name"] for s in specs),
                   output_names=tuple(o.name for o in model.graph.output))
    return art, specs


def cmd_zoo(args: argparse.Namespace) -> int:
    from quantflow.zoo import MODELS

    for name, e in MODELS.items():
        print(f"zoo:{name:28s} {e.input_shape!s:16s} {e.dataset:14s} {e.description}")
    return 0
