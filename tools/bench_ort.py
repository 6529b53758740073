"""Benchmark quantflow's INT8 against other PTQ tools, all executed by ONNX Runtime (issue #2).

Every tool starts from the same FP32 ONNX file (captured, BN folded by quantflow's default
pass pipeline, exported by `targets/onnx_export.py`; no cross-layer equalization, so the other
tools do not inherit quantflow's CLE) and the same calibration images, and every artifact is
measured by the same harness: onnxruntime CPU EP, ORT_ENABLE_ALL, sequential execution, a
fixed intra-op thread count, batch 1 (`targets/ort.py`'s `OrtTarget.run` / `.profile`).

Rows per model:
- quantflow: `pipeline.compile(..., CompileConfig())` (calibrator auto, CLE auto).
- ort/<calibrator>: `onnxruntime.quantization.quantize_static`, QDQ, per_channel=True,
  activations QUInt8 (ORT's x86 default U8S8) / weights QInt8, one row per calibrator; plus the
  best calibrator with QInt8 activations. `entropy` uses ORT's defaults (num_bins=128,
  num_quantized_bins=128: its KL search then has exactly one candidate threshold, the full
  range, i.e. it IS MinMax). `entropy-2048` calibrates with num_bins=2048 (the value TensorRT's
  algorithm assumes); quantize_static does not forward num_bins from `extra_options`, so that
  row runs ORT's own `create_calibrator` and hands the ranges to quantize_static through its
  `calibration_cache_path`. The "best" ORT row is chosen on the evaluation data (an oracle
  choice, favouring ORT); quantflow chooses on calibration data only.
- nncf: `nncf.quantize` on the ONNX model, run in a separate venv (`--nncf-python`) because
  nncf must not change the project's torch/onnxruntime; skipped with the reason when missing.
- torchao: PT2E with `X86InductorQuantizer` (uint8 asymmetric activations with a histogram
  observer, int8 per-channel weights) in the same side venv (`--torchao-python`) on the
  unfolded float model, exported to QDQ ONNX by targets/onnx_export.py.

Quality: with labels, top-1 accuracy of FP32 and INT8 (drop in points); always top-1 agreement
with the FP32 ONNX output and output SQNR = 10·log10(‖y‖²/‖y−ŷ‖²) over the evaluation set.
quantflow's row also records its torch simulation's quality (fake-quant, against the torch FP32
model, on the first `measure.SIM_SAMPLES` evaluation samples), for "vs simulation" comparisons.

Quality per CPU class (`--isa`): ONNX Runtime picks its int8 kernels by the CPU it runs on, and
on x86 without VNNI (AVX2: `vpmaddubsw`) they add two u8·s8 products in a saturating int16, so
one file can be exact on the build host and wrong on the CPU it ships to (targets/ort_isa.py).
Every artifact (FP32 included) is measured natively, on this host's class
(`quantflow.hostcpu.host_cpu().isa_class`, e.g. x86-vnni), AND under each emulated ISA
(`quantflow.targets.emulate.run_onnx`, e.g. x86-avx2 = `qemu-x86_64 -cpu Haswell`): all its
evaluation samples in ONE emulator process per artifact (files are batch 1), on the first
`--isa-eval-limit` samples (emulation is ~30x slower for integer kernels, far more for float
ones), against the FP32 ONNX output computed natively. FP32 is exact enough everywhere to be
the reference: the emulated FP32 row (first `--isa-fp32-limit` samples) shows how far it moves,
float rounding only; emulated outputs are bit-exact with that CPU's kernels,
and each emulated row says how many samples came out bit-identical to the host's run of the same
file. Latency is timed on the host only (timings under emulation mean nothing).
Latency: the artifacts of one model are timed in interleaved rounds (A B C A B C ...), so a
load spike on this shared machine hits every artifact alike; median and p90 are the medians
over rounds of each round's median / p90, and `os.getloadavg()` is stored before each round.

Usage:
  .venv/bin/python tools/bench_ort.py --models resnet_fmnist mobilenetv2_fmnist \
      mobilenet_v2_imagenet resnet18 --out bench_results/ort.json
  .venv/bin/python tools/bench_ort.py --quick ...         # smoke run: few samples, few runs
  .venv/bin/python tools/bench_ort.py --latency-only ...  # re-time the artifacts of --out
  .venv/bin/python tools/bench_ort.py --isa x86-avx2 ...   # quality natively and on AVX2 too

The markdown table is written next to --out (same name, .md). nncf and torchao come from the
side venv that tools/setup_bench_peers.sh creates (/tmp/benchvenv).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parent.parent

#: ORT calibrators benchmarked (name -> (CalibrationMethod name, extra_options, create_calibrator
#: options that quantize_static would not forward))
ORT_CALIBRATORS: dict[str, tuple[str, dict[str, Any], dict[str, Any] | None]] = {
    "minmax": ("MinMax", {}, None),
    "entropy": ("Entropy", {}, None),
    "entropy-2048": ("Entropy", {}, {"num_bins": 2048, "num_quantized_bins": 128}),
    "percentile": ("Percentile", {}, None),
    "distribution": ("Distribution", {}, None),
}
LATENCY_ONLY_MODELS = {"resnet18"}


@dataclass(frozen=True)
class BenchData:
    x_cal: Any
    x_eval: Any
    y_eval: Any | None
    cal_name: str
    eval_name: str


# --------------------------------------------------------------------------- data and models


def load_model(name: str, random_weights: bool) -> tuple[Any, tuple[int, ...], str]:
    """(nn.Module, input shape (C,H,W), dataset) for a zoo name, or the untrained resnet18."""
    from quantflow.zoo import MODELS, get_model, resnet18

    if name == "resnet18":  # ImageNet-shaped, untrained: latency only
        import torch

        torch.manual_seed(0)
        return resnet18().eval(), (3, 224, 224), "imagenet-random"
    entry = MODELS[name]
    return get_model(name, pretrained=not random_weights), entry.input_shape, entry.dataset


def load_data(dataset: str, calib_limit: int | None, eval_limit: int | None) -> BenchData:
    from quantflow.data import builtin_dataset

    if dataset == "fashion-mnist":
        names = ("fashion-mnist-calib", "fashion-mnist")
    else:
        names = ("natural-images-calib", "natural-images")
    x_cal, _ = builtin_dataset(names[0])
    x_ev, y_ev = builtin_dataset(names[1])
    x_cal = x_cal[:calib_limit]
    x_ev = x_ev[:eval_limit]
    y_ev = None if y_ev is None else y_ev[:eval_limit]
    return BenchData(x_cal, x_ev, y_ev, names[0], names[1])


def export_plain_fp32(model: Any, example: Any, path: Path) -> None:
    """Capture + quantflow's default passes (BN folding, clean-up) + ONNX export, no CLE."""
    from quantflow.ir import capture
    from quantflow.passes import DEFAULT_PIPELINE, run_pipeline
    from quantflow.targets.onnx_export import export_onnx

    gm = capture(model, (example,))
    run_pipeline(gm, DEFAULT_PIPELINE)
    export_onnx(gm, (example,), path)


# --------------------------------------------------------------------------- runners


def artifact(path: Path, precision: str) -> Any:
    import onnx

    from quantflow.targets.base import Artifact

    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    ins = tuple(i.name for i in m.graph.input if i.name not in inits)
    outs = tuple(o.name for o in m.graph.output)
    return Artifact(target="ort", precision=precision, files={"model": str(path)},
                    input_names=ins, output_names=outs)


def run_all(target: Any, path: Path, x: Any) -> Any:
    """Logits of the ONNX file at `path` over `x`, one sample at a time (files are batch 1)."""
    from quantflow import evaluate as ev

    art = artifact(path, "int8")
    return ev.predict_runtime(lambda xs: target.run(art, xs), x, 1)


def quality(logits: Any, ref: Any, labels: Any | None) -> dict[str, Any]:
    from quantflow import evaluate as ev

    q = ev.quality(logits, labels, ref)
    return {"accuracy": None if q.accuracy is None else round(q.accuracy, 3),
            "agreement": round(float(q.agreement or 0.0), 4),
            # JSON has no infinity: identical outputs (the reference itself) get None
            "sqnr_db": round(float(q.sqnr_db), 2) if q.sqnr_db not in (None, float("inf"))
            else None, "kl": float(f"{q.kl:.3g}")}


def host_isa() -> str:
    """This host's CPU class (x86-vnni, x86-avx2, arm64, ...): the ISA of the native rows."""
    from quantflow.hostcpu import host_cpu

    return host_cpu().isa_class


def emulated_logits(path: Path, x: Any, isa: str, timeout: float) -> Any:
    """Logits of the ONNX file at `path` over `x` on `isa`, by emulation: all samples in ONE
    emulator process (start-up dominates), one sample per run (files are batch 1)."""
    import numpy as np
    import torch

    from quantflow.targets import emulate

    art = artifact(path, "int8")
    name, out = art.input_names[0], art.output_names[0]
    xs = x.numpy()
    feeds = [{name: xs[i:i + 1]} for i in range(xs.shape[0])]
    outs = emulate.run_onnx(path, feeds, isa, outputs=[out], timeout=timeout)
    return torch.from_numpy(np.concatenate([np.asarray(o[out]) for o in outs]))


def isa_quality(logits: Any, ref: Any, labels: Any | None) -> dict[str, Any]:
    """`quality` plus the sample count and, with labels, the reference's (FP32's) accuracy on
    the same samples and the drop against it."""
    q = quality(logits, ref, labels)
    q["samples"] = int(logits.shape[0])
    if labels is not None:
        fp32_acc = 100.0 * float((ref.argmax(-1) == labels).double().mean())
        q["fp32_accuracy"] = round(fp32_acc, 3)
        q["accuracy_drop"] = round(fp32_acc - q["accuracy"], 3)
    return q


def vs_host(logits: Any, host: Any) -> dict[str, Any]:
    """How an emulated run of a file differs from the host's run of the same file."""
    from quantflow import evaluate as ev

    diff = (logits.double() - host.double()).abs().flatten(1).amax(1)
    sqnr = ev.sqnr_db(host, logits)
    return {"identical_samples": round(float((diff == 0).double().mean()), 4),
            "max_abs_diff": float(f"{float(diff.max()):.4g}"),
            "top1_agreement": round(float((logits.argmax(-1) == host.argmax(-1))
                                          .double().mean()), 4),
            "sqnr_db": None if sqnr == float("inf") else round(sqnr, 2)}


def fusion_summary(path: Path) -> dict[str, Any]:
    """What ORT_ENABLE_ALL made of a file: integer kernels vs convs/gemms left in float."""
    import tempfile

    import onnx
    import onnxruntime as ort

    from quantflow.targets.ort_graph import session_options, summarize_graph

    with tempfile.TemporaryDirectory() as tmp:
        opt = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), session_options(1, optimized_path=opt),
                             providers=["CPUExecutionProvider"])
        s = summarize_graph(onnx.load(opt))
    return {"integer_ops": s["integer_ops"], "float_compute_ops": len(s["float_compute_ops"]),
            "float_ops_on_dequantized": len(s["float_ops_on_dequantized"]),
            "requantize_pairs": len(s["requantize_pairs"])}


class _Reader:
    """onnxruntime CalibrationDataReader over (N, C, H, W) calibration images, batch 1."""

    def __init__(self, name: str, x: Any) -> None:
        self.name, self.x = name, x.numpy()
        self.it: Iterator[dict[str, Any]] = iter(())
        self.rewind()

    def get_next(self) -> dict[str, Any] | None:
        return next(self.it, None)

    def rewind(self) -> None:
        self.it = iter([{self.name: self.x[i:i + 1]} for i in range(len(self.x))])

    def __len__(self) -> int:
        return len(self.x)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.it = iter([{self.name: self.x[i:i + 1]} for i in range(start_index, end_index)])


def ort_preprocess(src: Path, dst: Path) -> str:
    """ORT's recommended pre-processing (shape inference + graph optimization); else a copy."""
    import shutil

    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
        return "quant_pre_process"
    except Exception as exc:  # noqa: BLE001  (any failure: record why, use the export as is)
        shutil.copy(src, dst)
        return f"quant_pre_process failed ({type(exc).__name__}: {exc}); used the export as is"


def ort_quantize(src: Path, dst: Path, x_cal: Any, calibrator: str, act: str,
                 work: Path) -> dict[str, Any]:
    """quantize_static with one calibrator; returns wall time and the activation ranges."""
    import numpy as np
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import (
        create_calibrator,
        load_tensors_data,
        save_tensors_data,
    )

    method_name, extra, calib_opts = ORT_CALIBRATORS[calibrator]
    method = getattr(CalibrationMethod, method_name)
    in_name = artifact(src, "fp32").input_names[0]
    reader = _Reader(in_name, x_cal)
    cache = work / f"ort_{calibrator}_{act}_ranges.json"
    cache.unlink(missing_ok=True)
    t0 = time.perf_counter()
    if calib_opts is not None:
        c = create_calibrator(src, None, augmented_model_path=str(work / "augmented.onnx"),
                              calibrate_method=method, extra_options=calib_opts)
        c.collect_data(reader)
        save_tensors_data(c.compute_data(), cache)
        reader.rewind()
    quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=getattr(QuantType, act), weight_type=QuantType.QInt8,
                    calibrate_method=method, extra_options=dict(extra),
                    calibration_cache_path=str(cache))
    seconds = time.perf_counter() - t0
    ranges = {k: [float(np.min(d.range_value[0])), float(np.max(d.range_value[1]))]
              for k, d in load_tensors_data(cache).data.items()
              if hasattr(d, "range_value")} if cache.exists() else {}
    return {"quantize_s": round(seconds, 2), "ranges": ranges}


def range_difference(a: dict[str, list[float]], b: dict[str, list[float]]) -> dict[str, Any]:
    """How far two calibrations' ranges are apart: max relative difference of the range width."""
    common = sorted(set(a) & set(b))
    rel = [abs((a[k][1] - a[k][0]) - (b[k][1] - b[k][0])) / max(abs(a[k][1] - a[k][0]), 1e-12)
           for k in common]
    return {"tensors": len(common), "identical": sum(r == 0.0 for r in rel),
            "max_rel_width_diff": round(max(rel), 4) if rel else None}


def nncf_quantize(python: str, src: Path, dst: Path, x_cal: Any, work: Path) -> dict[str, Any]:
    """nncf.quantize in its own interpreter (see module docstring); returns time or the reason."""
    import numpy as np

    if not Path(python).exists():
        return {"error": f"no interpreter at {python} (nncf needs its own venv)"}
    npy = work / "calib.npy"
    np.save(npy, x_cal.numpy())
    cmd = [python, str(Path(__file__).resolve()), "_nncf", str(src), str(npy), str(dst)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        return {"error": f"nncf failed (rc {proc.returncode}): {proc.stderr.strip()[-600:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _nncf_main(src: str, npy: str, dst: str) -> None:
    """Runs inside the nncf venv: only numpy, onnx and nncf are imported here."""
    import nncf
    import numpy as np
    import onnx

    model = onnx.load(src)
    x = np.load(npy)
    name = model.graph.input[0].name
    ds = nncf.Dataset([x[i:i + 1] for i in range(len(x))], lambda s: {name: s})
    t0 = time.perf_counter()
    q = nncf.quantize(model, ds, subset_size=len(x))
    seconds = time.perf_counter() - t0
    onnx.save(q, dst)
    print(json.dumps({"quantize_s": round(seconds, 2), "nncf": nncf.__version__}))


def torchao_quantize(python: str, model: Any, example: Any, x_cal: Any, dst: Path,
                     work: Path) -> dict[str, Any]:
    """torchao PT2E (X86InductorQuantizer) in the side venv, then quantflow's ONNX export.

    The float model travels as a torch.export .pt2 (same torch version on both sides), the
    converted model comes back as a .pt2 of quantized_decomposed Q/DQ ops, which
    targets/onnx_export.py turns into a QDQ ONNX file like quantflow's own.
    """
    import numpy as np
    import torch

    from quantflow.targets.onnx_export import export_onnx

    if not Path(python).exists():
        return {"error": f"no interpreter at {python} (torchao needs its own venv)"}
    src, back, npy = work / "float.pt2", work / "torchao.pt2", work / "calib.npy"
    torch.export.save(torch.export.export(model, (example,)), src)
    np.save(npy, x_cal.numpy())
    cmd = [python, str(Path(__file__).resolve()), "_torchao", str(src), str(npy), str(back)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        return {"error": f"torchao failed (rc {proc.returncode}): {proc.stderr.strip()[-600:]}"}
    info: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    try:
        gm = torch.export.load(back).module()
        export_onnx(gm, (example,), dst)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001  (third-party tool: record any failure as the row)
        info["error"] = f"ONNX export of the PT2E model failed: {type(exc).__name__}: {exc}"[:600]
    return info


def _torchao_main(src: str, npy: str, dst: str) -> None:
    """Runs inside the side venv: torchao's PT2E flow with the x86 Inductor quantizer."""
    import numpy as np
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    x = torch.from_numpy(np.load(npy))
    t0 = time.perf_counter()
    m = torch.export.load(src).module()
    q = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    m = prepare_pt2e(m, q)  # type: ignore[arg-type]
    with torch.no_grad():
        for i in range(x.shape[0]):
            m(x[i:i + 1])
    m = convert_pt2e(m)
    seconds = time.perf_counter() - t0
    torch.export.save(torch.export.export(m, (x[:1],)), dst)
    import torchao

    print(json.dumps({"quantize_s": round(seconds, 2), "torchao": torchao.__version__}))


# --------------------------------------------------------------------------- latency


def time_artifacts(paths: dict[str, Path], x0: Any, threads: int, rounds: int, runs: int,
                   warmup: int) -> dict[str, dict[str, Any]]:
    """Interleaved rounds; per artifact the median over rounds of median and p90 (ms)."""
    from quantflow.targets.ort import OrtTarget

    target = OrtTarget(threads=threads)
    arts = {k: artifact(p, "int8") for k, p in paths.items()}
    per: dict[str, list[Any]] = {k: [] for k in paths}
    loads: list[list[float]] = []
    for _ in range(rounds):
        loads.append([round(v, 2) for v in os.getloadavg()])
        for k, art in arts.items():
            per[k].append(target.profile(art, [x0], warmup=warmup, runs=runs))
    out = {}
    for k, lats in per.items():
        out[k] = {"median_ms": round(statistics.median(l.median_ms for l in lats), 4),
                  "p90_ms": round(statistics.median(l.p90_ms for l in lats), 4),
                  "round_medians_ms": [round(l.median_ms, 4) for l in lats],
                  "threads": threads, "batch": 1, "rounds": rounds, "runs_per_round": runs,
                  "loadavg_per_round": loads}
    return out


# --------------------------------------------------------------------------- one model


TOOLS = ("quantflow", "ort", "nncf", "torchao")


def _tool_of(key: str) -> str:
    return key.split("/")[0]


def bench_model(name: str, args: argparse.Namespace, work: Path,
                prev: dict[str, Any] | None = None) -> dict[str, Any]:
    """All rows of one model. Tools left out of `args.tools` keep their rows and artifacts
    from `prev` (a previous result of this model), re-evaluated against the new FP32 file."""
    import torch

    model, shape, dataset = load_model(name, args.random_weights)
    latency_only = name in LATENCY_ONLY_MODELS
    data = load_data("fashion-mnist" if dataset == "fashion-mnist" else "imagenet",
                     args.calib_limit or (16 if latency_only else None),
                     args.eval_limit or (8 if latency_only else None))
    work.mkdir(parents=True, exist_ok=True)
    example = data.x_cal[:1].clone()
    res: dict[str, Any] = {"model": name, "input_shape": [1, *shape], "dataset": dataset,
                           "random_weights": args.random_weights or latency_only,
                           "calib": {"data": data.cal_name, "samples": int(data.x_cal.shape[0])},
                           "eval": {"data": data.eval_name, "samples": int(data.x_eval.shape[0]),
                                    "labels": data.y_eval is not None},
                           "git": git_state(), "rows": {}}
    rows: dict[str, dict[str, Any]] = res["rows"]
    paths: dict[str, Path] = {}

    fp32 = work / "fp32.onnx"
    export_plain_fp32(model, example, fp32)
    paths["fp32"] = fp32
    rows["fp32"] = {"tool": "fp32", "quantize_s": None}

    if prev is not None:
        for k, r in prev["rows"].items():
            if k != "fp32" and _tool_of(k) not in args.tools and Path(r.get("path", "")).exists():
                rows[k] = {f: v for f, v in r.items() if f not in
                           ("accuracy", "agreement", "sqnr_db", "kl", "accuracy_drop",
                            "by_isa")}
                paths[k] = Path(r["path"])
        for key in ("ort_entropy_vs_minmax",):
            if key in prev and "ort" not in args.tools:
                res[key] = prev[key]

    # (a) quantflow, default config
    if "quantflow" in args.tools:
        _quantflow(name, model, example, data, work, rows, paths)
        if args.optimize_time:  # the same compile with --optimize-time, side by side
            _quantflow(name, model, example, data, work, rows, paths, args.optimize_time)

    # (b) onnxruntime quantize_static
    pre = work / "fp32_ort_pre.onnx"
    rows["fp32"]["ort_preprocess"] = ort_preprocess(fp32, pre)
    if "ort" in args.tools:
        _ort_rows(pre, data, args, work, rows, paths, res)

    # (c) nncf and torchao in their own venv
    if args.nncf_python and "nncf" in args.tools:
        r = nncf_quantize(args.nncf_python, fp32, work / "nncf.onnx", data.x_cal, work)
        rows["nncf"] = {"tool": "nncf", **r}
        if "error" not in r:
            paths["nncf"] = work / "nncf.onnx"
    if args.torchao_python and "torchao" in args.tools:
        r = torchao_quantize(args.torchao_python, model, example, data.x_cal,
                             work / "torchao.onnx", work)
        rows["torchao"] = {"tool": "torchao-pt2e", "calibrator": "x86-inductor", **r}
        if "error" not in r:
            paths["torchao"] = work / "torchao.onnx"

    logits = _quality_rows(data, args, rows, paths)
    if "ort" in args.tools and args.ort_qint8:
        _ort_s8_row(pre, data, args, work, rows, paths, logits)
    res["isa"] = _isa_rows(data, args, rows, paths, logits)

    x0 = torch.zeros(1, *shape).numpy() if latency_only else data.x_eval[:1].numpy()
    res["latency"] = time_artifacts(paths, x0, args.threads, args.rounds, args.runs,
                                    args.warmup)
    res["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    return res


def _quantflow(name: str, model: Any, example: Any, data: BenchData, work: Path,
               rows: dict[str, Any], paths: dict[str, Path], optimize_s: float = 0.0) -> None:
    from quantflow import pipeline as pl

    key = "quantflow" if not optimize_s else "quantflow+opt"
    qf_dir = work / key
    t0 = time.perf_counter()
    # the evaluation data only feeds the report's quality section (its torch-simulation
    # quality is recorded below); calibrator and CLE are chosen on the calibration data
    rep = pl.compile(model, (example,), pl.Dataset(data.x_cal, None, data.cal_name),
                     pl.Dataset(data.x_eval, data.y_eval, data.eval_name), qf_dir,
                     pl.CompileConfig(profile_runs=2, profile_warmup=1,
                                      optimize_seconds=optimize_s), name=name)
    wall = time.perf_counter() - t0
    st = rep["stages"]
    # what the peers' quantize_s measures: everything up to the quantized artifact
    build_s = sum(st.get(k, 0.0) for k in ("capture", "passes", "plan", "repair", "round",
                                           "quantize", "lower"))
    paths[key] = Path(rep["artifacts"]["quantized"])
    label = "quantflow" if not optimize_s else f"quantflow --optimize-time {optimize_s:g}s"
    rows[key] = {"tool": label, "quantize_s": round(build_s, 2),
                 "compile_total_s": round(wall, 2), "stages": st,
                 "optimize_time_s": optimize_s, "repair": rep.get("repair"),
                 "rounding": {k: v for k, v in (rep.get("rounding") or {}).items()
                              if k != "output_mse_gain_db"} or None,
                 "calibrator": rep["calibration"]["calibrator"],
                 "equalize": rep["calibration"]["equalize"],
                 "candidates": rep["calibration"]["candidates"],
                 "float_compute_ops": rep["runtime"].get("float_compute_ops", []),
                 "device": rep.get("device"),
                 "simulation": _simulation(rep)}


def _simulation(rep: Any) -> dict[str, Any] | None:
    """The torch simulation's quality from a quantflow report (fake-quant vs the torch FP32
    model, first `measure.SIM_SAMPLES` evaluation samples)."""
    q = rep.get("quality") or {}
    sim = q.get("simulation")
    if not sim:
        return None
    out = {"samples": sim.get("samples"),
           "accuracy": None if sim.get("accuracy") is None else round(sim["accuracy"], 3),
           "agreement": None if sim.get("agreement") is None else round(sim["agreement"], 4),
           "sqnr_db": None if sim.get("sqnr_db") in (None, float("inf"))
           else round(sim["sqnr_db"], 2),
           "kl": None if sim.get("kl") is None else float(f"{sim['kl']:.3g}"),
           "reference": "torch FP32 model (deploy form)",
           "runtime_vs_simulation_sqnr_db": q.get("runtime_vs_simulation_sqnr_db"),
           "eval_data": q.get("eval_data")}
    return out


def _ort_rows(pre: Path, data: BenchData, args: argparse.Namespace, work: Path,
              rows: dict[str, Any], paths: dict[str, Path], res: dict[str, Any]) -> None:
    ort_ranges: dict[str, dict[str, list[float]]] = {}
    for c in args.ort_calibrators:
        key = f"ort/{c}"
        dst = work / f"ort_{c}.onnx"
        try:
            r = ort_quantize(pre, dst, data.x_cal, c, "QUInt8", work)
        except Exception as exc:  # noqa: BLE001  (third-party tool: record any failure as the row)
            rows[key] = {"tool": "onnxruntime", "error": f"{type(exc).__name__}: {exc}"[:500]}
            continue
        ort_ranges[c] = r.pop("ranges")
        rows[key] = {"tool": "onnxruntime", "calibrator": c, "activations": "QUInt8", **r}
        paths[key] = dst
    if "minmax" in ort_ranges:
        res["ort_entropy_vs_minmax"] = {c: range_difference(ort_ranges["minmax"], ort_ranges[c])
                                        for c in ort_ranges if c.startswith("entropy")}


def _quality_row(key: str, logits: Any, ref: Any, path: Path, data: BenchData,
                 rows: dict[str, Any]) -> None:
    rows[key].update(quality(logits, ref, data.y_eval))
    rows[key]["size_bytes"] = path.stat().st_size
    rows[key]["path"] = str(path)
    rows[key]["ort_graph"] = fusion_summary(path)
    if data.y_eval is not None:
        rows[key]["accuracy_drop"] = round(rows["fp32"]["accuracy"] - rows[key]["accuracy"], 3)


def _quality_rows(data: BenchData, args: argparse.Namespace, rows: dict[str, Any],
                  paths: dict[str, Path]) -> dict[str, Any]:
    """Every artifact through the same ORT harness, the FP32 ONNX output as reference;
    returns each artifact's native logits (for the s8 row and the per-ISA comparison)."""
    from quantflow.targets.ort import OrtTarget

    target = OrtTarget(threads=args.threads)
    ref = run_all(target, paths["fp32"], data.x_eval)
    logits = {"fp32": ref}
    _quality_row("fp32", ref, ref, paths["fp32"], data, rows)
    for k, p in paths.items():
        if k != "fp32":
            logits[k] = run_all(target, p, data.x_eval)
            _quality_row(k, logits[k], ref, p, data, rows)
    return logits


def _isa_rows(data: BenchData, args: argparse.Namespace, rows: dict[str, Any],
              paths: dict[str, Path], logits: dict[str, Any]) -> dict[str, Any]:
    """Quality of every artifact per CPU class: `rows[key]["by_isa"][isa]`.

    The host's entry repeats the native numbers (all evaluation samples); each emulated ISA
    runs the first `--isa-eval-limit` samples in one emulator process per artifact, against
    the natively computed FP32 output of the same samples, and records `vs_host` (the same
    file's native output on those samples). Returns the model's `isa` section.
    """
    from quantflow.errors import TargetRuntimeError, TargetUnavailableError
    from quantflow.targets import emulate

    host = host_isa()
    ref, labels = logits["fp32"], data.y_eval
    for k in paths:
        rows[k]["by_isa"] = {host: {**isa_quality(logits[k], ref, labels), "emulated": False}}
    sim = rows.get("quantflow", {}).get("simulation")
    if sim and sim.get("samples") and labels is not None:
        n_sim = int(sim["samples"])
        sim["fp32_accuracy"] = round(100.0 * float((ref[:n_sim].argmax(-1) == labels[:n_sim])
                                                   .double().mean()), 3)
        if sim.get("accuracy") is not None:
            sim["accuracy_drop"] = round(sim["fp32_accuracy"] - sim["accuracy"], 3)
    emulated = [i for i in dict.fromkeys(args.isa) if i not in ("host", host)]
    n = min(args.isa_eval_limit, int(data.x_eval.shape[0]))
    section: dict[str, Any] = {"host": host, "isas": [host], "emulated": {},
                               "emulated_eval_samples": n, "skipped": {}}
    x, ref_n = data.x_eval[:n], ref[:n]
    lab_n = None if labels is None else labels[:n]
    for isa in emulated:
        try:
            info = emulate.runner_info(isa)
        except (TargetUnavailableError, TargetRuntimeError) as exc:
            section["skipped"][isa] = str(exc)
            print(f"   {isa}: skipped: {exc}", file=sys.stderr, flush=True)
            continue
        section["isas"].append(isa)
        section["emulated"][isa] = info
        for k, p in paths.items():
            # the FP32 file only shows that float rounding moves it by nothing that matters;
            # emulated float kernels are slow (~1 s per Fashion-MNIST sample), so fewer samples
            m = min(n, args.isa_fp32_limit) if k == "fp32" else n
            t0 = time.perf_counter()
            try:
                out = emulated_logits(p, x[:m], isa, args.isa_timeout)
            except (TargetUnavailableError, TargetRuntimeError) as exc:
                rows[k]["by_isa"][isa] = {"error": str(exc)[-800:], "emulated": True}
                continue
            seconds = round(time.perf_counter() - t0, 1)
            rows[k]["by_isa"][isa] = {**isa_quality(out, ref_n[:m],
                                                    None if lab_n is None else lab_n[:m]),
                                      "emulated": True, "cpu": info.get("cpu"),
                                      "vs_host": vs_host(out, logits[k][:m]),
                                      "emulator_s": seconds}
            print(f"   {isa} {k}: {seconds} s, {m} samples", file=sys.stderr, flush=True)
    return section


def _ort_s8_row(pre: Path, data: BenchData, args: argparse.Namespace, work: Path,
                rows: dict[str, Any], paths: dict[str, Path], logits: dict[str, Any]) -> None:
    """The best ORT calibrator (oracle choice on the evaluation data) with QInt8 activations."""
    from quantflow.targets.ort import OrtTarget

    ref = logits["fp32"]
    ort_keys = [k for k in rows if k.startswith("ort/") and k.count("/") == 1
                and rows[k].get("sqnr_db") is not None]
    if not ort_keys:
        return
    best = max(ort_keys, key=lambda k: (rows[k].get("accuracy") or 0.0, rows[k]["sqnr_db"]))
    c = rows[best]["calibrator"]
    key, dst = f"ort/{c}/s8", work / f"ort_{c}_s8.onnx"
    try:
        r = ort_quantize(pre, dst, data.x_cal, c, "QInt8", work)
    except Exception as exc:  # noqa: BLE001  (third-party tool: record any failure as the row)
        rows[key] = {"tool": "onnxruntime", "error": f"{type(exc).__name__}: {exc}"[:500]}
        return
    r.pop("ranges")
    rows[key] = {"tool": "onnxruntime", "calibrator": c, "activations": "QInt8", **r}
    paths[key] = dst
    logits[key] = run_all(OrtTarget(threads=args.threads), dst, data.x_eval)
    _quality_row(key, logits[key], ref, dst, data, rows)


def retime(res: dict[str, Any], args: argparse.Namespace) -> None:
    """--latency-only: re-time the artifacts recorded in a previous result."""
    import numpy as np

    paths = {k: Path(r["path"]) for k, r in res["rows"].items() if "path" in r}
    x0 = np.zeros(res["input_shape"], dtype=np.float32)
    if res["model"] not in LATENCY_ONLY_MODELS:
        x0 = load_data(res["dataset"], 1, 1).x_eval[:1].numpy()
    res["latency"] = time_artifacts(paths, x0, args.threads, args.rounds, args.runs,
                                    args.warmup)
    res["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]


# --------------------------------------------------------------------------- table


TABLE_HEAD = ("| model | tool | calibrator | ISA | eval n | FP32 acc | acc | drop (pt) | agree "
              "| SQNR dB | = host | median ms | p90 ms | × FP32 | quantize s | size KiB |")
TOOL_ORDER = ("fp32", "quantflow", "ort", "nncf", "torchao")


def _fmt(v: Any, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def table(results: dict[str, Any]) -> str:
    """One row per (model, tool, ISA): the host's class first (native, with latency), then each
    emulated ISA (latency n/a), and quantflow's torch simulation after its host row. "FP32 acc"
    is the native FP32 file's accuracy on the same samples, "acc" this file's on this ISA,
    "agree"/"SQNR" against the native FP32 output, "= host" the fraction of samples whose
    output is bit-identical to the host's run of the same file. Results written before the
    ISA level existed (no `by_isa`) show their native numbers as the host row."""
    lines = [TABLE_HEAD, "|" + "---|" * 16]
    for name, res in results["models"].items():
        lat = res.get("latency", {})
        f_ms = lat.get("fp32", {}).get("median_ms")
        isa_sec = res.get("isa") or {}
        host = isa_sec.get("host", "host")
        keys = sorted(res["rows"], key=lambda k: TOOL_ORDER.index(_tool_of(k))
                      if _tool_of(k) in TOOL_ORDER else len(TOOL_ORDER))
        for isa in isa_sec.get("isas") or [host]:
            for k in keys:
                r = res["rows"][k]
                if "error" in r:
                    if isa == host:
                        lines.append(f"| {name} | {k} | | {isa} | | | | | | | | | | | | error: "
                                     f"{r['error'][:80]} |")
                    continue
                q = (r.get("by_isa") or {}).get(isa)
                if q is None and isa == host and "by_isa" not in r:
                    q = {f: r.get(f) for f in ("accuracy", "agreement", "sqnr_db")}
                    q["samples"] = res.get("eval", {}).get("samples")
                    q["fp32_accuracy"] = res["rows"].get("fp32", {}).get("accuracy")
                    q["accuracy_drop"] = r.get("accuracy_drop")
                lines.extend(_table_rows(name, k, r, isa, host, q, lat.get(k, {}), f_ms))
    return "\n".join(lines)


def _table_rows(name: str, k: str, r: dict[str, Any], isa: str, host: str,
                q: dict[str, Any] | None, lk: dict[str, Any], f_ms: float | None) -> list[str]:
    tool = r["tool"] if k != "fp32" else "FP32"
    cal = r.get("calibrator", "") + ("+cle" if r.get("equalize") else "")
    if r.get("activations") == "QInt8":
        cal += " (s8 act)"
    size = _fmt(r.get("size_bytes", 0) / 1024, ".0f")
    if q is None:
        return [f"| {name} | {tool} | {cal} | {isa} | | | | | | | | | | | | not measured |"]
    if "error" in q:
        return [(f"| {name} | {tool} | {cal} | {isa} | | | | | | | | n/a | n/a | n/a | | "
                f"error: {q['error'][-80:]} |")]
    native = isa == host
    ratio = (lk["median_ms"] / f_ms) if native and lk and f_ms else None
    same = (q.get("vs_host") or {}).get("identical_samples")
    lat = (f"{_fmt(lk.get('median_ms'), '.3f')} | {_fmt(lk.get('p90_ms'), '.3f')} "
           f"| {_fmt(ratio, '.2f')}" if native else "n/a | n/a | n/a")
    out = [(f"| {name} | {tool} | {cal} | {isa} | {_fmt(q.get('samples'), 'd')} "
           f"| {_fmt(q.get('fp32_accuracy'), '.2f')} | {_fmt(q.get('accuracy'), '.2f')} "
           f"| {_fmt(q.get('accuracy_drop'), '.2f')} | {_fmt(q.get('agreement'), '.3f')} "
           f"| {_fmt(q.get('sqnr_db'), '.1f')} | {_fmt(same, '.3f')} | {lat} "
           f"| {_fmt(r.get('quantize_s'), '.1f')} | {size} |")]
    sim = r.get("simulation")
    if native and k == "quantflow" and sim:
        out.append(f"| {name} | {tool} | {cal} | torch sim | {_fmt(sim.get('samples'), 'd')} "
                   f"| {_fmt(sim.get('fp32_accuracy'), '.2f')} "
                   f"| {_fmt(sim.get('accuracy'), '.2f')} "
                   f"| {_fmt(sim.get('accuracy_drop'), '.2f')} "
                   f"| {_fmt(sim.get('agreement'), '.3f')} | {_fmt(sim.get('sqnr_db'), '.1f')} "
                   f"| | n/a | n/a | n/a | | |")
    return out


def git_state() -> dict[str, Any]:
    """The commit the benchmark ran on and whether the work tree differed from it."""
    def git(*a: str) -> str:
        proc = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,
                              check=False, timeout=60)
        return proc.stdout.rstrip() if proc.returncode == 0 else ""

    # porcelain lines start with a status column that may be a space: strip only the end
    status = git("status", "--porcelain")  # untracked files count: the code may import them
    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(status),
            "changes": status.splitlines()}


def machine() -> dict[str, Any]:
    import onnxruntime
    import torch

    from quantflow.targets.base import device_description

    return {"device": device_description(), "isa_class": host_isa(),
            "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_nncf"]:
        _nncf_main(*argv[1:4])
        return 0
    if argv[:1] == ["_torchao"]:
        _torchao_main(*argv[1:4])
        return 0
    sys.path.insert(0, str(ROOT))
    from quantflow.devices import EMULATED_ISAS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet_fmnist", "mobilenetv2_fmnist",
                                                   "mobilenet_v2_imagenet", "resnet18"])
    p.add_argument("--out", default="bench_results/ort.json")
    p.add_argument("--work-dir", default=None, help="artifacts (default: <out stem>_work/)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 16 calibration / 32 evaluation samples, minmax+entropy, "
                        "1 latency round of 5 runs, no nncf")
    p.add_argument("--calib-limit", type=int, default=None)
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--ort-calibrators", nargs="+", default=list(ORT_CALIBRATORS),
                   choices=list(ORT_CALIBRATORS))
    p.add_argument("--no-ort-qint8", dest="ort_qint8", action="store_false",
                   help="skip the extra ORT row with QInt8 activations")
    p.add_argument("--nncf-python", default="/tmp/benchvenv/bin/python",
                   help="interpreter of a venv with nncf; '' to skip nncf")
    p.add_argument("--torchao-python", default="/tmp/benchvenv/bin/python",
                   help="interpreter of a venv with torchao (PT2E); '' to skip torchao")
    p.add_argument("--tools", nargs="+", default=list(TOOLS), choices=list(TOOLS),
                   help="tools to (re)run; the others keep their rows from --out")
    p.add_argument("--random-weights", action="store_true",
                   help="untrained zoo weights (for smoke tests only)")
    p.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    p.add_argument("--optimize-time", type=float, default=0.0,
                   help="also compile with quantflow's --optimize-time SECONDS (row "
                        "quantflow+opt: worst-tensor repair and learned rounding)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--latency-only", action="store_true",
                   help="re-time the artifacts recorded in --out (no quantization)")
    p.add_argument("--isa", nargs="+", default=["host"], choices=["host", *EMULATED_ISAS],
                   metavar="ISA",
                   help="CPU classes to measure quality on besides the host (always measured "
                        f"natively): any of {', '.join(EMULATED_ISAS)}, run under emulation "
                        "(targets/emulate.py); default: host only")
    p.add_argument("--isa-eval-limit", type=int, default=2000,
                   help="evaluation samples per emulated ISA (the first N; emulation is ~30x "
                        "slower than native; default 2000: ImageNet's 80 views all run)")
    p.add_argument("--isa-fp32-limit", type=int, default=16,
                   help="samples of the FP32 file per emulated ISA (a check that float rounding "
                        "is all that changes; QEMU's float kernels are slow); default 16")
    p.add_argument("--isa-timeout", type=float, default=3600.0,
                   help="seconds one artifact may take under emulation")
    args = p.parse_args(argv)
    if args.quick:
        args.calib_limit = args.calib_limit or 16
        args.eval_limit = args.eval_limit or 32
        args.ort_calibrators = [c for c in args.ort_calibrators if c in ("minmax", "entropy")]
        args.nncf_python, args.torchao_python, args.ort_qint8 = "", "", False
        args.rounds, args.runs, args.warmup = 1, 5, 2
    out = Path(args.out)
    work = Path(args.work_dir) if args.work_dir else out.with_name(out.stem + "_work")
    results: dict[str, Any] = (json.loads(out.read_text()) if out.exists()
                               else {"models": {}})
    results["machine"] = machine()
    results["command"] = " ".join(["tools/bench_ort.py", *argv])
    results["git"] = git_state()
    for name in args.models:
        print(f"== {name}", file=sys.stderr, flush=True)
        if args.latency_only:
            retime(results["models"][name], args)
        else:
            results["models"][name] = bench_model(name, args, work / name,
                                                  results["models"].get(name))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
        out.with_suffix(".md").write_text(table(results) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
