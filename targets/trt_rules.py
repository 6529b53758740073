"""Structural checker for TensorRT explicit quantization (Q/DQ ONNX), run before any engine build.

TensorRT builds an *explicitly quantized* engine when the network contains QuantizeLinear /
DequantizeLinear (Q/DQ) nodes: it folds Q/DQ pairs into the neighbouring layers and runs the
layer in INT8 exactly where the graph says so. Two things can go wrong:

* the Q/DQ nodes use a form TensorRT cannot import (asymmetric zero point, uint8, per-channel
  activations, a weight scale on the wrong axis): the ONNX parser or builder fails on the
  device, far from the cause -> **error**;
* the graph imports but the placement defeats the fusions (a quantized weight whose input is
  float, a residual add with one float input, a Q/DQ pair in front of a float-only op): the
  engine builds, but layers run in FP16/FP32 and reformat kernels are inserted -> **warning**.

The algebra TensorRT assumes (symmetric, signed): q = clamp(round_half_even(x / s), -128, 127),
x' = s * q, s > 0, zero point 0; weights per output channel, activations per tensor. A Q -> DQ
pair is then the identity up to rounding and TensorRT may move DQ forward / Q backward through
data-movement layers and fuse them into the compute layer (conv with int8 in, fp or int8 out).

Every rule is a small function `(QdqGraph) -> Iterator[Violation]` (the graph index and the
record: trt_qdq_graph.py) in the explicit tuple `RULES`; each docstring cites the
documentation section it enforces:

[EQ]   TensorRT Developer Guide, "Working with Quantized Types" -> "Explicit Quantization"
       (incl. "Quantized Weights", "ONNX Support", "Q/DQ Layer-Placement Recommendations"),
       https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/quantized-types-explicit-quantization.html
[WQT]  "Working with Quantized Types" (symmetric scheme; INT8, FP8, INT4 weight-only),
       https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/work-with-quantized-types.html
[OPS]  ONNX-TensorRT operator support matrix (QuantizeLinear: `y_zero_point` must be 0;
       DequantizeLinear: `x_zero_point` must be zero; per-op supported types),
       https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md
[ONNX] ONNX QuantizeLinear/DequantizeLinear-13 (the `axis` attribute, default 1, and per-axis
       scales appear in opset 13), https://onnx.ai/onnx/operators/onnx__QuantizeLinear.html
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import onnx
from onnx import TensorProto

from quantflow.targets.trt_qdq_graph import (
    FP8_TYPES,
    INT4,
    INT8,
    QDQ_OPS,
    UINT4,
    WEIGHTED_OPS,
    QdqGraph,
    Severity,
    Violation,
)

#: compute ops with no INT8 implementation in the ONNX-TensorRT support matrix [OPS]: they run in
#: FP16/FP32, so a Q/DQ pair feeding only them is executed as standalone int8 round-trip kernels
FLOAT_ONLY_OPS = frozenset({
    "Softmax", "LogSoftmax", "LayerNormalization", "InstanceNormalization", "GroupNormalization",
    "BatchNormalization", "LRN", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin",
    "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
    "Exp", "Log", "Sqrt", "Pow", "Div", "Erf", "Reciprocal", "Sin", "Cos", "Resize", "Einsum",
    "CumSum", "TopK", "LSTM", "GRU", "RNN"})


def _v(rule: str, severity: Severity, node: onnx.NodeProto, message: str) -> Violation:
    return Violation(rule, severity, node.name or node.output[0], node.output[0], message)


def _qdq_nodes(g: QdqGraph) -> Iterator[onnx.NodeProto]:
    return (n for n in g.nodes if n.op_type in QDQ_OPS)


def _type_name(t: int) -> str:
    return TensorProto.DataType.Name(t)  # type: ignore[attr-defined,no-any-return]


# -- rules ----------------------------------------------------------------------------------


def check_opset(g: QdqGraph) -> Iterator[Violation]:
    """Per-channel Q/DQ needs opset >= 13: the `axis` attribute and 1-D scales were added to
    QuantizeLinear/DequantizeLinear in opset 13 [ONNX]; with opset 10 TensorRT's parser reads
    only per-tensor scales [EQ "ONNX Support"]."""
    if g.opset >= 13:
        return
    for node in _qdq_nodes(g):
        s = g.scale(node)
        if s is not None and s.size > 1:
            yield _v("opset", "error", node,
                     f"per-channel {node.op_type} needs ONNX opset >= 13, model has opset "
                     f"{g.opset}; fix: export with opset >= 13 (quantflow's default is newer)")


def check_qdq_type(g: QdqGraph) -> Iterator[Violation]:
    """Q/DQ must be signed INT8 (or FP8 E4M3); INT4 only for weight-only GEMM/MatMul weights.
    TensorRT's scheme is symmetric signed [WQT]: uint8 (the ONNX default when the zero point is
    omitted) is rejected; INT4 is weight-only quantization of GEMM weights [WQT, EQ "Quantized
    Weights"]; DequantizeLinear accepts INT8, FP8, INT4, FP4 — not int32 biases [OPS]."""
    for node in _qdq_nodes(g):
        t = g.qtype(node)
        if t == INT8 or t in FP8_TYPES:
            continue
        if t == INT4 and node.op_type == "DequantizeLinear" and g.is_weight_qdq(node) and any(
                c.op_type in ("MatMul", "Gemm") for c in g.final_consumers(node.output[0])):
            continue
        if t == TensorProto.INT32:
            yield _v("int8-type", "error", node,
                     "int32 DequantizeLinear (a quantized bias): TensorRT's DequantizeLinear "
                     "accepts INT8/FP8/INT4/FP4 only [OPS]. fix: keep biases float — TensorRT "
                     "applies the bias in the int8 kernel's epilogue (TrtTarget folds these)")
            continue
        hint = ("INT4 is supported only for weight-only GEMM/MatMul weights" if t in (INT4, UINT4)
                else "TensorRT supports only signed symmetric INT8/FP8 Q/DQ")
        yield _v("int8-type", "error", node,
                 f"{node.op_type} uses {_type_name(t)}; {hint}. fix: quantize this tensor as "
                 "signed int8 with zero point 0 (quantflow.spec.TRT_ACT for activations)")


def check_symmetric(g: QdqGraph) -> Iterator[Violation]:
    """Zero points must be exactly 0: TensorRT implements only symmetric quantization
    [WQT]; the parser asserts it ([OPS]: "`y_zero_point` must be 0")."""
    for node in _qdq_nodes(g):
        zp = g.zero_point(node)
        if zp is not None and np.any(zp.astype(np.float64) != 0):
            nz = np.unique(zp[zp != 0])[:4].tolist()
            yield _v("symmetric-zero-point", "error", node,
                     f"zero point {nz} is not 0 (asymmetric); TensorRT accepts only symmetric "
                     "quantization. fix: symmetric signed int8 (quantflow.spec.TRT_ACT)")


def check_scale(g: QdqGraph) -> Iterator[Violation]:
    """Scales must be build-time constants, finite and strictly positive: TensorRT computes
    x / s and folds s into the fused kernel's output scaling [EQ "Quantized Weights"; the
    IQuantizeLayer scale must be positive]."""
    for node in _qdq_nodes(g):
        s = g.scale(node)
        if s is None:
            yield _v("scale", "error", node, f"scale {node.input[1]!r} is not a constant "
                     "(initializer/Constant); fix: export with constant scales")
        elif not np.all(np.isfinite(s)) or np.any(s <= 0):
            yield _v("scale", "error", node, f"scale must be finite and > 0, got min "
                     f"{float(np.min(s)):.3g}; fix: recalibrate (a dead channel needs a tiny "
                     "positive scale, not 0)")


def check_activation_per_tensor(g: QdqGraph) -> Iterator[Violation]:
    """Activation Q/DQ must be per-tensor: TensorRT supports per-channel scales only for
    weights of convolution, deconvolution, fully connected and MatMul [EQ]."""
    for node in _qdq_nodes(g):
        s = g.scale(node)
        if s is not None and s.size > 1 and not g.is_weight_qdq(node):
            yield _v("activation-per-tensor", "error", node,
                     f"activation {node.op_type} has {s.size} scales (per-channel); TensorRT "
                     "quantizes activations per tensor. fix: granularity='tensor' for activations")


def _out_channel_axis(g: QdqGraph, op: onnx.NodeProto, rank: int) -> int:
    """Output-channel axis of the weight as the op consumes it (after any Transpose)."""
    if op.op_type == "Conv":
        return 0  # W: [K, C/g, kH, kW]
    if op.op_type == "ConvTranspose":
        return 1  # W: [C, K/g, kH, kW]
    if op.op_type == "Gemm":
        return 0 if g.attr(op, "transB", 0) else 1  # B: [N, K] if transB else [K, N]
    return rank - 1  # MatMul: B [..., K, N]


def check_weight_axis(g: QdqGraph) -> Iterator[Violation]:
    """Per-channel weight scales must lie on the output-channel axis and number exactly the
    output channels: "the axis of quantization must be the output-channel axis" (K of KCRS for
    convolution) [EQ "Quantized Weights"]. Conv: axis 0; ConvTranspose: 1; Gemm: 0 with
    transB=1 ([N, K]) else 1; MatMul weight [K, N]: the last axis. A Transpose between the DQ
    and the op is followed. Block-wise scales (rank > 1) are accepted only for INT4 GEMM."""
    for op in g.nodes:
        if op.op_type not in WEIGHTED_OPS:
            continue
        found = g.weight_dq(op)
        if found is None:
            continue
        dq, perm = found
        s, w = g.scale(dq), g.consts.get(dq.input[0])
        if s is None or s.size <= 1:
            continue  # per-tensor weights are supported
        if w is None:  # Q(float W) -> DQ: the shape is that of the Q input
            q = g.producer.get(dq.input[0])
            w = g.consts.get(q.input[0]) if q is not None else None
        if w is None:
            continue
        if s.ndim > 1:
            if g.qtype(dq) != INT4:
                yield _v("weight-channel-axis", "error", dq,
                         f"block-wise scale {list(s.shape)} on {_type_name(g.qtype(dq))} weight; "
                         "TensorRT supports block quantization only for INT4 GEMM weights")
            continue
        rank = w.ndim
        axis = int(g.attr(dq, "axis", 1))
        axis = axis + rank if axis < 0 else axis
        consumed = axis if perm is None else perm.index(axis)
        shape = list(w.shape) if perm is None else [w.shape[p] for p in perm]
        want = _out_channel_axis(g, op, rank)
        if consumed != want or s.size != shape[want]:
            yield _v("weight-channel-axis", "error", dq,
                     f"weight of {op.op_type} {op.name!r} (consumed shape {shape}) is "
                     f"quantized on axis {consumed} with {s.size} scales; TensorRT needs the "
                     f"output-channel axis {want} with {shape[want]} scales. fix: per-channel "
                     f"axis {want if perm is None else perm[want]} in the weight QSpec")


def check_weight_range(g: QdqGraph) -> Iterator[Violation]:
    """INT8 weights should use [-127, 127]: the developer guide's ONNX section states that
    TensorRT supports INT8 activations in [-128, 127] but INT8 weights in [-127, 127] [EQ,
    TensorRT 8.x edition "Working with Quantized Networks"]. A warning, not an error: newer
    releases may accept -128, but the symmetric range is what the kernels are validated on."""
    for node in _qdq_nodes(g):
        w = g.consts.get(node.input[0])
        if node.op_type == "DequantizeLinear" and w is not None and w.dtype == np.int8 \
                and bool(np.any(w == -128)):
            yield _v("weight-range", "warning", node,
                     "int8 weight uses -128; TensorRT's weight range is [-127, 127]. fix: "
                     "symmetric narrow range (QSpec(symmetric=True) gives qmin=-127)")


def check_float_layers(g: QdqGraph) -> Iterator[Violation]:
    """A weighted op runs in INT8 only when both its data input and its weight are DQ'd
    (recommendation "quantize all inputs of weighted operations" [EQ "Q/DQ Layer-Placement
    Recommendations"]). Quantized weight + float input, or DQ'd input + float weight, makes
    TensorRT run the layer in FP16/FP32: reported as a float layer (intended under mixed
    precision; INT4 weight-only GEMM is exempt)."""
    for op in g.nodes:
        if op.op_type not in WEIGHTED_OPS or len(op.input) < 2:
            continue
        wq = g.weight_dq(op)
        xq = g.dq_through(op.input[0]) is not None
        if wq is not None and not xq and g.qtype(wq[0]) != INT4:
            yield _v("float-layer", "warning", op,
                     f"weight is quantized but input {op.input[0]!r} has no Q/DQ: TensorRT runs "
                     "this layer in float (weight dequantized at build time)")
        elif wq is None and xq and g.is_const(op.input[WEIGHTED_OPS[op.op_type]]):
            yield _v("float-layer", "warning", op,
                     "input is Q/DQ'd but the weight is float: the layer runs in float and the "
                     "Q/DQ pair on its input only adds rounding and reformat kernels")


def _add_input_kind(g: QdqGraph, value: str) -> str:
    if g.dq_through(value) is not None:
        return "dq"
    prod = g.producer.get(value)
    return "qlayer" if prod is not None and g.is_quantized_layer(prod) else "float"


def check_residual_add(g: QdqGraph) -> Iterator[Violation]:
    """Residual adds: TensorRT fuses an element-wise add into the preceding quantized
    conv/GEMM epilogue when the add's other input is DQ'd ("quantize the residual input in skip
    connections" [EQ "Q/DQ Layer-Placement Recommendations"]), or runs a quantized add when both
    inputs are DQ'd. Checked condition: for an Add/Sum with >= 2 non-constant inputs touching a
    quantized region (some input DQ'd or the raw output of a quantized layer), every input must
    be DQ'd or the raw output of a quantized layer, and at least one must be DQ'd. Exempt: an
    add read only by float-only ops (a transformer's residual add before LayerNorm, which
    TensorRT fuses into a float skip-LayerNorm; quantizing the residual stream loses its
    outlier channels)."""
    for node in g.nodes:
        if node.op_type not in ("Add", "Sum"):
            continue
        inputs = [i for i in node.input if i and not g.is_const(i)]
        if len(inputs) < 2:
            continue
        kinds = {v: _add_input_kind(g, v) for v in inputs}
        if all(k == "float" for k in kinds.values()):
            continue  # a float add in a float region: intended
        cons = g.final_consumers(node.output[0])
        if cons and all(c.op_type in FLOAT_ONLY_OPS for c in cons):
            continue  # a transformer's residual add: it fuses into the float LayerNorm after it
        floats = [v for v, k in kinds.items() if k == "float"]
        if floats:
            desc = ", ".join(f"{v!r} (from {getattr(g.producer.get(v), 'op_type', 'graph input')})"
                             for v in floats)
            yield _v("residual-add", "warning", node,
                     f"input(s) {desc} have no Q/DQ while the other input is quantized: the add "
                     "cannot fuse into the conv epilogue and runs in float with reformats. fix: "
                     "quantize the residual (skip-branch) input of this add")
        elif "dq" not in kinds.values():
            yield _v("residual-add", "warning", node,
                     "both inputs are raw outputs of quantized layers: only one layer can absorb "
                     "the add, the other output is written in float. fix: Q/DQ one input")


def check_qdq_before_float_op(g: QdqGraph) -> Iterator[Violation]:
    """A Q->DQ pair on an activation whose every consumer (looking through data-movement ops)
    is a float-only op (`FLOAT_ONLY_OPS`: no INT8 kernel in [OPS], e.g. Softmax, LayerNorm,
    ReduceMean, Resize) cannot fuse into anything: TensorRT executes it as standalone int8
    round-trip kernels — extra latency and rounding error, no int8 compute ("Q/DQ
    Layer-Placement Recommendations": place Q/DQ only where they enable int8 fusions [EQ])."""
    for node in g.nodes:
        if node.op_type != "DequantizeLinear" or g.is_weight_qdq(node):
            continue
        cons = g.final_consumers(node.output[0])
        if cons and all(c.op_type in FLOAT_ONLY_OPS for c in cons):
            names = ", ".join(f"{c.op_type} {c.name!r}" for c in cons)
            yield _v("qdq-before-float-op", "warning", node,
                     f"Q/DQ feeds only float-only op(s) {names}: no int8 fusion possible, the "
                     "pair becomes reformat kernels. fix: do not quantize this tensor")


def check_attention(g: QdqGraph) -> Iterator[Violation]:
    """Multi-head attention: TensorRT's MHA fusion runs both batched matmuls in INT8 when
    Q, K, V and the softmax output are Q/DQ'd and the softmax INPUT is not ("Q/DQ
    Layer-Placement Recommendations" and the MHA fusion notes of the developer guide [EQ]:
    quantize the BMM inputs, keep softmax in higher precision). Checked: a MatMul with two
    activation inputs (Q·Kᵀ, P·V) and one of them DQ'd has both DQ'd; a Softmax reads a
    float input."""
    for node in g.nodes:
        if node.op_type != "MatMul" or any(g.is_const(i) for i in node.input[:2]):
            continue
        if g.weight_dq(node) is not None or any(g.dq_through(i) is not None and
                                                g.is_weight_qdq(g.dq_through(i))  # type: ignore[arg-type]
                                                for i in node.input[:2]):
            continue  # a GEMM with a (quantized) constant weight: check_float_layers' case
        floats = [i for i in node.input[:2] if g.dq_through(i) is None]
        if len(floats) == 1:  # both float: a float BMM by choice (FP32 model, mixed precision)
            yield _v("attention-bmm", "warning", node,
                     f"activation x activation MatMul with float input(s) {floats}: TensorRT's "
                     "MHA fusion runs this BMM in FP16. fix: Q/DQ both inputs (Q, K, V and "
                     "the softmax output)")
    for node in g.nodes:
        if node.op_type == "Softmax" and g.dq_through(node.input[0]) is not None:
            yield _v("attention-softmax", "warning", node,
                     "softmax input is Q/DQ'd: TensorRT keeps softmax in higher precision and "
                     "the pair only adds rounding of the attention scores. fix: leave the "
                     "scores (the Q·Kᵀ output and the mask add) float")


Rule = Callable[[QdqGraph], Iterable[Violation]]

#: the rules, in report order (errors first)
RULES: tuple[Rule, ...] = (
    check_opset,
    check_qdq_type,
    check_symmetric,
    check_scale,
    check_activation_per_tensor,
    check_weight_axis,
    check_weight_range,
    check_float_layers,
    check_residual_add,
    check_attention,
    check_qdq_before_float_op,
)


def check_trt_qdq(model: onnx.ModelProto, rules: tuple[Rule, ...] = RULES) -> list[Violation]:
    """All violations of TensorRT's explicit-quantization rules in `model`, errors first."""
    g = QdqGraph(model)
    found = [v for rule in rules for v in rule(g)]
    return sorted(found, key=lambda v: v.severity != "error")


def format_violations(violations: Iterable[Violation]) -> str:
    return "\n".join(f"  - {v}" for v in violations)
