"""Merge a 1×1 conv into the conv that follows it: conv_K(conv_1x1(x)) → one K×K conv.

DBB's 1×1→K×K branch (and its 1×1→avg-pool branch once the pool is a conv) is two convs with
only per-channel affine maps and padding in between. A 1×1 conv commutes with spatial
sampling, so for a 1×1 conv (W1, groups g1, stride 1) followed by any conv (W2, stride s,
dilation d, groups g2):

    conv2(W1·x + β)  =  conv(x, W, b; s, P, d, gcd(g1, g2))
    W[o, i, k] = Σ_m W2[o, m, k] · W1[m, i]          (contract over middle channels)
    b[o]       = b2[o] + Σ_{m,k} W2[o, m, k] · β[m]

where W1·x + β is the intermediate conv2 reads (β: the 1×1 bias passed through any affine
ops: inference BN, + − × by per-channel constants, which also scale W1's rows).

The catch is the border. conv2 and any pad op in between pad the intermediate; the merged
conv pads x with zeros instead, which puts W·0 + b = Σ W2·β there, i.e. it behaves as if the
intermediate had been padded with β. So the merge is exact iff every padded ring of the
intermediate holds β:
  - the 1×1 conv's own padding: its border is its bias, β (always fine);
  - a pad op with value v, or a pad whose border strips are then overwritten with v (DBB's
    pad-aware BN, `BNAndPadLayer`, which pads with the BN's shift): need v = β (checked to a
    few ulps, since v and β are computed by different code from the same statistics);
  - conv2's own zero padding: needs β = 0 (a bias-free intermediate).
With plain zero padding and β ≠ 0 the borders differ, so the merge is refused. The merged
padding is the sum of all of them (symmetric pads only: aten conv padding is symmetric).

Refused, with the reason at debug level: the first conv is not 1×1 or has stride ≠ 1 (strided
sampling before a K×K conv is not a K×K conv of x), an intermediate has another user, a
nonlinearity or other non-affine op sits between, constants are not constant, border values
differ as above, or the merged conv would cost more MACs than the pair (a bottleneck:
C→M→C with M ≪ C; MobileNetV2's linear bottleneck followed by a 1×1 expansion is such a case).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from quantflow.ir import CONV_OPS
from quantflow.passes.driver import for_each, skip
from quantflow.passes.reparam_graph import (
    Constants,
    conv_constants,
    erase_dead,
    fake_val,
    make_conv,
)
from quantflow.passes.reparam_math import (
    F64,
    bias_through,
    bn_scale_shift,
    compose_pointwise,
    conv_macs,
    per_channel,
)

aten = torch.ops.aten
log = logging.getLogger("quantflow.passes")

_PAD_OPS = (aten.pad.default, aten.constant_pad_nd.default)
#: ulps of disagreement tolerated between a pad value and the bias it must equal
_ULPS = 16


@dataclass
class Step:
    """One node between the convs: y ↦ scale·y + shift, or a symmetric pad of `pad` pixels.

    For a pad, `rings` lists the per-channel values its border holds (the pad value and/or
    the values the border strips are overwritten with); `extra` are the overwrite nodes.
    """

    node: fx.Node
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    pad: tuple[int, ...] | None = None
    rings: list[torch.Tensor] = field(default_factory=list)
    extra: list[fx.Node] = field(default_factory=list)


def _pad_step(node: fx.Node, consts: Constants, channels: int, rank: int) -> Step | str:
    nd = rank - 2
    third = "mode" if node.target == aten.pad.default else "value"
    vals: dict[str, Any] = dict(zip(("self", "pad", third, "value"), node.args))
    vals.update(node.kwargs)
    if vals.get("mode", "constant") != "constant":
        return f"{node.name} pads in {vals['mode']!r} mode, not with a constant"
    pads = [int(p) for p in vals["pad"]]
    if len(pads) % 2 or len(pads) > 2 * nd:
        return f"{node.name} pads non-spatial dims"
    per_dim = [0] * nd
    for j in range(len(pads) // 2):
        left, right = pads[2 * j], pads[2 * j + 1]
        if left != right or left < 0:
            return f"{node.name} pads asymmetrically/negatively ({pads}); conv padding is symmetric"
        per_dim[nd - 1 - j] = left
    value = vals.get("value")
    step = Step(node, pad=tuple(per_dim))
    fill = per_channel(0.0 if value is None else value, channels, rank)
    assert fill is not None
    # users besides the chain: strips of the border overwritten in place (pad-aware BN)
    out = fake_val(node)
    covered: dict[tuple[int, int], torch.Tensor] = {}
    for user in node.users:
        if user.target != aten.slice.Tensor:
            continue
        got = _overwrite(user, out, per_dim, consts, channels, rank)
        if isinstance(got, str):
            return f"{node.name}: {got}"
        (dim, side), value, nodes = got
        covered[(dim, side)] = value
        step.extra += nodes
    # every side holds its overwrite value or the pad value; corners belong to strips of
    # two sides, so they hold one of these too
    for dim in range(2, rank):
        for side in (0, 1):
            if per_dim[dim - 2]:
                step.rings.append(covered.get((dim, side), fill))
    return step


def _full_range(start: Any, end: Any, size: Any) -> bool:
    """Whether slice [start:end] keeps a whole dim (size may be symbolic: batch)."""
    return start in (None, 0) and (end is None or end >= 2 ** 62 or
                                   isinstance(size, int) and end >= size)


def _overwrite(first: fx.Node, out: torch.Tensor | None, per_dim: list[int],
               consts: Constants, channels: int, rank: int
               ) -> tuple[tuple[int, int], torch.Tensor, list[fx.Node]] | str:
    """A chain of slices from the pad ending in `copy_(strip, value)`.

    Exactly one slice cuts a border strip [0:p] or [-p:] of a padded spatial dim; the others
    keep whole dims (`y[:, :, 0:p, :] = v` exports as such a chain). Returns ((dim, side),
    per-channel value, nodes to erase with the pad) or why not.
    """
    if out is None:
        return "unknown padded shape"
    nodes: list[fx.Node] = []
    strip: tuple[int, int] | None = None
    cur = first
    while cur.target == aten.slice.Tensor:
        sl: dict[str, Any] = dict(zip(("self", "dim", "start", "end", "step"), cur.args))
        sl.update(cur.kwargs)
        if sl.get("step", 1) != 1 or len(cur.users) != 1:
            return f"{cur.name} is not a border strip being overwritten"
        dim = int(sl.get("dim", 0)) % rank
        size = out.shape[dim]
        nodes.append(cur)
        cur = next(iter(cur.users))
        if _full_range(sl.get("start"), sl.get("end"), size):
            continue
        if dim < 2 or not per_dim[dim - 2] or strip is not None or not isinstance(size, int):
            return f"{nodes[-1].name} overwrites the interior"
        p = per_dim[dim - 2]
        lo, hi, _ = slice(sl.get("start"), sl.get("end")).indices(size)
        side = 0 if (lo, hi) == (0, p) else 1 if (lo, hi) == (size - p, size) else -1
        if side < 0:
            return f"{nodes[-1].name} is not exactly a border strip of width {p}"
        strip = (dim, side)
    if cur.target != aten.copy_.default or cur.args[0] is not nodes[-1] or cur.users:
        return f"{cur.name} is not an in-place copy into the strip"
    if strip is None:
        return f"{cur.name} overwrites the whole padded tensor"
    src = cur.args[1]
    while isinstance(src, fx.Node) and src.target == aten.expand.default and \
            not consts.is_const(src):
        src = src.args[0]  # expand to a (symbolic) batch size: copy_ broadcasts anyway
    value = per_channel(consts.value(src), channels, rank)
    if value is None:
        return f"{cur.name} does not fill its strip with a per-channel constant"
    return strip, value, [cur, *nodes]


def _affine_step(node: fx.Node, consts: Constants, channels: int, rank: int
                 ) -> tuple[Step, fx.Node] | str:
    """(step, input) for BN / ± / × by per-channel constants."""
    t = node.target
    if t == aten.batch_norm.default:
        a: dict[str, Any] = dict(zip(("input", "weight", "bias", "running_mean", "running_var",
                                      "training", "momentum", "eps"), node.args))
        a.update(node.kwargs)
        if a.get("training"):
            return f"{node.name} is a BN in training mode"
        stats = [consts.value(a.get(k)) for k in ("weight", "bias", "running_mean",
                                                  "running_var")]
        if stats[2] is None or stats[3] is None or \
                any(a.get(k) is not None and v is None
                    for k, v in zip(("weight", "bias"), stats[:2])):
            return f"{node.name} has non-constant BN parameters"
        s, sh = bn_scale_shift(stats[2], stats[3], float(a.get("eps", 1e-5)), stats[0],
                               stats[1])
        return Step(node, scale=s, shift=sh), a["input"]
    if t not in (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor):
        return f"{node.name} ({t}) is not a per-channel affine op or a pad"
    if node.kwargs.get("alpha", 1) != 1 or len(node.args) != 2:
        return f"{node.name} has alpha != 1"
    x, c = node.args
    swapped = not isinstance(x, fx.Node) or consts.is_const(x)
    if swapped:
        x, c = c, x
    if not isinstance(x, fx.Node) or consts.is_const(x):
        return f"{node.name} has no activation operand"
    cv = per_channel(consts.value(c) if isinstance(c, fx.Node) else c, channels, rank)
    if cv is None:
        return f"{node.name}'s other operand is not a per-channel constant"
    one = torch.ones(channels, dtype=F64)
    if t == aten.mul.Tensor:
        return Step(node, scale=cv, shift=torch.zeros_like(cv)), x
    if t == aten.add.Tensor:
        return Step(node, scale=one, shift=cv), x
    return (Step(node, scale=-one, shift=cv) if swapped else Step(node, scale=one, shift=-cv)), x


def _precedes(a: fx.Node, b: fx.Node) -> bool:
    """Whether a comes before b in graph order."""
    n = a.next
    while n.op != "root":
        if n is b:
            return True
        n = n.next
    return False


@dataclass
class ChainError:
    """Why the walk back stopped, where, and whether it had got past a conv's output."""

    reason: str
    node: fx.Node
    near_miss: bool


def pointwise_chain(consts: Constants, start: fx.Node, consumer: fx.Node, channels: int,
                    rank: int) -> tuple[fx.Node, list[Step]] | ChainError:
    """Walk back from `start` (read by `consumer`) through affine/pad nodes to a conv.

    Returns (conv, steps in forward order). Every node on the way must be read only by the
    next one (a pad also by its own border overwrites, which must precede the reader).
    """
    steps: list[Step] = []
    node, user = start, consumer

    def fail(why: str) -> ChainError:
        feeds = node.args[0] if node.op == "call_function" and node.args else None
        near = bool(steps) or node.target in CONV_OPS or \
            isinstance(feeds, fx.Node) and feeds.target in CONV_OPS
        return ChainError(why, node, near)

    while not (node.op == "call_function" and node.target in CONV_OPS):
        if node.op != "call_function":
            return fail(f"{node.name} is not produced by a conv")
        if node.target in _PAD_OPS:
            step = _pad_step(node, consts, channels, rank)
            if isinstance(step, str):
                return fail(step)
            nxt = node.args[0]
            late = [c for c in step.extra if c.target == aten.copy_.default
                    and not _precedes(c, user)]
            if late:
                return fail(f"{late[0].name} overwrites {node.name} after {user.name} read it")
        else:
            got = _affine_step(node, consts, channels, rank)
            if isinstance(got, str):
                return fail(got)
            step, nxt = got
        others = [u for u in node.users if u is not user and u not in step.extra]
        if others:
            return fail(f"{node.name} between the convs has other users ({others[0].name})")
        steps.append(step)
        if not isinstance(nxt, fx.Node):
            return fail(f"{node.name} has no tensor input")
        node, user = nxt, node
    if len(node.users) != 1:
        return fail(f"{node.name} has other users besides {user.name}")
    return node, steps[::-1]


def _close(a: torch.Tensor, b: torch.Tensor, magnitude: float, dtype: torch.dtype) -> bool:
    """a ≈ b to a few ulps of `magnitude`, the largest value they were computed from.

    The pad value and the bias are computed by different code (DBB's pad-aware BN vs fold_bn),
    and x − v + v style pads leave a residual of rounding size, not exactly zero.
    """
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    scale = max(magnitude, a.abs().max().item() if a.numel() else 0.0,
                b.abs().max().item() if b.numel() else 0.0)
    return bool(((a - b).abs() <= _ULPS * eps * scale).all())


def _merge_one(gm: fx.GraphModule, consts: Constants, conv2: fx.Node) -> bool:
    got2 = conv_constants(consts, conv2)
    if isinstance(got2, str):
        return False  # not a candidate; merge_parallel/others report non-constant weights
    a2, w2, b2 = got2
    rank = w2.dim()
    mid = w2.shape[1] * a2.groups
    if not isinstance(a2.x, fx.Node):
        return False
    chain = pointwise_chain(consts, a2.x, conv2, mid, rank)
    if isinstance(chain, ChainError):
        # report near misses only (e.g. conv→ReLU→conv), not every conv after an activation
        if chain.near_miss:
            return skip("merge_sequential_convs", conv2, chain.reason)
        return False
    conv1, steps = chain
    got1 = conv_constants(consts, conv1)
    if isinstance(got1, str):
        return skip("merge_sequential_convs", conv2, got1)
    a1, w1, b1 = got1
    if w1.dim() != rank or any(k != 1 for k in w1.shape[2:]):
        return skip("merge_sequential_convs", conv2,
                    f"{conv1.name} is not a 1x1 conv ({tuple(w1.shape[2:])})")
    if any(s != 1 for s in a1.stride):
        return skip("merge_sequential_convs", conv2,
                    f"{conv1.name} has stride {a1.stride}; strided sampling before a "
                    "spatial conv is not one conv of the input")
    if w1.shape[0] != mid:
        return skip("merge_sequential_convs", conv2,
                    f"{conv1.name} has {w1.shape[0]} output channels, {conv2.name} reads {mid}")
    dtype = w2.dtype
    scale = torch.ones(mid, dtype=F64)
    beta = torch.zeros(mid, dtype=F64) if b1 is None else b1.to(F64)
    padding = list(a1.padding)           # the 1x1's own border holds its bias: fine
    magnitude = beta.abs().max().item() if mid else 0.0
    for st in steps:
        if st.scale is not None and st.shift is not None:
            scale, beta = scale * st.scale, beta * st.scale + st.shift
            magnitude = max(magnitude * st.scale.abs().max().item(),
                            st.shift.abs().max().item(), beta.abs().max().item())
            continue
        assert st.pad is not None
        for ring in st.rings:
            if not _close(ring, beta, magnitude, dtype):
                return skip("merge_sequential_convs", conv2,
                            f"{st.node.name} pads with values that differ from the "
                            "intermediate's bias; the merged conv's borders would differ")
        padding = [p + q for p, q in zip(padding, st.pad)]
    if any(a2.padding) and not _close(beta, torch.zeros_like(beta), magnitude, dtype):
        return skip("merge_sequential_convs", conv2,
                    f"{conv2.name} zero-pads an intermediate that carries a nonzero bias "
                    f"(from {conv1.name}); the merged conv's borders would differ")
    padding = [p + q for p, q in zip(padding, a2.padding)]
    c_in = w1.shape[1] * a1.groups
    gc = math.gcd(a1.groups, a2.groups)
    ratio = math.prod(a2.stride)
    before = conv_macs(mid, c_in, a1.groups, (1,)) * ratio + \
        conv_macs(w2.shape[0], mid, a2.groups, w2.shape[2:])
    after = conv_macs(w2.shape[0], c_in, gc, w2.shape[2:])
    if after > before:
        return skip("merge_sequential_convs", conv2,
                    f"merging {conv1.name} into it would cost {after} MACs/pixel instead of "
                    f"{before}")
    w1s = w1.to(F64) * scale.reshape(-1, *([1] * (rank - 1)))
    w, groups = compose_pointwise(w1s, a1.groups, w2.to(F64), a2.groups)
    b = bias_through(w2, a2.groups, beta)
    if b2 is not None:
        b = b + b2.to(F64)
    x = a1.x
    assert isinstance(x, fx.Node)
    conv = make_conv(gm, x, w.to(dtype), b.to(dtype), a2.stride, tuple(padding), a2.dilation,
                     groups, before=conv2, hint=f"{conv2.name}_seq", like=conv2)
    conv2.replace_all_uses_with(conv)
    log.debug("merge_sequential_convs: %s -> %s merged into %s (padding %s)",
              conv1.name, conv2.name, conv.name, padding)
    extra = [n for st in steps for n in st.extra]
    erase_dead(gm, [conv2, *extra, *[st.node for st in steps], conv1])
    return True


def merge_sequential_convs(gm: fx.GraphModule) -> bool:
    """Merge every 1×1 conv (through affine/pad-with-bias ops) into the conv that follows."""
    consts = Constants(gm)
    return for_each(gm, lambda node: node.op == "call_function" and node.target in CONV_OPS,
                    lambda conv2: _merge_one(gm, consts, conv2))
