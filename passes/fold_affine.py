"""Fold a per-channel affine op that follows a conv / linear, also behind a permute, into it.

The ops: an inference BatchNorm, a multiplication by a constant (ConvNeXt / UniRepLKNet layer
scale `γ · y`), an addition of a constant. Each is z = s ⊙ y + t with s, t constant along one
axis j of its input y and broadcast over the others (BN: j = 1, s = γ/√(σ²+ε), t = β − s·μ).
When y = P(L(x)), L a conv (output channel axis 1) or linear (axis −1) and P a permute (or
none), axis j of y is axis P[j] of L's output, and an affine op along L's output channel c is
the layer with

    W'_c = s_c · W_c,    b'_c = s_c · b_c + t_c               (b = 0 without a bias)

so z = P(L'(x)) exactly (up to one rounding; computed in float64). The map distributes over a
sum of two layers, s ⊙ (L1(x1) + L2(x2)) + t = L1'(x1) + L2''(x2) with W' = s·W in both and
the shift t added to the first bias only (a KAN-Legendre conv: BN(base conv + basis conv)).
This is the BN that
UniRepLKNet puts after `Linear → NHWC-to-NCHW permute`, and the layer scale after it, which the
official `reparameterize()` folds into the linear.

A BN directly on a conv/linear is `fold_bn`'s (it also covers the 2-D linear case); here a BN
is taken only behind a permute. Skipped, with the reason: the layer or permute has other
users, non-constant weights, a constant that is not per-channel along one axis or that
broadcasts the tensor to a larger shape, an axis that is not the layer's output channel, a
BN in training mode or with its saved statistics used.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from quantflow.ir import BN_OPS, CONV_OPS, LINEAR_OPS, ConvArgs, add_const
from quantflow.passes.driver import for_each, skip
from quantflow.passes.fold_bn import _bn_args, _bn_outputs
from quantflow.passes.reparam_graph import Constants, fake_val
from quantflow.passes.reparam_math import F64, bn_scale_shift

aten = torch.ops.aten
_NAME = "fold_affine"
_MUL = (aten.mul.Tensor,)
_ADD = (aten.add.Tensor,)


def _layers_behind(node: Any) -> tuple[list[fx.Node], fx.Node, list[int]] | str:
    """(layers, the node carrying their result, permutation) when `node` is L(x),
    permute(L(x)) or L1(x1) + L2(x2) (a sum of two layers: the affine map distributes)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return "input is not a computed tensor"
    result = node
    perm_node = None
    layers = [node]
    if node.target == aten.permute.default:
        if len(node.users) != 1:
            return f"{node.name} has other users"
        perm_node, node = node, node.args[0]  # type: ignore[assignment]
        if not isinstance(node, fx.Node):
            return "permute of a non-node"
        layers = [node]
    elif node.target == aten.add.Tensor and len(node.args) == 2 and not node.kwargs \
            and all(isinstance(a, fx.Node) for a in node.args):
        if len(node.users) != 1:
            return f"{node.name} has other users"
        layers = list(node.args)  # type: ignore[arg-type]
        if len(set(layers)) != 2:
            return f"{node.name} adds a tensor to itself"
    for layer in layers:
        if layer.target not in CONV_OPS + LINEAR_OPS:
            return f"{layer.name} is not a conv/linear"
        if len(layer.users) != 1:
            return f"{layer.name} has other users; folding would change what they see"
    if len({layer.target for layer in layers}) != 1:
        return "a sum of a conv and a linear"
    vals = [fake_val(layer) for layer in layers]
    shapes = [[str(d) for d in v.shape] for v in vals if v is not None]
    if len(shapes) != len(vals) or any(sh != shapes[0] for sh in shapes):
        return "the layers' output shapes are unknown or differ"
    rank = vals[0].dim()  # type: ignore[union-attr]
    perm = list(range(rank)) if perm_node is None else \
        [int(p) % rank for p in perm_node.args[1]]  # type: ignore[union-attr,arg-type]
    return layers, result, perm


def _weights(consts: Constants, layer: fx.Node
             ) -> tuple[ConvArgs | None, torch.Tensor, torch.Tensor | None] | str:
    """(conv args or None for a linear, weight, bias) with constant weight/bias, or why not."""
    cargs = ConvArgs.of(layer) if layer.target in CONV_OPS else None
    w_node: Any
    b_node: Any
    if cargs is not None:
        w_node, b_node = cargs.weight, cargs.bias
    else:
        w_node = layer.args[1]
        b_node = layer.args[2] if len(layer.args) > 2 else layer.kwargs.get("bias")
    w = consts.value(w_node)
    b = consts.value(b_node) if b_node is not None else None
    if w is None or (b_node is not None and b is None):
        return f"{layer.name} weight/bias are not constants"
    return cargs, w, b


def _per_channel(c: torch.Tensor, rank: int) -> int | None:
    """The axis (of a rank-`rank` tensor) along which `c` varies; -1 for a scalar; None if
    it varies along more than one axis or has more dims than the tensor."""
    if c.dim() > rank:
        return None
    shape = [1] * (rank - c.dim()) + list(c.shape)
    axes = [i for i, n in enumerate(shape) if n != 1]
    if len(axes) > 1:
        return None
    return axes[0] if axes else -1


def _rewrite(gm: fx.GraphModule, consts: Constants, node: fx.Node) -> bool:
    is_bn = node.target in BN_OPS
    outs: list[fx.Node] = [node]
    if is_bn:
        args = _bn_args(node)
        y = args["input"]
        if args["training"]:
            return skip(_NAME, node, "BN in training mode uses batch statistics")
        got_outs = _bn_outputs(node)
        if got_outs is None:
            return skip(_NAME, node, "saved mean/invstd outputs are used")
        outs = got_outs
        stats = [consts.value(args[k]) if args[k] is not None else None
                 for k in ("weight", "bias", "running_mean", "running_var")]
        if any(v is None for v, k in zip(stats, ("weight", "bias", "running_mean",
                                                 "running_var")) if args[k] is not None) \
                or stats[2] is None or stats[3] is None:
            return skip(_NAME, node, "BN parameters/statistics are not constants")
        s, t = bn_scale_shift(stats[2], stats[3], float(args["eps"]), stats[0], stats[1])
        axis = 1
    else:
        a, b = node.args[0], node.args[1]
        if len(node.args) > 2 or node.kwargs:
            return skip(_NAME, node, "add with alpha")
        y, c_node = (b, a) if consts.is_const(a) or not isinstance(a, fx.Node) else (a, b)
        if isinstance(c_node, (int, float)):
            c = torch.tensor(float(c_node), dtype=F64)
        else:
            got = consts.value(c_node)
            if got is None:
                return skip(_NAME, node, "neither operand is a constant")
            c = got.to(F64)
        yv, zv = fake_val(y), fake_val(node)
        if yv is None or zv is None or tuple(yv.shape) != tuple(zv.shape):
            return skip(_NAME, node, "the constant broadcasts the tensor to a larger shape")
        found = _per_channel(c, yv.dim())
        if found is None:
            return skip(_NAME, node, f"constant of shape {tuple(c.shape)} is not per-channel")
        axis = found
        flat = c.reshape(-1)
        one = torch.ones_like(flat)
        s, t = (flat, 0 * flat) if node.target in _MUL else (one, flat)
    found_layer = _layers_behind(y)
    if isinstance(found_layer, str):
        return skip(_NAME, node, found_layer)
    layers, result, perm = found_layer
    if is_bn and result is layers[0]:
        return skip(_NAME, node, "BN directly on the layer: fold_bn's")
    rank = len(perm)
    chan = 1 if layers[0].target in CONV_OPS else rank - 1
    if axis != -1 and perm[axis] != chan:
        return skip(_NAME, node, f"axis {axis} is not {layers[0].name}'s output channel")
    found_w = [_weights(consts, layer) for layer in layers]
    for layer, g in zip(layers, found_w):
        if isinstance(g, str):
            return skip(_NAME, node, g)
        n_out = g[1].shape[0]
        if s.numel() not in (1, n_out) or t.numel() not in (1, n_out):
            return skip(_NAME, node, f"{s.numel()} channels vs {n_out} outputs of {layer.name}")
    for i, (layer, g) in enumerate(zip(layers, found_w)):
        assert not isinstance(g, str)
        cargs, w, b = g
        n_out = w.shape[0]
        s64 = s.to(F64).reshape(-1).expand(n_out)
        t64 = t.to(F64).reshape(-1).expand(n_out) * (1.0 if i == 0 else 0.0)  # shift once
        w_new = (w.to(F64) * s64.reshape([-1] + [1] * (w.dim() - 1))).to(w.dtype)
        b_new = (t64 if b is None else s64 * b.to(F64) + t64).to(w.dtype)
        w_c = add_const(gm, f"{layer.name}_weight_affine", w_new, before=layer)
        b_c = add_const(gm, f"{layer.name}_bias_affine", b_new, before=layer)
        if cargs is not None:
            cargs.weight, cargs.bias = w_c, b_c
            layer.args, layer.kwargs = cargs.args(), {}
        else:
            layer.args, layer.kwargs = (layer.args[0], w_c, b_c), {}
    for out in outs:
        out.replace_all_uses_with(result)
    for user in list(node.users):  # remaining getitems of a BN's tuple form
        gm.graph.erase_node(user)
    gm.graph.erase_node(node)
    return True


def fold_affine(gm: fx.GraphModule) -> bool:
    """Fold per-channel BN (behind a permute) / constant mul / constant add into the layer."""
    consts = Constants(gm)
    return for_each(gm, lambda n: n.op == "call_function" and n.target in BN_OPS + _MUL + _ADD,
                    lambda n: _rewrite(gm, consts, n))
