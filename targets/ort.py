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

import collections
import json
import logging
import os
import re
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import fx

from quantflow.errors import TargetUnavailableError
from quantflow.hostcpu import host_cpu
from quantflow.spec import KernelRules
from quantflow.targets import onnx_int4, ort_isa
from quantflow.targets.base import Artifact, Latency, device_description, time_runs
from quantflow.targets.onnx_export import export_onnx, required_opset

try:
    import onnxruntime as ort
except ImportError as exc:  # pragma: no cover - onnxruntime is a core dependency
    raise TargetUnavailableError("target 'ort' needs onnxruntime: pip install onnxruntime") \
        from exc

log = logging.getLogger("quantflow.targets.ort")

PRECISIONS = ("int8", "mixed", "fp32")

#: ORT kernels that compute in integers (fused from Q/DQ groups or dynamic quantization)
INTEGER_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QGemm", "QLinearAdd",
    "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat",
    "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QLinearReduceMean",
    "QLinearWhere", "QLinearConvTranspose", "DynamicQuantizeLinear", "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat", "MatMulNBits", "QAttention", "NhwcMaxPool",
})
#: ops that do the heavy float arithmetic when a layer was not fused into an integer kernel
FLOAT_COMPUTE_OPS = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul",
    "NhwcFusedConv",
})

_ORT_SUFFIX = re.compile(r"(_token_\d+|_nchwc)+$")
#: ops ORT fuses into the preceding conv/gemm (FusedConv etc. then carry the activation's name)
_FUSABLE_ACTIVATIONS = frozenset({"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh"})


def fx_name(onnx_node_name: str, aliases: dict[str, str] | None = None) -> str:
    """Map an (optimized) ORT node name back to the fx node it came from, where possible.

    The exporter names a node `node_<fx name>`; ORT's rewrites keep that name and append
    `_token_<n>` (layout transforms), or name a node after its output value plus `_nchwc`.
    A fused conv+activation carries the activation's name; `aliases` (`fusion_aliases`) maps
    it back to the conv. Nodes ORT created from nothing (Transpose, Reorder*) stay as they are.
    """
    name = _ORT_SUFFIX.sub("", onnx_node_name).removeprefix("node_")
    return (aliases or {}).get(name, name)


def fusion_aliases(model: onnx.ModelProto) -> dict[str, str]:
    """Names ORT may give a node -> the fx node it computes, from the exported graph (pure).

    ORT's NCHWc rewrite names a node after its output value (`output_nchwc` for a conv whose
    value is the graph output), and a conv fused with the activation after it carries the
    activation's names: both are mapped to the conv's fx name.
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    aliases = {}
    for node in model.graph.node:
        owner = fx_name(node.name)
        src = producer.get(node.input[0]) if node.input else None
        if node.op_type in _FUSABLE_ACTIVATIONS and src is not None \
                and src.op_type in FLOAT_COMPUTE_OPS:
            owner = fx_name(src.name)
            aliases[fx_name(node.name)] = owner
        for value in node.output:
            if value != owner:
                aliases[value] = owner
    return aliases


_SUB_BYTE = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)


def _initializer_bytes(model: onnx.ModelProto) -> int:
    """Stored bytes of the initializers (4-bit types pack two values a byte)."""
    total = 0
    for init in model.graph.initializer:
        n = int(np.prod(init.dims, dtype=np.int64))
        if init.data_type in _SUB_BYTE:
            total += (n + 1) // 2
            continue
        total += n * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    return total


def summarize_graph(model: onnx.ModelProto, aliases: dict[str, str] | None = None
                    ) -> dict[str, Any]:
    """Op histogram and integer/float compute layers of an ORT-optimized graph (pure)."""
    hist = collections.Counter(node.op_type for node in model.graph.node)
    integer = {op: n for op, n in sorted(hist.items()) if op in INTEGER_OPS}
    quantized_layers = sorted(fx_name(node.name, aliases) for node in model.graph.node
                              if node.op_type in INTEGER_OPS
                              and node.op_type != "DynamicQuantizeLinear")
    float_layers = sorted(fx_name(node.name, aliases) for node in model.graph.node
                          if node.op_type in FLOAT_COMPUTE_OPS)
    # A node that reads a DequantizeLinear output computes in float: the DQ -> op -> Q group
    # around it matched no fusion. These are the patterns to tell the quantizer about.
    dq_outputs = {o for node in model.graph.node if node.op_type == "DequantizeLinear"
                  for o in node.output}
    unfused = sorted(f"{fx_name(node.name, aliases)} ({node.op_type})"
                     for node in model.graph.node
                     if node.op_type not in ("QuantizeLinear", "DequantizeLinear")
                     and any(i in dq_outputs for i in node.input))
    # DQ -> Q left over: a float round trip between two quantizers of different parameters,
    # e.g. a Q/DQ pair the quantizer put between a conv and an activation it did not fold
    dq_name = {o: node.name for node in model.graph.node if node.op_type == "DequantizeLinear"
               for o in node.output}
    requantize = sorted(f"{fx_name(dq_name[node.input[0]])} -> {fx_name(node.name)}"
                        for node in model.graph.node
                        if node.op_type == "QuantizeLinear" and node.input[0] in dq_name)
    return {"op_histogram": dict(sorted(hist.items())), "integer_ops": integer,
            "quantized_layers": quantized_layers, "float_compute_ops": float_layers,
            "float_ops_on_dequantized": unfused, "requantize_pairs": requantize}


def _session_options(threads: int, *, level: Any = None, profile_prefix: str | None = None,
                     optimized_path: str | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = level or ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only: the NCHWc serialization warning is expected
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    if optimized_path is not None:
        so.optimized_model_filepath = optimized_path
    return so


def per_node_ms(trace: list[dict[str, Any]], runs: int,
                aliases: dict[str, str] | None = None) -> dict[str, float]:
    """Kernel time per node, ms per run: the median over the last `runs` model_run events.

    The median, not the mean, because one preempted run on a shared machine would otherwise
    add its stall to whichever kernel it hit (pure function of the parsed profile JSON).
    """
    model_runs = sorted((e for e in trace if e.get("cat") == "Session"
                         and e.get("name") == "model_run"), key=lambda e: e["ts"])[-runs:]
    windows = [(e["ts"], e["ts"] + e["dur"]) for e in model_runs]
    per_run: dict[str, list[float]] = collections.defaultdict(lambda: [0.0] * len(windows))
    for event in trace:
        name = str(event.get("name", ""))
        if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        run = next((i for i, (lo, hi) in enumerate(windows) if lo <= event["ts"] <= hi), None)
        if run is not None:
            node = fx_name(name.removesuffix("_kernel_time"), aliases)
            per_run[node][run] += event["dur"] / 1e3
    medians = {node: statistics.median(ms) for node, ms in per_run.items()}
    return dict(sorted(medians.items(), key=lambda kv: -kv[1]))


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
    devices = ort_isa.DEVICES

    def __init__(self, threads: int | None = None, opset: int | None = None,
                 device: str = ort_isa.DEFAULT_DEVICE) -> None:
        self.threads = threads
        self.opset = opset
        self.device = ort_isa.resolve_device(device, host_cpu().isa_class)
        self._sessions: dict[tuple[str, int, int], ort.InferenceSession] = {}

    @property
    def kernel_rules(self) -> KernelRules:
        """What ORT's integer kernels on `device` need from the quantized weights."""
        return KernelRules(placement="ort", pair_limit=ort_isa.pair_limit(self.device))

    def tensor_codes(self, artifact: Artifact, names: Sequence[str],
                     feeds: Sequence[Sequence[np.ndarray]], isa: str = "host"
                     ) -> list[dict[str, np.ndarray]]:
        """Integer codes of the quantized tensors `names`, per run, as ORT computes them on
        `isa` ("host" or an emulated CPU class; targets/ort_parity.py)."""
        from quantflow.targets.ort_parity import tensor_codes

        return tensor_codes(artifact, names, feeds, isa)

    def _threads(self, threads: int | None) -> int:
        return threads or self.threads or os.cpu_count() or 1

    def _session(self, artifact: Artifact, threads: int) -> ort.InferenceSession:
        # keyed by modification time too: re-lowering to the same path must not reuse a session
        key = (str(artifact.path), artifact.path.stat().st_mtime_ns, threads)
        if key not in self._sessions:
            self._sessions[key] = ort.InferenceSession(
                str(artifact.path), _session_options(threads),
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
            ort.InferenceSession(str(path), _session_options(1, optimized_path=optimized),
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
            "weights_bytes": _initializer_bytes(exported),
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
            so = _session_options(threads, profile_prefix=str(Path(tmp) / "ort_profile"))
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
                device: str = ort_isa.DEFAULT_DEVICE) -> OrtTarget:
    return OrtTarget(threads=threads, opset=opset, device=device)
