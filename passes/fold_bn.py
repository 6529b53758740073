"""Fold inference-mode batch norm into the conv / linear that feeds it.

At inference a batch norm is a per-channel affine map of its input y:

    BN(y)_c = γ_c · (y_c − μ_c) / sqrt(σ²_c + ε) + β_c = a_c · y_c + (β_c − a_c · μ_c),
    a_c = γ_c / sqrt(σ²_c + ε)

and y_c = W_c ⋆ x + b_c depends on output channel c of the weight only (for any stride,
padding, dilation and groups, because a grouped conv's output channel c still reads exactly
one slice W[c] of the weight). So BN(y) is the same layer with

    W'_c = a_c · W_c,    b'_c = a_c · (b_c − μ_c) + β_c        (b_c = 0 when bias is None,
                                                                 γ = 1, β = 0 when affine=False)

which is exact up to rounding. We compute it in float64 and round once to the weight dtype.
For `linear` the channel is axis 0 of the [out, in] weight and BatchNorm1d normalizes dim 1 of
its input, which is the linear's output feature only when that output is 2-D (N, C); for a
(N, L, C) output dim 1 is L, so we fold only rank-2 linear outputs.

Skipped (logged at debug level with the reason): the layer output has other users besides the
BN (folding would change what they see), weights/BN parameters are not constants, BN in training
mode (uses batch statistics), unknown output rank, channel-count mismatch. A standalone BN is
left for `reparam_bn_branch`.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from quantflow.ir import BN_OPS, CONV_OPS, LINEAR_OPS, ConvArgs, add_const, get_tensor, is_const
from quantflow.passes.driver import for_each, skip
from quantflow.passes.reparam_math import F64, bn_scale_shift

aten = torch.ops.aten

#: schema argument names, to read args and kwargs alike (export may pass either)
_BN_ARG_NAMES: dict[Any, tuple[str, ...]] = {
    aten.batch_norm.default: ("input", "weight", "bias", "running_mean", "running_var",
                              "training", "momentum", "eps", "cudnn_enabled"),
    aten._native_batch_norm_legit_no_training.default: ("input", "weight", "bias",
                                                         "running_mean", "running_var",
                                                         "momentum", "eps"),
}


def fold_bn_weights(w: torch.Tensor, b: torch.Tensor | None, mean: torch.Tensor,
                    var: torch.Tensor, eps: float, gamma: torch.Tensor | None,
                    beta: torch.Tensor | None, axis: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') of the layer followed by the inference BN; channel along `axis` of `w`.

    With BN(y) = a·y + t (`bn_scale_shift`): W' = a·W, b' = a·b + t. Computed in float64,
    returned in w's dtype. Never mutates its inputs.
    """
    a, t = bn_scale_shift(mean, var, eps, gamma, beta)
    shape = [1] * w.dim()
    shape[axis] = -1
    w_new = w.to(F64) * a.reshape(shape)
    b_new = t if b is None else a * b.to(F64) + t
    return w_new.to(w.dtype), b_new.to(w.dtype)


def _bn_args(node: fx.Node) -> dict[str, Any]:
    names = _BN_ARG_NAMES[node.target]
    vals: dict[str, Any] = dict(zip(names, node.args))
    vals.update(node.kwargs)
    vals.setdefault("eps", 1e-5)
    vals.setdefault("training", False)
    return vals


def _rank(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else None


def _bn_outputs(bn: fx.Node) -> list[fx.Node] | None:
    """Nodes that carry the BN's normalized output (itself, or its getitem-0 users).

    None when part of the BN's tuple output other than the normalized tensor is used.
    """
    if bn.target == aten.batch_norm.default:
        return [bn]
    outs = []
    for user in bn.users:
        if user.target is not operator.getitem:
            return None
        if user.args[1] == 0:
            outs.append(user)
        elif user.users:  # save_mean / save_invstd actually consumed
            return None
    return outs


def _fold_one(gm: fx.GraphModule, bn: fx.Node) -> bool:
    args = _bn_args(bn)
    layer = args["input"]
    if not isinstance(layer, fx.Node) or layer.op != "call_function" or \
            layer.target not in CONV_OPS + LINEAR_OPS:
        return skip("fold_bn", bn,
                    "input is not a conv/linear (standalone BN: left to reparam_bn_branch)")
    if len(layer.users) != 1:
        return skip("fold_bn", bn,
                    f"{layer.name} has other users; folding would change what they see")
    if args["training"]:
        return skip("fold_bn", bn, "training=True uses batch statistics, not the running ones")
    outs = _bn_outputs(bn)
    if outs is None:
        return skip("fold_bn", bn, "saved mean/invstd outputs are used")
    params = [args["weight"], args["bias"], args["running_mean"], args["running_var"]]
    if not all(p is None or is_const(p) for p in params) or args["running_mean"] is None \
            or args["running_var"] is None:
        return skip("fold_bn", bn, "BN parameters/statistics are not constants")
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
        return skip("fold_bn", bn, f"{layer.name} weight/bias are not constants")
    w = get_tensor(gm, w_node)
    assert w is not None
    # the BN normalizes dim 1: the layer's channel only for a batched conv / 2-D linear output
    want_rank = w.dim() if is_conv else 2
    rank = _rank(layer)
    if rank != want_rank:
        return skip("fold_bn", bn, f"{layer.name} output rank {rank} (need {want_rank}): BN dim 1 "
                    "would not be the layer's output channel")
    mean, var = get_tensor(gm, args["running_mean"]), get_tensor(gm, args["running_var"])
    assert mean is not None and var is not None
    if mean.numel() != w.shape[0]:
        return skip("fold_bn", bn,
                    f"{mean.numel()} BN channels vs {w.shape[0]} output channels of {layer.name}")
    w_new, b_new = fold_bn_weights(w, get_tensor(gm, b_node), mean, var, float(args["eps"]),
                                   get_tensor(gm, args["weight"]), get_tensor(gm, args["bias"]))
    # new constants: the old weight may be a Parameter shared with other layers
    w_const = add_const(gm, f"{layer.name}_weight_bnfold", w_new, before=layer)
    b_const = add_const(gm, f"{layer.name}_bias_bnfold", b_new, before=layer)
    if is_conv:
        cargs.weight, cargs.bias = w_const, b_const
        layer.args, layer.kwargs = cargs.args(), {}
    else:
        layer.args, layer.kwargs = (layer.args[0], w_const, b_const), {}
    for out in outs:
        out.replace_all_uses_with(layer)
    for user in list(bn.users):  # remaining getitems of the tuple form
        gm.graph.erase_node(user)
    gm.graph.erase_node(bn)
    return True


def fold_bn(gm: fx.GraphModule) -> bool:
    """Fold every inference BN whose input is a conv/linear used only by that BN."""
    return for_each(gm, lambda node: node.op == "call_function" and node.target in BN_OPS,
                    lambda bn: _fold_one(gm, bn))
