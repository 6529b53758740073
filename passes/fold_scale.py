"""Fold a multiplication by a constant scalar into the linear/conv layer that produced the tensor.

    (x·Wᵀ + b) · s = x·(s·W)ᵀ + s·b

and a scalar commutes with every op that only moves or regroups values (view, reshape,
transpose, permute, unsqueeze, squeeze, contiguous), so the layer may sit behind a chain of
those. `x / s` is `x · (1/s)`. The case it exists for: the 1/√d of attention, which
`decompose_sdpa` puts on the queries, moves into the query projection, so Q·Kᵀ reads the
projection's output directly (one float Mul less between two integer kernels).

Skipped, with a reason: a scale that is a tensor (layer scale is per-channel: a different
algebra), a layer or chain node with other users (they would see the scaled values), and a
layer whose weight/bias are not constants.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from quantflow.ir import CONV_OPS, LINEAR_OPS, ConvArgs, add_const, get_tensor, is_const
from quantflow.passes.driver import for_each, skip

aten = torch.ops.aten
PASS = "fold_scale"
_SCALE_OPS = (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar)
_MOVES = (aten.view.default, aten.reshape.default, aten.transpose.int, aten.permute.default,
          aten.unsqueeze.default, aten.squeeze.dim, aten.contiguous.default, aten._unsafe_view.default)


def _match(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in _SCALE_OPS and len(n.args) == 2 \
        and isinstance(n.args[0], fx.Node) and isinstance(n.args[1], (int, float)) \
        and not isinstance(n.args[1], bool)


def _rewrite(gm: fx.GraphModule, mul: fx.Node) -> bool:
    x, s = mul.args[0], float(mul.args[1])  # type: ignore[arg-type]
    if mul.target in (aten.div.Tensor, aten.div.Scalar):
        if s == 0.0:
            return skip(PASS, mul, "division by zero")
        s = 1.0 / s
    layer: Any = x
    while isinstance(layer, fx.Node) and layer.op == "call_function" and layer.target in _MOVES:
        if len(layer.users) != 1:
            return skip(PASS, mul, f"{layer.name} has other users; they would see scaled values")
        layer = layer.args[0]
    if not isinstance(layer, fx.Node):
        return skip(PASS, mul, "the scaled value is not computed by a node")
    if layer.op != "call_function" or layer.target not in CONV_OPS + LINEAR_OPS:
        return skip(PASS, mul, f"{layer.name} is not a conv/linear (nothing to fold into)")
    if len(layer.users) != 1:
        return skip(PASS, mul, f"{layer.name} has other users; they would see scaled values")
    is_conv = layer.target in CONV_OPS
    w_node: Any
    b_node: Any
    if is_conv:
        cargs = ConvArgs.of(layer)
        w_node, b_node = cargs.weight, cargs.bias
    else:
        w_node = layer.args[1]
        b_node = layer.args[2] if len(layer.args) > 2 else layer.kwargs.get("bias")
    if not is_const(w_node) or not (b_node is None or is_const(b_node)):
        return skip(PASS, mul, f"{layer.name} weight/bias are not constants")
    w = get_tensor(gm, w_node)  # type: ignore[arg-type]
    b = get_tensor(gm, b_node)  # type: ignore[arg-type]
    assert w is not None
    # new constants: the old weight may be shared with other layers
    w_const = add_const(gm, f"{layer.name}_weight_scaled", w * s, before=layer)
    b_const = None if b is None else add_const(gm, f"{layer.name}_bias_scaled", b * s,
                                               before=layer)
    if is_conv:
        cargs.weight, cargs.bias = w_const, b_const
        layer.args, layer.kwargs = cargs.args(), {}
    else:
        layer.args, layer.kwargs = (layer.args[0], w_const, b_const), {}
    mul.replace_all_uses_with(x)  # type: ignore[arg-type]
    gm.graph.erase_node(mul)
    return True


def fold_scale(gm: fx.GraphModule) -> bool:
    """Fold every scalar mul/div into the conv/linear behind it; whether any."""
    changed = for_each(gm, _match, lambda n: _rewrite(gm, n))
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed

