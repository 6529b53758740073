"""TensorRT target: QDQ ONNX -> explicitly quantized TensorRT engine, or a deployable bundle.

TensorRT *explicit quantization*: the scales live in QuantizeLinear/DequantizeLinear nodes of
the ONNX file, so no calibrator runs on the device; the builder fuses each DQ -> conv/GEMM
(-> Q) group into an int8 kernel and keeps the rest in FP16/FP32 ("Working with Quantized
Types" -> "Explicit Quantization", https://docs.nvidia.com/deeplearning/tensorrt/latest/
inference-library/quantized-types-explicit-quantization.html). Only symmetric signed int8 with
per-tensor activations and per-output-channel weights is accepted; `trt_rules.check_trt_qdq`
checks that (and the fusion-friendly placement) before anything is built.

`lower` writes `model.onnx` (the quantized graph exported by `onnx_export.export_onnx`, with
int32 bias DequantizeLinear nodes folded to float constants: TensorRT's DequantizeLinear has no
int32 input, and it applies biases in the kernel epilogue itself) plus, always, the bundle that
builds the engine on the device: `build_engine.py`, `trtexec.txt`, `README.md`,
`qdq_check.json`. Where `import tensorrt` works and a CUDA GPU is present it also builds
`model.engine` in-process by running that same `build_engine.py` (one implementation, shipped
and used), reusing the timing cache `timing.cache`, and reads the per-layer precisions with the
engine inspector.

Build flags (weakly typed network, the TensorRT 8.x/10.x default): INT8 whenever the graph has
Q/DQ nodes (lets the builder pick int8 kernels where the Q/DQ nodes say so; explicit Q/DQ needs
no calibrator), FP16 when `fp16_fallback` (the layers kept in float may run in half precision).
`strongly_typed=True` (TensorRT >= 10) instead takes every type from the graph and sets no
precision flags, as the documentation recommends for explicit quantization; float layers then
run in FP32 because the exported ONNX is FP32.

Without TensorRT (this CI: no GPU, PyPI's `tensorrt` is a downloader stub) `run` executes the
same Q/DQ ONNX in onnxruntime — identical Q/DQ semantics, which is how numerics are proven here
— and `profile` refuses (TensorRT latency exists only on the device) unless
`allow_ort_proxy=True`, which times onnxruntime and labels the result as a proxy.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import logging
import os
import re
import shlex
import statistics
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper
from torch import fx

from quantflow.errors import TargetUnavailableError, UnsupportedOpError
from quantflow.targets import ARTIFACT_SUFFIXES
from quantflow.targets.base import Artifact, Latency, TargetCaps, device_description, time_runs
from quantflow.targets.onnx_artifact import load_onnx_artifact
from quantflow.targets.onnx_export import export_onnx
from quantflow.targets.trt_rules import QDQ_OPS, check_trt_qdq, format_violations

log = logging.getLogger("quantflow.targets")

PRECISIONS = ("int8", "mixed", "fp32")
#: violations quoted in an error message (all of them are in qdq_check.json)
MAX_LISTED = 8
#: oldest TensorRT whose Python API has everything used here (name-based I/O tensors,
#: execute_async_v3, engine inspector, set_memory_pool_limit)
MIN_TRT = "8.6"


#: The standalone build script shipped in every bundle and run in-process when TensorRT exists:
#: `trt_build_engine.py`, plain Python >= 3.9 + tensorrt, no quantflow import (it must run on a
#: bare device). Its `DEFAULTS = {...}` line is rewritten with the lowering's flags.
BUILD_SCRIPT = Path(__file__).resolve().parent / "trt_build_engine.py"
_DEFAULTS_LINE = re.compile(r"^DEFAULTS: dict\[str, Any\] = \{[^}]*\}", re.MULTILINE)


def build_script(defaults: dict[str, Any]) -> str:
    """The bundle's build_engine.py with `defaults` (one line) as its default flags."""
    text, n = _DEFAULTS_LINE.subn(lambda _: f"DEFAULTS: dict[str, Any] = {defaults!r}",
                                  BUILD_SCRIPT.read_text())
    assert n == 1, "trt_build_engine.py must have exactly one DEFAULTS line"
    return text


def tensorrt_unavailable_reason() -> str | None:
    """None if TensorRT can build and run engines here, else why not (for messages)."""
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt Python package is not installed"
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - the PyPI stub and broken installs raise anything
        return f"`import tensorrt` failed ({type(exc).__name__}: {exc})"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch (torch.cuda.is_available() is False)"
    return None


def fold_int32_bias_dq(model: onnx.ModelProto) -> list[str]:
    """Replace DequantizeLinear(int32 constant) by its float value, in place; return the names.

    y = (x - zp) * s computed in float32 exactly as DequantizeLinear does, so the graph's
    numbers do not change. TensorRT's DequantizeLinear takes INT8/FP8/INT4/FP4 only.
    """
    inits = {i.name: i for i in model.graph.initializer}
    folded: list[str] = []
    for node in list(model.graph.node):
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        x_init = inits[node.input[0]]
        if x_init.data_type != TensorProto.INT32 or node.input[1] not in inits:
            continue
        x = numpy_helper.to_array(x_init).astype(np.float32)
        s = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        zp_name = node.input[2] if len(node.input) > 2 else ""
        zp = (numpy_helper.to_array(inits[zp_name]).astype(np.float32) if zp_name in inits
              else np.zeros_like(s))
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if s.ndim == 1 and s.size > 1:  # per-axis: broadcast along `axis`
            shape = [1] * x.ndim
            shape[axis % x.ndim] = s.size
            s, zp = s.reshape(shape), zp.reshape(shape)
        value = ((x - zp) * s).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        model.graph.node.remove(node)
        folded.append(node.output[0])
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    for init in list(model.graph.initializer):
        if init.name not in used:
            model.graph.initializer.remove(init)
    return folded


def trtexec_command(*, int8: bool, fp16: bool, strongly_typed: bool, workspace_mb: int) -> str:
    """The trtexec line equivalent to build_engine.py, plus a per-layer benchmark.

    Flags per the trtexec reference (https://docs.nvidia.com/deeplearning/tensorrt/latest/
    reference/command-line-programs.html and samples/trtexec/README.md): `--stronglyTyped`
    forbids precision flags; `--memPoolSize` needs TensorRT >= 8.4 (older: `--workspace`).
    """
    args = ["trtexec", "--onnx=model.onnx", "--saveEngine=model.engine"]
    if strongly_typed:
        args.append("--stronglyTyped")  # precision flags are not allowed with it
    else:
        args += ["--int8"] * int8 + ["--fp16"] * fp16
    args += [f"--memPoolSize=workspace:{workspace_mb}M", "--timingCacheFile=timing.cache",
             "--profilingVerbosity=detailed", "--dumpLayerInfo", "--exportLayerInfo=layers.json",
             "--dumpProfile", "--separateProfileRun"]
    return shlex.join(args)


def render_readme(*, trtexec: str, reason: str | None, warnings: list[str],
                  quantized: bool) -> str:
    status = ("The engine was built here (`model.engine`); rebuild it on every other device."
              if reason is None else
              f"No engine was built on the machine that wrote this bundle: {reason}.")
    warn = "\n".join(f"- {w}" for w in warnings) or "- none"
    model = ("an explicitly quantized (Q/DQ) ONNX model with symmetric int8 scales. No "
             "calibration data or calibrator is needed: the scales are in the Q/DQ nodes, and "
             "`--int8` only allows TensorRT to use int8 kernels where they say so; `--fp16` "
             "lets the layers kept in float run in half precision." if quantized else
             "the float (FP32 baseline) model, without Q/DQ nodes; `--fp16`, if given, lets "
             "TensorRT run it in half precision.")
    return f"""# TensorRT deployment bundle (quantflow)

{status}

A TensorRT engine is specific to the GPU model, the TensorRT version and the CUDA version it is
built with, so it must be built **on the target device**, with TensorRT >= {MIN_TRT} (8.6 or
10.x; `--stronglyTyped` needs 10.x): the builder times candidate kernels (tactics) on that very
GPU and serializes the fastest, and a plan file is not portable across GPUs or versions. Where
your TensorRT release deprecates weakly typed networks (precision flags), build with
`--strongly-typed` / `trtexec --stronglyTyped` instead; float layers then run in FP32.

`model.onnx` is portable: {model}

## Build

    python build_engine.py            # TensorRT Python API; writes model.engine, timing.cache,
                                      # layers.json and prints a per-layer precision report
    python build_engine.py --help     # --int8/--no-int8, --fp16/--no-fp16, --strongly-typed

or with trtexec (also benchmarks and prints per-layer times):

    {trtexec}

`timing.cache` makes rebuilds fast; it is valid only for the same device and TensorRT version.

## Check the result

`layers.json` (engine inspector, detailed verbosity) lists every fused layer with its input and
output formats: quantized convolutions show `Int8` inputs. Layers reported as FP32 and
`Reformat` layers are where time goes beyond the int8 kernels.

## Structural check of the Q/DQ placement (`qdq_check.json`)

Warnings found by quantflow's TensorRT rule checker:

{warn}
"""


def _load_build_script(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("quantflow_trt_build_engine", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Engine:
    """A deserialized engine bound to torch CUDA buffers (TensorRT >= 8.6 name-based API).

    Each I/O tensor gets a device address via set_tensor_address; execute_async_v3 enqueues on
    a torch CUDA stream. Docs: IExecutionContext, https://docs.nvidia.com/deeplearning/tensorrt/
    latest/_static/python-api/infer/Core/ExecutionContext.html; "Migrating I/O Buffer Allocation
    to Named Tensors", https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/
    tensorrt-8x-to-10x-python-api-patterns.html. Not exercised in CI (no GPU there).
    """

    def __init__(self, engine_path: Path) -> None:
        import tensorrt as trt

        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise TargetUnavailableError(f"trt: could not deserialize {engine_path} (built with "
                                         "another TensorRT version or GPU?); rebuild it here")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names
                       if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.stream = torch.cuda.Stream()
        self._keep: list[torch.Tensor] = []

    def bind(self, feed: dict[str, np.ndarray]) -> list[torch.Tensor]:
        self._keep = []
        for name in self.inputs:
            t = torch.from_numpy(np.ascontiguousarray(feed[name])).cuda()
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
            self._keep.append(t)  # the buffer must outlive the enqueued work
        outs = []
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            np_dtype = np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))
            t = torch.empty(shape, dtype=torch.from_numpy(np.empty(0, np_dtype)).dtype,
                            device="cuda")
            self.context.set_tensor_address(name, t.data_ptr())
            outs.append(t)
        self._keep += outs
        return outs

    def execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("trt: execute_async_v3 failed (see the TensorRT log above)")

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        outs = self.bind(feed)
        self.execute()
        self.stream.synchronize()
        return [o.cpu().numpy() for o in outs]


class TrtTarget:
    """Lower to an explicitly quantized TensorRT engine (or its build bundle); run; profile."""

    name = "trt"
    #: per-layer times come from the engine build's layer report, not from `profile`;
    #: TensorRT has no int16 activations
    caps = TargetCaps(per_layer_profile=False, threads=True, devices=("host",),
                      integer_options=frozenset({"W8A8", "W4A8"}),
                      artifact_suffixes=ARTIFACT_SUFFIXES["trt"])

    def __init__(self, fp16_fallback: bool = True, workspace_mb: int = 1024,
                 strongly_typed: bool = False, allow_ort_proxy: bool = False,
                 timing_cache: str | None = None, opset: int | None = None,
                 threads: int | None = None) -> None:
        self.fp16_fallback = fp16_fallback
        self.workspace_mb = workspace_mb
        self.strongly_typed = strongly_typed
        self.allow_ort_proxy = allow_ort_proxy
        self.timing_cache = timing_cache
        self.opset = opset
        self.threads = threads
        self._engines: dict[str, _Engine] = {}
        self._sessions: dict[str, Any] = {}

    # -- lower ----------------------------------------------------------------------------------
    def lower(self, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor],
              out_dir: Path, *, precision: str) -> Artifact:
        if precision not in PRECISIONS:
            raise ValueError(f"trt: precision must be one of {PRECISIONS}, got {precision!r}")
        # the FP32 baseline gets its own bundle: compile() lowers both into one out_dir
        out_dir = Path(out_dir) / "fp32" if precision == "fp32" else Path(out_dir)
        onnx_path = out_dir / "model.onnx"
        self._engines.pop(str(out_dir / "model.engine"), None)
        self._sessions = {k: v for k, v in self._sessions.items()
                          if not k.startswith(f"{onnx_path}#")}
        info = export_onnx(gm, example_inputs, onnx_path, opset=self.opset)
        model = onnx.load(str(onnx_path))
        folded = fold_int32_bias_dq(model)
        if folded:
            onnx.save(model, str(onnx_path))
        violations = check_trt_qdq(model)
        (out_dir / "qdq_check.json").write_text(json.dumps(
            [v.__dict__ for v in violations], indent=2) + "\n")
        errors = [v for v in violations if v.severity == "error"]
        if errors:
            counts = collections.Counter(v.rule for v in errors)
            shown = format_violations(errors[:MAX_LISTED])
            more = (f"\n  ... {len(errors) - MAX_LISTED} more in {out_dir / 'qdq_check.json'}"
                    if len(errors) > MAX_LISTED else "")
            raise UnsupportedOpError(
                f"trt: {onnx_path} breaks TensorRT's explicit-quantization rules ("
                + ", ".join(f"{r} x{n}" for r, n in counts.items()) + f"):\n{shown}{more}\n"
                "fix: quantize with the TensorRT placement (quantize(..., placement='trt')) and "
                "TensorRT specs: symmetric signed int8 activations (quantflow.spec.TRT_ACT), "
                "per-channel symmetric int8 weights on the output-channel axis; the ORT default "
                "(uint8 asymmetric activations) cannot be built by TensorRT")
        warnings = [str(v) for v in violations if v.severity == "warning"]
        for w in warnings:
            log.warning("trt: %s", w)

        int8 = any(n.op_type in QDQ_OPS for n in model.graph.node)
        fp16 = self.fp16_fallback and precision != "fp32"
        script = out_dir / "build_engine.py"
        script.write_text(build_script({
            "int8": int8, "fp16": fp16, "strongly_typed": self.strongly_typed,
            "workspace_mb": self.workspace_mb}))
        script.chmod(0o755)
        trtexec = trtexec_command(int8=int8, fp16=fp16, strongly_typed=self.strongly_typed,
                                  workspace_mb=self.workspace_mb)
        (out_dir / "trtexec.txt").write_text(trtexec + "\n")
        reason = tensorrt_unavailable_reason()
        (out_dir / "README.md").write_text(render_readme(trtexec=trtexec, reason=reason,
                                                         warnings=warnings, quantized=int8))
        files = {"model": str(onnx_path), "onnx": str(onnx_path), "build_script": str(script),
                 "trtexec": str(out_dir / "trtexec.txt"), "readme": str(out_dir / "README.md"),
                 "qdq_check": str(out_dir / "qdq_check.json")}
        meta: dict[str, Any] = {
            "opset": info.opset, "qdq_dtypes": list(info.qdq_dtypes),
            "narrow_activation_ranges": list(info.narrow_activation_ranges),
            "folded_int32_bias": folded, "qdq_warnings": warnings,
            "build_flags": {"int8": int8, "fp16": fp16, "strongly_typed": self.strongly_typed,
                            "workspace_mb": self.workspace_mb},
            "trtexec": trtexec,
        }
        if reason is not None:
            meta["engine_built"] = False
            meta["run_backend"] = "onnxruntime (CPU) on model.onnx: numerics proxy, not TensorRT"
            meta["message"] = (
                f"TensorRT engine not built: {reason}. The deployable bundle is in {out_dir}: "
                f"copy it to the target NVIDIA GPU (TensorRT >= {MIN_TRT}) and run `python "
                "build_engine.py` or the trtexec command in trtexec.txt. Until then `run` "
                "executes the same Q/DQ ONNX in onnxruntime and TensorRT latency cannot be "
                "measured here.")
            log.warning("trt: %s", meta["message"])
            return Artifact(self.name, precision, files, info.input_names, info.output_names,
                            meta)

        engine_path = out_dir / "model.engine"
        summary = _load_build_script(script).build(
            onnx_path, engine_path, int8=int8, fp16=fp16, strongly_typed=self.strongly_typed,
            workspace_mb=self.workspace_mb,
            timing_cache=self.timing_cache or str(out_dir / "timing.cache"),
            layer_info=str(out_dir / "layers.json"))
        import tensorrt as trt

        files.update(model=str(engine_path), layer_info=str(out_dir / "layers.json"))
        meta.update(engine_built=True, run_backend="tensorrt", tensorrt=trt.__version__,
                    gpu=torch.cuda.get_device_name(), layers=summary)
        if summary.get("fp32_layers") or summary.get("reformat_layers"):
            log.warning("trt: %d layer(s) run in FP32 and %d reformat layer(s) were inserted "
                        "(see %s)", len(summary.get("fp32_layers", [])),
                        len(summary.get("reformat_layers", [])), out_dir / "layers.json")
        return Artifact(self.name, precision, files, info.input_names, info.output_names, meta)

    # -- run ------------------------------------------------------------------------------------
    def _use_engine(self, artifact: Artifact) -> bool:
        if not artifact.meta.get("engine_built"):
            return False
        reason = tensorrt_unavailable_reason()
        if reason is not None:
            log.warning("trt: %s was built elsewhere but %s here; running the Q/DQ ONNX in "
                        "onnxruntime instead", artifact.files["model"], reason)
            return False
        return True

    def _engine(self, artifact: Artifact) -> _Engine:
        key = artifact.files["model"]
        if key not in self._engines:
            self._engines[key] = _Engine(Path(key))
        return self._engines[key]

    def _ort_session(self, artifact: Artifact, threads: int | None = None) -> Any:
        import onnxruntime as ort

        n = threads or self.threads or os.cpu_count() or 1
        key = f"{artifact.files['onnx']}#{n}"
        if key not in self._sessions:
            so = ort.SessionOptions()
            so.intra_op_num_threads = n
            so.log_severity_level = 3
            # this session stands in for TensorRT's exact int8 arithmetic, so it must not fuse
            # Q/DQ into ORT's integer kernels: on x86 without VNNI they add products in a
            # saturating int16 (targets/ort_isa.py) and would report errors TensorRT does not
            # make. Below the extended level ORT runs each op in float on dequantized values,
            # which equals exact integer accumulation up to float32 rounding, on every CPU.
            # (ORT's own remedy, session.x64quantprecision, fails to load these graphs in
            # 1.32: "Attempt to replace the existing tensor".)
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            self._sessions[key] = ort.InferenceSession(artifact.files["onnx"], so,
                                                       providers=["CPUExecutionProvider"])
        return self._sessions[key]

    def load_artifact(self, path: str | Path) -> Artifact:
        """The Q/DQ ONNX file of a bundle this target wrote (`quantflow profile`)."""
        art = load_onnx_artifact(path, self.name)
        return Artifact(art.target, art.precision, {**art.files, "onnx": art.files["model"]},
                        art.input_names, art.output_names, art.meta)

    def artifact_warning(self, artifact: Artifact) -> str | None:
        return None

    def run(self, artifact: Artifact, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        feed = dict(zip(artifact.input_names, inputs))
        if self._use_engine(artifact):
            return self._engine(artifact).run(feed)
        log.info("trt: running %s in onnxruntime (same Q/DQ semantics; TensorRT not used)",
                 artifact.files["onnx"])
        sess = self._ort_session(artifact)
        return [np.asarray(o) for o in sess.run(list(artifact.output_names), feed)]

    # -- profile --------------------------------------------------------------------------------
    def profile(self, artifact: Artifact, inputs: Sequence[np.ndarray], *, warmup: int = 10,
                runs: int = 50, threads: int | None = None) -> Latency:
        """GPU time per inference (CUDA events around execute_async_v3, inputs resident)."""
        batch = int(inputs[0].shape[0]) if inputs and np.ndim(inputs[0]) else 1
        feed = dict(zip(artifact.input_names, inputs))
        if self._use_engine(artifact):
            return self._profile_engine(artifact, feed, warmup=warmup, runs=runs, batch=batch)
        if not self.allow_ort_proxy:
            raise TargetUnavailableError(
                "trt: TensorRT latency can only be measured on the device with the built "
                f"engine ({artifact.meta.get('message', 'no engine in this artifact')}). "
                "fix: run the bundle's build_engine.py / trtexec.txt on the target GPU, or pass "
                "allow_ort_proxy=True to time the same ONNX in onnxruntime, labelled as a proxy")
        sess = self._ort_session(artifact, threads)
        names = list(artifact.output_names)
        n = threads or self.threads or os.cpu_count() or 1
        return time_runs(lambda: sess.run(names, feed), warmup=warmup, runs=runs, threads=n,
                         batch=batch, device="PROXY onnxruntime-CPU, NOT TensorRT: "
                                           + device_description())

    def _profile_engine(self, artifact: Artifact, feed: dict[str, np.ndarray], *, warmup: int,
                        runs: int, batch: int) -> Latency:
        eng = self._engine(artifact)
        eng.bind(feed)
        for _ in range(warmup):
            eng.execute()
        eng.stream.synchronize()
        times = []
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(eng.stream)
            eng.execute()
            end.record(eng.stream)
            end.synchronize()
            times.append(float(start.elapsed_time(end)))
        times.sort()
        return Latency(median_ms=statistics.median(times),
                       p90_ms=times[min(len(times) - 1, round(0.9 * (len(times) - 1)))],
                       mean_ms=statistics.fmean(times), runs=runs, warmup=warmup, threads=1,
                       batch=batch, device=f"{torch.cuda.get_device_name()} (TensorRT "
                                           f"{eng.trt.__version__}, GPU time, CUDA events)")


def make_target(fp16_fallback: bool = True, workspace_mb: int = 1024,
                strongly_typed: bool = False, allow_ort_proxy: bool = False,
                timing_cache: str | None = None, opset: int | None = None,
                threads: int | None = None) -> TrtTarget:
    return TrtTarget(fp16_fallback=fp16_fallback, workspace_mb=workspace_mb,
                     strongly_typed=strongly_typed, allow_ort_proxy=allow_ort_proxy,
                     timing_cache=timing_cache, opset=opset, threads=threads)
