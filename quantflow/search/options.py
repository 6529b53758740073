"""What the search can be told, grouped by concern: frozen, validated option objects.

- `SearchOptions`: the space (precision options × calibrators × activation schemes × weight
  granularities) and the loop (evaluations, strategy, pool, seed, warm start, end-to-end
  checks); `search_mixed`'s defaults.
- `LoopOptions`: `quantune.run_search`'s own knobs (`SearchOptions.loop()` fills them).
- `HawqOptions`: which calibration samples the Hessian traces use and when they stop, as the
  search calls them; `TraceOptions`: the estimator's own knobs (`hawq.hutchinson_traces`).
- `LatencyOptions`: how latency is priced (measured per layer on the target, or the BOPs
  proxy) and how the measurements are taken.

The budget (what the user allows) stays `quantune.Budget`. Every default equals the keyword
default it replaced, so a caller that passes nothing gets the search it got before.
Sequences are stored as tuples: the objects stay hashable and cannot change under a search.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantflow.search.space import OPTIONS
from quantflow.spec import CALIBRATORS, GRANULARITIES

#: the loop's orders of visiting the pool: cost-model guided, or the benchmark's baselines
STRATEGIES = ("xgb", "random", "grid")
LATENCY_MODES = ("measured", "proxy")


def _tuple(obj: Any, name: str, allowed: Sequence[Any]) -> None:
    """Store field `name` as a non-empty tuple of values from `allowed`."""
    value = tuple(getattr(obj, name))
    bad = [v for v in value if v not in allowed]
    if not value or bad:
        raise ValueError(f"{type(obj).__name__}.{name} must be a non-empty selection of "
                         f"{tuple(allowed)}, got {value!r}")
    object.__setattr__(obj, name, value)  # frozen: the only way to normalize in place


def _at_least(obj: Any, name: str, low: float) -> None:
    if getattr(obj, name) < low:
        raise ValueError(f"{type(obj).__name__}.{name} must be >= {low}, got "
                         f"{getattr(obj, name)!r}")


def _strategy(obj: Any) -> None:
    if obj.strategy not in STRATEGIES:
        raise ValueError(f"{type(obj).__name__}.strategy must be xgb, random or grid, got "
                         f"{obj.strategy!r}")


def _positive_or_none(obj: Any, name: str) -> None:
    value = getattr(obj, name)
    if value is not None and value <= 0:
        raise ValueError(f"{type(obj).__name__}.{name} must be > 0 or None, got {value!r}")


@dataclass(frozen=True)
class LoopOptions:
    """How `run_search` visits the pool (see quantune's module docstring).

    explore: probability of a random pick instead of the cost model's best; grow_pool: add
    mutations of the best trials after each evaluation (xgb only); min_rows: cost-model rows
    needed before it replaces the HAWQ prior; round_size: candidates picked with one model
    and evaluated together (in parallel with workers); fixed, never the worker count, so
    results do not depend on how many workers evaluate them.
    """

    strategy: str = "xgb"
    max_evals: int = 24
    explore: float = 0.1
    grow_pool: bool = True
    seed: int = 0
    min_rows: int = 4
    round_size: int = 4

    def __post_init__(self) -> None:
        _strategy(self)
        _at_least(self, "max_evals", 1)
        _at_least(self, "min_rows", 0)
        _at_least(self, "round_size", 1)
        if not 0.0 <= self.explore <= 1.0:
            raise ValueError(f"LoopOptions.explore is a probability, got {self.explore!r}")


@dataclass(frozen=True)
class SearchOptions:
    """The configuration space and the search loop of `search_mixed`.

    Space: per-layer precision `options` (space.OPTIONS) × global `calibrators` × activation
    `schemes` (False: asymmetric uint8, True: symmetric int8) × weight `granularities`.
    Loop: `max_evals` real evaluations chosen by `strategy` from a pool of `pool_size`
    candidates (plus what it grows), `seed` for every random choice (HAWQ draws included),
    `warm_start` the cost model from other models' database rows, and `validate_top` best
    candidates timed end to end when a latency limit applies.
    """

    options: tuple[str, ...] = OPTIONS
    calibrators: tuple[str, ...] = CALIBRATORS
    schemes: tuple[bool, ...] = (False, True)
    granularities: tuple[str, ...] = ("channel", "tensor")
    max_evals: int = 20
    strategy: str = "xgb"
    pool_size: int = 400
    seed: int = 0
    warm_start: bool = True
    validate_top: int = 3

    def __post_init__(self) -> None:
        _tuple(self, "options", OPTIONS)
        _tuple(self, "calibrators", CALIBRATORS)
        _tuple(self, "schemes", (False, True))
        _tuple(self, "granularities", GRANULARITIES)
        _strategy(self)
        _at_least(self, "max_evals", 1)
        _at_least(self, "pool_size", 0)
        _at_least(self, "validate_top", 1)

    def loop(self) -> LoopOptions:
        """The loop's options; explore, grow_pool and min_rows keep run_search's defaults."""
        return LoopOptions(strategy=self.strategy, max_evals=self.max_evals, seed=self.seed)


@dataclass(frozen=True)
class TraceOptions:
    """`hutchinson_traces`' stopping rule and estimator (see its docstring): stop when every
    trace's stderr ≤ rel_tol · max(|trace|, abs_floor · the largest of its kind) after
    `min_iter` draws, or after `max_iter` draws or `max_seconds`; `activations` adds the
    layer-input traces, `per_block` forces one product per block (None: up to 8 layers)."""

    rel_tol: float = 0.05
    max_iter: int = 100
    min_iter: int = 5
    abs_floor: float = 0.01
    activations: bool = True
    per_block: bool | None = None
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        _at_least(self, "rel_tol", 0.0)
        _at_least(self, "max_iter", 1)
        _at_least(self, "min_iter", 1)
        _at_least(self, "abs_floor", 0.0)
        _positive_or_none(self, "max_seconds")


@dataclass(frozen=True)
class HawqOptions:
    """The Hessian traces as the search runs them.

    Samples: the first `batches` calibration batches, at most `max_samples` samples and
    `max_elements` input elements (a Hutchinson draw is a double backward over every sample:
    ~0.9 s per 224² image on one core, so ImageNet gets 8 images, Fashion-MNIST all it has).
    Stopping: `tol` relative stderr, `max_iter` draws, and a work cap: at most `max_gmacs`
    giga multiply-accumulates of forward passes over the samples in all draws together (at
    least `TraceOptions.min_iter` draws; ImageNet MobileNetV2 on 8 images: 20 draws). A cap
    in work, not seconds, so the traces — and the plan — are the same on every machine, under
    any load and for any worker count; `max_seconds` (default off) adds a wall-clock cap that
    gives that up. Looser than `TraceOptions`' defaults: the search needs a ranking of layers,
    not precise traces.
    """

    batches: int = 2
    max_samples: int = 32
    max_elements: int = 1_300_000
    max_gmacs: float | None = 48.0
    max_seconds: float | None = None
    tol: float = 0.1
    max_iter: int = 30

    def __post_init__(self) -> None:
        for name in ("batches", "max_samples", "max_elements", "max_iter"):
            _at_least(self, name, 1)
        _at_least(self, "tol", 0.0)
        _positive_or_none(self, "max_gmacs")
        _positive_or_none(self, "max_seconds")

    def trace_options(self, gmacs_per_draw: float = 0.0) -> TraceOptions:
        """The stopping rule for draws that each cost `gmacs_per_draw` forward GMACs."""
        max_iter = self.max_iter
        if self.max_gmacs is not None and gmacs_per_draw > 0:
            min_iter = TraceOptions().min_iter
            max_iter = min(max_iter, max(min_iter, int(self.max_gmacs // gmacs_per_draw)))
        return TraceOptions(rel_tol=self.tol, max_iter=max_iter, max_seconds=self.max_seconds)


@dataclass(frozen=True)
class LatencyOptions:
    """How candidates are priced in time.

    mode "measured": per-layer tables timed on the target (cached under `cache_dir`, default
    ~/.cache/quantflow/latency) when one is given, and latency limits checked end to end;
    "proxy": BOPs only (reported, never a limit). `runs` / `warmup`: timed / untimed runs per
    measurement, tables and end-to-end checks alike; `threads`: the tables' thread count
    (None: the target's own).
    """

    mode: str = "measured"
    cache_dir: Path | None = None
    runs: int = 30
    warmup: int = 5
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in LATENCY_MODES:
            raise ValueError(f"LatencyOptions.mode must be one of {LATENCY_MODES}, got "
                             f"{self.mode!r}")
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        _at_least(self, "runs", 1)
        _at_least(self, "warmup", 0)
        if self.threads is not None:
            _at_least(self, "threads", 1)
