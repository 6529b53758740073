"""Cost models: XGBoost ranks candidates better than random; save/load; online updates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quantflow.search.costmodel import CostModel, RandomCostModel, XGBCostModel


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A quality surface shaped like the search's: Σ sensitivity·(bits penalty) + interactions."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, 8))
    y = -(3 * x[:, 0] * x[:, 1] + 2 * x[:, 2] ** 2 + np.where(x[:, 3] > 0.5, 1.0, 0.0)
          + 0.5 * x[:, 4]) + 0.05 * rng.standard_normal(n)
    return x, y


def top_k_recall(pred: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Fraction of the true top-k found in the predicted top-k."""
    return len(set(np.argsort(-pred)[:k]) & set(np.argsort(-truth)[:k])) / k


def test_xgb_beats_random_at_ranking() -> None:
    x_train, y_train = synthetic(64, seed=0)
    x_test, y_test = synthetic(500, seed=1)
    xgb_model, rnd = XGBCostModel(seed=0), RandomCostModel(seed=0)
    for m in (xgb_model, rnd):
        assert isinstance(m, CostModel)
        m.update(x_train, y_train)
    rank_corr = {name: float(np.corrcoef(np.argsort(np.argsort(m.predict(x_test))),
                                         np.argsort(np.argsort(y_test)))[0, 1])
                 for name, m in (("xgb", xgb_model), ("random", rnd))}
    recall = {name: top_k_recall(m.predict(x_test), y_test, 25)
              for name, m in (("xgb", xgb_model), ("random", rnd))}
    # random: Spearman ≈ 0 ± 0.05 and recall ≈ 5%; the trees must be far better
    assert rank_corr["xgb"] > 0.7 > abs(rank_corr["random"]) + 0.5, rank_corr
    assert recall["xgb"] >= 0.3 > recall["random"], recall


def test_online_update_improves_the_model() -> None:
    x_test, y_test = synthetic(400, seed=2)
    m = XGBCostModel(seed=0)
    errors = []
    for chunk in range(4):
        x, y = synthetic(16, seed=10 + chunk)
        m.update(x, y)
        errors.append(float(np.mean((m.predict(x_test) - y_test) ** 2)))
    assert m.n_rows == 64
    assert errors[-1] < 0.7 * errors[0], errors


def test_save_load_round_trip(tmp_path: Path) -> None:
    x, y = synthetic(40, seed=3)
    m = XGBCostModel(seed=0)
    m.update(x, y)
    m.save(tmp_path / "cm.json")
    m2 = XGBCostModel()
    m2.load(tmp_path / "cm.json")
    x_test, _ = synthetic(50, seed=4)
    np.testing.assert_allclose(m2.predict(x_test), m.predict(x_test), rtol=1e-6, atol=1e-6)
    # as warm-start data the rows count less than fresh measurements
    m3 = XGBCostModel(prior_weight=0.25)
    m3.load(tmp_path / "cm.json", as_prior=True)
    assert m3.n_rows == 40 and np.allclose(m3.w, 0.25)
    r = RandomCostModel(seed=7)
    r.update(x, y)
    r.save(tmp_path / "r.json")
    r2 = RandomCostModel()
    r2.load(tmp_path / "r.json")
    assert r2.n_rows == 40 and r2.seed == 7


def test_untrained_model_and_bad_input() -> None:
    m = XGBCostModel()
    assert (m.predict(np.zeros((3, 5))) == 0.0).all()
    with pytest.raises(ValueError, match="2-D"):
        m.update(np.zeros(5), np.zeros(5))
    m.update(np.zeros((2, 5)), np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="feature set changed"):
        m.update(np.zeros((2, 6)), np.array([1.0, 2.0]))
