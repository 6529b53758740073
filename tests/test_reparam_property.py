"""Property tests: on random branch sets the reparam merges are exact or refused, never wrong.

Graphs are built directly from aten ops (no torch.export, so each example takes
milliseconds): random kernel sizes (odd and even, 1×K/K×1), dilations, groups, strides,
paddings (aligned or not), identity and scalar summands for `merge_parallel_convs`; random
1×1 → (BN | ± c | × c | pads with 0, with the bias, or with something else | ReLU) → K×K
chains for `merge_sequential_convs`. Every example must compute the same function (fp64,
max|Δ| ≤ 1e-12·max|y|), lint, and be a fixpoint; examples that are plainly mergeable must
actually merge.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import fx, nn

from quantflow.ir import count_ops
from quantflow.passes.reparam_parallel import merge_parallel_convs
from quantflow.passes.reparam_sequential import merge_sequential_convs
from quantflow.testing import FP64_REL, max_rel_err

aten = torch.ops.aten
F64 = torch.float64
SETTINGS = settings(max_examples=50, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


class _Builder:
    """A GraphModule under construction: constants become buffers read by get_attr."""

    def __init__(self) -> None:
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.x = self.graph.placeholder("x")

    def const(self, t: torch.Tensor) -> fx.Node:
        name = f"c{len(self.root._buffers)}"
        self.root.register_buffer(name, t)
        return self.graph.get_attr(name)

    def call(self, op: Any, *args: Any) -> fx.Node:
        return self.graph.call_function(op, args)

    def finish(self, out: fx.Node) -> fx.GraphModule:
        self.graph.output(out)
        return fx.GraphModule(self.root, self.graph)


def _check(pass_fn: Callable[[fx.GraphModule], bool], gm: fx.GraphModule, x: torch.Tensor
           ) -> bool:
    """Exact or refused: same outputs, valid graph, fixpoint. Returns whether it changed."""
    reference = copy.deepcopy(gm)
    with torch.no_grad():
        want = reference(x)
    changed = pass_fn(gm)
    gm.graph.lint()
    gm.recompile()
    with torch.no_grad():
        got = gm(x)
    err = max_rel_err(got, want)
    assert err <= FP64_REL, f"{pass_fn.__name__} changed the function: {err:.2e}\n{gm.graph}"
    assert not pass_fn(gm), f"{pass_fn.__name__} is not a fixpoint"
    return changed


def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - (k - 1) * d - 1) // s + 1


# --------------------------------------------------------------------------- parallel


@dataclass
class Branch:
    kernel: tuple[int, int]
    dilation: tuple[int, int]
    padding: tuple[int, int]
    bias: bool


@dataclass
class ParallelCase:
    channels: int
    out_channels: int
    groups: int
    stride: int
    size: int
    branches: list[Branch]
    identity: bool
    scalar: float | None
    reversed_adds: list[bool] = field(default_factory=list)


@st.composite
def parallel_cases(draw: st.DrawFn) -> ParallelCase:
    channels = draw(st.sampled_from([2, 4, 6]))
    groups = draw(st.sampled_from([g for g in (1, 2, channels) if channels % g == 0]))
    out_channels = draw(st.sampled_from([channels, 2 * channels]))
    stride = draw(st.sampled_from([1, 1, 2]))
    size = draw(st.integers(6, 11))
    aligned = draw(st.booleans())
    centre2 = (draw(st.integers(-1, 1)), draw(st.integers(-1, 1)))   # 2p − (k−1)d per dim
    branches = []
    for _ in range(draw(st.integers(2, 4))):
        kernel, dilation, padding = [], [], []
        for dim in range(2):
            k, d = draw(st.integers(1, 5)), draw(st.integers(1, 3))
            if aligned:
                if (centre2[dim] + (k - 1) * d) % 2:  # span parity must match the centre
                    d = 1
                    k = k if (centre2[dim] + k - 1) % 2 == 0 else k + 1
                p = (centre2[dim] + (k - 1) * d) // 2    # ≥ 0: centre2 ≥ −1, parity fits
            else:
                p = draw(st.integers(0, 3))
            kernel.append(k)
            dilation.append(d)
            padding.append(p)
        branches.append(Branch(tuple(kernel), tuple(dilation), tuple(padding),  # type: ignore[arg-type]
                               draw(st.booleans())))
    # keep the branches whose output has the first one's shape (others could not be added)
    def shape(b: Branch) -> tuple[int, int]:
        return tuple(_out_size(size, k, stride, p, d)  # type: ignore[return-value]
                     for k, p, d in zip(b.kernel, b.padding, b.dilation))
    first = shape(branches[0])
    branches = [b for b in branches if shape(b) == first and min(shape(b)) > 0]
    identity = draw(st.booleans()) and stride == 1 and first == (size, size) and \
        out_channels == channels
    scalar = draw(st.sampled_from([None, 0, 0.5]))
    flips = [draw(st.booleans()) for _ in range(len(branches) + 2)]
    return ParallelCase(channels, out_channels, groups, stride, size, branches, identity,
                        scalar, flips)


def _build_parallel(case: ParallelCase, seed: int) -> fx.GraphModule:
    g = torch.Generator().manual_seed(seed)
    b = _Builder()
    terms: list[Any] = []
    for br in case.branches:
        w = torch.randn(case.out_channels, case.channels // case.groups, *br.kernel,
                        dtype=F64, generator=g)
        bias = b.const(torch.randn(case.out_channels, dtype=F64, generator=g)) \
            if br.bias else None
        terms.append(b.call(aten.conv2d.default, b.x, b.const(w), bias,
                            [case.stride] * 2, list(br.padding), list(br.dilation),
                            case.groups))
    if case.identity:
        terms.append(b.x)
    if case.scalar is not None:
        terms.append(case.scalar)
    acc = terms[0]
    for t, flip in zip(terms[1:], case.reversed_adds):
        args = (t, acc) if flip and isinstance(t, fx.Node) else (acc, t)
        acc = b.call(aten.add.Tensor, *args)
    return b.finish(acc)


@SETTINGS
@given(case=parallel_cases(), seed=st.integers(0, 2 ** 16))
def test_parallel_merge_is_exact_or_refused(case: ParallelCase, seed: int) -> None:
    if len(case.branches) < 2 and not (case.branches and case.identity):
        return  # nothing to sum
    gm = _build_parallel(case, seed)
    x = torch.randn(2, case.channels, case.size, case.size, dtype=F64,
                    generator=torch.Generator().manual_seed(seed + 1))
    before = count_ops(gm)["conv"]
    _check(merge_parallel_convs, gm, x)
    after = count_ops(gm)["conv"]
    assert after <= before
    event(f"{before} convs -> {after}")
    # plainly mergeable: stride 1 (equal shapes = aligned centres), dense taps, and the
    # merged kernel costs no more taps than the branches
    kh = max(b.kernel[0] for b in case.branches)
    kw = max(b.kernel[1] for b in case.branches)
    taps = sum(math.prod(b.kernel) for b in case.branches) + case.identity
    plain = case.stride == 1 and all(b.dilation == (1, 1) for b in case.branches)
    if plain and kh * kw <= taps:
        assert after == 1, f"mergeable branches were not merged:\n{gm.graph}"


# --------------------------------------------------------------------------- sequential


@dataclass
class SequentialCase:
    c_in: int
    mid: int
    out: int
    g1: int
    g2: int
    bias1: bool
    pad1: int
    stride1: int
    ops: list[str]
    kernel: int
    stride2: int
    dilation2: int
    pad2: int
    size: int


@st.composite
def sequential_cases(draw: st.DrawFn) -> SequentialCase:
    c_in, mid, out = (draw(st.sampled_from([2, 4])), draw(st.sampled_from([2, 4, 8])),
                      draw(st.sampled_from([2, 4])))
    g1 = draw(st.sampled_from([g for g in (1, 2) if c_in % g == 0 and mid % g == 0] +
                              ([c_in] if mid % c_in == 0 else [])))
    g2 = draw(st.sampled_from([g for g in (1, 2) if mid % g == 0 and out % g == 0] +
                              ([out] if mid % out == 0 else [])))
    ops = draw(st.lists(st.sampled_from(["bn", "add", "mul", "pad_zero", "pad_bias",
                                         "pad_other", "relu"]), max_size=3))
    return SequentialCase(
        c_in, mid, out, g1, g2, draw(st.booleans()), draw(st.sampled_from([0, 0, 1])),
        draw(st.sampled_from([1, 1, 1, 2])), ops, draw(st.integers(1, 4)),
        draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(0, 2)),
        draw(st.integers(6, 10)))


def _build_sequential(case: SequentialCase, seed: int) -> fx.GraphModule:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=F64, generator=g)

    b = _Builder()
    beta = rnd(case.mid) if case.bias1 else torch.zeros(case.mid, dtype=F64)
    y = b.call(aten.conv2d.default, b.x, b.const(rnd(case.mid, case.c_in // case.g1, 1, 1)),
               b.const(beta.clone()) if case.bias1 else None, [case.stride1] * 2,
               [case.pad1] * 2, [1, 1], case.g1)
    for op in case.ops:
        if op == "bn":
            mean, var = rnd(case.mid), torch.rand(case.mid, dtype=F64, generator=g) + 0.5
            gamma, shift = rnd(case.mid), rnd(case.mid)
            y = b.call(aten.batch_norm.default, y, b.const(gamma), b.const(shift),
                       b.const(mean), b.const(var), False, 0.1, 1e-5, False)
            s = gamma / torch.sqrt(var + 1e-5)
            beta = beta * s + shift - mean * s
        elif op in ("add", "mul"):
            c = rnd(1, case.mid, 1, 1)
            y = b.call(aten.add.Tensor if op == "add" else aten.mul.Tensor, y, b.const(c))
            beta = beta + c.flatten() if op == "add" else beta * c.flatten()
        elif op == "pad_zero":
            y = b.call(aten.constant_pad_nd.default, y, [1, 1, 1, 1], 0.0)
        elif op in ("pad_bias", "pad_other"):    # pad with a per-channel value v
            v = (beta if op == "pad_bias" else rnd(case.mid)).reshape(1, -1, 1, 1)
            vn = b.const(v.clone())
            y = b.call(aten.add.Tensor,
                       b.call(aten.constant_pad_nd.default, b.call(aten.sub.Tensor, y, vn),
                              [1, 1, 1, 1], 0.0), vn)
        else:
            y = b.call(aten.relu.default, y)
    w2 = rnd(case.out, case.mid // case.g2, case.kernel, case.kernel)
    y = b.call(aten.conv2d.default, y, b.const(w2), b.const(rnd(case.out)),
               [case.stride2] * 2, [case.pad2] * 2, [case.dilation2] * 2, case.g2)
    return b.finish(y)


@SETTINGS
@given(case=sequential_cases(), seed=st.integers(0, 2 ** 16))
def test_sequential_merge_is_exact_or_refused(case: SequentialCase, seed: int) -> None:
    pads = case.pad1 + sum(op.startswith("pad") for op in case.ops) + case.pad2
    mid_size = (case.size + 2 * case.pad1 - 1) // case.stride1 + 1
    if mid_size + 2 * (pads - case.pad1) < (case.kernel - 1) * case.dilation2 + 1:
        return  # the second conv's window does not fit
    gm = _build_sequential(case, seed)
    x = torch.randn(2, case.c_in, case.size, case.size, dtype=F64,
                    generator=torch.Generator().manual_seed(seed + 1))
    changed = _check(merge_sequential_convs, gm, x)
    assert count_ops(gm)["conv"] == (1 if changed else 2)
    event("merged" if changed else "refused")
    # plainly mergeable: stride-1 1x1, only affine ops, no padding anywhere, no bottleneck
    macs_before = case.mid * case.c_in // case.g1 * case.stride2 ** 2 + \
        case.out * case.mid // case.g2 * case.kernel ** 2
    macs_after = case.out * case.c_in // math.gcd(case.g1, case.g2) * case.kernel ** 2
    plain = case.stride1 == 1 and pads == 0 and \
        set(case.ops) <= {"bn", "add", "mul"} and macs_after <= macs_before
    if plain:
        assert changed, f"mergeable pair was not merged:\n{gm.graph}"
