"""Turn identity-like branches into convs so they can merge with their sibling convs.

`bn_to_conv`: an inference BN is the per-channel affine map BN(x) = s·x + t with
s = γ/√(σ²+ε), t = β − μ·s. That is a 1×1 conv of x with the identity kernel scaled by s and
bias t: W[o, o mod (C/g)] = s[o] (groups g). RepVGG's and MobileOne's identity branch is such a
BN standing alone on x, summed with convs of x; as a conv it merges with them
(`merge_parallel_convs`). The rule: convert a BN only when
  - its input is not a conv used only by it (that pair is `fold_bn`'s: folding it is cheaper),
  - its output is only a summand of an add, and
  - another summand of that add is a conv of the same input that the identity can join:
    stride 1, C_in = C_out = C, output centred on the input pixels.
The identity kernel takes that sibling's groups, so the merge sees equal groups. A lone BN in
a plain network (no such sibling) is left alone (for `fold_bn`, or kept): as a conv it would
cost C²/g MACs per pixel instead of 2C.

`avgpool_to_conv`: avg-pooling with kernel k, stride s, padding p, count_include_pad=True
(every window divides by |k|, zero padding included) and floor output sizes is the conv with
kernel W[o, o mod (C/g)] = 1/|k| at every tap (or 1/divisor_override), stride s, padding p.
DBB's average-pooling branch becomes a conv that way; the BN after it then folds (`fold_bn`)
and the branch merges (`merge_sequential_convs` when a 1×1 conv precedes it, then
`merge_parallel_convs`). Same rule: only when the pool (optionally followed by BN) is a
summand next to a conv reading the pool's input, or the input of the 1×1 conv (through
affine/pad ops) that feeds the pool; its groups are that sibling's. ceil_mode and
count_include_pad=False with padding are refused (border windows divide by fewer elements).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import fx

from quantflow.ir import CONV_OPS, ConvArgs
from quantflow.passes.driver import for_each, skip
from quantflow.passes.reparam_graph import (
    Constants,
    conv_constants,
    enclosing_add_tree,
    erase_dead,
    fake_val,
    geometry,
    make_conv,
    through_single_bn,
)
from quantflow.passes.reparam_math import bn_scale_shift, identity_kernel
from quantflow.passes.reparam_sequential import pointwise_chain

aten = torch.ops.aten
log = logging.getLogger("quantflow.passes")

_BN_NAMES = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum",
             "eps", "cudnn_enabled")
_POOL_NAMES = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
               "divisor_override")
_POOLS = {aten.avg_pool2d.default: 2, aten.avg_pool1d.default: 1}


Placement = tuple[tuple[int, ...], tuple[int, ...]]   # (stride, 2·centre offset) per dim


def _sibling(consts: Constants, leaves: list[Any], wants: dict[fx.Node, Placement],
             channels: int, square: bool) -> tuple[fx.Node, torch.Tensor, int] | str:
    """(conv, weight, groups) of a summand conv that our branch, as a conv, would merge with.

    `wants` maps each input the sibling may read to the stride and centre offset our branch
    has relative to it; `square` asks for C_in = C_out (an identity map of the same input).
    """
    why = "no other summand is a conv reading the same input"
    for leaf in leaves:
        conv = through_single_bn(leaf)
        if not (isinstance(conv, fx.Node) and conv.op == "call_function"
                and conv.target in CONV_OPS):
            continue
        got = conv_constants(consts, conv)
        if isinstance(got, str):
            why = got
            continue
        args, w, _ = got
        if not isinstance(args.x, fx.Node) or args.x not in wants:
            continue
        stride, centre2 = wants[args.x]
        c_in = w.shape[1] * args.groups
        if w.shape[0] != channels:
            why = f"sibling {conv.name} has {w.shape[0]} output channels, not {channels}"
        elif args.stride != stride:
            why = f"sibling {conv.name} has stride {args.stride}, this branch {stride}"
        elif square and c_in != channels:
            why = f"sibling {conv.name} maps {c_in} to {w.shape[0]} channels"
        elif geometry(args, w).centre2() != centre2:
            why = f"sibling {conv.name} samples other pixels (centre offsets differ)"
        else:
            return conv, w, args.groups
    return why


def _bn_one(gm: fx.GraphModule, consts: Constants, bn: fx.Node) -> bool:
    a: dict[str, Any] = dict(zip(_BN_NAMES, bn.args))
    a.update(bn.kwargs)
    x = a["input"]
    if not isinstance(x, fx.Node):
        return skip("bn_to_conv", bn, "input is not a tensor node")
    if x.op == "call_function" and x.target in CONV_OPS and len(x.users) == 1:
        return skip("bn_to_conv", bn,
                    f"its input {x.name} is a conv used only by it: left to fold_bn")
    if a.get("training"):
        return skip("bn_to_conv", bn, "training mode uses batch statistics")
    tree = enclosing_add_tree(bn)
    if tree is None:
        return skip("bn_to_conv", bn,
                    "not a summand of an add (a lone BN is left to fold_bn, or kept)")
    mean, var = consts.value(a.get("running_mean")), consts.value(a.get("running_var"))
    gamma, beta = consts.value(a.get("weight")), consts.value(a.get("bias"))
    if mean is None or var is None or (a.get("weight") is not None and gamma is None) or \
            (a.get("bias") is not None and beta is None):
        return skip("bn_to_conv", bn, "BN parameters are not constants")
    channels = mean.numel()
    val = fake_val(bn)
    if val is None or val.dim() < 3:
        return skip("bn_to_conv", bn, "unknown rank, or no spatial dims")
    nd = val.dim() - 2
    leaves = [leaf for leaf in tree.leaves if leaf is not bn]
    found = _sibling(consts, leaves, {x: ((1,) * nd, (0,) * nd)}, channels, square=True)
    if isinstance(found, str):
        return skip("bn_to_conv", bn, f"nothing to merge with: {found}")
    conv, w, groups = found
    s, t = bn_scale_shift(mean, var, float(a.get("eps", 1e-5)), gamma, beta)
    kernel = identity_kernel(channels, groups, (1,) * nd, s, w.dtype)
    new = make_conv(gm, x, kernel, t.to(w.dtype), (1,) * nd, (0,) * nd, (1,) * nd, groups,
                    before=bn, hint=f"{bn.name}_as_conv", like=bn)
    bn.replace_all_uses_with(new)
    erase_dead(gm, [bn])
    log.debug("bn_to_conv: %s -> identity conv %s (groups %d, to merge with %s)",
              bn.name, new.name, groups, conv.name)
    return True


def bn_to_conv(gm: fx.GraphModule) -> bool:
    """Rewrite standalone BN branches that are summed with sibling convs as 1×1 convs."""
    consts = Constants(gm)
    return for_each(
        gm, lambda node: node.op == "call_function" and node.target == aten.batch_norm.default,
        lambda bn: _bn_one(gm, consts, bn))


def _tuple(v: Any, nd: int) -> tuple[int, ...]:
    t = (int(v),) * nd if isinstance(v, int) else tuple(int(i) for i in v)
    return t * nd if len(t) == 1 else t


def _pool_one(gm: fx.GraphModule, consts: Constants, pool: fx.Node) -> bool:
    nd = _POOLS[pool.target]  # type: ignore[index]
    a: dict[str, Any] = dict(zip(_POOL_NAMES, pool.args))
    a.update(pool.kwargs)
    x = a["input"]
    kernel = _tuple(a["kernel_size"], nd)
    stride = _tuple(a.get("stride") or kernel, nd)
    padding = _tuple(a.get("padding", 0), nd)
    if a.get("ceil_mode"):
        return skip("avgpool_to_conv", pool,
                    "ceil_mode: the last window may be partial and divide by fewer elements")
    if not a.get("count_include_pad", True) and any(padding):
        return skip("avgpool_to_conv", pool,
                    "count_include_pad=False: border windows divide by fewer elements")
    val = fake_val(pool)
    if not isinstance(x, fx.Node) or val is None or val.dim() != nd + 2:
        return skip("avgpool_to_conv", pool, "unknown input/output shape")
    channels = int(val.shape[1])
    # the branch may continue with a BN before it is summed
    tip = pool
    while len(tip.users) == 1 and next(iter(tip.users)).target == aten.batch_norm.default:
        tip = next(iter(tip.users))
    tree = enclosing_add_tree(tip)
    if tree is None:
        return skip("avgpool_to_conv", pool, "not on a branch summed with convs (kept as a pool)")
    # where the pool samples, relative to its input, or to the input of a 1x1 conv feeding it
    # through affine/pad ops (its padding then adds to the pool's once they are merged)
    centre2 = tuple(2 * p - (k - 1) for k, p in zip(kernel, padding))
    wants: dict[fx.Node, Placement] = {x: (stride, centre2)}
    chain = pointwise_chain(consts, x, pool, channels, nd + 2)
    if isinstance(chain, tuple):
        first = ConvArgs.of(chain[0])
        extra = [sum(q) for q in zip(first.padding, *(st.pad for st in chain[1]
                                                      if st.pad is not None))]
        if isinstance(first.x, fx.Node):
            wants[first.x] = (stride, tuple(c + 2 * e for c, e in zip(centre2, extra)))
    leaves = [leaf for leaf in tree.leaves if leaf is not tip]
    found = _sibling(consts, leaves, wants, channels, square=False)
    if isinstance(found, str):
        return skip("avgpool_to_conv", pool, f"nothing to merge with: {found}")
    conv, w, groups = found
    if channels % groups:
        return skip("avgpool_to_conv", pool,
                    f"{channels} channels do not split into the sibling's {groups} groups")
    divisor = a.get("divisor_override") or math.prod(kernel)
    weight = identity_kernel(channels, groups, kernel, 1.0 / divisor, w.dtype)
    new = make_conv(gm, x, weight, None, stride, padding, (1,) * nd, groups, before=pool,
                    hint=f"{pool.name}_as_conv", like=pool)
    pool.replace_all_uses_with(new)
    erase_dead(gm, [pool])
    log.debug("avgpool_to_conv: %s -> conv %s (groups %d, to merge with %s)",
              pool.name, new.name, groups, conv.name)
    return True


def avgpool_to_conv(gm: fx.GraphModule) -> bool:
    """Rewrite average pools on branches summed with convs as constant-kernel convs."""
    consts = Constants(gm)
    return for_each(gm, lambda node: node.op == "call_function" and node.target in _POOLS,
                    lambda pool: _pool_one(gm, consts, pool))
