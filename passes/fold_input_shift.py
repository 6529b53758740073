"""Fold a constant added to a linear's input into the linear's bias.

A linear reads its input along the last axis: L(y + β) = (y + β)·Wᵀ + b = y·Wᵀ + (W·β + b)
when β is constant along that axis and broadcast over the others (it must not enlarge y). So

    linear(y + β, W, b)  =  linear(y, W, b + W·β)               (exact; float64, one rounding)

This is GRN's β (ConvNeXt V2 / UniRepLKNet: `(γ·N(x) + 1)·x + β` before the second linear),
which the official UniRepLKNet `reparameterize()` projects into that linear's bias: one float
Add fewer between the quantized ops. Convs are not handled (a zero-padded border would see
β·0 instead of β). Skipped, with the reason: the sum has other users, β is not per-feature
(or a scalar) along the last axis or broadcasts y larger, non-constant weights.
"""

from __future__ import annotations

import torch
from torch import fx

from quantflow.ir import LINEAR_OPS, add_const
from quantflow.passes.driver import for_each, skip
from quantflow.passes.reparam_graph import Constants, fake_val
from quantflow.passes.reparam_math import F64

aten = torch.ops.aten
_NAME = "fold_input_shift"


def _rewrite(gm: fx.GraphModule, consts: Constants, lin: fx.Node) -> bool:
    add = lin.args[0]
    if not isinstance(add, fx.Node) or add.target != aten.add.Tensor or len(add.args) != 2 \
            or add.kwargs:
        return skip(_NAME, lin, "input is not a two-operand add")
    if len(add.users) != 1:
        return skip(_NAME, lin, f"{add.name} has other users")
    a, b = add.args
    y, c_node = (b, a) if consts.is_const(a) or not isinstance(a, fx.Node) else (a, b)
    if isinstance(c_node, (int, float)):
        beta = torch.tensor([float(c_node)], dtype=F64)
    else:
        got = consts.value(c_node)
        if got is None:
            return skip(_NAME, lin, f"neither operand of {add.name} is a constant")
        beta = got.to(F64)
    yv, av = fake_val(y), fake_val(add)
    if yv is None or av is None or tuple(yv.shape) != tuple(av.shape):
        return skip(_NAME, lin, "the constant broadcasts the input to a larger shape")
    if any(n != 1 for n in beta.shape[:-1]):
        return skip(_NAME, lin, f"constant of shape {tuple(beta.shape)} varies along "
                    "more than the input features")
    w = consts.value(lin.args[1])
    b_node = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
    bias = consts.value(b_node) if b_node is not None else None
    if w is None or (b_node is not None and bias is None):
        return skip(_NAME, lin, "weight/bias are not constants")
    vec = beta.reshape(-1).expand(w.shape[1])
    shift = w.to(F64) @ vec
    b_new = (shift if bias is None else bias.to(F64) + shift).to(w.dtype)
    b_c = add_const(gm, f"{lin.name}_bias_shift", b_new, before=lin)
    lin.args, lin.kwargs = (y, lin.args[1], b_c), {}
    gm.graph.erase_node(add)
    return True


def fold_input_shift(gm: fx.GraphModule) -> bool:
    """Fold `linear(y + β)` with constant per-feature β into the linear's bias."""
    consts = Constants(gm)
    return for_each(gm, lambda n: n.op == "call_function" and n.target in LINEAR_OPS,
                    lambda n: _rewrite(gm, consts, n))
