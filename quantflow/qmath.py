"""Quantization arithmetic, pure tensor functions with ONNX QuantizeLinear semantics.

q = clamp(round_half_even(x / s) + zp, qmin, qmax),   x̂ = (q − zp) · s

Ranges always include 0 so that zero (padding, ReLU's floor) is exactly representable.
"""

from __future__ import annotations

import torch

from quantflow.spec import QSpec

#: smallest scale we emit; a tensor that is constant zero would otherwise get scale 0
MIN_SCALE = 1e-8


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QSpec
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int64) that map [lo, hi] (per element) onto spec's grid."""
    lo = torch.minimum(lo.double(), torch.zeros_like(lo, dtype=torch.float64))
    hi = torch.maximum(hi.double(), torch.zeros_like(hi, dtype=torch.float64))
    if spec.symmetric:
        amax = torch.maximum(-lo, hi)
        scale = (amax / spec.qmax).clamp_min(MIN_SCALE)
        zp = torch.zeros_like(scale, dtype=torch.int64)
    else:
        scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp_min(MIN_SCALE)
        zp = torch.round(spec.qmin - lo / scale).clamp(spec.qmin, spec.qmax).to(torch.int64)
    return scale.float(), zp


def along_axis(t: torch.Tensor, dim: int, axis: int | None) -> torch.Tensor:
    """Per-channel `t` shaped to broadcast along `axis` of a `dim`-D tensor (as is: None)."""
    if axis is None:
        return t
    shape = [1] * dim
    shape[axis] = -1
    return t.reshape(shape)


def quantize(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int,
             axis: int | None = None) -> torch.Tensor:
    """Integer codes (as the input's float dtype) for x; per-channel when `axis` is given."""
    scale, zp = along_axis(scale, x.dim(), axis), along_axis(zp, x.dim(), axis)
    return torch.clamp(torch.round(x / scale.to(x.dtype)) + zp.to(x.dtype), qmin, qmax)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int,
               axis: int | None = None) -> torch.Tensor:
    """Quantize then dequantize (the simulation of what an integer kernel sees)."""
    q = quantize(x, scale, zp, qmin, qmax, axis)
    scale, zp = along_axis(scale, x.dim(), axis), along_axis(zp, x.dim(), axis)
    return (q - zp.to(x.dtype)) * scale.to(x.dtype)


def weight_qparams(w: torch.Tensor, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight scales/zero points: exact min/max, or an MSE-optimal clip for `mse`.

    Per-channel along `spec.axis` when spec.granularity == "channel". MSE clipping is what makes
    4-bit weights usable: with 15 levels, a few outliers otherwise waste most of the grid.
    """
    if spec.granularity == "channel":
        flat = w.detach().transpose(0, spec.axis).reshape(w.shape[spec.axis], -1).double()
    else:
        flat = w.detach().reshape(1, -1).double()
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    if spec.calibrator == "mse":
        best_err = torch.full_like(lo, float("inf"))
        best_lo, best_hi = lo.clone(), hi.clone()
        for ratio in torch.linspace(0.3, 1.0, 71, dtype=torch.float64):
            s, z = qparams_from_range(lo * ratio, hi * ratio, spec)
            err = ((fake_quant(flat, s.double(), z, spec.qmin, spec.qmax, axis=0) - flat) ** 2
                   ).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, lo * ratio, best_lo)
            best_hi = torch.where(better, hi * ratio, best_hi)
        lo, hi = best_lo, best_hi
    scale, zp = qparams_from_range(lo, hi, spec)
    if spec.granularity == "tensor":
        return scale.reshape(()), zp.reshape(())
    return scale, zp


def fake_quant_weight(w: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """Q(W): the weight as the quantized model sees it (used by sensitivity analysis too)."""
    scale, zp = weight_qparams(w, spec)
    axis = spec.axis if spec.granularity == "channel" else None
    return fake_quant(w, scale, zp, spec.qmin, spec.qmax, axis).to(w.dtype)
