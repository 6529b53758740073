"""Pure tensor math of structural re-parameterization (no graph code).

A conv is linear in its weight, so a sum of convs over the same input is one conv whose kernel
is the sum of the branch kernels, once every branch kernel is written on one common tap grid:

    Σ_i conv(x, W_i, b_i; s, p_i, d_i, g)  =  conv(x, Σ_i E_i(W_i), Σ_i b_i; s, P, D, g)

where E_i places branch i's taps into the merged kernel. Per spatial dimension, branch i reads
input positions  u·s − p_i + j·d_i  (j = 0..k_i−1), a window of span e_i = (k_i−1)·d_i whose
centre sits at  u·s + (e_i/2 − p_i).  All branches see the same pixels iff the centre offsets
p_i − e_i/2 are equal (then their output sizes are equal for every input size and stride, and
zero padding covers the same out-of-image taps). The merged conv then has padding P = max p_i,
branch i's taps land at merged input offset o_i + j·d_i with o_i = P − p_i, and the merged
dilation D is the gcd of all tap positions (a k×k conv with dilation r is the ((k−1)r+1)-sized
dense kernel with zeros between the taps; D > 1 keeps a shared dilation instead of
densifying). Different strides, groups or centre offsets do not merge.

Identity-like branches are convs too: a per-channel affine y = s·x + t (inference BN) is a 1×1
conv whose kernel is the identity scaled by s, with bias t; avg-pooling (count_include_pad,
no ceil mode) is a conv with constant kernel 1/|k| on the identity channel map. With groups g,
"identity" means  W[o, o mod (C/g)] = 1  (output channel o reads its own channel, which is
local input o mod (C/g) of its group).

A 1×1 conv followed by any conv (`compose_pointwise`) is one conv:
    W[o, i, k] = Σ_m W2[o, m, k] · W1[m, i]   (with the groups of both taken into account),
    b[o]       = b2[o] + Σ_{m,k} W2[o, m, k] · β[m]
when the intermediate equals W1·x + β everywhere the second conv reads, padded border
included (checked by the graph pass). With groups g1 and g2 over the middle channels the
composite is block diagonal with gcd(g1, g2) groups.

All functions compute in float64 and return the dtype of their (first) weight argument;
nothing mutates its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

F64 = torch.float64


def bn_scale_shift(mean: torch.Tensor, var: torch.Tensor, eps: float,
                   gamma: torch.Tensor | None, beta: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) in float64 with BN(x) = s·x + t per channel (inference mode)."""
    s = torch.rsqrt(var.to(F64) + eps)
    if gamma is not None:
        s = s * gamma.to(F64)
    t = -mean.to(F64) * s
    if beta is not None:
        t = t + beta.to(F64)
    return s, t


def per_channel(t: Any, channels: int, rank: int) -> torch.Tensor | None:
    """A scalar or a tensor constant along every dim but 1 (the channel), as a float64 [C]."""
    if isinstance(t, bool) or t is None:
        return None
    if isinstance(t, (int, float)):
        return torch.full((channels,), float(t), dtype=F64)
    if not isinstance(t, torch.Tensor) or t.dim() > rank:
        return None
    t = t.to(F64).reshape((1,) * (rank - t.dim()) + tuple(t.shape))
    if t.shape[1] not in (1, channels):
        return None
    flat = t.movedim(1, 0).reshape(t.shape[1], -1)
    if flat.numel() and not torch.equal(flat.amax(1), flat.amin(1)):
        return None
    return flat[:, 0].expand(channels).clone()


def identity_kernel(channels: int, groups: int, kernel_size: Sequence[int],
                    value: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """[C, C/g, *k] kernel mapping channel o to itself with every tap equal to value[o].

    `value` is a scalar or a per-channel vector. kernel_size (1,1) gives the identity / a
    per-channel scale; (k,k) with value 1/k² gives average pooling.
    """
    if channels % groups:
        raise ValueError(f"{channels} channels do not split into {groups} groups")
    per_group = channels // groups
    v = torch.as_tensor(value, dtype=F64).expand(channels) if not isinstance(value, float) \
        else torch.full((channels,), value, dtype=F64)
    w = torch.zeros(channels, per_group, *kernel_size, dtype=F64)
    o = torch.arange(channels)
    w[o, o % per_group] = v.reshape(channels, *([1] * len(kernel_size)))
    return w.to(dtype)


@dataclass(frozen=True)
class Geometry:
    """Kernel size, padding and dilation of one conv branch (one entry per spatial dim)."""

    kernel: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]

    def centre2(self) -> tuple[int, ...]:
        """Twice the centre offset per dim, 2·p − (k−1)·d (an integer also for even spans)."""
        return tuple(2 * p - (k - 1) * d
                     for k, p, d in zip(self.kernel, self.padding, self.dilation))

    def taps(self) -> int:
        return math.prod(self.kernel)


@dataclass(frozen=True)
class MergedGeometry:
    """The merged conv's geometry and where each branch's first tap lands (input pixels)."""

    geometry: Geometry
    offsets: tuple[tuple[int, ...], ...]


def merge_geometry(branches: Sequence[Geometry]) -> MergedGeometry | str:
    """Common geometry of parallel branches, or the reason they cannot share one."""
    if not branches:
        return "no branches"
    nd = len(branches[0].kernel)
    if any(len(b.kernel) != nd for b in branches):
        return "branches differ in dimensionality"
    centres = {b.centre2() for b in branches}
    if len(centres) > 1:
        return ("misaligned receptive-field centres (2p-(k-1)d per dim: "
                f"{sorted(centres)}); the branches read different pixels")
    kernel, padding, dilation, offsets = [], [], [], []
    for dim in range(nd):
        pad = max(b.padding[dim] for b in branches)
        if pad < 0:
            return "every branch crops its input (no padding ≥ 0 to merge onto)"
        offs = [pad - b.padding[dim] for b in branches]
        span = max(o + (b.kernel[dim] - 1) * b.dilation[dim] for o, b in zip(offs, branches))
        step = 0
        for o, b in zip(offs, branches):
            step = math.gcd(step, o)
            if b.kernel[dim] > 1:
                step = math.gcd(step, b.dilation[dim])
        step = max(step, 1)
        kernel.append(span // step + 1)
        padding.append(pad)
        dilation.append(step)
        offsets.append(offs)
    return MergedGeometry(Geometry(tuple(kernel), tuple(padding), tuple(dilation)),
                          tuple(zip(*offsets)))


def place_kernel(w: torch.Tensor, branch: Geometry, offset: Sequence[int],
                 merged: Geometry) -> torch.Tensor:
    """Branch kernel w [O, I, *k] written on the merged tap grid (float64, zeros elsewhere)."""
    out = torch.zeros(*w.shape[:2], *merged.kernel, dtype=F64)
    index: list[slice] = [slice(None), slice(None)]
    for k, d, o, step in zip(branch.kernel, branch.dilation, offset, merged.dilation):
        if o % step or (k > 1 and d % step):
            raise ValueError("branch taps are not on the merged dilation grid")
        start, stride = o // step, max(d // step, 1)
        index.append(slice(start, start + (k - 1) * stride + 1, stride))
    out[tuple(index)] = w.to(F64)
    return out


def merge_parallel(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
                   branches: Sequence[Geometry], merged: MergedGeometry,
                   extra_bias: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W, b) of the sum of the branches (same groups, stride, in/out channels)."""
    w = torch.zeros(*weights[0].shape[:2], *merged.geometry.kernel, dtype=F64)
    for wi, g, o in zip(weights, branches, merged.offsets):
        w = w + place_kernel(wi, g, o, merged.geometry)
    present = [b.to(F64) for b in biases if b is not None]
    if not present and extra_bias == 0.0:
        return w.to(weights[0].dtype), None
    b = torch.full((weights[0].shape[0],), float(extra_bias), dtype=F64)
    for bi in present:
        b = b + bi
    return w.to(weights[0].dtype), b.to(weights[0].dtype)


def ungroup(w: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped kernel [O, I/g, *k] as the equivalent dense (block-diagonal) [O, I, *k]."""
    (o, i_g), k = w.shape[:2], w.shape[2:]
    o_g = o // groups
    blocks = w.reshape(groups, o_g, i_g, *k)
    dense = w.new_zeros(groups, o_g, groups, i_g, *k)
    g = torch.arange(groups)
    dense[g, :, g] = blocks
    return dense.reshape(o, groups * i_g, *k)


def compose_pointwise(w1: torch.Tensor, g1: int, w2: torch.Tensor, g2: int
                      ) -> tuple[torch.Tensor, int]:
    """Kernel and groups of conv(W2, g2) ∘ conv1x1(W1, g1): W = W2 ⋅ W1 over middle channels.

    w1 is [M, C/g1, 1...], w2 is [O, M/g2, *k]. The composite has gc = gcd(g1, g2) groups.
    It is built one composite group at a time (batched), so a depthwise pair never builds
    the dense O×C kernel.
    """
    gc = math.gcd(g1, g2)
    m, o, k = w1.shape[0], w2.shape[0], w2.shape[2:]
    a = w1.to(F64).reshape(gc, m // gc, w1.shape[1])
    b = w2.to(F64).reshape(gc, o // gc, w2.shape[1], *k)
    d1 = torch.stack([ungroup(a[j], g1 // gc) for j in range(gc)]) if g1 > gc else a
    d2 = torch.stack([ungroup(b[j], g2 // gc) for j in range(gc)]) if g2 > gc else b
    # W[g, o, i, k] = Σ_m d2[g, o, m, k]·d1[g, m, i], as one batched matmul over (g, o, k)
    lhs = d2.reshape(gc, d2.shape[1], d2.shape[2], -1).transpose(2, 3)  # [gc, O/gc, |k|, M/gc]
    w = torch.matmul(lhs, d1.unsqueeze(1))                                # [gc, O/gc, |k|, C/gc]
    return w.transpose(2, 3).reshape(o, d1.shape[2], *k).to(w2.dtype), gc


def bias_through(w2: torch.Tensor, g2: int, beta: torch.Tensor) -> torch.Tensor:
    """Σ_{m,k} W2[o, m, k]·β[m]: what a constant per-channel input β contributes (float64)."""
    o, m_g = w2.shape[:2]
    per = w2.to(F64).reshape(g2, o // g2, m_g, -1).sum(-1)      # [g, O/g, M/g]
    beta_g = beta.to(F64).reshape(g2, m_g, 1)                     # [g, M/g, 1]
    return torch.bmm(per, beta_g).reshape(o)


def conv_macs(out_ch: int, in_ch: int, groups: int, kernel: Sequence[int]) -> int:
    """Multiply-accumulates per output pixel of a conv."""
    return out_ch * (in_ch // groups) * math.prod(kernel)
