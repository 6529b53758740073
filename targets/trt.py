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

Modules: this one is the target (lower, run, profile); the bundle files and the int32-bias
folding are trt_bundle.py, the in-process engine (and whether TensorRT can run here)
trt_engine.py, the placement rules trt_rules.py over the graph index in trt_qdq_graph.py.
"""

from __future__ import annotations

import collections
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import fx

from quantflow import devices
from quantflow.errors import TargetUnavailableError, UnsupportedOpError
from quantflow.targets import ARTIFACT_SUFFIXES
from quantflow.targets.base import Artifact, Latency, TargetCaps, device_description, time_runs
from quantflow.targets.onnx_artifact import load_onnx_artifact
from quantflow.targets.onnx_export import export_onnx
from quantflow.targets.trt_bundle import (
    MIN_TRT,
    build_script,
    fold_int32_bias_dq,
    load_build_script,
    render_readme,
    trtexec_command,
)
from quantflow.targets.trt_engine import Engine, engine_latency, tensorrt_unavailable_reason
from quantflow.targets.trt_qdq_graph import QDQ_OPS
from quantflow.targets.trt_rules import check_trt_qdq, format_violations

log = logging.getLogger("quantflow.targets")

PRECISIONS = ("int8", "mixed", "fp32")
#: violations quoted in an error message (all of them are in qdq_check.json)
MAX_LISTED = 8


class TrtTarget:
    """Lower to an explicitly quantized TensorRT engine (or its build bundle); run; profile."""

    name = "trt"
    #: per-layer times come from the engine build's layer report, not from `profile`;
    #: TensorRT has no int16 activations
    caps = TargetCaps(per_layer_profile=False, threads=True, devices=devices.DEVICES["trt"],
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
        self._engines: dict[str, Engine] = {}
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
        summary = load_build_script(script).build(
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

    def _engine(self, artifact: Artifact) -> Engine:
        key = artifact.files["model"]
        if key not in self._engines:
            self._engines[key] = Engine(Path(key))
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

    def measurement_device(self) -> str:
        return device_description()

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
                runs: int = 50, threads: int | None = None, per_layer: bool = False) -> Latency:
        """GPU time per inference (CUDA events around execute_async_v3, inputs resident).

        `per_layer` is accepted as the `Target` protocol has it, and ignored: per-layer times
        come from the engine build's layer report (`caps.per_layer_profile` is False)."""
        batch = int(inputs[0].shape[0]) if inputs and np.ndim(inputs[0]) else 1
        feed = dict(zip(artifact.input_names, inputs))
        if self._use_engine(artifact):
            return engine_latency(self._engine(artifact), feed, warmup=warmup, runs=runs,
                                  batch=batch)
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


def make_target(fp16_fallback: bool = True, workspace_mb: int = 1024,
                strongly_typed: bool = False, allow_ort_proxy: bool = False,
                timing_cache: str | None = None, opset: int | None = None,
                threads: int | None = None) -> TrtTarget:
    return TrtTarget(fp16_fallback=fp16_fallback, workspace_mb=workspace_mb,
                     strongly_typed=strongly_typed, allow_ort_proxy=allow_ort_proxy,
                     timing_cache=timing_cache, opset=opset, threads=threads)
