"""PT2E graph -> Relax, with quantized convs and linears lowered to integer arithmetic.

Why a frontend hook rather than a Relax dataflow-pattern rewrite: `from_exported_program` knows
neither `quantized_decomposed` op, so they need converters anyway, and at conversion time the
fx graph still says, by node identity, which DQ feeds which conv; the int8/int32 constants can
be read as tensors to precompute per-channel terms. The result is the same Relax an after-the-
fact rewrite would produce, without pattern matching over an already-float graph.

The algebra, for one output channel o of a conv (or a linear row) whose input is
`x = (xq - zx) * sx` (per-tensor, uint8 or int8) and whose weight is `w = wq * sw[o]` (int8,
symmetric: zero points must be 0):

    conv(x, w)[o] = sx * sw[o] * conv(xq - zx, wq)[o]
                  = sx * sw[o] * (conv(pad(xq, value=zx), wq)[o] - zx * sum(wq[o]))

Padding xq with zx (not 0) makes the padded border equal zero in real terms, so the
correction `zx * sum(wq[o])` is one constant per channel, folded with the int32 bias `bq[o]`
when the bias scale is sx * sw[o] (PT2E's convention). `conv(uint8, int8) -> int32` is exact.
The int32 accumulator is then cast to float and scaled by `sx * sw[o]`; the ops between it and
the next quantize (relu, clamp) and that quantize itself (`round(y / sy) + zy`, clip, cast)
are elementwise, so Relax's FuseOps folds the requantize into the conv's epilogue.

Relative to the torch simulation (fp32 conv of dequantized values), the only difference is the
fp32 rounding of the simulated sum, which moves a value across a rounding boundary of the next
quantize at most once: outputs agree to within 1 quantization step.

Quantize/dequantize nodes not absorbed this way are converted with torch's exact formulas
(`clamp(round(x * (1/s)) + z)`, `(q - z) * s`), so everything else is the simulation, op for op.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.ao.quantization.fx._decomposed
from torch import fx

from quantflow.errors import UnsupportedOpError
from quantflow.ir import ConvArgs

log = logging.getLogger("quantflow.targets.tvm")

qd = torch.ops.quantized_decomposed
Q_PT = (qd.quantize_per_tensor.default,)
DQ_PT = (qd.dequantize_per_tensor.default,)
DQ_PC = (qd.dequantize_per_channel.default,)
_INT_ACT = (torch.uint8, torch.int8)
#: relative tolerance for "bias scale == sx * sw" (PT2E computes it in fp32)
BIAS_SCALE_RTOL = 1e-5


# ----------------------------------------------------------------------------- pure math

def zero_point_correction(wq: np.ndarray, zx: int) -> np.ndarray:
    """`zx * sum(wq[o])` per output channel o (axis 0), as int64 (exact)."""
    return zx * wq.reshape(wq.shape[0], -1).astype(np.int64).sum(axis=1)


def integer_bias(bq: np.ndarray | None, wq: np.ndarray, zx: int) -> np.ndarray:
    """The int32 term added to the raw accumulator: `bq - zx * sum(wq[o])`."""
    corr = -zero_point_correction(wq, zx)
    if bq is not None:
        corr = corr + bq.astype(np.int64)
    if np.abs(corr).max(initial=0) >= 2**31:
        raise OverflowError("integer bias does not fit int32")
    return corr.astype(np.int32)


def bias_matches_scale(bias_scale: np.ndarray, sx: float, sw: np.ndarray) -> bool:
    """True if the int32 bias is in accumulator units (scale sx * sw[o])."""
    want = np.float32(sx) * sw.astype(np.float32)
    return bool(np.allclose(bias_scale, want, rtol=BIAS_SCALE_RTOL, atol=0.0))


#: VNNI block: vpdpbusd multiplies 4 consecutive uint8 inputs by a 16 x 4 int8 block
VNNI_LANES, VNNI_K = 16, 4


def pack_vnni_weight(wq: np.ndarray) -> np.ndarray:
    """OIHW int8 -> [O/16, KH, KW, I/4, 16, 4]: each 16 (out) x 4 (in) block contiguous, the
    operand layout of TVM's `dot_16x4_vnni` intrinsic (needs O % 16 == 0, I % 4 == 0)."""
    o, i, kh, kw = wq.shape
    w = wq.reshape(o // VNNI_LANES, VNNI_LANES, i // VNNI_K, VNNI_K, kh, kw)
    return np.ascontiguousarray(w.transpose(0, 4, 5, 2, 1, 3))


def vnni_conv2d_nhwc(data: Any, wp: Any, strides: Sequence[int], dilation: Sequence[int]) -> Any:
    """TE: int32 NHWC conv of padded uint8 NHWC `data` with a `pack_vnni_weight` weight.

    The innermost reduction (4 input channels) and the 16 output channels of one weight block
    are separate iterators over contiguous memory, which is what MetaSchedule's x86 VNNI rule
    needs to tensorize the block into vpdpbusd (TVM's own NCHW conv cannot be).
    """
    from tvm import te

    n, hp, wdp, _c = data.shape
    o0, kh_, kw_, i0, o1, i1 = wp.shape
    (sh, sw), (dh, dw) = strides, dilation
    oh = (hp - dh * (kh_ - 1) - 1) // sh + 1
    ow = (wdp - dw * (kw_ - 1) - 1) // sw + 1
    kh = te.reduce_axis((0, kh_), "kh")
    kw = te.reduce_axis((0, kw_), "kw")
    c0 = te.reduce_axis((0, i0), "c0")
    c1 = te.reduce_axis((0, i1), "c1")
    return te.compute(
        (n, oh, ow, o0 * o1),
        lambda b, h, w, oc: te.sum(
            data[b, h * sh + kh * dh, w * sw + kw * dw, c0 * VNNI_K + c1].astype("int32")
            * wp[oc // VNNI_LANES, kh, kw, c0, oc % VNNI_LANES, c1].astype("int32"),
            axis=[kh, kw, c0, c1]),
        name="conv2d_vnni")


# ----------------------------------------------------------------------------- matching

@dataclass
class QuantOperand:
    """A dequantize node's integer input and quantization parameters."""

    q: fx.Node  # the integer tensor node
    scale: np.ndarray  # per-tensor: shape (); per-channel: shape (C,)
    zero_point: np.ndarray
    dtype: torch.dtype
    axis: int | None


class ConstTable:
    """Tensors behind the exported program's parameter/buffer/constant placeholders."""

    def __init__(self, ep: torch.export.ExportedProgram) -> None:
        state = dict(ep.state_dict)
        state.update(ep.constants)
        self.by_node: dict[str, torch.Tensor] = {}
        for spec in ep.graph_signature.input_specs:
            tgt = spec.target
            if tgt is not None and tgt in state:
                value = state[tgt]
                if isinstance(value, torch.Tensor):
                    self.by_node[spec.arg.name] = value.detach()  # type: ignore[union-attr]

    def get(self, node: Any) -> torch.Tensor | None:
        if isinstance(node, fx.Node) and node.op == "placeholder":
            return self.by_node.get(node.name)
        return None


def _scalar_or_const(arg: Any, consts: ConstTable) -> np.ndarray | None:
    if isinstance(arg, (int, float)):
        return np.asarray(arg)
    t = consts.get(arg)
    return None if t is None else t.numpy()


def match_dq(node: Any, consts: ConstTable) -> QuantOperand | None:
    """The quantization of `node` if it is a dequantize with constant parameters."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    args: tuple[Any, ...] = tuple(node.args)
    if node.target in DQ_PT:
        q, s, z, _qmin, _qmax, dtype = args[:6]
        axis = None
    elif node.target in DQ_PC:
        q, s, z, axis, _qmin, _qmax, dtype = args[:7]
    else:
        return None
    scale, zp = _scalar_or_const(s, consts), _scalar_or_const(z, consts)
    if scale is None or zp is None or not isinstance(q, fx.Node):
        return None
    return QuantOperand(q=q, scale=scale.astype(np.float32), zero_point=zp.astype(np.int64),
                        dtype=dtype, axis=axis)


@dataclass
class IntLayer:
    """A conv/linear whose operands all qualify for the integer path."""

    x: QuantOperand
    w: QuantOperand
    wq: np.ndarray  # int8 weight
    sw: np.ndarray  # per-output-channel weight scale, shape (O,)
    bias_node: Any  # fx node of the bias (float path) or None
    bias_int: np.ndarray  # int32 added to the accumulator (includes zero-point correction)
    bias_float: bool  # bias did not match accumulator scale: add it in float


def match_int_layer(node: fx.Node, x_arg: Any, w_arg: Any, b_arg: Any,
                    consts: ConstTable) -> tuple[IntLayer | None, str]:
    """Decide whether a conv/linear can run in integers; the string says why not."""
    x = match_dq(x_arg, consts)
    if x is None or x.axis is not None or x.dtype not in _INT_ACT:
        return None, "input is not a per-tensor uint8/int8 dequantize"
    w = match_dq(w_arg, consts)
    if w is None or w.dtype != torch.int8:
        return None, "weight is not an int8 dequantize"
    wt = consts.get(w.q)
    if wt is None:
        return None, "weight integer tensor is not a constant"
    if w.axis not in (None, 0) or np.any(w.zero_point != 0):
        return None, "weight is not symmetric per-output-channel (axis 0, zero point 0)"
    wq = wt.numpy()
    n_out = wq.shape[0]
    sw = np.broadcast_to(w.scale, (n_out,)).astype(np.float32)
    sx, zx = float(x.scale), int(x.zero_point)
    bias_node, bias_float, bq = None, False, None
    b = match_dq(b_arg, consts) if b_arg is not None else None
    if b is not None and b.dtype == torch.int32 and consts.get(b.q) is not None \
            and np.all(b.zero_point == 0) \
            and bias_matches_scale(np.broadcast_to(b.scale, (n_out,)), sx, sw):
        bq = consts.get(b.q).numpy()  # type: ignore[union-attr]
    elif b_arg is not None:
        bias_node, bias_float = b_arg, True
    try:
        bias_int = integer_bias(bq, wq, zx)
    except OverflowError:
        return None, "zero-point correction overflows int32"
    return IntLayer(x=x, w=w, wq=wq, sw=sw, bias_node=bias_node, bias_int=bias_int,
                    bias_float=bias_float), ""


# ----------------------------------------------------------------------------- conversion

@dataclass
class LoweringStats:
    int_layers: list[str]
    float_layers: dict[str, str]  # node name -> why it stayed float
    #: (weight, fx node name) of every conv/linear with a constant weight, so
    #: `tvm_tune.kernel_layers` can name each compiled kernel after the layer whose weight it
    #: is called with (the int8 weight for integer layers, the float weight otherwise)
    weights: list[tuple[np.ndarray, str]] = field(default_factory=list)
    #: integer convs lowered as `vnni_conv2d_nhwc`
    vnni_layers: list[str] = field(default_factory=list)


def make_convert_map(consts: ConstTable, stats: LoweringStats, *, vnni: bool = False
                     ) -> dict[str, Callable[..., Any]]:
    """Converters for `from_exported_program(custom_convert_map=...)`.

    vnni: integer convs that fit the VNNI block (uint8 input, groups 1, in channels % 4, out
    channels % 16) run as `vnni_conv2d_nhwc` between two transposes, so tuning can use
    vpdpbusd; the transposes fuse into the pad before and the epilogue after.
    """
    from tvm import relax

    def const(a: np.ndarray) -> Any:
        return relax.const(np.ascontiguousarray(a))

    def quantize(node: fx.Node, imp: Any) -> Any:
        args: tuple[Any, ...] = tuple(node.args)
        x, s, z, qmin, qmax, dtype = args[:6]
        scale = _scalar_or_const(s, consts)
        zp = _scalar_or_const(z, consts)
        if scale is None or zp is None:
            raise UnsupportedOpError(f"node {node.name!r}: quantize with non-constant scale")
        bb, xv = imp.block_builder, imp.env[x]
        # torch: clamp(round(x * (1.0 / scale)) + zp, qmin, qmax).to(dtype); same op order
        inv = np.float32(1.0 / float(scale))
        y = bb.emit(relax.op.round(relax.op.multiply(xv, relax.const(inv, "float32"))))
        y = bb.emit(relax.op.add(y, relax.const(np.float32(zp), "float32")))
        y = bb.emit(relax.op.clip(y, int(qmin), int(qmax)))
        return bb.emit(relax.op.astype(y, str(dtype).replace("torch.", "")))

    def dequantize(node: fx.Node, imp: Any) -> Any:
        op = match_dq(node, consts)
        if op is None:
            raise UnsupportedOpError(f"node {node.name!r}: dequantize with non-constant params")
        bb, qv = imp.block_builder, imp.env[op.q]
        rank = len(node.meta["val"].shape) if "val" in node.meta else None
        scale, zp = op.scale, op.zero_point.astype(np.float32)
        if op.axis is not None and rank is not None:
            shape = [1] * rank
            shape[op.axis] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        y = bb.emit(relax.op.astype(qv, "float32"))
        y = bb.emit(relax.op.subtract(y, const(zp)))
        return bb.emit(relax.op.multiply(y, const(scale)))

    def finish(imp: Any, acc: Any, layer: IntLayer, chan_shape: list[int]) -> Any:
        bb = imp.block_builder
        acc = bb.emit(relax.op.add(acc, const(layer.bias_int.reshape(chan_shape))))
        y = bb.emit(relax.op.astype(acc, "float32"))
        mult = (np.float32(layer.x.scale) * layer.sw).reshape(chan_shape)
        y = bb.emit(relax.op.multiply(y, const(mult.astype(np.float32))))
        if layer.bias_float:
            b = imp.env[layer.bias_node]
            y = bb.emit(relax.op.add(y, relax.op.reshape(b, chan_shape)))
        return y

    def record_float_weight(w: Any, name: str) -> None:
        t = consts.get(w)
        if t is not None:  # a weight dequantized in the graph folds to an unknown constant
            stats.weights.append((t.numpy(), name))

    def conv2d(node: fx.Node, imp: Any) -> Any:
        c = ConvArgs.of(node)  # export drops trailing defaults; this normalizes them
        layer, why = match_int_layer(node, c.x, c.weight, c.bias, consts)
        if layer is None:
            stats.float_layers[node.name] = why
            record_float_weight(c.weight, node.name)
            return imp._conv2d(node)
        bb = imp.block_builder
        xq, wq = imp.env[layer.x.q], imp.env[layer.w.q]
        ph, pw = c.padding
        if ph or pw:
            # pad with the input zero point: real-valued zero at the border (see docstring)
            xq = bb.emit(relax.op.nn.pad(xq, [0, 0, 0, 0, ph, ph, pw, pw], "constant",
                                         float(int(layer.x.zero_point))),
                         name_hint=f"{node.name}_pad")
        stats.int_layers.append(node.name)
        o, i = layer.wq.shape[:2]
        if vnni and c.groups == 1 and layer.x.dtype == torch.uint8 \
                and o % VNNI_LANES == 0 and i % VNNI_K == 0:
            wp = pack_vnni_weight(layer.wq)
            stats.weights.append((wp, node.name))
            stats.vnni_layers.append(node.name)
            x_nhwc = bb.emit(relax.op.permute_dims(xq, [0, 2, 3, 1]))
            acc = bb.emit(bb.call_te(vnni_conv2d_nhwc, x_nhwc, const(wp), list(c.stride),
                                     list(c.dilation), primfunc_name_hint="conv2d_vnni"),
                          name_hint=node.name)
            y = finish(imp, acc, layer, [1, 1, 1, -1])
            return bb.emit(relax.op.permute_dims(y, [0, 3, 1, 2]))
        acc = bb.emit(relax.op.nn.conv2d(xq, wq, strides=list(c.stride), padding=[0, 0],
                                         dilation=list(c.dilation), groups=c.groups,
                                         out_dtype="int32"), name_hint=node.name)
        stats.weights.append((layer.wq, node.name))
        return finish(imp, acc, layer, [1, -1, 1, 1])

    def linear(node: fx.Node, imp: Any) -> Any:
        args = list(node.args) + [None] * (3 - len(node.args))
        x, w, b = args[:3]
        layer, why = match_int_layer(node, x, w, b, consts)
        if layer is None:
            stats.float_layers[node.name] = why
            record_float_weight(w, node.name)
            return imp._linear(node)
        bb = imp.block_builder
        xq, wq = imp.env[layer.x.q], imp.env[layer.w.q]
        wt = bb.emit(relax.op.permute_dims(wq, [1, 0]))
        acc = bb.emit(relax.op.matmul(xq, wt, out_dtype="int32"), name_hint=node.name)
        stats.int_layers.append(node.name)
        stats.weights.append((layer.wq, node.name))
        return finish(imp, acc, layer, [-1])

    def batch_norm(node: fx.Node, imp: Any) -> Any:
        # TVM 0.27 reads aten.batch_norm.default's `training` flag as momentum and always
        # emits training-mode (batch statistics) BN; lower eval BN as its affine map instead.
        x, w, b, mean, var, training, _momentum, eps = (list[Any](node.args) + [None] * 9)[:8]
        if training:
            raise UnsupportedOpError(f"node {node.name!r}: training-mode batch_norm; "
                                     "fix: export the model in eval mode")
        bb, xv = imp.block_builder, imp.env[x]
        rank = len(node.meta["val"].shape)
        shape = [1, -1] + [1] * (rank - 2)

        def chan(n: Any) -> Any:
            return relax.op.reshape(imp.env[n], shape)

        inv = bb.emit(relax.op.rsqrt(relax.op.add(imp.env[var],
                                                  relax.const(np.float32(eps or 1e-5)))))
        y = bb.emit(relax.op.subtract(xv, chan(mean)))
        y = bb.emit(relax.op.multiply(y, relax.op.reshape(inv, shape)))
        if w is not None:
            y = bb.emit(relax.op.multiply(y, chan(w)))
        if b is not None:
            y = bb.emit(relax.op.add(y, chan(b)))
        return y

    return {
        "batch_norm.default": batch_norm,
        "quantize_per_tensor.default": quantize,
        "dequantize_per_tensor.default": dequantize,
        "dequantize_per_channel.default": dequantize,
        "conv2d.default": conv2d,
        "linear.default": linear,
    }


def to_relax(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], *, vnni: bool = False
             ) -> tuple[Any, LoweringStats]:
    """Export `gm` and import it into a Relax IRModule (integer layers where possible;
    `vnni`: see `make_convert_map`)."""
    from tvm.relax.frontend.torch import from_exported_program

    ep = torch.export.export(gm, tuple(example_inputs))
    stats = LoweringStats(int_layers=[], float_layers={})
    try:
        mod = from_exported_program(ep, run_ep_decomposition=False,
                                    custom_convert_map=make_convert_map(ConstTable(ep), stats,
                                                                       vnni=vnni))
    except (AssertionError, KeyError, ValueError) as exc:
        culprits = [n.name for n in ep.graph.nodes if n.op == "call_function"
                    and getattr(n.target, "__name__", "\0") in str(exc)]
        raise UnsupportedOpError(
            f"tvm target: Relax import of the graph failed at node(s) {culprits}: {exc}\n"
            "fix: use the ort target for this model, or report the op so the TVM frontend "
            "can map it"
        ) from exc
    for name, why in stats.float_layers.items():
        log.debug("tvm: %s stays float: %s", name, why)
    return mod, stats
