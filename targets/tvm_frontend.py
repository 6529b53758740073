"""PT2E graph -> Relax, with quantized convs and linears lowered to integer arithmetic.

Why a frontend hook rather than a Relax dataflow-pattern rewrite: `from_exported_program` knows
neither `quantized_decomposed` op, so they need converters anyway, and at conversion time the
fx graph still says, by node identity, which DQ feeds which conv; the int8/int32 constants can
be read as tensors to precompute per-channel terms. The result is the same Relax an after-the-
fact rewrite would produce, without pattern matching over an already-float graph.

Which layers qualify is decided in tvm_match.py; the arithmetic they are lowered to (integer
conv of zero-point-padded codes, a per-channel int32 bias that absorbs the zero-point
correction, requantize fused by FuseOps; at most 1 step from the simulation) is derived in
tvm_int_math.py. This module holds the Relax converters and `to_relax`.

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
from torch import fx

from quantflow.errors import UnsupportedOpError
from quantflow.ir import ConvArgs
from quantflow.targets.tvm_dot import DOT_K, PACKED_BLOCK, WIDE_BLOCK, DotPath, pairs_fit
from quantflow.targets.tvm_int_math import (
    depthwise_conv2d_nhwc,
    integer_bias,
    pack_vnni_weight,
    vnni_conv2d_nhwc,
)
from quantflow.targets.tvm_layout import Twins
from quantflow.targets.tvm_match import (
    ConstTable,
    IntLayer,
    match_dq,
    match_int_layer,
    scalar_or_const,
)

log = logging.getLogger("quantflow.targets.tvm")


@dataclass
class LoweringStats:
    int_layers: list[str]
    float_layers: dict[str, str]  # node name -> why it stayed float
    #: (weight, fx node name) of every conv/linear with a constant weight, so
    #: `tvm_tune.kernel_layers` can name each compiled kernel after the layer whose weight it
    #: is called with (the int8 weight for integer layers, the float weight otherwise)
    weights: list[tuple[np.ndarray, str]] = field(default_factory=list)
    #: integer convs lowered as `vnni_conv2d_nhwc` with the ISA's dot product (tvm_dot)
    dot_layers: list[str] = field(default_factory=list)
    #: integer convs that would fit but whose weights break vpmaddubsw's pair bound
    pair_bound_layers: list[str] = field(default_factory=list)


def make_convert_map(consts: ConstTable, stats: LoweringStats, *, dot: DotPath | None = None
                     ) -> dict[str, Callable[..., Any]]:
    """Converters for `from_exported_program(custom_convert_map=...)`.

    dot: integer convs that fit the ISA's dot-product block (uint8 input, groups 1, in
    channels % 4, out channels % lanes; on AVX2 weights within the pair bound) run as
    `vnni_conv2d_nhwc` between two transposes (tvm_dot); the transposes fuse into the pad
    before and the epilogue after.
    """
    from tvm import relax

    twins = Twins()

    def const(a: np.ndarray) -> Any:
        return relax.const(np.ascontiguousarray(a))

    def quantize(node: fx.Node, imp: Any) -> Any:
        args: tuple[Any, ...] = tuple(node.args)
        x, s, z, qmin, qmax, dtype = args[:6]
        scale = scalar_or_const(s, consts)
        zp = scalar_or_const(z, consts)
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

    def finish(imp: Any, acc: Any, layer: IntLayer, chan_shape: list[int],
               bias_int: np.ndarray | None = None) -> Any:
        bb = imp.block_builder
        bias = layer.bias_int if bias_int is None else bias_int
        acc = bb.emit(relax.op.add(acc, const(bias.reshape(chan_shape))))
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

    def shift_to_int8(bb: Any, x: Any, layer: IntLayer, wq: np.ndarray) -> tuple[Any, Any]:
        """Arm multiplies s8 x s8 only: the uint8 codes shifted to int8, and the zero point
        with them, (x - 128) - (zx - 128) = x - zx: the correction gains 128 * sum(w)."""
        x = bb.emit(relax.op.astype(relax.op.subtract(
            relax.op.astype(x, "int16"), relax.const(128, "int16")), "int8"))
        return x, integer_bias(layer.bias_int, wq, -128)

    def nhwc_conv(node: fx.Node, imp: Any, c: ConvArgs, layer: IntLayer, o: int, i: int,
                  zx: float) -> Any:
        """A 2-D uint8 conv in NHWC (tvm_layout): packed for the ISA's dot product (tvm_dot)
        or depthwise; its input's NHWC twin if there is one, and its output recorded as a
        twin. None: neither form fits (the caller lowers the NCHW conv)."""
        assert dot is not None
        depthwise = c.groups == o and i == 1 and o > 1
        # channels padded with zero weights to whole blocks (the extra outputs are sliced
        # off): e.g. MobileNetV2's 24-channel projections, a 3-channel RGB stem
        o_pad, i_pad = -(-o // dot.lanes) * dot.lanes, -(-i // DOT_K) * DOT_K
        wq = np.zeros((o_pad, i_pad, *layer.wq.shape[2:]), np.int8)
        wq[:o, :i] = layer.wq
        # AVX2 weights past vpmaddubsw's pair bound: the same layout, widened to int32
        wide = c.groups == 1 and dot.pair_bound and not pairs_fit(wq)
        if wide:
            stats.pair_bound_layers.append(node.name)
        if not (c.groups == 1 or depthwise):
            return None
        bb = imp.block_builder
        x = twins.nhwc.get(layer.x.q)
        if x is None:
            x = bb.emit(relax.op.permute_dims(imp.env[layer.x.q], [0, 2, 3, 1]))
        extra_c = 0 if depthwise else i_pad - i
        if any(c.padding) or extra_c:  # zero point at the border, as in NCHW
            widths = [0, 0] + [p for p in c.padding for _ in (0, 1)] + [0, extra_c]
            x = bb.emit(relax.op.nn.pad(x, widths, "constant", zx), name_hint=f"{node.name}_pad")
        bias = None
        if depthwise:  # int32 widening, vectorized over channels (tvm_schedules)
            w = np.ascontiguousarray(layer.wq[:, 0].transpose(1, 2, 0))
            stats.weights.append((w, node.name))
            acc = bb.emit(bb.call_te(depthwise_conv2d_nhwc, x, const(w), list(c.stride),
                                     list(c.dilation), primfunc_name_hint="dwconv2d_nhwc"),
                          name_hint=node.name)
        else:
            wp = pack_vnni_weight(wq, dot.lanes)
            stats.weights.append((wp, node.name))
            if not wide:
                stats.dot_layers.append(node.name)
            if dot.act == "int8":
                x, bias = shift_to_int8(bb, x, layer, layer.wq)
            block = WIDE_BLOCK if wide else PACKED_BLOCK
            acc = bb.emit(bb.call_te(vnni_conv2d_nhwc, x, const(wp), list(c.stride),
                                     list(c.dilation), block, primfunc_name_hint=block),
                          name_hint=node.name)
            if o_pad != o:
                acc = bb.emit(relax.op.strided_slice(acc, axes=[3], begin=[0], end=[o]))
        y = finish(imp, acc, layer, [1, 1, 1, -1], bias)
        return twins.to_nchw(node, bb, y)

    def conv(node: fx.Node, imp: Any) -> Any:
        """conv1d/2d/3d: the same integer algebra over any number of spatial dims."""
        c = ConvArgs.of(node)  # export drops trailing defaults; this normalizes them
        nd = len(c.stride)
        layer, why = match_int_layer(node, c.x, c.weight, c.bias, consts)
        if layer is None:
            stats.float_layers[node.name] = why
            record_float_weight(c.weight, node.name)
            return {1: imp._conv1d, 2: imp._conv2d, 3: imp._conv3d}[nd](node)
        bb = imp.block_builder
        xq, wq = imp.env[layer.x.q], imp.env[layer.w.q]
        stats.int_layers.append(node.name)
        o, i = layer.wq.shape[:2]
        zx = float(int(layer.x.zero_point))
        if nd == 2 and dot is not None and layer.x.dtype == torch.uint8:
            nhwc = nhwc_conv(node, imp, c, layer, o, i, zx)
            if nhwc is not None:
                return nhwc
        if any(c.padding):
            # pad with the input zero point: real-valued zero at the border (tvm_int_math)
            widths = [0, 0, 0, 0] + [p for p in c.padding for _ in (0, 1)]
            xq = bb.emit(relax.op.nn.pad(xq, widths, "constant", zx),
                         name_hint=f"{node.name}_pad")
        if nd != 2:
            op = relax.op.nn.conv1d if nd == 1 else relax.op.nn.conv3d
            acc = bb.emit(op(xq, wq, strides=list(c.stride), padding=[0] * nd,
                             dilation=list(c.dilation), groups=c.groups, out_dtype="int32"),
                          name_hint=node.name)
            stats.weights.append((layer.wq, node.name))
            return finish(imp, acc, layer, [1, -1] + [1] * nd)
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
        stats.int_layers.append(node.name)
        shape = node.meta["val"].shape if "val" in node.meta else None
        if dot is not None and layer.x.dtype == torch.uint8 and shape is not None:
            packed = packed_linear(node, imp, layer, [int(d) for d in shape])
            if packed is not None:
                return packed
        wt = bb.emit(relax.op.permute_dims(wq, [1, 0]))
        acc = bb.emit(relax.op.matmul(xq, wt, out_dtype="int32"), name_hint=node.name)
        stats.weights.append((layer.wq, node.name))
        return finish(imp, acc, layer, [-1])

    def packed_linear(node: fx.Node, imp: Any, layer: IntLayer, out_shape: list[int]) -> Any:
        """An int8 linear as a 1x1 packed conv over the rows (tvm_dot): [.., K] codes as
        NHWC [1, 1, rows, K], the weight [N, K] as [N, K, 1, 1]; None if the pair bound
        fails (AVX2)."""
        assert dot is not None
        bb = imp.block_builder
        n, k = layer.wq.shape
        rows = int(np.prod(out_shape[:-1]))
        n_pad, k_pad = -(-n // dot.lanes) * dot.lanes, -(-k // DOT_K) * DOT_K
        wq = np.zeros((n_pad, k_pad, 1, 1), np.int8)
        wq[:n, :k, 0, 0] = layer.wq
        wide = dot.pair_bound and not pairs_fit(wq)  # as in nhwc_conv
        if wide:
            stats.pair_bound_layers.append(node.name)
        x = bb.emit(relax.op.reshape(imp.env[layer.x.q], [1, 1, rows, k]))
        if k_pad != k:  # zero weights: any code works
            x = bb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, 0, 0, 0, k_pad - k], "constant", 0.0))
        bias = None
        if dot.act == "int8":
            x, bias = shift_to_int8(bb, x, layer, layer.wq[:, :, None, None])
        wp = pack_vnni_weight(wq, dot.lanes)
        stats.weights.append((wp, node.name))
        if not wide:
            stats.dot_layers.append(node.name)
        block = WIDE_BLOCK if wide else PACKED_BLOCK
        acc = bb.emit(bb.call_te(vnni_conv2d_nhwc, x, const(wp), [1, 1], [1, 1], block,
                                 primfunc_name_hint=block), name_hint=node.name)
        acc = bb.emit(relax.op.reshape(relax.op.strided_slice(acc, axes=[3], begin=[0],
                                                              end=[n]), out_shape))
        return finish(imp, acc, layer, [-1], bias)

    def matmul(node: fx.Node, imp: Any) -> Any:
        """Activation × activation (attention's Q·Kᵀ and P·V) from two per-tensor DQs: an
        exact int32 product of the zero-point-shifted codes, scaled by sa·sb once
        (tvm_int_math's algebra with both operands quantized)."""
        bb = imp.block_builder
        a, b = (match_dq(arg, consts) for arg in node.args[:2])
        ok = all(op is not None and op.axis is None and op.dtype in (torch.uint8, torch.int8)
                 for op in (a, b))
        if not ok:
            stats.float_layers[node.name] = "an input is not a per-tensor uint8/int8 dequantize"
            return bb.emit(relax.op.matmul(imp.env[node.args[0]], imp.env[node.args[1]]))
        assert a is not None and b is not None

        def shifted(op: Any) -> Any:
            v = bb.emit(relax.op.astype(imp.env[op.q], "int32"))
            zp = int(op.zero_point)
            return v if zp == 0 else bb.emit(relax.op.subtract(v, relax.const(zp, "int32")))

        acc = bb.emit(relax.op.matmul(shifted(a), shifted(b), out_dtype="int32"),
                      name_hint=node.name)
        stats.int_layers.append(node.name)
        y = bb.emit(relax.op.astype(acc, "float32"))
        return bb.emit(relax.op.multiply(y, relax.const(np.float32(a.scale) * np.float32(b.scale),
                                                         "float32")))

    def select(node: fx.Node, imp: Any) -> Any:
        # TVM 0.27 takes aten.select's index as is: x[..., -1] read element -1 as garbage
        # instead of the last one; normalize a negative index with the static size
        x, dim, index = node.args[:3]
        val = x.meta.get("val") if isinstance(x, fx.Node) else None
        if val is None or not isinstance(index, int) or not isinstance(dim, int):
            raise UnsupportedOpError(f"node {node.name!r}: select without static arguments")
        dim = dim % val.dim()
        if index < 0:
            index += int(val.shape[dim])
        return imp.block_builder.emit(relax.op.take(imp.env[x], relax.const(index, "int64"),
                                                    axis=dim))

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
        **(twins.defaults() if dot is not None else {}),
        "batch_norm.default": batch_norm,
        "quantize_per_tensor.default": twins.follow(quantize),
        "dequantize_per_tensor.default": twins.follow(dequantize),
        "dequantize_per_channel.default": dequantize,
        "conv1d.default": conv,
        "conv2d.default": conv,
        "conv3d.default": conv,
        "linear.default": linear,
        "matmul.default": matmul,
        "select.int": select,
    }


def to_relax(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], *,
             dot: DotPath | None = None) -> tuple[Any, LoweringStats]:
    """Export `gm` and import it into a Relax IRModule (integer layers where possible;
    `dot`: see `make_convert_map`)."""
    from tvm.relax.frontend.torch import from_exported_program

    ep = torch.export.export(gm, tuple(example_inputs))
    stats = LoweringStats(int_layers=[], float_layers={})
    try:
        mod = from_exported_program(ep, run_ep_decomposition=False,
                                    custom_convert_map=make_convert_map(ConstTable(ep), stats,
                                                                       dot=dot))
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
