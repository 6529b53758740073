"""Cost models that predict a candidate's measured quality from its features (TVM-style).

The search can only afford a few real evaluations (quantize + run on the evaluation data), but
can featurize thousands of candidates for free. A cost model learns features → quality from
the evaluations so far and ranks the unevaluated candidates; the best-predicted ones get the
next real evaluations, whose results update the model (online learning). Same interface as
TVM's auto-scheduler cost models: `update(features, scores)`, `predict(features)`, plus
`save`/`load` so a model trained on earlier runs (other models) warm-starts a new search.

- `XGBCostModel`: gradient-boosted trees (xgboost). Trees suit these features: few samples,
  interactions (4-bit hurts only where the Hessian is large), no scaling needed. It keeps
  every (features, score) pair and refits from scratch on each update: with at most a few
  thousand rows that is milliseconds, and unlike continued boosting it cannot drift.
  With `bootstrap=True` every refit sees Poisson(1)-reweighted rows, so its predictions are
  a sample from an approximate posterior and greedy selection on them is Thompson sampling:
  the search keeps exploring where the model is unsure instead of locking onto its first
  good region.
- `RandomCostModel`: uniform random scores; the baseline any learned model must beat.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

FORMAT = "quantflow.XGBCostModel/1"


@runtime_checkable
class CostModel(Protocol):
    """Predicts a score (higher is better) for feature rows; learns from measured scores."""

    def update(self, features: np.ndarray, scores: np.ndarray) -> None:
        """Add measured (features, score) rows and refit."""
        ...

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Predicted scores, one per row."""
        ...

    def save(self, path: str | Path) -> None:
        ...

    def load(self, path: str | Path) -> None:
        ...


def _rows(features: np.ndarray) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D array [rows, features], got shape {x.shape}")
    return x


class XGBCostModel:
    """XGBoost regressor on (features → score), refit on all data after each update.

    `prior_weight` down-weights rows loaded from earlier runs (warm start) relative to rows
    measured in this run, so the new model's own evaluations dominate once they exist.
    """

    def __init__(self, *, n_estimators: int = 200, max_depth: int = 4, learning_rate: float = 0.1,
                 seed: int = 0, prior_weight: float = 0.3, bootstrap: bool = False) -> None:
        self.params = {"n_estimators": n_estimators, "max_depth": max_depth,
                       "learning_rate": learning_rate, "random_state": seed,
                       "subsample": 0.9, "colsample_bytree": 0.9, "min_child_weight": 1.0,
                       "n_jobs": 1, "tree_method": "hist"}
        self.prior_weight = prior_weight
        self.bootstrap = bootstrap
        self._rng = np.random.default_rng(seed)
        self.x = np.zeros((0, 0))
        self.y = np.zeros(0)
        self.w = np.zeros(0)
        self._model: object | None = None

    @property
    def n_rows(self) -> int:
        return int(self.y.shape[0])

    def _append(self, x: np.ndarray, y: np.ndarray, weight: float) -> None:
        if self.x.size and x.shape[1] != self.x.shape[1]:
            raise ValueError(f"cost model: feature rows have {x.shape[1]} columns, the model "
                             f"was trained on {self.x.shape[1]}; the feature set changed, so "
                             "start from a fresh database (or delete the saved cost model)")
        self.x = x if not self.x.size else np.vstack([self.x, x])
        self.y = np.concatenate([self.y, y])
        self.w = np.concatenate([self.w, np.full(len(y), weight)])

    def update(self, features: np.ndarray, scores: np.ndarray) -> None:
        x, y = _rows(features), np.asarray(scores, dtype=np.float64).reshape(-1)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{x.shape[0]} feature rows but {y.shape[0]} scores")
        if not len(y):
            return
        self._append(x, y, 1.0)
        self._fit()

    def _fit(self) -> None:
        import xgboost as xgb  # lazy: only the search needs it

        if self.n_rows < 2:
            self._model = None
            return
        w = self.w
        if self.bootstrap:  # online (Poisson) bootstrap: each refit is a posterior sample
            w = w * self._rng.poisson(1.0, size=w.shape)
            if not (w > 0).any():
                w = self.w
        model = xgb.XGBRegressor(**self.params)
        model.fit(self.x, self.y, sample_weight=w)
        self._model = model

    def predict(self, features: np.ndarray) -> np.ndarray:
        x = _rows(features)
        if self._model is None:  # nothing learned yet: no preference (mean of what we saw)
            return np.full(x.shape[0], float(self.y.mean()) if self.n_rows else 0.0)
        return np.asarray(self._model.predict(x), dtype=np.float64)  # type: ignore[attr-defined]

    def save(self, path: str | Path) -> None:
        """JSON with the training rows (the model is refit on load: exact and portable)."""
        Path(path).write_text(json.dumps({
            "format": FORMAT, "params": self.params, "prior_weight": self.prior_weight,
            "x": self.x.tolist(), "y": self.y.tolist(), "w": self.w.tolist()}) + "\n")

    def load(self, path: str | Path, *, as_prior: bool = False) -> None:
        """Replace the data with a saved model's; `as_prior` marks it as warm-start data."""
        d = json.loads(Path(path).read_text())
        if d.get("format") != FORMAT:
            raise ValueError(f"{path}: not a saved XGBCostModel (format={d.get('format')!r})")
        self.params = d["params"]
        self.x, self.y = np.asarray(d["x"], dtype=np.float64), np.asarray(d["y"], np.float64)
        self.w = np.asarray(d["w"], dtype=np.float64)
        if self.x.size == 0:
            self.x = np.zeros((0, 0))
        if as_prior:
            self.w = np.full_like(self.y, self.prior_weight)
        self._fit()

    def warm_start(self, features: np.ndarray, scores: np.ndarray) -> None:
        """Add rows from earlier runs (other models) at `prior_weight`."""
        x, y = _rows(features), np.asarray(scores, dtype=np.float64).reshape(-1)
        if len(y):
            self._append(x, y, self.prior_weight)
            self._fit()


class RandomCostModel:
    """Random scores: what ranking without a model looks like (the baseline)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.n_rows = 0

    def update(self, features: np.ndarray, scores: np.ndarray) -> None:
        self.n_rows += int(np.asarray(scores).size)

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(self.rng.random(_rows(features).shape[0]), dtype=np.float64)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"format": "quantflow.RandomCostModel/1",
                                          "seed": self.seed, "n_rows": self.n_rows}) + "\n")

    def load(self, path: str | Path) -> None:
        d = json.loads(Path(path).read_text())
        self.seed, self.n_rows = int(d["seed"]), int(d["n_rows"])
        self.rng = np.random.default_rng(self.seed)
