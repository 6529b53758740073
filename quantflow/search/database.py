"""The evaluation database: every real evaluation, appended the moment it finishes.

SQLite (stdlib, one file, atomic commits) at `~/.cache/quantflow/search.sqlite` or a given
path. A row is keyed by (model hash, data hash, candidate key), so

- a rerun after Ctrl-C finds every finished evaluation and never repeats it (resumable), and
- rows of OTHER models (other hashes) warm-start the cost model of a new search, through the
  model-agnostic features stored with each row.

The model hash covers the graph code and every constant's bytes; the data hash covers the
calibration and evaluation data identity, so a changed dataset never reuses stale scores.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import fx

from quantflow.cache import cache_dir

SCHEMA = """
CREATE TABLE IF NOT EXISTS evaluations (
    model_hash TEXT NOT NULL,
    data_hash TEXT NOT NULL,
    key TEXT NOT NULL,
    features TEXT NOT NULL,
    quality REAL NOT NULL,
    reference_quality REAL NOT NULL,
    size_bytes REAL,
    latency_ms REAL,
    seconds REAL,
    created REAL,
    PRIMARY KEY (model_hash, data_hash, key)
)
"""


def default_path() -> Path:
    return cache_dir("search.sqlite")


def model_hash(gm: fx.GraphModule) -> str:
    """sha256 of the graph code and of every parameter/buffer (name, dtype, shape, bytes)."""
    h = hashlib.sha256(gm.code.encode())
    for name, t in sorted({**dict(gm.named_parameters()), **dict(gm.named_buffers())}.items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def tensor_hash(tensors: Iterable[torch.Tensor | None], extra: str = "") -> str:
    """sha256 of tensors' bytes (None counts as a marker) and an extra string."""
    h = hashlib.sha256(extra.encode())
    for t in tensors:
        if t is None:
            h.update(b"<none>")
            continue
        h.update(f"{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Record:
    """One real evaluation."""

    model_hash: str
    data_hash: str
    key: str
    features: tuple[float, ...]
    quality: float
    reference_quality: float
    size_bytes: float | None
    latency_ms: float | None
    seconds: float

    @property
    def drop(self) -> float:
        return self.reference_quality - self.quality


class EvalDB:
    """Append-only store of evaluations (commits after each insert)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(self.path), timeout=30.0)
        self.conn.execute(SCHEMA)
        self.conn.commit()

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> EvalDB:  # noqa: PYI034 (typing.Self needs 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _row(r: tuple) -> Record:  # type: ignore[type-arg]
        return Record(r[0], r[1], r[2], tuple(json.loads(r[3])), float(r[4]), float(r[5]),
                      r[6], r[7], float(r[8] or 0.0))

    _COLS = ("model_hash, data_hash, key, features, quality, reference_quality, size_bytes, "
             "latency_ms, seconds")

    def get(self, model: str, data: str, key: str) -> Record | None:
        cur = self.conn.execute(f"SELECT {self._COLS} FROM evaluations WHERE model_hash=? AND "
                                "data_hash=? AND key=?", (model, data, key))
        row = cur.fetchone()
        return None if row is None else self._row(row)

    def put(self, r: Record) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO evaluations VALUES (?,?,?,?,?,?,?,?,?,?)",
            (r.model_hash, r.data_hash, r.key, json.dumps(list(r.features)), r.quality,
             r.reference_quality, r.size_bytes, r.latency_ms, r.seconds, time.time()))
        self.conn.commit()  # immediately: a Ctrl-C right after loses nothing

    def records(self, model: str | None = None, data: str | None = None, *,
                exclude_model: str | None = None) -> list[Record]:
        q = f"SELECT {self._COLS} FROM evaluations WHERE 1=1"
        args: list[str] = []
        if model is not None:
            q, args = q + " AND model_hash=?", args + [model]
        if data is not None:
            q, args = q + " AND data_hash=?", args + [data]
        if exclude_model is not None:
            q, args = q + " AND model_hash!=?", args + [exclude_model]
        return [self._row(r) for r in self.conn.execute(q + " ORDER BY created", args)]

    def warm_start_rows(self, exclude_model: str, n_features: int
                        ) -> tuple[np.ndarray, np.ndarray]:
        """(features, −drop) of other models' evaluations with the current feature length."""
        rows = [r for r in self.records(exclude_model=exclude_model)
                if len(r.features) == n_features]
        if not rows:
            return np.zeros((0, n_features)), np.zeros(0)
        return (np.asarray([r.features for r in rows]), np.asarray([-r.drop for r in rows]))
