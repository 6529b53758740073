"""Exact bit allocation: the ILP and the DP equal brute force on random small instances."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantflow.search.allocate import (
    InfeasibleBudgetError,
    pareto_sweep,
    solve_dp,
    solve_milp,
)


def brute_force(s: np.ndarray, c: np.ndarray, b: np.ndarray) -> float:
    """min Σ Ω over all K^L choices that fit every budget (inf when none does)."""
    best = np.inf
    n_layers = s.shape[0]
    for choice in itertools.product(range(s.shape[1]), repeat=n_layers):
        idx = np.arange(n_layers)
        ch = np.asarray(choice)
        if (c[:, idx, ch].sum(axis=1) <= b + 1e-9).all():
            best = min(best, float(s[idx, ch].sum()))
    return best


@st.composite
def instances(draw: st.DrawFn, integer: bool, resources: int = 1
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n_layers = draw(st.integers(1, 5))
    n_opts = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    s = rng.exponential(1.0, size=(n_layers, n_opts))
    if draw(st.booleans()):  # some forbidden options, but each layer keeps one
        mask = rng.random((n_layers, n_opts)) < 0.3
        mask[np.arange(n_layers), rng.integers(0, n_opts, n_layers)] = False
        s[mask] = np.inf
    c = rng.integers(0, 20, size=(resources, n_layers, n_opts)).astype(np.float64)
    if not integer:
        c = c + rng.random(c.shape)
    frac = draw(st.floats(0.0, 1.0))
    lo, hi = c.min(axis=2).sum(axis=1), c.max(axis=2).sum(axis=1)
    b = lo + frac * (hi - lo)
    if integer:
        b = np.floor(b)
    return s, c, b


def _check_solution(a_sens: float, a_cost: tuple[float, ...], want: float, b: np.ndarray) -> None:
    assert a_sens == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert (np.asarray(a_cost) <= b + 1e-6).all()


@settings(max_examples=60, deadline=None)
@given(instances(integer=False, resources=2))
def test_milp_equals_brute_force(inst: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    s, c, b = inst
    want = brute_force(s, c, b)
    if not np.isfinite(want):
        with pytest.raises(InfeasibleBudgetError):
            solve_milp(s, c, b)
        return
    a = solve_milp(s, c, b)
    _check_solution(a.sensitivity, a.cost, want, b)
    assert all(np.isfinite(s[i, k]) for i, k in enumerate(a.choice))


@settings(max_examples=60, deadline=None)
@given(instances(integer=True))
def test_dp_equals_brute_force_on_integer_costs(
        inst: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    s, c, b = inst
    want = brute_force(s, c, b)
    if not np.isfinite(want):
        with pytest.raises(InfeasibleBudgetError):
            solve_dp(s, c[0], float(b[0]))
        return
    a = solve_dp(s, c[0], float(b[0]), resolution=1.0)
    _check_solution(a.sensitivity, a.cost, want, b)


@settings(max_examples=40, deadline=None)
@given(instances(integer=False))
def test_dp_with_rounding_never_exceeds_budget(
        inst: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """Real costs: rounding up keeps the DP feasible, and it is no better than the optimum."""
    s, c, b = inst
    want = brute_force(s, c, b)
    try:
        a = solve_dp(s, c[0], float(b[0]), resolution=0.25)
    except InfeasibleBudgetError:
        return  # rounding may make a tight budget infeasible; never the other way round
    assert a.cost[0] <= b[0] + 1e-9
    assert a.sensitivity >= want - 1e-9


def test_pareto_sweep_is_monotone() -> None:
    rng = np.random.default_rng(0)
    s = rng.exponential(size=(6, 3))
    c = rng.integers(1, 10, size=(6, 3)).astype(float)
    budgets = np.linspace(c.min(axis=1).sum(), c.max(axis=1).sum(), 12)
    front = pareto_sweep(s, c, budgets)
    assert len(front) >= 2
    # a larger budget never gives a worse optimum
    sens = [a.sensitivity for a in sorted(front, key=lambda a: a.cost[0])]
    assert all(x >= y - 1e-12 for x, y in itertools.pairwise(sens))


def test_bad_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="cost must be"):
        solve_milp(np.ones((3, 2)), np.ones((3, 3)), 1.0)
