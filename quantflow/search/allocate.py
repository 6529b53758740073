"""Exact budgeted bit allocation (HAWQ-V3): a multiple-choice knapsack.

Every layer l picks exactly one option k (W8A8, W8A16, W4A8, FP32, ...). Option k of layer l
has a sensitivity Ω[l, k] (the expected loss increase, see `hawq.py`) and costs C[m, l, k]
for each budgeted resource m (bytes, milliseconds). Sensitivities add up over layers (the
second-order model drops the cross-layer Hessian blocks), so the best allocation is

    minimize  Σ_l Ω[l, k_l]   subject to  Σ_l C[m, l, k_l] ≤ B[m]  for every m.

Two exact solvers:
- `solve_milp`: a 0/1 integer program (x[l,k] binary, Σ_k x[l,k] = 1) solved by
  `scipy.optimize.milp` (HiGHS branch and bound). Exact for any real costs and any number of
  budgets; the default.
- `solve_dp`: dynamic programming over a discretized budget for one resource. Costs are
  rounded UP to multiples of `resolution`, so the result never violates the real budget; it
  is exactly optimal when every cost is a multiple of `resolution` (e.g. bytes with
  resolution 1) and within one rounding step otherwise. O(L · K · B/resolution).

Options that are not allowed for a layer carry Ω = +inf (e.g. a layer the target cannot run
in 4 bits); both solvers skip them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from quantflow.errors import BudgetExceededError


class InfeasibleBudgetError(BudgetExceededError):
    """No allocation fits the budget, even with every layer at its cheapest option."""


@dataclass(frozen=True)
class Allocation:
    """One option index per layer, with the objective and the cost(s) it spends."""

    choice: tuple[int, ...]
    sensitivity: float
    cost: tuple[float, ...]


def _check(sens: np.ndarray, cost: np.ndarray, budget: np.ndarray) -> None:
    if sens.ndim != 2:
        raise ValueError(f"sensitivity must be [layers, options], got shape {sens.shape}")
    if cost.shape[1:] != sens.shape:
        raise ValueError(f"cost must be [resources, layers, options] = [M, {sens.shape[0]}, "
                         f"{sens.shape[1]}], got {cost.shape}")
    if budget.shape != (cost.shape[0],):
        raise ValueError(f"budget must have one entry per resource ({cost.shape[0]}), "
                         f"got shape {budget.shape}")
    if np.isnan(sens).any() or not np.isfinite(cost).all():
        raise ValueError("sensitivities must not be NaN and costs must be finite")


def _as_arrays(sens: object, cost: object, budget: object
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = np.asarray(sens, dtype=np.float64)
    c = np.asarray(cost, dtype=np.float64)
    b = np.atleast_1d(np.asarray(budget, dtype=np.float64))
    if c.ndim == 2:
        c = c[None]
    _check(s, c, b)
    return s, c, b


def _result(s: np.ndarray, c: np.ndarray, choice: list[int]) -> Allocation:
    idx = np.arange(len(choice))
    ch = np.asarray(choice)
    return Allocation(tuple(int(k) for k in choice), float(s[idx, ch].sum()),
                      tuple(float(v) for v in c[:, idx, ch].sum(axis=1)))


def _infeasible(c: np.ndarray, b: np.ndarray, allowed: np.ndarray) -> InfeasibleBudgetError:
    cheapest = np.where(allowed[None], c, np.inf).min(axis=2).sum(axis=1)
    return InfeasibleBudgetError(
        f"bit allocation: no per-layer choice fits the budget {b.tolist()} (the cheapest "
        f"allowed choice costs {cheapest.tolist()}); fix: raise the budget or allow more "
        "options (e.g. W4A8) for the large layers")


def solve_milp(sensitivity: object, cost: object, budget: object) -> Allocation:
    """Exact allocation by 0/1 ILP. cost: [M, L, K] (or [L, K] for one resource)."""
    s, c, b = _as_arrays(sensitivity, cost, budget)
    n_layers, n_opts = s.shape
    allowed = np.isfinite(s)
    if not allowed.any(axis=1).all():
        bad = int(np.flatnonzero(~allowed.any(axis=1))[0])
        raise ValueError(f"layer {bad} has no allowed option (all sensitivities are inf)")
    # scale the objective so HiGHS tolerances are relative to the problem, not absolute
    finite = s[allowed]
    scale = max(float(np.abs(finite).max()), 1e-300)
    obj = np.where(allowed, s / scale, 0.0).ravel()
    one_hot = np.zeros((n_layers, n_layers * n_opts))
    for layer in range(n_layers):
        one_hot[layer, layer * n_opts:(layer + 1) * n_opts] = 1.0
    cons = [LinearConstraint(one_hot, 1.0, 1.0),
            LinearConstraint(c.reshape(c.shape[0], -1), -np.inf, b)]
    upper = allowed.ravel().astype(np.float64)  # forbidden options: 0
    res = milp(obj, constraints=cons, integrality=np.ones_like(obj),
               bounds=Bounds(np.zeros_like(obj), upper), options={"mip_rel_gap": 0.0})
    if res.status == 2:  # infeasible
        raise _infeasible(c, b, allowed)
    if not res.success or res.x is None:
        raise RuntimeError(f"bit allocation: scipy milp failed: {res.message}")
    choice = np.argmax(res.x.reshape(n_layers, n_opts), axis=1).tolist()
    return _result(s, c, choice)


def solve_dp(sensitivity: object, cost: object, budget: float, *, resolution: float = 1.0
             ) -> Allocation:
    """Allocation by DP over the budget in steps of `resolution` (one resource only)."""
    s, c, b = _as_arrays(sensitivity, cost, budget)
    if c.shape[0] != 1:
        raise ValueError("solve_dp handles one budgeted resource; use solve_milp for several")
    if resolution <= 0:
        raise ValueError(f"resolution must be > 0, got {resolution}")
    n_layers, n_opts = s.shape
    allowed = np.isfinite(s)
    # round up (with a relative slack for float noise, e.g. 0.3/0.1 = 2.9999999999999996)
    units = np.ceil(c[0] / resolution - 1e-9).astype(np.int64)
    if (units < 0).any():
        raise ValueError("solve_dp needs non-negative costs")
    cap = int(np.floor(b[0] / resolution + 1e-9))
    if cap < 0 or cap > 50_000_000 // max(n_layers, 1):
        raise ValueError(f"solve_dp: budget/resolution = {cap} units is out of range; "
                         "use a coarser resolution or solve_milp")
    # best[u] = min Σ Ω over the layers so far spending exactly u units
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    back = np.zeros((n_layers, cap + 1), dtype=np.int64)
    for layer in range(n_layers):
        new = np.full(cap + 1, np.inf)
        arg = np.full(cap + 1, -1, dtype=np.int64)
        for k in range(n_opts):
            if not allowed[layer, k] or units[layer, k] > cap:
                continue
            u = int(units[layer, k])
            cand = np.full(cap + 1, np.inf)
            cand[u:] = best[:cap + 1 - u] + s[layer, k]
            better = cand < new
            new[better] = cand[better]
            arg[better] = k
        best, back[layer] = new, arg
    if not np.isfinite(best).any():
        raise _infeasible(c, b, allowed)
    u = int(np.argmin(best))
    choice = [0] * n_layers
    for layer in range(n_layers - 1, -1, -1):
        k = int(back[layer, u])
        choice[layer] = k
        u -= int(units[layer, k])
    return _result(s, c, choice)


def pareto_sweep(sensitivity: object, cost: object, budgets: object) -> list[Allocation]:
    """Exact allocations for a sequence of budgets on one resource (cost: [L, K]).

    Gives the sensitivity-vs-cost frontier that seeds the search with diverse starting points;
    infeasible budgets are skipped and duplicate allocations dropped.
    """
    out: list[Allocation] = []
    seen: set[tuple[int, ...]] = set()
    for bud in np.atleast_1d(np.asarray(budgets, dtype=np.float64)):
        try:
            a = solve_milp(sensitivity, cost, float(bud))
        except InfeasibleBudgetError:
            continue
        if a.choice not in seen:
            seen.add(a.choice)
            out.append(a)
    return out
