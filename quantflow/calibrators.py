"""Activation range selection from calibration statistics.

Each calibrator maps a `TensorStats` (min, max, 2048-bin histogram over [min, max]) and a
`QSpec` to a clipping range [lo, hi]; `quantflow.qmath.qparams_from_range` turns that into a
scale and zero point.

- minmax: the observed range. No clipping error, largest rounding error.
- percentile: clip to the p-th / (100−p)-th percentiles of the histogram.
- entropy: TensorRT's KL-divergence calibration: pick the threshold whose quantized
  distribution Q is closest (KL(P‖Q)) to the clipped reference distribution P.
- mse: the range minimizing the expected squared error of quantize→dequantize, evaluated
  exactly on the histogram's bin centres (rounding and clipping error together).

Ranges are searched over thresholds from the zero point outwards; all calibrators return a range
that contains 0 (qparams_from_range enforces it anyway).
"""

from __future__ import annotations

import numpy as np
import torch

from quantflow.calibrate import TensorStats
from quantflow.qmath import qparams_from_range
from quantflow.spec import QSpec


def activation_range(stats: TensorStats, spec: QSpec) -> tuple[float, float]:
    """The clipping range [lo, hi] for one activation tensor under `spec`."""
    if spec.calibrator == "minmax" or stats.hist is None or stats.max <= stats.min:
        return stats.min, stats.max
    if spec.calibrator == "percentile":
        return _percentile(stats, spec.percentile)
    if spec.calibrator == "entropy":
        return _entropy(stats, spec)
    if spec.calibrator == "mse":
        return _mse(stats, spec)
    raise ValueError(f"unknown calibrator {spec.calibrator!r}")


def _centres(stats: TensorStats) -> np.ndarray:
    e = stats.bin_edges.numpy()
    return np.asarray((e[:-1] + e[1:]) / 2)


def _percentile(stats: TensorStats, p: float) -> tuple[float, float]:
    assert stats.hist is not None
    h = stats.hist.numpy()
    cdf = np.cumsum(h) / max(h.sum(), 1.0)
    edges = stats.bin_edges.numpy()
    hi_idx = int(np.searchsorted(cdf, p / 100.0))
    lo_idx = int(np.searchsorted(cdf, 1.0 - p / 100.0))
    hi = float(edges[min(hi_idx + 1, len(edges) - 1)])
    # a tensor that never goes negative (post-ReLU) keeps its exact floor
    lo = stats.min if stats.min >= 0 else float(edges[lo_idx])
    return min(lo, 0.0) if stats.min < 0 else lo, max(hi, 0.0)


def _abs_hist(stats: TensorStats, bins: int) -> tuple[np.ndarray, float]:
    """Histogram of |x| over [0, amax] with `bins` bins, rebinned from the signed histogram."""
    c = _centres(stats)
    h = stats.hist.numpy() if stats.hist is not None else np.zeros(0)
    amax = max(abs(stats.min), abs(stats.max))
    idx = np.minimum((np.abs(c) / amax * bins).astype(np.int64), bins - 1)
    out = np.zeros(bins)
    np.add.at(out, idx, h)
    return out, amax


def _entropy(stats: TensorStats, spec: QSpec) -> tuple[float, float]:
    """KL calibration on |x| (TensorRT's algorithm), applied to the side(s) the tensor uses.

    The number of quantization levels available to one side: all of them for a non-negative
    tensor in an unsigned type, half for a signed/two-sided tensor.
    """
    bins = 2048
    hist, amax = _abs_hist(stats, bins)
    # The spike of exact zeros (ReLU outputs: often half the tensor) is quantized exactly: 0 is
    # on the grid. Left in, it dominates KL as soon as the first quantization group spans more
    # than one bin, so the search would always return its first (tightest) candidate. Replace
    # it by its neighbour, i.e. assume a smooth density at 0.
    hist[0] = min(hist[0], hist[1])
    one_sided = stats.min >= 0 and not spec.signed
    levels = (2**spec.bits if one_sided else 2 ** (spec.bits - 1))
    levels = min(levels, 256)  # 16-bit: more levels than bins would make KL meaningless
    best_i, best_kl = bins, float("inf")
    start = max(levels, 128)
    for i in range(start, bins + 1, 8 if bins > 512 else 1):
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()  # outliers clipped into the last bin
        nz = hist[:i] > 0
        # quantize the i bins into `levels` groups, spread each group's mass over its non-zero bins
        groups = np.minimum((np.arange(i) * levels) // i, levels - 1)
        mass = np.bincount(groups, weights=hist[:i], minlength=levels)
        cnt = np.bincount(groups, weights=nz.astype(np.float64), minlength=levels)
        q = np.where(nz, mass[groups] / np.maximum(cnt[groups], 1), 0.0)
        ps, qs = p.sum(), q.sum()
        if ps <= 0 or qs <= 0:
            continue
        pn, qn = p / ps, q / qs
        m = pn > 0
        kl = float(np.sum(pn[m] * np.log(pn[m] / np.maximum(qn[m], 1e-12))))
        if kl < best_kl:
            best_kl, best_i = kl, i
    t = amax * best_i / bins
    return max(stats.min, -t), min(stats.max, t)


def _mse(stats: TensorStats, spec: QSpec) -> tuple[float, float]:
    """Shrink [min, max] towards 0 by a common factor; keep the factor of least expected MSE."""
    assert stats.hist is not None
    c = torch.from_numpy(_centres(stats))
    h = stats.hist
    best = (float("inf"), stats.min, stats.max)
    for ratio in np.linspace(0.05, 1.0, 96):
        lo, hi = stats.min * ratio, stats.max * ratio
        s, z = qparams_from_range(torch.tensor(lo), torch.tensor(hi), spec)
        sd = s.double()
        q = torch.clamp(torch.round(c / sd) + z, spec.qmin, spec.qmax)
        err = float((((q - z) * sd - c) ** 2 * h).sum())
        if err < best[0]:
            best = (err, lo, hi)
    return best[1], best[2]


def activation_qparams(stats: TensorStats, spec: QSpec) -> tuple[float, int]:
    """Scale and zero point of a per-tensor activation quantizer."""
    lo, hi = activation_range(stats, spec)
    s, z = qparams_from_range(torch.tensor(lo), torch.tensor(hi), spec)
    return float(s), int(z)
