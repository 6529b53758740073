"""Budget semantics (objective modes, limits) and `random_feasible` sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quantflow.search.allocate import InfeasibleBudgetError
from quantflow.search.compile import LATENCY_SLACK, SEARCH_DROP_MARGIN, search_budget
from quantflow.search.quantune import (
    Budget,
    Trial,
    objective,
    random_feasible,
    satisfies,
    seeds,
    uniform,
)
from quantflow.search.space import OPTIONS, Candidate, SearchSpace, global_configs, size_table


def _space(latency: bool = False) -> SearchSpace:
    rng = np.random.default_rng(0)
    numels = [int(n) for n in rng.integers(100, 5000, size=12)]
    size = size_table(numels, OPTIONS)
    sens = {g.scheme_key: rng.random((12, len(OPTIONS))) for g in global_configs()}
    lat = rng.random((12, len(OPTIONS))) if latency else None
    return SearchSpace([f"conv{i}" for i in range(12)], OPTIONS, global_configs(), sens, size,
                       lat, 0.1 if latency else 0.0)


@pytest.mark.parametrize("ratio", [0.55, 0.7, 1.0, 2.0])
def test_draws_meet_a_size_budget(ratio: float) -> None:
    space = _space()
    budget = Budget(max_size_ratio=ratio)
    rng = np.random.default_rng(1)
    draws = [random_feasible(space, budget, rng) for _ in range(300)]
    limit = ratio * space.int8_size()
    assert all(space.size_bytes(c) <= limit * (1 + 1e-9) for c in draws)
    # not degenerate: many distinct candidates, every option used somewhere
    assert len({c.key() for c in draws}) > 250
    used = {o for c in draws for o in c.options}
    assert used == set(OPTIONS) if ratio >= 0.7 else "W4A8" in used
    # uniform rejection sampling would rarely hit 0.55 × INT8: the sampler always does
    if ratio == 0.55:
        uniform_hits = sum(space.size_bytes(c) <= limit for c in
                           (random_feasible(space, Budget(), rng) for _ in range(300)))
        assert uniform_hits < 15


def test_draws_meet_size_and_latency_budgets_together() -> None:
    space = _space(latency=True)
    assert space.latency is not None
    w8 = OPTIONS.index("W8A8")
    lat_limit = float(space.latency[:, w8].sum()) + space.latency_rest
    budget = Budget(max_size_ratio=0.8, max_latency_ms=lat_limit)
    rng = np.random.default_rng(2)
    for _ in range(200):
        c = random_feasible(space, budget, rng)
        assert space.feasible(c, 0.8 * space.int8_size(), lat_limit)


def test_an_unreachable_budget_names_itself() -> None:
    with pytest.raises(InfeasibleBudgetError, match="cheapest option"):
        random_feasible(_space(), Budget(max_size_ratio=0.4), np.random.default_rng(0))


def _trial(space: SearchSpace, c: Candidate, drop: float) -> Trial:
    return Trial(c, 90.0 - drop, 90.0, space.size_bytes(c), space.latency_ms(c))


def test_minimize_size_within_drop_and_int8_latency() -> None:
    """Budget(minimize='size', max_latency_ratio=1): the smallest candidate within the drop
    whose table latency is not above uniform W8A8's wins; the rest rank below it."""
    space = _space(latency=True)
    assert space.latency is not None
    budget = Budget(max_drop=1.0, minimize="size", max_size_ratio=1.0, max_latency_ratio=1.0)
    assert budget.mode(space) == "size"
    w8 = uniform(space, "W8A8")
    assert budget.latency_limit(space) == pytest.approx(space.latency_ms(w8))
    rng = np.random.default_rng(3)
    cands = [random_feasible(space, budget, rng) for _ in range(200)] + [w8]
    trials = [_trial(space, c, float(d)) for c, d in zip(cands, rng.uniform(0, 2, len(cands)))]
    ok = [t for t in trials if satisfies(t, budget, space)]
    best = max(trials, key=lambda t: objective(t, budget, space))
    assert ok and best in ok
    assert best.size_bytes == min(t.size_bytes for t in ok)
    assert best.latency_ms is not None
    assert best.latency_ms <= space.latency_ms(w8) * (1 + 1e-9)
    # a trial over the drop ranks below every trial within it, however small
    over = _trial(space, uniform(space, "W4A8"), 1.5)
    assert objective(over, budget, space) < min(objective(t, budget, space) for t in ok)
    # ILP seeds sweep the size axis under the latency limit: all of them are feasible
    for c in seeds(space, budget):
        assert space.feasible(c, budget.size_limit(space), budget.latency_limit(space))


def test_budget_modes_and_validation() -> None:
    space = _space(latency=False)
    assert Budget(max_size_ratio=0.7).mode(space) == "quality"
    assert Budget().mode(space) == "quality"
    assert Budget(max_drop=1.0).mode(space) == "size"  # no measured table: size
    assert Budget(max_drop=1.0, minimize="latency").mode(space) == "size"
    assert Budget(max_drop=1.0).mode(_space(latency=True)) == "latency"
    # without a measured table, latency limits cannot apply (the BOPs proxy has no unit)
    assert Budget(max_latency_ratio=1.0).latency_limit(space) is None
    with pytest.raises(ValueError, match="needs max_drop"):
        Budget(minimize="size")
    with pytest.raises(ValueError, match="minimize must be one of"):
        Budget(max_drop=1.0, minimize="speed")


def test_compile_maps_flags_to_budgets() -> None:
    from quantflow.pipeline import CompileConfig

    b = search_budget(CompileConfig(bits="mixed", max_drop=1.0), measured=True)
    assert (b.minimize, b.max_size_ratio, b.max_latency_ratio) == ("size", 1.0, LATENCY_SLACK)
    assert b.max_drop == pytest.approx(1.0 * SEARCH_DROP_MARGIN)
    b = search_budget(CompileConfig(bits="mixed", max_drop=1.0), measured=False)
    assert b.max_latency_ratio is None
    b = search_budget(CompileConfig(bits="mixed", max_drop=1.0, max_size_ratio=0.6),
                      measured=True)
    assert (b.minimize, b.max_size_ratio, b.max_drop) == (None, 0.6, 1.0)
    b = search_budget(CompileConfig(bits="mixed", max_latency_ms=2.0), measured=True)
    assert (b.max_latency_ms, b.max_size_ratio, b.max_drop) == (2.0, None, None)
    assert search_budget(CompileConfig(bits="mixed"), measured=True) == Budget(max_size_ratio=1.0)


def test_latency_validation_takes_the_first_candidate_measured_within_the_limit() -> None:
    from quantflow.search.validate import TOLERANCE, first_within

    measured = {"a": 1.5, "b": 1.0 * (1 + TOLERANCE / 2), "c": 0.5}
    chosen, checks = first_within(["a", "b", "c"], measured.__getitem__, 1.0,
                                  lambda k: 0.9, str, top=3)
    assert chosen == "b"  # "a" is over the limit; "c" is never timed
    assert [(c.config, c.accepted) for c in checks] == [("a", False), ("b", True)]
    chosen, checks = first_within(["a", "b", "c"], {"a": 2.0, "b": 3.0, "c": 0.1}.__getitem__,
                                  1.0, lambda k: None, str, top=2)
    assert chosen is None and len(checks) == 2  # only the top 2 are tried


@pytest.mark.parametrize("calibrator", ["minmax", "percentile", "entropy", "mse"])
def test_16_bit_activations_are_never_clipped(calibrator: str) -> None:
    """A16 takes the whole observed range whatever the candidate's calibrator; A8 keeps it."""
    from quantflow.search.space import GlobalConfig, layer_plan

    g = GlobalConfig(calibrator=calibrator)
    a16, a8 = layer_plan("W8A16", g).act, layer_plan("W8A8", g).act
    assert a16 is not None and a8 is not None
    assert (a16.bits, a16.calibrator) == (16, "minmax")
    assert (a8.bits, a8.calibrator) == (8, calibrator)


class _Stop(Exception):
    pass


@pytest.mark.parametrize(("flags", "w8a16"), [({"max_drop": 1.0}, False),
                                              ({"max_size_ratio": 0.8}, True)])
def test_ort_drops_w8a16_only_when_latency_is_capped_at_int8(
        flags: dict, w8a16: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--max-drop alone caps latency at INT8's; on ORT a W8A16 layer (float conv between
    Q16/DQ16) cannot meet that, so it is not offered; with a size budget it stays."""
    import torch
    from torch import nn

    from quantflow.ir import capture
    from quantflow.pipeline import CompileConfig, Dataset
    from quantflow.search import compile as sc

    seen: dict = {}

    def fake_search(*args: object, **kwargs: object) -> None:
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr(sc, "search_mixed", fake_search)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x = torch.randn(16, 1, 8, 8)
    gm = capture(net.eval(), (x[:1],))
    config = CompileConfig(bits="mixed", calibrator="minmax", equalize="off", **flags)
    with pytest.raises(_Stop):
        sc.mixed_plan(gm, Dataset(x, None, "rand"), None, config, tmp_path)
    options = seen["search"].options
    assert ("W8A16" in options) is w8a16
    assert {"W8A8", "W4A8", "FP32"} <= set(options)
