"""quantflow.pair_limit: the int16 pair bound, the kernels' K order and the weight fit (pure).

What must hold: the bound is the exact saturation threshold; `kernel_order` reproduces the
(kernel position, input channel) order of ORT's packing; `fit_pairs` leaves no violating
pair, touches only channels that had one, and is at least as close to the float weights
(in the weighted squared error it minimizes) as the two simplest repairs, moving the pairs
at the original scale and 7-bit weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantflow.pair_limit import (
    INT16_MAX,
    fit_pairs,
    kernel_order,
    pair_bound,
    pair_index,
    violations,
)


def test_bound_is_the_exact_saturation_threshold() -> None:
    bound = pair_bound(255)
    assert bound == 128
    # the largest same-sign pair allowed fits an int16 for the largest input, one more does not
    assert 255 * bound <= INT16_MAX < 255 * (bound + 1)
    # opposite signs never saturate with int8 weights: the worst is one full product
    assert 255 * 127 <= INT16_MAX


def test_kernel_order_is_position_major_channel_minor() -> None:
    # conv weight [out, in=3, 2, 2]: K order (k0,c0) (k0,c1) (k0,c2) (k1,c0) ...
    order = kernel_order((5, 3, 2, 2))
    flat = [int(i) for i in order]
    # torch layout per channel: index = c * 4 + k
    assert flat[:6] == [0, 4, 8, 1, 5, 9]
    assert sorted(flat) == list(range(12))
    # linear [out, in]: input order itself
    assert [int(i) for i in kernel_order((7, 6))] == list(range(6))
    a, b = pair_index((5, 3, 2, 2))
    assert [(int(x), int(y)) for x, y in zip(a, b)][:3] == [(0, 4), (8, 1), (5, 9)]
    # an odd K leaves the last element unpaired (the kernel pads K with zeros)
    a, b = pair_index((2, 3, 1, 1))
    assert a.numel() == b.numel() == 1


def _codes_err(codes: torch.Tensor, scale: torch.Tensor, w: torch.Tensor,
               cw: torch.Tensor) -> torch.Tensor:
    return ((codes * scale.reshape(-1, 1) - w.double()) ** 2 * cw).sum(1)


@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (32, 16, 1, 1), (16, 1, 3, 3), (10, 64)])
def test_fit_pairs_guarantees(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * 0.1
    w.view(shape[0], -1)[:, 0] *= 4  # outliers, as in real conv weights: many violations
    w2 = w.reshape(shape[0], -1)
    scale = w2.abs().amax(1) / 127
    a, b = pair_index(shape)
    cw = torch.rand(w2.shape[1], generator=g, dtype=torch.float64) + 0.1
    fit = fit_pairs(w2, scale, 127, a, b, 128, cw)
    assert not violations(fit.codes, a, b, 128).any()
    assert fit.codes.abs().max() <= 127 and bool((fit.codes == fit.codes.round()).all())
    plain = torch.round(w2.double() / scale.double().reshape(-1, 1)).clamp(-127, 127)
    bad_rows = violations(plain, a, b, 128).any(1)
    assert fit.pairs_over == int(violations(plain, a, b, 128).sum()) > 0
    assert fit.channels_changed == int(bad_rows.sum())
    # channels without a violation keep codes and scale
    assert torch.equal(fit.codes[~bad_rows], plain[~bad_rows])
    assert torch.equal(fit.scale[~bad_rows], scale.double()[~bad_rows])
    # no worse than moving the pairs at the original scale (the grid's first point)...
    err = _codes_err(fit.codes, fit.scale, w2, cw)
    moved = fit_pairs(w2, scale, 127, a, b, 128, cw, grid=1 + 1)  # t in {1, t_max}
    assert bool((err <= _codes_err(moved.codes, moved.scale, w2, cw) + 1e-12).all())
    # ... and than 7-bit weights ([-64, 64]: 64 + 64 = 128) on the changed channels
    s7 = scale.double() * 127 / 64
    c7 = torch.round(w2.double() / s7.reshape(-1, 1)).clamp(-64, 64)
    assert bool((err[bad_rows] <= _codes_err(c7, s7, w2, cw)[bad_rows] + 1e-12).all())


def test_fit_pairs_shared_scale_keeps_one_scale() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 16, generator=g)
    scale = w.abs().max() / 127
    a, b = pair_index((8, 16))
    fit = fit_pairs(w, scale.reshape(()), 127, a, b, 128, shared_scale=True)
    assert fit.scale.numel() == 1
    assert not violations(fit.codes, a, b, 128).any()


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 9), st.sampled_from([1, 3]), st.integers(0, 10_000))
def test_fit_pairs_never_leaves_a_violation(out: int, cin: int, k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    w = torch.from_numpy(rng.standard_t(3, size=(out, cin, k, k)))  # heavy tails
    w2 = w.reshape(out, -1)
    scale = (w2.abs().amax(1) / 127).clamp_min(1e-8)
    a, b = pair_index(tuple(w.shape))
    fit = fit_pairs(w2, scale, 127, a, b, 128)
    assert not violations(fit.codes, a, b, 128).any()
    # every kernel pair's worst-case dot product fits an int16 for any uint8 input
    ca, cb = fit.codes[:, a], fit.codes[:, b]
    worst = torch.maximum((255 * ca.clamp_min(0) + 255 * cb.clamp_min(0)),
                          -(255 * ca.clamp_max(0) + 255 * cb.clamp_max(0)))
    assert worst.numel() == 0 or int(worst.max()) <= INT16_MAX
