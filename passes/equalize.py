"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization through Weight
Equalization and Bias Correction", sec. 4.1).

Two consecutive layers y = W2 · f(W1 x + b1) + b2 with f positively homogeneous per channel
(f(x/s) = f(x)/s for s > 0: identity, ReLU, leaky ReLU) are unchanged by a per-channel scale
s_i > 0 applied as

    W1[i] ← W1[i] / s_i,   b1[i] ← b1[i] / s_i,   W2[:, i] ← W2[:, i] · s_i

(layer 1: output channel i, any groups; layer 2: input channel i, which for a grouped conv is
column i mod C/g of the output channels of group i div C/g; for a depthwise conv that is the
filter of channel i). With r1_i = max|W1[i]| and r2_i = max|W2[:, i]| the ranges become r1_i/s_i
and r2_i·s_i; both equal sqrt(r1_i·r2_i) — the choice that minimizes the loss of per-tensor
weight quantization precision in the paper — for

    s_i = sqrt(r1_i / r2_i) = (1 / r2_i) · sqrt(r1_i · r2_i)          (s_i = 1 if r1_i r2_i = 0).

Chains (conv → conv → conv, MobileNet's 1×1 → dw 3×3 → 1×1) share layers between pairs, so
we sweep all pairs (Gauss-Seidel, in graph order) until every pair's max_i |log s_i| < 1e-3;
a pair below that tolerance is not touched, so a second run finds nothing and returns False.
The arithmetic is float64, rounded once to the weight dtype when written back as new constants.

ReLU6 (`hardtanh(x, 0, 6)`, `clamp(x, 0, 6)`, `relu6(x)`) is not scale-equivariant: relu6(y)/s_i is
clamp(y/s_i, 0, 6/s_i), a per-channel bound. Design choice:
  - `equalize` (the default choice) does NOT equalize through ReLU6. It stays exact, and
    the ONNX graph keeps Conv → Clip(0, 6), which onnxruntime folds into the QLinearConv's
    output quantization; a per-channel bound cannot be an ONNX Clip (its min/max are scalars).
  - `equalize_relu6` is the explicit opt-in: it rewrites each ReLU6 it scales through into
    `minimum(relu(y), bound)` with a per-channel constant `bound` (shape [C, 1, 1] for conv2d),
    which is exactly relu6 of the unscaled input. Cost, checked with onnxruntime 1.31 on a QDQ
    Conv: with Clip(0, 6) it becomes one QLinearConv; with Relu → Min and no Q in between the
    conv falls back to float (FusedConv); with Q/DQ after the Relu, Conv+Relu is a QLinearConv
    and Min runs in float as DQ → Min → Q. So the quantizer must quantize the Relu output, and
    it is worth it only where per-tensor weight error dominates (MobileNetV2 with per-tensor
    int8 weights). Nagel et al. replace ReLU6 by ReLU instead, which is not output-equivalent
    and so not allowed for a pass here.
Both passes follow an existing `minimum(·, per-channel bound)` by scaling its bound.

Skipped (debug log): a layer output with several users (the other users would see the
scaled tensor), non-constant weights, mismatched channel counts, activations that are not
positively homogeneous, conv → linear (flatten in between).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from quantflow.ir import (
    CONV_ND,
    CONV_OPS,
    LINEAR_OPS,
    WEIGHTED_OPS,
    ConvArgs,
    add_const,
    get_tensor,
    is_const,
)
from quantflow.passes.cleanup import dead_code
from quantflow.passes.driver import skip

aten = torch.ops.aten
log = logging.getLogger("quantflow.passes")

#: stop when every pair's max_i |log s_i| is below this
TOL = 1e-3
MAX_ROUNDS = 100

_HOMOGENEOUS = (aten.relu.default, aten.relu_.default, aten.leaky_relu.default,
                aten.leaky_relu_.default)
#: F.relu6 exports as aten.relu6, nn.ReLU6 as hardtanh(x, 0, 6)
_CLIP = (aten.hardtanh.default, aten.hardtanh_.default, aten.clamp.default, aten.relu6.default)


# ----------------------------------------------------------------------------- pure math

def channel_ranges(w: torch.Tensor) -> torch.Tensor:
    """r1_i = max|W[i]| over output channel i (axis 0), float64."""
    return w.detach().to(torch.float64).abs().reshape(w.shape[0], -1).amax(dim=1)


def _grouped(w2: torch.Tensor, groups: int) -> torch.Tensor:
    """View [O, C/g, *k] as [g, O/g, C/g, *k] so that input channel i = (i div C/g, i mod C/g)."""
    return w2.reshape(groups, w2.shape[0] // groups, *w2.shape[1:])


def input_channel_ranges(w2: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """r2_i = max|W2[:, i]| over everything reading input channel i (conv or linear weight)."""
    g = _grouped(w2.detach().to(torch.float64).abs(), groups)
    dims = [1] + list(range(3, g.dim()))
    return g.amax(dim=dims).reshape(-1)


def equalization_scales(r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """s_i = sqrt(r1_i / r2_i), 1 where either range is 0 (dead channel: nothing to balance)."""
    ok = (r1 > 0) & (r2 > 0)
    return torch.where(ok, torch.sqrt(r1 / torch.where(ok, r2, 1.0)), torch.ones_like(r1))


def scale_out_channels(w: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """W[i] · inv_i along axis 0 (also for biases and per-channel bounds)."""
    return w * inv.reshape(-1, *([1] * (w.dim() - 1)))


def scale_in_channels(w2: torch.Tensor, s: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """W2[:, i] · s_i for input channel i of a (grouped) conv or linear weight."""
    g = _grouped(w2, groups)
    shape = [groups, 1, g.shape[2]] + [1] * (g.dim() - 3)
    return (g * s.reshape(shape)).reshape(w2.shape)


def equalize_pair(w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                  groups2: int = 1
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """One equalization step: (W1', b1', W2', s) with W1' = W1/s, b1' = b1/s, W2'[:, i] = W2 s_i.

    Returned in the inputs' dtypes; s in float64.
    """
    s = equalization_scales(channel_ranges(w1), input_channel_ranges(w2, groups2))
    f64 = torch.float64
    w1n = scale_out_channels(w1.to(f64), 1.0 / s).to(w1.dtype)
    b1n = None if b1 is None else (b1.to(f64) / s).to(b1.dtype)
    w2n = scale_in_channels(w2.to(f64), s, groups2).to(w2.dtype)
    return w1n, b1n, w2n, s


def range_spread(w: torch.Tensor) -> float:
    """max_i r_i / min_i r_i over the non-zero output-channel ranges: 1 is perfectly balanced."""
    r = channel_ranges(w)
    r = r[r > 0]
    return float(r.max() / r.min()) if r.numel() else 1.0


# ----------------------------------------------------------------------------- graph surgery

@dataclass
class _Pair:
    first: fx.Node
    acts: list[fx.Node]
    second: fx.Node


@dataclass
class _State:
    """Float64 working copies of everything the sweep rescales, keyed by node."""

    w: dict[fx.Node, torch.Tensor] = field(default_factory=dict)
    b: dict[fx.Node, torch.Tensor | None] = field(default_factory=dict)
    bound: dict[fx.Node, torch.Tensor] = field(default_factory=dict)
    touched: set[fx.Node] = field(default_factory=set)
    bias_touched: set[fx.Node] = field(default_factory=set)


def _weights(node: fx.Node) -> tuple[Any, Any, int]:
    """(weight, bias, groups) argument nodes of a conv/linear."""
    if node.target in CONV_OPS:
        c = ConvArgs.of(node)
        return c.weight, c.bias, c.groups
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return node.args[1], bias, 1


def _const(gm: fx.GraphModule, node: Any) -> torch.Tensor:
    """The tensor of a get_attr node (callers checked `is_const`)."""
    t = get_tensor(gm, node)
    assert t is not None
    return t


def _arg(node: fx.Node, i: int, name: str, default: object) -> object:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _clip_bound(node: fx.Node) -> float | None:
    """Upper bound M if node is the relu6-like clip(x, 0, M), M > 0."""
    if node.target == aten.relu6.default:
        return 6.0
    if node.target == aten.clamp.default:
        lo, hi = _arg(node, 1, "min", None), _arg(node, 2, "max", None)
    else:  # hardtanh(x, min_val=-1, max_val=1)
        lo, hi = _arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)
    if isinstance(lo, (int, float)) and lo == 0 and isinstance(hi, (int, float)) and hi > 0:
        return float(hi)
    return None


def _bound_shape(layer: fx.Node, channels: int) -> tuple[int, ...]:
    """Per-channel constant shape that broadcasts over the layer's output ([C,1,1] / [C])."""
    if layer.target in CONV_OPS:
        return (channels,) + (1,) * CONV_ND[layer.target]
    return (channels,)


def _find_pair(gm: fx.GraphModule, first: fx.Node, relu6: bool, st: _State) -> _Pair | None:
    def no_pair(why: str) -> _Pair | None:
        skip("equalize", first, why)
        return None

    w_node, b_node, _ = _weights(first)
    if not is_const(w_node) or not (b_node is None or is_const(b_node)):
        return no_pair("weight/bias are not constants")
    channels = _const(gm, w_node).shape[0]
    acts: list[fx.Node] = []
    cur = first
    while True:
        if len(cur.users) != 1:
            return no_pair(f"{cur.name} has {len(cur.users)} users; they would see scaled values")
        nxt = next(iter(cur.users))
        if nxt.op != "call_function":
            return no_pair(f"{cur.name} feeds {nxt.op} {nxt.name}")
        if nxt.target in WEIGHTED_OPS:
            break
        if nxt.target in _HOMOGENEOUS or (nxt.target == aten.clamp.default and
                                          _arg(nxt, 1, "min", None) == 0 and
                                          _arg(nxt, 2, "max", None) is None):
            acts.append(nxt)
        elif nxt.target in _CLIP and (hi := _clip_bound(nxt)) is not None:
            if not relu6:
                return no_pair(f"{nxt.name} is a ReLU6-style clip; use equalize_relu6 to "
                               "rewrite it into a per-channel bound")
            st.bound[nxt] = torch.full(_bound_shape(first, channels), hi, dtype=torch.float64)
            acts.append(nxt)
        elif nxt.target == aten.minimum.default and is_const(nxt.args[1]) and \
                tuple(_const(gm, nxt.args[1]).shape) == _bound_shape(first, channels):
            st.bound[nxt] = _const(gm, nxt.args[1]).to(torch.float64)
            acts.append(nxt)
        else:
            return no_pair(f"{nxt.name} ({nxt.target}) is not positively homogeneous")
        cur = nxt
    second = nxt
    same_family = (second.target == first.target) if first.target in CONV_OPS else \
        second.target in LINEAR_OPS
    if not same_family or second.args[0] is not cur:
        return no_pair(f"{second.name} ({second.target}) is not a matching consumer")
    w2_node, _, groups2 = _weights(second)
    if not is_const(w2_node):
        return no_pair(f"{second.name} weight is not a constant")
    w2 = get_tensor(gm, w2_node)
    assert w2 is not None
    if w2.shape[1] * groups2 != channels:
        return no_pair(f"{channels} channels vs {w2.shape[1] * groups2} inputs of {second.name}")
    for layer in (first, second):
        if layer not in st.w:
            wn, bn, _ = _weights(layer)
            st.w[layer] = _const(gm, wn).to(torch.float64)
            b = get_tensor(gm, bn)
            st.b[layer] = None if b is None else b.to(torch.float64)
    return _Pair(first, acts, second)


def _sweep(pairs: list[_Pair], st: _State) -> None:
    for _ in range(MAX_ROUNDS):
        applied = False
        for p in pairs:
            groups2 = _weights(p.second)[2]
            s = equalization_scales(channel_ranges(st.w[p.first]),
                                    input_channel_ranges(st.w[p.second], groups2))
            if float(s.log().abs().max()) < TOL:
                continue
            st.w[p.first] = scale_out_channels(st.w[p.first], 1.0 / s)
            b = st.b[p.first]
            st.b[p.first] = None if b is None else b / s
            for a in p.acts:
                if a in st.bound:
                    st.bound[a] = scale_out_channels(st.bound[a], 1.0 / s)
                    st.touched.add(a)
            st.w[p.second] = scale_in_channels(st.w[p.second], s, groups2)
            st.touched.update((p.first, p.second))
            st.bias_touched.add(p.first)
            applied = True
        if not applied:
            return
    log.warning("equalize: scales still moving after %d rounds; a second run may change the "
                "graph again", MAX_ROUNDS)


def _write_back(gm: fx.GraphModule, st: _State) -> None:
    for node in [n for n in gm.graph.nodes if n in st.touched]:  # deterministic order
        if node in st.w:
            w_node, b_node, _ = _weights(node)
            dtype = _const(gm, w_node).dtype
            w_c = add_const(gm, f"{node.name}_weight_cle", st.w[node].to(dtype), before=node)
            b = st.b[node]
            b_c = b_node if b is None or node not in st.bias_touched else \
                add_const(gm, f"{node.name}_bias_cle", b.to(dtype), before=node)
            if node.target in CONV_OPS:
                c = ConvArgs.of(node)
                c.weight, c.bias = w_c, b_c
                node.args, node.kwargs = c.args(), {}
            else:
                node.args, node.kwargs = (node.args[0], w_c, b_c), {}
        elif node.target == aten.minimum.default:
            old = node.args[1]
            assert isinstance(old, fx.Node)
            dtype = _const(gm, old).dtype
            node.update_arg(1, add_const(gm, f"{node.name}_bound_cle", st.bound[node].to(dtype),
                                         before=node))
        else:  # a ReLU6 clip, now clip(y/s, 0, 6/s) per channel: minimum(relu(y), bound)
            x = node.args[0]
            val = node.meta.get("val")
            dtype = val.dtype if isinstance(val, torch.Tensor) else torch.float32
            bound = add_const(gm, f"{node.name}_bound_cle", st.bound[node].to(dtype),
                              before=node)
            with gm.graph.inserting_before(node):
                relu = gm.graph.call_function(aten.relu.default, (x,))
                mini = gm.graph.call_function(aten.minimum.default, (relu, bound))
            relu.meta["val"] = mini.meta["val"] = val
            node.replace_all_uses_with(mini)
            gm.graph.erase_node(node)


def _equalize(gm: fx.GraphModule, relu6: bool) -> bool:
    st = _State()
    pairs = [p for n in gm.graph.nodes if n.op == "call_function" and n.target in WEIGHTED_OPS
             for p in [_find_pair(gm, n, relu6, st)] if p is not None]
    _sweep(pairs, st)
    _write_back(gm, st)
    if st.touched:  # the replaced weights would otherwise stay in the module (and its size)
        dead_code(gm)
    return bool(st.touched)


def equalize(gm: fx.GraphModule) -> bool:
    """Equalize conv/linear pairs joined by nothing, ReLU or leaky ReLU (not ReLU6)."""
    return _equalize(gm, relu6=False)


def equalize_relu6(gm: fx.GraphModule) -> bool:
    """`equalize`, also through ReLU6, rewritten into minimum(relu(y), per-channel bound)."""
    return _equalize(gm, relu6=True)


def weight_range_spread(gm: fx.GraphModule) -> dict[str, float]:
    """`range_spread` of every conv/linear with a constant weight, by node name (a measure)."""
    out = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in WEIGHTED_OPS:
            w_node = _weights(n)[0]
            if is_const(w_node):
                out[n.name] = range_spread(_const(gm, w_node))
    return out
