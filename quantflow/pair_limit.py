"""Integer weights that no saturating int16 pair sum can corrupt (pure tensor functions).

Some CPU int8 kernels multiply unsigned 8-bit activations by signed 8-bit weights and add
two neighbouring products into a *saturating* int16 before widening (x86 `vpmaddubsw`, used by
ONNX Runtime on AVX2 and AVX-512 CPUs without VNNI; targets/ort_isa.py has the catalogue).
For activation codes x ∈ [0, A] and one such pair of weight codes (a, b):

    max over x of |x_a·a + x_b·b| = A·(|a| + |b|)   if a and b have the same sign
                                  = A·max(|a|, |b|)  otherwise

so the pair is exact for every input iff  |a| + |b| ≤ L = ⌊32767 / A⌋  whenever a·b > 0
(A = 255: L = 128; int8 weights reach 127, so two large same-sign neighbours break it).

Which weights form a pair is the kernel's packing order ("K order"): for a convolution, each
output channel's weights in (kernel position, input channel) order, input channel fastest,
cut into consecutive pairs (2i, 2i+1); for a linear layer, consecutive input features.
`pair_index` turns that into index arrays over the weight tensor's own per-channel layout.

`fit_pairs` then finds, per output channel, the codes closest to the float weights (squared
error, optionally weighted per input position by E[x²]) that satisfy the bound, searching two
repairs together: growing the channel's scale by t ∈ [1, t_max] (t_max makes every pair fit;
t ≈ 2 is "7-bit weights") and, at each t, moving only the violating pairs onto the line
|a| + |b| = L (the constrained least-squares point, rounded). Channels without a violating
pair keep their codes and scale untouched.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any

import torch

from quantflow.spec import KernelRules, LayerPlan, QSpec

#: int16 accumulator limit of the pair sum
INT16_MAX = 32767


def pair_bound(act_code_max: int, acc_max: int = INT16_MAX) -> int:
    """L: the largest |a| + |b| of a same-sign weight pair that cannot saturate."""
    return acc_max // act_code_max


def kernel_order(weight_shape: tuple[int, ...]) -> torch.Tensor:
    """Flat per-channel index (in the weight's own [in, *kernel] layout) at each K position.

    Conv weights [out, in_g, *k] are read in (kernel position, input channel) order; linear
    weights [out, in] in input order (the same formula with one kernel position).
    """
    in_g = weight_shape[1]
    positions = 1
    for s in weight_shape[2:]:
        positions *= s
    ic = torch.arange(in_g).repeat(positions)  # input channel fastest
    k = torch.arange(positions).repeat_interleave(in_g)
    return ic * positions + k


def pair_index(weight_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel flat indices (a, b) of the weights each kernel pair adds (an odd last
    element pairs with the kernel's zero padding and is left out)."""
    order = kernel_order(weight_shape)
    n = order.numel() // 2 * 2
    return order[0:n:2], order[1:n:2]


def violations(codes: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bound: int
               ) -> torch.Tensor:
    """Bool [out, pairs]: same-sign pairs whose magnitudes sum past `bound` (codes: [out, K])."""
    ca, cb = codes[:, a], codes[:, b]
    return (ca * cb > 0) & (ca.abs() + cb.abs() > bound)


def _fit_at(ua: torch.Tensor, ub: torch.Tensor, bound: int, qmax: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of each pair (float codes ua, ub) at one scale, violating pairs moved onto
    |a| + |b| = bound: the nearest integer point of that segment to (|ua|, |ub|)."""
    ca, cb = torch.round(ua).clamp(-qmax, qmax), torch.round(ub).clamp(-qmax, qmax)
    bad = (ca * cb > 0) & (ca.abs() + cb.abs() > bound)
    ma = torch.round((ua.abs() - ub.abs() + bound) / 2).clamp(bound - qmax, qmax)
    sign = ca.sign()
    return torch.where(bad, sign * ma, ca), torch.where(bad, sign * (bound - ma), cb)


@dataclass(frozen=True)
class PairFit:
    """Result of `fit_pairs` for one layer."""

    codes: torch.Tensor  # [out, K] int-valued float64
    scale: torch.Tensor  # [out] (or [1] for a shared scale)
    pairs_over: int  # violating pairs before the fit
    channels_changed: int
    max_scale_growth: float
    weight_sqnr_before_db: float  # plain rounding (violating) vs float weights
    weight_sqnr_after_db: float


def _sqnr(ref: torch.Tensor, err: torch.Tensor) -> float:
    num, den = float((ref**2).sum()), float((err**2).sum())
    return float("inf") if den == 0 else 10.0 * torch.log10(torch.tensor(num / den)).item()


def fit_pairs(w: torch.Tensor, scale: torch.Tensor, qmax: int, a: torch.Tensor,
              b: torch.Tensor, bound: int, col_weight: torch.Tensor | None = None,
              grid: int = 33, shared_scale: bool = False) -> PairFit:
    """Codes for float weights `w` [out, K] (symmetric, zero point 0) with no violating pair.

    `scale` [out] (or one shared value with `shared_scale`), `col_weight` [K] ≥ 0 weights the
    squared error per input position (E[x²] of the input it multiplies; None: uniform).
    """
    w = w.double()
    s = scale.double().reshape(-1, 1).expand(w.shape[0], 1) if not shared_scale \
        else scale.double().reshape(1, 1).expand(w.shape[0], 1)
    cw = torch.ones(w.shape[1], dtype=torch.float64) if col_weight is None \
        else col_weight.double().clamp_min(0)
    codes0 = torch.round(w / s).clamp(-qmax, qmax)
    bad0 = violations(codes0, a, b, bound)
    rows = bad0.any(dim=1)
    if shared_scale and bool(rows.any()):
        rows = torch.ones_like(rows)
    before = _sqnr(w, codes0 * s - w)
    if not bool(rows.any()):
        return PairFit(codes0, scale.double().reshape(-1), 0, 0, 1.0, before, before)
    # only the channels with a violating pair are searched (the others keep their codes);
    # the error splits over the disjoint pairs, and elements in no pair keep plain rounding
    wr, sr = w[rows], s[rows]
    u = wr / sr
    ua, ub = u[:, a], u[:, b]
    wa, wb, cwa, cwb = wr[:, a], wr[:, b], cw[a], cw[b]
    # the growth that makes every same-sign pair fit even before rounding
    same = (ua * ub) > 0
    t_max = (torch.where(same, ua.abs() + ub.abs(), torch.zeros_like(ua)).amax(dim=1)
             / (bound - 1.0)).clamp_min(1.0)
    if shared_scale:
        t_max = t_max.amax().expand_as(t_max)
    best_err = torch.full((wr.shape[0],), float("inf"), dtype=torch.float64)
    best_t = torch.ones_like(t_max)
    # quadratic spacing: small growths are the likely optimum and need the finer steps; plus
    # the growth to |w| <= bound/2 ("7-bit"), which fits every pair, so the fit is never
    # worse than narrowing the whole channel
    half = qmax / (bound // 2) if bound // 2 < qmax else 1.0
    growths = [1.0 + (t_max - 1.0) * (j / (grid - 1)) ** 2 for j in range(grid)]
    growths.append(torch.full_like(t_max, half))
    for t in (g.reshape(-1, 1) for g in growths):
        ca, cb = _fit_at(ua / t, ub / t, bound, qmax)
        st = sr * t
        err = ((ca * st - wa) ** 2 * cwa + (cb * st - wb) ** 2 * cwb).sum(dim=1)
        if a.numel() * 2 < w.shape[1]:  # unpaired elements follow the growth too
            paired = torch.zeros(w.shape[1], dtype=torch.bool)
            paired[a], paired[b] = True, True
            rest = ~paired
            cr = torch.round(u[:, rest] / t).clamp(-qmax, qmax)
            err = err + ((cr * st - wr[:, rest]) ** 2 * cw[rest]).sum(dim=1)
        if shared_scale:
            err = err.sum().expand_as(err)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_t = torch.where(better, t.reshape(-1), best_t)
    tb = best_t.reshape(-1, 1)
    best_codes = torch.round(u / tb).clamp(-qmax, qmax)
    ca, cb = _fit_at(ua / tb, ub / tb, bound, qmax)
    best_codes[:, a], best_codes[:, b] = ca, cb
    codes = codes0.clone()
    codes[rows] = best_codes
    growth = torch.ones(w.shape[0], dtype=torch.float64)
    growth[rows] = best_t
    assert not bool(violations(codes, a, b, bound).any()), "fit_pairs left a violation"
    new_scale = s.reshape(-1) * growth if not shared_scale else s[:1].reshape(-1) * growth[0]
    after = codes * (s.reshape(-1, 1) * growth.reshape(-1, 1)) - w
    return PairFit(codes, new_scale, int(bad0.sum()), int(rows.sum()), float(growth.max()),
                   before, _sqnr(w, after))


# ------------------------------------------------------------------ applied to one layer


def seven_bit(spec: QSpec) -> QSpec:
    """The same weight spec in 7 bits, [-63, 63]: no two same-sign codes sum past 128."""
    return replace(spec, bits=min(spec.bits, 7))


def needs_pair_limit(rules: KernelRules, lp: LayerPlan, w: torch.Tensor, groups: int,
                     repair: str | None) -> bool:
    """Whether the layer runs on pair-summing kernels that the rules say to respect: 8-bit
    activations into a symmetric int8 weight (4-bit codes, |w| <= 7, never reach the bound),
    not a depthwise conv (its kernels widen to 16/32 bits before adding: exact)."""
    if rules.pair_limit is None and repair != "pairs":
        return False
    assert lp.weight is not None
    if lp.act is None or lp.act.bits != 8 or lp.weight.bits != 8 or not lp.weight.symmetric:
        return False
    depthwise = groups > 1 and w.dim() > 2 and w.shape[1] == 1 and w.shape[0] == groups
    return not depthwise


#: fits by their inputs: a compile quantizes the same weights for every calibrator candidate
#: (and the search for every plan), and the fit depends on the weights, not the calibrator
_FITS: dict[str, tuple[torch.Tensor, torch.Tensor, dict[str, Any] | None]] = {}
_MAX_FITS = 512


def _key(*parts: Any) -> str:
    h = hashlib.sha1()
    for p in parts:
        if isinstance(p, torch.Tensor):
            t = p.detach().contiguous().cpu()
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy()
                     .tobytes())
        else:
            h.update(repr(p).encode())
    return h.hexdigest()


def fit_layer(w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, spec: QSpec,
              lp: LayerPlan, groups: int, input_sq_mean: torch.Tensor | None,
              rules: KernelRules) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any] | None]:
    """Codes and scales of one layer's weight `w` that no kernel pair can saturate, and the
    record of what changed for the report (None: nothing needed to). Memoized on its inputs."""
    assert lp.act is not None
    key = _key(w, codes, scale, spec, lp.act.qmin, lp.act.qmax, groups,
               input_sq_mean if input_sq_mean is not None else "none", rules.pair_limit)
    if key not in _FITS:
        if len(_FITS) >= _MAX_FITS:
            _FITS.pop(next(iter(_FITS)))
        _FITS[key] = _fit_layer(w, codes, scale, spec, lp, groups, input_sq_mean, rules)
    codes_out, scale_out, record = _FITS[key]
    return codes_out.clone(), scale_out.clone(), None if record is None else dict(record)


def _fit_layer(w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, spec: QSpec,
               lp: LayerPlan, groups: int, input_sq_mean: torch.Tensor | None,
               rules: KernelRules) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any] | None]:
    assert lp.act is not None
    limit = rules.pair_limit.acc_max if rules.pair_limit else INT16_MAX
    act_max = lp.act.qmax - lp.act.qmin  # raw codes reach the whole range: x - qmin
    bound = pair_bound(max(act_max, 1), limit)
    a, b = pair_index(tuple(w.shape))
    w2d = w.detach().reshape(w.shape[0], -1)
    col = None
    if input_sq_mean is not None and input_sq_mean.numel() == w.shape[1] * groups:
        # E[x²] of the input channel each weight multiplies (groups: the first group's
        # channels stand for all; the error weighting only needs relative sizes)
        per_in = input_sq_mean.reshape(groups, -1).mean(0)
        col = per_in.repeat_interleave(w2d.shape[1] // w.shape[1])
    shared = spec.granularity != "channel"
    fit = fit_pairs(w2d, scale, spec.qmax, a, b, bound, col, shared_scale=shared)
    if fit.pairs_over == 0:
        return codes, scale, None
    record = {
        "fix": "pairs", "pairs_over_bound": fit.pairs_over, "pair_bound": bound,
        "channels_changed": fit.channels_changed, "channels": int(w.shape[0]),
        "max_scale_growth": round(fit.max_scale_growth, 4),
        "weight_sqnr_db": {"unconstrained": round(fit.weight_sqnr_before_db, 2),
                           "pair_limited": round(fit.weight_sqnr_after_db, 2)},
        "why": rules.pair_limit.why if rules.pair_limit
        else "runtime parity check found this layer off"}
    new_scale = fit.scale.float().reshape(scale.shape) if not shared \
        else fit.scale.float().reshape(())
    return fit.codes.reshape(w.shape), new_scale, record
