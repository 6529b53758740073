"""The curve arithmetic of tools/bench_hawq_ranking.py: size ratios, budget prefixes, AUC."""

from __future__ import annotations

import numpy as np
import pytest
from tool_loader import load_tool

bench = load_tool("bench_hawq_ranking")


def test_size_ratios_follow_the_order() -> None:
    # 4-bit weights are half the INT8 bytes: dropping the 60-element layer first saves 30 of 100
    r = bench.size_ratios([2, 0, 1], [10, 30, 60])
    assert np.allclose(r, [1.0, 0.70, 0.65, 0.50], atol=1e-12)


def test_budget_ks_take_the_first_prefix_that_fits() -> None:
    ratios = np.array([1.0, 0.70, 0.65, 0.50])
    assert bench.budget_ks(ratios, (1.0, 0.9, 0.7, 0.6, 0.5)) == [0, 1, 1, 3, 3]
    with pytest.raises(ValueError, match="below the all-4-bit size"):
        bench.budget_ks(ratios, (0.4,))


def test_budget_curve_auc_is_the_mean_over_budgets() -> None:
    calls: list[int] = []

    def quality(k: int) -> float:
        calls.append(k)
        return 90.0 - k  # each 4-bit layer costs one point

    c = bench.budget_curve([2, 0, 1], [10, 30, 60], quality, (1.0, 0.9, 0.7, 0.6, 0.5))
    assert sorted(calls) == [0, 1, 3]  # each distinct prefix evaluated once
    assert c["at_budget"] == {"1.00": 90.0, "0.90": 89.0, "0.70": 89.0, "0.60": 87.0,
                              "0.50": 87.0}
    assert c["auc"] == pytest.approx((90 + 89 + 89 + 87 + 87) / 5, abs=1e-12)
    assert [p["k"] for p in c["points"]] == [0, 1, 3]
    assert c["points"][1]["weight_bytes"] == pytest.approx(70.0, abs=1e-9)


def test_orderings() -> None:
    delta = np.array([3.0, 1.0, 2.0])
    numel = [10, 100, 10]
    o = bench.orderings(delta, delta + 5.0, np.array([0.1, 0.3, 0.2]), numel, n_random=2)
    assert o["hawq"] == [1, 2, 0]
    assert o["reverse_hawq"] == [0, 2, 1]
    # per byte saved: 3/5, 1/50, 2/5
    assert o["hawq_per_byte"] == [1, 2, 0]
    assert o["trace_only"] == [0, 2, 1]
    # seeded permutations: reproducible, one per seed
    assert o["random_0"] == [int(i) for i in np.random.default_rng(0).permutation(3)]
    assert sorted(o["random_1"]) == [0, 1, 2] and "random_2" not in o


def test_random_summary() -> None:
    curves = {"hawq": {"auc": 99.0, "at_budget": {"0.50": 1.0}},
              "random_0": {"auc": 1.0, "at_budget": {"0.50": 2.0}},
              "random_1": {"auc": 3.0, "at_budget": {"0.50": 4.0}}}
    s = bench.random_summary(curves)
    assert s["n"] == 2
    assert s["auc"] == pytest.approx({"mean": 2.0, "std": 2 ** 0.5, "min": 1.0, "max": 3.0})
    assert s["at_budget"]["0.50"]["mean"] == pytest.approx(3.0)
