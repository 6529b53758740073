"""ONNX Runtime target (CPU execution provider): QDQ ONNX file -> ORT integer kernels.

Lowering writes the QDQ ONNX file (targets/onnx_export.py). ORT's graph optimizer, at
ORT_ENABLE_ALL, rewrites each matched DequantizeLinear -> op -> QuantizeLinear group into an
integer kernel (QLinearConv, QGemm, QLinearAdd, QLinearGlobalAveragePool, ...): the int32
accumulator is exact and the result is requantized with the float multiplier
s_x * s_w / s_y and round-half-even, so its output matches the torch simulation
(float conv on dequantized values, then quantize) except where the real value lies within
float rounding error of a rounding tie: at most one step per quantized tensor, rarely.

When a group does not match a fusion pattern, ORT silently keeps the float op between the
DQ and Q nodes. So `lower` builds a session at ORT_ENABLE_ALL (the level `run`/`profile`
use), serializes the optimized graph and records in `Artifact.meta`, by fx node name, which
layers really became integer kernels (`quantized_layers`, `integer_ops`) and what stayed
float: `float_compute_ops` (Conv/Gemm/MatMul left in float), `float_ops_on_dequantized` (any
op still reading a DequantizeLinear: an unfused DQ -> op -> Q group) and `requantize_pairs`
(DQ -> Q float round trips). The serialized graph may contain hardware-specific NCHWc/NHWC
rewrites; it is only inspected, never shipped.

The file has the static input shapes of the example inputs (batch included), the shape the
latency is measured at. Per-layer profiling uses ORT's own profiler: it sums the
`*_kernel_time` events of each node within each timed `model_run` event (warm-up runs
excluded) and reports the median over runs.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
from torch import fx

from quantflow import hostcpu
from quantflow.errors import TargetUnavailableError
from quantflow.spec import KernelRules
from quantflow.targets import ARTIFACT_SUFFIXES, onnx_int4, ort_isa
from quantflow.targets.base import Artifact, Latency, TargetCaps, device_description, time_runs
from quantflow.targets.onnx_artifact import load_onnx_artifact
from quantflow.targets.onnx_export import export_onnx, required_opset

if TYPE_CHECKING:
    from quantflow.targets.ray_device import RayDevice
from quantflow.targets.ort_graph import (
    fusion_aliases,
    initializer_bytes,
    per_node_ms,
    session_options,
    summarize_graph,
)

try:
    import onnxruntime as ort
except ImportError as exc:  # pragma: no cover - onnxruntime is a core dependency
    raise TargetUnavailableError("target 'ort' needs onnxruntime: pip install onnxruntime") \
        from exc

log = logging.getLogger("quantflow.targets.ort")

PRECISIONS = ("int8", "mixed", "fp32")

#: ONNX metadata_props key recording the device an artifact is for (targets/ort_isa.py)
DEVICE_KEY = "quantflow.device"


def artifact_device(model: onnx.ModelProto) -> str | None:
    """The --device a quantflow artifact was compiled for (None: not recorded)."""
    return next((p.value for p in model.metadata_props if p.key == DEVICE_KEY), None)


class OrtTarget:
    """Lower to a QDQ ONNX file and run it with onnxruntime's CPU execution provider.

    `device` (targets/ort_isa.py) says which CPUs the artifact must be exact on; the quantizer
    learns what that takes from `kernel_rules`, and the parity gate (quantflow.verify) reads
    the artifact's integer tensors through `tensor_codes`.
    """

    name = "ort"
    caps = TargetCaps(per_layer_profile=True, threads=True, devices=ort_isa.DEVICES,
                      integer_options=frozenset({"W8A8", "W4A8"}), parity_taps=True,
                      layer_taps=True, artifact_suffixes=ARTIFACT_SUFFIXES["ort"])

    def __init__(self, threads: int | None = None, opset: int | None = None,
                 device: str = ort_isa.DEFAULT_DEVICE, measure_on: str | None = None,
                 ray_address: str | None = None) -> None:
        self.threads = threads
        self.opset = opset
        self.device = ort_isa.resolve_device(device, hostcpu.host_cpu().isa_class)
        self._sessions: dict[tuple[str, int, int], ort.InferenceSession] = {}
        # `profile` on a Ray device node (targets/ray_device.py) instead of this machine
        self.remote: RayDevice | None = None
        if measure_on is not None:
            if not ray_address:
                raise ValueError("ort target: measure_on needs the Ray cluster's address "
                                 "(--measure-on NAME with --ray ADDRESS or $RAY_ADDRESS)")
            from quantflow.targets.ray_device import RayDevice

            self.remote = RayDevice(measure_on, ray_address)

    def measurement_device(self) -> str:
        """Where `profile` times (the board's CPU with --measure-on)."""
        return self.remote.description() if self.remote else device_description()

    @property
    def kernel_rules(self) -> KernelRules:
        """What ORT's integer kernels on `device` need from the quantized weights."""
        return KernelRules(placement="ort", pair_limit=ort_isa.pair_limit(self.device))

    def load_artifact(self, path: str | Path) -> Artifact:
        """A QDQ ONNX file this target wrote (`quantflow profile`)."""
        return load_onnx_artifact(path, self.name)

    def artifact_warning(self, artifact: Artifact) -> str | None:
        """Why this host may not run `artifact` exactly (None: it does): an x86-vnni or arm64
        artifact on x86 without VNNI."""
        device = artifact.meta.get("metadata", {}).get(DEVICE_KEY)
        return ort_isa.host_warning(device, hostcpu.host_cpu().isa_class) if device else None

    def tensor_codes(self, artifact: Artifact, names: Sequence[str],
                     feeds: Sequence[Sequence[np.ndarray]], isa: str = "host"
                     ) -> list[dict[str, np.ndarray]]:
        """Integer codes of the quantized tensors `names`, per run, as ORT computes them on
        `isa` ("host" or an emulated CPU class; targets/ort_parity.py)."""
        from quantflow.targets.ort_parity import tensor_codes

        return tensor_codes(artifact, names, feeds, isa)

    def layer_codes(self, artifact: Artifact, qgm: fx.GraphModule, names: Sequence[str],
                    feeds: Sequence[Sequence[np.ndarray]], isa: str = "host"
                    ) -> list[dict[str, np.ndarray]]:
        """caps.layer_taps: the artifact itself is tapped (tensor_codes)."""
        return self.tensor_codes(artifact, names, feeds, isa)

    def _threads(self, threads: int | None) -> int:
        return threads or self.threads or os.cpu_count() or 1

    def _session(self, artifact: Artifact, threads: int) -> ort.InferenceSession:
        # keyed by modification time too: re-lowering to the same path must not reuse a session
        key = (str(artifact.path), artifact.path.stat().st_mtime_ns, threads)
        if key not in self._sessions:
            self._sessions[key] = ort.InferenceSession(
                str(artifact.path), session_options(threads),
                providers=["CPUExecutionProvider"])
        return self._sessions[key]

    @staticmethod
    def _feed(sess: ort.InferenceSession, artifact: Artifact, inputs: Sequence[np.ndarray]
              ) -> dict[str, np.ndarray]:
        """Name the inputs; float64 arrays become float32 (the exported graphs are fp32)."""
        if len(inputs) != len(artifact.input_names):
            raise ValueError(f"ort: {artifact.path} takes {len(artifact.input_names)} inputs "
                             f"{artifact.input_names}, got {len(inputs)}")
        kinds = {i.name: i.type for i in sess.get_inputs()}
        return {name: (np.ascontiguousarray(x, dtype=np.float32)
                       if kinds.get(name) == "tensor(float)" else np.asarray(x))
                for name, x in zip(artifact.input_names, inputs)}

    def lower(self, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor],
              out_dir: Path, *, precision: str) -> Artifact:
        if precision not in PRECISIONS:
            raise ValueError(f"ort: precision must be one of {PRECISIONS}, got {precision!r}")
        out_dir = Path(out_dir)
        path = out_dir / ("model_fp32.onnx" if precision == "fp32" else "model.onnx")
        four_bit = any(n.op == "get_attr" and str(n.target).endswith(onnx_int4.SUFFIX)
                       for n in gm.graph.nodes)
        opset = self.opset
        if four_bit and opset is None:  # INT4 storage needs opset 21 (onnx_int4)
            opset = max(required_opset(gm)[0], onnx_int4.INT4_OPSET)
        info = export_onnx(gm, example_inputs, path, opset=opset)
        packed: list[str] = []
        if four_bit and info.opset >= onnx_int4.INT4_OPSET:
            packed = onnx_int4.pack_file(path)
        elif four_bit:
            log.warning("ort: opset %d < %d: 4-bit weights stay int8 on disk", info.opset,
                        onnx_int4.INT4_OPSET)
        if precision != "fp32":
            _set_metadata(path, {DEVICE_KEY: self.device, "onnxruntime": ort.__version__})
        with tempfile.TemporaryDirectory() as tmp:
            optimized = str(Path(tmp) / "optimized.onnx")
            ort.InferenceSession(str(path), session_options(1, optimized_path=optimized),
                                 providers=["CPUExecutionProvider"])
            exported = onnx.load(str(path), load_external_data=False)
            aliases = fusion_aliases(exported)
            summary = summarize_graph(onnx.load(optimized), aliases)
        meta: dict[str, Any] = {
            "opset": info.opset,
            "qdq_dtypes": list(info.qdq_dtypes),
            "narrow_activation_ranges": list(info.narrow_activation_ranges),
            "graph_optimization_level": "ORT_ENABLE_ALL",
            "onnxruntime": ort.__version__,
            "device": self.device,
            "weights_bytes": initializer_bytes(exported),
            "int4_packed_weights": len(packed),
            "fusion_aliases": aliases,
            **summary,
        }
        return Artifact(target=self.name, precision=precision, files={"model": str(path)},
                        input_names=info.input_names, output_names=info.output_names,
                        meta=meta)

    def run(self, artifact: Artifact, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        sess = self._session(artifact, self._threads(None))
        feed = self._feed(sess, artifact, inputs)
        return [np.asarray(o) for o in sess.run(list(artifact.output_names), feed)]

    def profile(self, artifact: Artifact, inputs: Sequence[np.ndarray], *, warmup: int = 10,
                runs: int = 50, threads: int | None = None,
                per_layer: bool = False) -> Latency:
        """Latency at ORT_ENABLE_ALL, sequential execution, `threads` intra-op threads
        (default: the target's `threads`, else os.cpu_count(); recorded in the result).

        per_layer=True adds a second, profiled pass (ORT's profiler slows the runs, so it
        never contributes to the wall-clock numbers) and fills `Latency.per_layer_ms`.
        """
        if self.remote is not None:
            return self.remote.profile(("ort", {"threads": self.threads, "opset": self.opset,
                                                "device": self.device}), artifact, inputs,
                                       warmup=warmup, runs=runs, threads=threads,
                                       per_layer=per_layer)
        n_threads = self._threads(threads)
        sess = self._session(artifact, n_threads)
        feed = self._feed(sess, artifact, inputs)
        names = list(artifact.output_names)
        batch = int(inputs[0].shape[0]) if inputs and np.ndim(inputs[0]) else 1
        latency = time_runs(lambda: sess.run(names, feed), warmup=warmup, runs=runs,
                            threads=n_threads, batch=batch, device=device_description())
        if not per_layer:
            return latency
        layers = self._profile_layers(artifact, feed, warmup=warmup, runs=runs,
                                      threads=n_threads)
        return Latency(**{**latency.to_dict(), "per_layer_ms": layers})

    def _profile_layers(self, artifact: Artifact, feed: dict[str, np.ndarray], *, warmup: int,
                        runs: int, threads: int) -> dict[str, float]:
        with tempfile.TemporaryDirectory() as tmp:
            so = session_options(threads, profile_prefix=str(Path(tmp) / "ort_profile"))
            sess = ort.InferenceSession(str(artifact.path), so,
                                        providers=["CPUExecutionProvider"])
            for _ in range(warmup + runs):
                sess.run(None, feed)
            trace = json.loads(Path(sess.end_profiling()).read_text())
        return per_node_ms(trace, runs, artifact.meta.get("fusion_aliases"))


def _set_metadata(path: Path, props: dict[str, str]) -> None:
    """Record `props` in the ONNX file's metadata_props (they travel with the file)."""
    model = onnx.load(str(path))
    keep = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def make_target(threads: int | None = None, opset: int | None = None,
                device: str = ort_isa.DEFAULT_DEVICE, measure_on: str | None = None,
                ray_address: str | None = None) -> OrtTarget:
    return OrtTarget(threads=threads, opset=opset, device=device, measure_on=measure_on,
                     ray_address=ray_address)
