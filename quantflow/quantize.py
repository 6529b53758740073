"""Quantize a float graph: put Q/DQ pairs on tensors and integer weights under layers.

The result is the PT2E representation: `quantized_decomposed.quantize_per_tensor` →
`dequantize_per_tensor` on activation tensors, int8 (or 4-bit-in-int8) weights behind
`dequantize_per_channel`, and int32 biases with scale s_x·s_w. Run in torch it is the fake-quant
simulation (the numerics reference); exported to ONNX it is the QDQ model a target executes.

Placement (which tensors get a Q/DQ pair) is target policy: quantflow/placement.py.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.ao.quantization.fx._decomposed
from torch import fx

from quantflow.calibrate import TensorStats
from quantflow.calibrators import activation_qparams
from quantflow.errors import CaptureError
from quantflow.ir import CONV_OPS, WEIGHTED_OPS, ConvArgs, add_const, get_tensor, is_const, is_op
from quantflow.pair_limit import fit_layer, needs_pair_limit, pair_bound, seven_bit
from quantflow.placement import VALUE_PRESERVING, plan_tensors
from quantflow.qmath import along_axis, weight_qparams
from quantflow.qmath import quantize as q_codes
from quantflow.rounding import use_learned
from quantflow.spec import KernelRules, LayerPlan, QSpec, QuantPlan

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed

_DTYPES = {(8, True): torch.int8, (8, False): torch.uint8, (16, True): torch.int16,
           (16, False): torch.uint16, (4, True): torch.int8, (7, True): torch.int8}


def dtype_of(spec: QSpec) -> torch.dtype:
    return _DTYPES[(spec.bits, spec.signed)]


def quantizable_nodes(gm: fx.GraphModule) -> list[str]:
    """Names of the weighted layers (conv, linear) with constant weights, in graph order."""
    return [n.name for n in gm.graph.nodes if is_op(n, WEIGHTED_OPS) and is_const(n.args[1])]


@dataclass
class QuantInfo:
    """What the quantizer did, attached to the quantized graph as `gm.meta["quantflow"]`."""

    placement: str
    #: tensor name -> (spec, scale, zero point)
    tensors: dict[str, tuple[QSpec, float, int]] = field(default_factory=dict)
    #: layer name -> LayerPlan actually applied
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    weight_bits: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (bits, n)
    #: layers whose weights were changed to fit the kernels' pair limit (or a repair), and how
    portability: dict[str, dict[str, Any]] = field(default_factory=dict)
    rules: KernelRules = field(default_factory=KernelRules)

    def to_dict(self) -> dict[str, Any]:
        return {
            "placement": self.placement,
            "tensors": {k: {"bits": s.bits, "signed": s.signed, "scale": sc, "zero_point": z}
                        for k, (s, sc, z) in self.tensors.items()},
            "layers": {k: v.label() for k, v in self.layers.items()},
            "portability": self.portability,
        }



def quantize(gm: fx.GraphModule, plan: QuantPlan, stats: dict[str, TensorStats],
             placement: str | KernelRules = "ort", *, int_bias: bool | None = None,
             rounding: Mapping[str, torch.Tensor] | None = None,
             act_qparams: Mapping[str, tuple[float, int]] | None = None) -> fx.GraphModule:
    """A new GraphModule with `plan` applied; `gm` is left untouched.

    `placement`: a placement name or the target's KernelRules (placement plus the weight
    limits its kernels need, e.g. the int16 pair limit of x86 CPUs without VNNI).
    `rounding`: learned integer codes per layer (quantflow.rounding) to use instead of
    round-to-nearest, where they lie on the layer's grid (a pair they would push past the
    kernels' pair limit keeps the nearest codes).
    `act_qparams`: (scale, zero point) per activation tensor instead of the calibrated ones
    (quantflow.repair); value-preserving ops after the tensor follow it.
    `int_bias`: int32 biases with scale s_x·s_w (default: for the "ort" placement only —
    onnxruntime's QDQ conv fusion needs them; TensorRT reads float biases and folds them).
    """
    rules = KernelRules.of(placement)
    placement = rules.placement
    if int_bias is None:
        int_bias = placement == "ort"
    qgm = copy.deepcopy(gm)
    info = QuantInfo(placement=placement, rules=rules)
    specs = plan_tensors(qgm, plan, placement)
    nodes = {n.name: n for n in qgm.graph.nodes}
    for name, spec in specs.items():
        if name not in stats:
            raise CaptureError(f"quantize: no calibration statistics for tensor {name!r} "
                               f"(node {nodes[name].format_node()}); calibrate the same graph "
                               "that is quantized (run passes before calibration)")
        scale, zp = activation_qparams(stats[name], spec)
        if act_qparams and name in act_qparams:
            scale, zp = act_qparams[name]
        info.tensors[name] = (spec, scale, zp)
    for n in qgm.graph.nodes:  # graph order, so chains of value-preserving ops propagate
        src = n.args[0] if n.args else None
        if (n.name in info.tensors and is_op(n, VALUE_PRESERVING) and isinstance(src, fx.Node)
                and src.name in info.tensors and info.tensors[src.name][0] == specs[n.name]):
            info.tensors[n.name] = info.tensors[src.name]
    # a layer the plan keeps float reads the float tensor, not its dequantized copy: fed by a
    # DequantizeLinear, onnxruntime (>= 1.20, WeightBiasQuantization) quantizes a float
    # Conv/Gemm's weights itself and runs it as an integer kernel the simulation never saw
    float_readers = {k for k, lp in plan.layers.items() if lp.is_float}
    for src_name, (spec, scale, zp) in info.tensors.items():
        src = nodes[src_name]
        _insert_qdq(qgm, src, spec, scale, zp, float_readers)
    for n in list(qgm.graph.nodes):
        if is_op(n, WEIGHTED_OPS) and is_const(n.args[1]):
            lp = plan.for_node(n.name)
            info.layers[n.name] = lp
            if lp.weight is not None:
                # TensorRT reads float biases and folds them itself; ORT's QDQ conv fusion
                # needs an int32 bias dequantized with scale s_x·s_w
                mean = sq_mean = None
                if isinstance(n.args[0], fx.Node):
                    src = float_source(n.args[0])
                    if src.name in stats:
                        sq_mean = stats[src.name].channel_sq_mean
                        if plan.bias_correction:
                            mean = stats[src.name].channel_mean
                _quantize_weight(qgm, n, lp, info, int_bias=int_bias, input_mean=mean,
                                 input_sq_mean=sq_mean,
                                 learned=(rounding or {}).get(n.name))
    qgm.graph.lint()
    qgm.recompile()
    qgm.meta["quantflow"] = info
    return qgm


def _insert_qdq(gm: fx.GraphModule, src: fx.Node, spec: QSpec, scale: float, zp: int,
                float_readers: set[str] | frozenset[str] = frozenset()) -> None:
    users = [u for u in src.users if u.name not in float_readers]
    if not users:
        return
    qargs = (scale, zp, spec.qmin, spec.qmax, dtype_of(spec))
    with gm.graph.inserting_after(src):
        q = gm.graph.create_node("call_function", qd.quantize_per_tensor.default,
                                 (src, *qargs), name=f"{src.name}_q")
    with gm.graph.inserting_after(q):
        dq = gm.graph.create_node("call_function", qd.dequantize_per_tensor.default,
                                  (q, *qargs), name=f"{src.name}_dq")
    for u in users:
        u.replace_input_with(src, dq)


def _input_scale(n: fx.Node) -> float | None:
    """Scale of the quantized activation feeding layer `n`, None if its input is float."""
    x = n.args[0]
    if isinstance(x, fx.Node) and x.target == qd.dequantize_per_tensor.default:
        return float(x.args[1])  # type: ignore[arg-type]
    return None


def float_source(x: fx.Node) -> fx.Node:
    """The float tensor behind a (possibly inserted) dequantize node."""
    if x.target == qd.dequantize_per_tensor.default:
        q = x.args[0]
        assert isinstance(q, fx.Node) and isinstance(q.args[0], fx.Node)
        return q.args[0]
    return x


def bias_shift(w: torch.Tensor, w_q: torch.Tensor, mean: torch.Tensor, groups: int = 1
               ) -> torch.Tensor:
    """E[(Q(W) − W)·x] per output channel, from the per-channel input mean E[x].

    Conv: sums the weight error over the kernel window (exact away from zero padding);
    grouped convs pair each output channel with its group's input channels.
    """
    dw = (w_q.double() - w.double())
    if dw.dim() > 2:
        dw = dw.flatten(2).sum(2)  # [out, in/groups]
    out_c, in_per_group = dw.shape
    m = mean.double().reshape(groups, in_per_group)  # [groups, in/groups]
    group_of = torch.arange(out_c) // (out_c // groups)
    return (dw * m[group_of]).sum(1)


def _quantize_weight(gm: fx.GraphModule, n: fx.Node, lp: LayerPlan, info: QuantInfo,
                     int_bias: bool, input_mean: torch.Tensor | None = None,
                     input_sq_mean: torch.Tensor | None = None,
                     learned: torch.Tensor | None = None) -> None:
    spec = lp.weight
    assert spec is not None
    w_node = n.args[1]
    assert isinstance(w_node, fx.Node)
    w = get_tensor(gm, w_node)
    assert w is not None
    groups = ConvArgs.of(n).groups if is_op(n, CONV_OPS) else 1
    repair = info.rules.repairs.get(n.name)
    if repair == "7bit":  # the parity gate's last resort: |w| <= 64 cannot saturate a pair
        spec = seven_bit(spec)
    scale, zp = weight_qparams(w, spec)
    per_channel = spec.granularity == "channel"
    codes = q_codes(w.double(), scale.double(), zp, spec.qmin, spec.qmax,
                    spec.axis if per_channel else None)
    if repair == "7bit":
        info.portability[n.name] = {"op": _op_name(n), "fix": "7bit",
                                    "why": "runtime parity check found this layer off"}
    elif needs_pair_limit(info.rules, lp, w, groups, repair):
        codes, scale, record = fit_layer(w, codes, scale, spec, lp, groups, input_sq_mean,
                                         info.rules)
        if record is not None:
            info.portability[n.name] = {"op": _op_name(n), **record}
    # bias correction uses the codes rounding-to-nearest gives: learned rounding learned its
    # codes against that corrected bias (it reads the bias from the nearest-rounded graph),
    # so correcting again for the learned codes would undo part of what it learned
    bias_codes = codes
    if learned is not None:
        limited = needs_pair_limit(info.rules, lp, w, groups, repair)
        bound = pair_bound(lp.act.qmax - lp.act.qmin) if limited and lp.act else None
        codes = use_learned(codes, learned, w, scale, spec, bound)
    codes = codes.to(dtype_of(spec))
    wq = add_const(gm, f"{n.name}_weight_int{spec.bits}", codes, n)
    with gm.graph.inserting_before(n):
        if per_channel:
            s = add_const(gm, f"{n.name}_weight_scale", scale, n)
            z = add_const(gm, f"{n.name}_weight_zp", zp, n)
            dq: fx.Node = gm.graph.create_node(
                "call_function", qd.dequantize_per_channel.default,
                (wq, s, z, spec.axis, spec.qmin, spec.qmax, dtype_of(spec)),
                name=f"{n.name}_weight_dq")
        else:
            dq = gm.graph.create_node(
                "call_function", qd.dequantize_per_tensor.default,
                (wq, float(scale), int(zp), spec.qmin, spec.qmax, dtype_of(spec)),
                name=f"{n.name}_weight_dq")
    n.replace_input_with(w_node, dq)
    info.weight_bits[n.name] = (spec.bits, w.numel())
    b_node = n.args[2] if len(n.args) > 2 else None
    if (input_mean is not None and isinstance(b_node, fx.Node) and is_const(b_node)
            and input_mean.numel() == w.shape[1] * groups):
        axis = spec.axis if per_channel else None
        w_q = (bias_codes.double() - along_axis(zp, w.dim(), axis)) \
            * along_axis(scale.double(), w.dim(), axis)
        b = get_tensor(gm, b_node)
        assert b is not None
        corrected = b.double() - bias_shift(w, w_q, input_mean, groups)
        new_b = add_const(gm, f"{n.name}_bias_corrected", corrected.to(b.dtype), n)
        n.replace_input_with(b_node, new_b)
        if not b_node.users:
            gm.graph.erase_node(b_node)
        b_node = new_b
    s_x = _input_scale(n)
    if (int_bias and isinstance(b_node, fx.Node) and is_const(b_node) and s_x is not None
            and spec.symmetric):
        b = get_tensor(gm, b_node)
        assert b is not None
        b_scale = (scale.double() * s_x).reshape(-1).expand(b.shape[0]).contiguous()
        lim = 2**31 - 1
        b_codes = torch.clamp(torch.round(b.double() / b_scale), -lim, lim).to(torch.int32)
        bq = add_const(gm, f"{n.name}_bias_int32", b_codes, n)
        bs = add_const(gm, f"{n.name}_bias_scale", b_scale.float(), n)
        bz = add_const(gm, f"{n.name}_bias_zp", torch.zeros(b.shape[0], dtype=torch.int64), n)
        with gm.graph.inserting_before(n):
            bdq = gm.graph.create_node("call_function", qd.dequantize_per_channel.default,
                                       (bq, bs, bz, 0, -lim, lim, torch.int32),
                                       name=f"{n.name}_bias_dq")
        n.replace_input_with(b_node, bdq)
    for old in (w_node, b_node):
        if isinstance(old, fx.Node) and not old.users:
            gm.graph.erase_node(old)


def _op_name(n: fx.Node) -> str:
    return str(n.target).split(".")[-2] if "." in str(n.target) else str(n.target)


def model_size_bytes(gm: fx.GraphModule) -> int:
    """Bytes of constants in `gm`, counting 4-bit weights at half a byte."""
    total = 0
    info: QuantInfo | None = gm.meta.get("quantflow")
    four_bit = {f"_qf_{k}_weight_int4" for k, (b, _) in (info.weight_bits.items() if info
                                                          else []) if b == 4}
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr" and n.users}
    for name in used:
        t = operator.attrgetter(name)(gm)
        if isinstance(t, torch.Tensor):
            nbytes = t.numel() * t.element_size()
            total += nbytes // 2 if any(name.startswith(f) for f in four_bit) else nbytes
    return total
