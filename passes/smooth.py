"""SmoothQuant (Xiao et al., ICML 2023): move activation outliers out of a LayerNorm's output
into the weights of the linears that read it.

    LN(x)·γ + β = y,   y·Wᵀ = (y·diag(1/s))·(W·diag(s))ᵀ

A transformer's LayerNorm outputs carry a few channels tens of times larger than the rest;
with one int8 scale per tensor (all the integer GEMM kernels of ORT/TensorRT take) those
channels set the step and the others lose their bits. Dividing channel j by
s_j = max|y_j|^α / max|W_:,j|^(1-α) flattens the activation and grows the weight columns,
which per-channel weight quantization absorbs. The division goes into γ and β (free); every
linear reader gets W·diag(s); any other reader (the residual add of a post-LN block) gets an
explicit `mul` by s, so every reader sees exactly what it saw before.

An activation with no affine op before it (a GELU output read only by linears, the FFN's
second linear in BERT) gets an explicit `mul` by 1/s in front of the linears instead, as NNCF
does: one float elementwise op buys the int8 GEMM a flattened range (MiniLM: the worst
quantized tensor; cosine 0.9952 → 0.9968 with both kinds at α = 0.8).

`smooth_scales` is the math (pure tensors); `smooth` the graph surgery. Skipped, with a
reason: a LayerNorm without constant affine parameters, with no linear reader, or whose
channel statistics are missing; an activation read by anything but linears.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import fx

from quantflow.ir import add_const, get_tensor, is_const
from quantflow.passes.driver import for_each, skip

aten = torch.ops.aten
PASS = "smooth"
#: keeps a channel's scale finite when its activation or weight column is all zeros
_CLAMP = (1e-5, 1e5)
#: producers whose output gets an explicit 1/s mul (no affine parameters to absorb it)
EXPLICIT_OPS = (aten.gelu.default, aten.silu.default, aten.relu.default)
#: node meta key on a smoothed LayerNorm (a second run must not divide again)
SMOOTHED = "quantflow_smoothed"


def smooth_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor,
                  alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^α / max|W_j|^(1−α), 1 where either is zero (nothing to balance)."""
    a = act_absmax.double()
    w = weight_absmax.double()
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    s = torch.where((a > 0) & (w > 0), s, torch.ones_like(s))
    return s.clamp(*_CLAMP)


def _linear_readers(ln: fx.Node) -> list[fx.Node]:
    return [u for u in ln.users if u.op == "call_function" and u.target == aten.linear.default
            and u.args[0] is ln and is_const(u.args[1])]


def _rewrite(gm: fx.GraphModule, ln: fx.Node, absmax: Mapping[str, torch.Tensor],
             alpha: float) -> bool:
    if ln.meta.get(SMOOTHED):
        return skip(PASS, ln, "already smoothed (its statistics describe the unsmoothed output)")
    args = list(ln.args) + [None] * (5 - len(ln.args))
    weight, bias = args[2], args[3]
    if not (is_const(weight) and is_const(bias)):
        return skip(PASS, ln, "no constant affine weight and bias to divide")
    readers = _linear_readers(ln)
    if not readers:
        return skip(PASS, ln, "no linear reads it")
    if ln.name not in absmax:
        return skip(PASS, ln, "no per-channel statistics (not calibrated)")
    gamma, beta = get_tensor(gm, weight), get_tensor(gm, bias)  # type: ignore[arg-type]
    assert gamma is not None and beta is not None
    ws = [get_tensor(gm, r.args[1]) for r in readers]  # type: ignore[arg-type]
    w_absmax = torch.stack([w.abs().amax(0) for w in ws if w is not None]).amax(0)
    act = absmax[ln.name]
    if act.numel() != gamma.numel() or w_absmax.numel() != gamma.numel():
        return skip(PASS, ln, f"channel counts differ ({act.numel()} statistics, "
                    f"{gamma.numel()} LayerNorm, {w_absmax.numel()} weight columns)")
    s = smooth_scales(act, w_absmax, alpha)
    g = gm.graph
    others = [u for u in ln.users if u not in readers]
    ln.args = (args[0], args[1], add_const(gm, f"{ln.name}_weight_smooth",
                                           (gamma.double() / s).to(gamma.dtype), before=ln),
               add_const(gm, f"{ln.name}_bias_smooth", (beta.double() / s).to(beta.dtype),
                         before=ln), *ln.args[4:])
    for r, w in zip(readers, ws):
        assert w is not None
        r.args = (r.args[0], add_const(gm, f"{r.name}_weight_smooth",
                                       (w.double() * s).to(w.dtype), before=r), *r.args[2:])
    if others:
        s_node = add_const(gm, f"{ln.name}_unsmooth", s.to(gamma.dtype), before=ln)
        with g.inserting_after(ln):
            back = g.call_function(aten.mul.Tensor, (ln, s_node))
        if "val" in ln.meta:
            back.meta["val"] = ln.meta["val"]
        for u in others:
            u.replace_input_with(ln, back)
    ln.meta[SMOOTHED] = alpha
    return True


def _rewrite_explicit(gm: fx.GraphModule, x: fx.Node, absmax: Mapping[str, torch.Tensor],
                      alpha: float) -> bool:
    """A tensor read only by linears, with no affine op before it to divide (a GELU output):
    an explicit `mul` by 1/s in front of the linears (a float elementwise op; the int8 GEMM
    after it gains the flattened range)."""
    if x.meta.get(SMOOTHED):
        return skip(PASS, x, "already smoothed")
    readers = _linear_readers(x)
    if not readers or len(readers) != len(x.users):
        return skip(PASS, x, "not read by linears only")
    if x.name not in absmax:
        return skip(PASS, x, "no per-channel statistics (not calibrated)")
    ws = [get_tensor(gm, r.args[1]) for r in readers]  # type: ignore[arg-type]
    w_absmax = torch.stack([w.abs().amax(0) for w in ws if w is not None]).amax(0)
    act = absmax[x.name]
    if act.numel() != w_absmax.numel():
        return skip(PASS, x, f"{act.numel()} statistics vs {w_absmax.numel()} weight columns")
    s = smooth_scales(act, w_absmax, alpha)
    inv = add_const(gm, f"{x.name}_smooth", (1.0 / s).float(), before=readers[0])
    with gm.graph.inserting_before(readers[0]):
        scaled = gm.graph.call_function(aten.mul.Tensor, (x, inv))
    if "val" in x.meta:
        scaled.meta["val"] = x.meta["val"]
    scaled.meta[SMOOTHED] = alpha
    for r, w in zip(readers, ws):
        assert w is not None
        r.args = (scaled, add_const(gm, f"{r.name}_weight_smooth", (w.double() * s).to(w.dtype),
                                    before=r), *r.args[2:])
    x.meta[SMOOTHED] = alpha
    return True


def smooth(gm: fx.GraphModule, absmax: Mapping[str, torch.Tensor], alpha: float = 0.5) -> bool:
    """SmoothQuant every LayerNorm → linear group with statistics in `absmax` (per-channel
    max |y| of the LayerNorm outputs, quantflow.calibrate.TensorStats.channel_absmax), and
    every activation (GELU, ...) read only by linears through an explicit mul."""
    changed = for_each(gm, lambda n: n.op == "call_function"
                       and n.target == aten.layer_norm.default,
                       lambda n: _rewrite(gm, n, absmax, alpha))
    changed |= for_each(gm, lambda n: n.op == "call_function" and n.target in EXPLICIT_OPS,
                        lambda n: _rewrite_explicit(gm, n, absmax, alpha))
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed
