"""The integer arithmetic of the TVM frontend: pure numpy (and one TE compute), no graph.

The algebra, for one output channel o of a conv (or a linear row) whose input is
`x = (xq - zx) * sx` (per-tensor, uint8 or int8) and whose weight is `w = wq * sw[o]` (int8,
symmetric: zero points must be 0):

    conv(x, w)[o] = sx * sw[o] * conv(xq - zx, wq)[o]
                  = sx * sw[o] * (conv(pad(xq, value=zx), wq)[o] - zx * sum(wq[o]))

Padding xq with zx (not 0) makes the padded border equal zero in real terms, so the
correction `zx * sum(wq[o])` is one constant per channel, folded with the int32 bias `bq[o]`
when the bias scale is sx * sw[o] (PT2E's convention). `conv(uint8, int8) -> int32` is exact.
The int32 accumulator is then cast to float and scaled by `sx * sw[o]`; the ops between it and
the next quantize (relu, clamp) and that quantize itself (`round(y / sy) + zy`, clip, cast)
are elementwise, so Relax's FuseOps folds the requantize into the conv's epilogue.

Relative to the torch simulation (fp32 conv of dequantized values), the only difference is the
fp32 rounding of the simulated sum, which moves a value across a rounding boundary of the next
quantize at most once: outputs agree to within 1 quantization step.

VNNI layout (`pack_vnni_weight`, `vnni_conv2d_nhwc`): the only conv form MetaSchedule's x86
VNNI rule can tensorize into vpdpbusd (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: relative tolerance for "bias scale == sx * sw" (PT2E computes it in fp32)
BIAS_SCALE_RTOL = 1e-5


def zero_point_correction(wq: np.ndarray, zx: int) -> np.ndarray:
    """`zx * sum(wq[o])` per output channel o (axis 0), as int64 (exact)."""
    return zx * wq.reshape(wq.shape[0], -1).astype(np.int64).sum(axis=1)


def integer_bias(bq: np.ndarray | None, wq: np.ndarray, zx: int) -> np.ndarray:
    """The int32 term added to the raw accumulator: `bq - zx * sum(wq[o])`."""
    corr = -zero_point_correction(wq, zx)
    if bq is not None:
        corr = corr + bq.astype(np.int64)
    if np.abs(corr).max(initial=0) >= 2**31:
        raise OverflowError("integer bias does not fit int32")
    return corr.astype(np.int32)


def bias_matches_scale(bias_scale: np.ndarray, sx: float, sw: np.ndarray) -> bool:
    """True if the int32 bias is in accumulator units (scale sx * sw[o])."""
    want = np.float32(sx) * sw.astype(np.float32)
    return bool(np.allclose(bias_scale, want, rtol=BIAS_SCALE_RTOL, atol=0.0))


#: VNNI block: vpdpbusd multiplies 4 consecutive uint8 inputs by a 16 x 4 int8 block
VNNI_LANES, VNNI_K = 16, 4


def pack_vnni_weight(wq: np.ndarray, lanes: int = VNNI_LANES) -> np.ndarray:
    """OIHW int8 -> [O/lanes, KH, KW, I/4, lanes, 4]: each lanes (out) x 4 (in) block
    contiguous, the operand layout of the dot-product intrinsics (TVM's `dot_16x4_vnni`,
    16 lanes; tvm_dot's other paths: 8 or 4). Needs O % lanes == 0, I % 4 == 0."""
    o, i, kh, kw = wq.shape
    w = wq.reshape(o // lanes, lanes, i // VNNI_K, VNNI_K, kh, kw)
    return np.ascontiguousarray(w.transpose(0, 4, 5, 2, 1, 3))


def vnni_conv2d_nhwc(data: Any, wp: Any, strides: Sequence[int], dilation: Sequence[int],
                     name: str = "conv2d_vnni") -> Any:
    """TE: int32 NHWC conv of padded uint8 (or int8) NHWC `data` with a `pack_vnni_weight`
    weight of any lane count.

    The innermost reduction (4 input channels) and the output channels of one weight block
    are separate iterators over contiguous memory, which is what tensorizing needs
    (MetaSchedule's x86 VNNI rule; tvm_schedules._packed); TVM's NCHW conv cannot be.
    """
    from tvm import te

    n, hp, wdp, _c = data.shape
    o0, kh_, kw_, i0, o1, i1 = wp.shape
    (sh, sw), (dh, dw) = strides, dilation
    oh = (hp - dh * (kh_ - 1) - 1) // sh + 1
    ow = (wdp - dw * (kw_ - 1) - 1) // sw + 1
    kh = te.reduce_axis((0, kh_), "kh")
    kw = te.reduce_axis((0, kw_), "kw")
    c0 = te.reduce_axis((0, i0), "c0")
    c1 = te.reduce_axis((0, i1), "c1")
    return te.compute(
        (n, oh, ow, o0 * o1),
        lambda b, h, w, oc: te.sum(
            data[b, h * sh + kh * dh, w * sw + kw * dw, c0 * VNNI_K + c1].astype("int32")
            * wp[oc // o1, kh, kw, c0, oc % o1, c1].astype("int32"),
            axis=[kh, kw, c0, c1]),
        name=name)


def depthwise_conv2d_nhwc(data: Any, w: Any, strides: Sequence[int], dilation: Sequence[int]
                          ) -> Any:
    """TE: int32 NHWC depthwise conv of padded uint8 NHWC `data` with an [KH, KW, C] int8
    weight (OIHW [C, 1, KH, KW] transposed): channels innermost, so that the default schedule
    vectorizes over them (tvm_schedules) and the input needs no transpose (tvm_layout)."""
    from tvm import te

    n, hp, wdp, ch = data.shape
    kh_, kw_, _c = w.shape
    (sh, sw), (dh, dw) = strides, dilation
    oh = (hp - dh * (kh_ - 1) - 1) // sh + 1
    ow = (wdp - dw * (kw_ - 1) - 1) // sw + 1
    kh = te.reduce_axis((0, kh_), "kh")
    kw = te.reduce_axis((0, kw_), "kw")
    return te.compute(
        (n, oh, ow, ch),
        lambda b, h, x, c: te.sum(
            data[b, h * sh + kh * dh, x * sw + kw * dw, c].astype("int32")
            * w[kh, kw, c].astype("int32"), axis=[kh, kw]),
        name="dwconv2d_nhwc")
