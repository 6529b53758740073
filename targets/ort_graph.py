"""What ONNX Runtime made of a QDQ graph: its integer kernels, the float ops left, per-node time.

Pure functions of an ORT-optimized ONNX model (the graph ORT serializes after its QDQ fusions)
or of ORT's profiler trace, plus the session options every quantflow session uses, so that the
target (targets/ort.py) and the parity tap (targets/ort_parity.py) build the same sessions and
read the same names. Node names map back to fx node names (`fx_name`).
"""

from __future__ import annotations

import collections
import re
import statistics
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from quantflow.targets.float_reasons import float_reason

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


def initializer_bytes(model: onnx.ModelProto) -> int:
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
    # why each of those op types is float (the quantizer cannot fix an op with no kernel)
    float_types = {node.op_type for node in model.graph.node
                   if node.op_type in FLOAT_COMPUTE_OPS
                   or (node.op_type not in ("QuantizeLinear", "DequantizeLinear")
                       and any(i in dq_outputs for i in node.input))}
    return {"op_histogram": dict(sorted(hist.items())), "integer_ops": integer,
            "quantized_layers": quantized_layers, "float_compute_ops": float_layers,
            "float_ops_on_dequantized": unfused, "requantize_pairs": requantize,
            "float_op_reasons": {op: float_reason(op) for op in sorted(float_types)}}


def session_options(threads: int, *, level: Any = None, profile_prefix: str | None = None,
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


