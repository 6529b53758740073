"""The search's option objects: their defaults are the search's defaults, bad values fail early."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantflow.search.options import (
    HawqOptions,
    LatencyOptions,
    LoopOptions,
    SearchOptions,
    TraceOptions,
)
from quantflow.search.space import OPTIONS
from quantflow.spec import CALIBRATORS


def test_defaults_are_the_search_defaults() -> None:
    # the values search_mixed, run_search, hutchinson_traces and measure_table took as
    # keyword defaults before they took these objects: a caller passing nothing gets the same
    s = SearchOptions()
    assert (s.options, s.calibrators, s.schemes, s.granularities) == \
        (OPTIONS, CALIBRATORS, (False, True), ("channel", "tensor"))
    assert (s.max_evals, s.strategy, s.pool_size, s.seed, s.warm_start, s.validate_top) == \
        (20, "xgb", 400, 0, True, 3)
    assert LoopOptions() == LoopOptions("xgb", 24, 0.1, True, 0, 4)
    assert s.loop() == LoopOptions(max_evals=20)
    h = HawqOptions()
    assert (h.batches, h.max_samples, h.max_elements, h.max_gmacs, h.max_seconds, h.tol,
            h.max_iter) == (2, 32, 1_300_000, 48.0, None, 0.1, 30)
    assert h.trace_options() == TraceOptions(rel_tol=0.1, max_iter=30, max_seconds=None)
    # the work cap: draws of 2.4 GMACs (MobileNetV2, 8 images) -> 20; never below min_iter
    assert h.trace_options(2.4).max_iter == 20
    assert h.trace_options(0.1).max_iter == 30 and h.trace_options(100.0).max_iter == 5
    assert HawqOptions(max_gmacs=None).trace_options(100.0).max_iter == 30
    assert TraceOptions() == TraceOptions(0.05, 100, 5, 0.01, True, None, None)
    assert LatencyOptions() == LatencyOptions("measured", None, 30, 5, None)


def test_sequences_become_tuples() -> None:
    s = SearchOptions(options=["W8A8", "FP32"], calibrators=["minmax"], schemes=[False],
                      granularities=["tensor"])  # type: ignore[arg-type]
    assert s.options == ("W8A8", "FP32") and s.calibrators == ("minmax",)
    assert s.schemes == (False,) and s.granularities == ("tensor",)
    assert hash(s) == hash(SearchOptions(options=("W8A8", "FP32"), calibrators=("minmax",),
                                         schemes=(False,), granularities=("tensor",)))
    assert LatencyOptions(cache_dir="/tmp/x").cache_dir == Path("/tmp/x")  # type: ignore[arg-type]


@pytest.mark.parametrize(("make", "match"), [
    (lambda: SearchOptions(options=("W2A2",)), "options"),
    (lambda: SearchOptions(options=()), "options"),
    (lambda: SearchOptions(calibrators=("median",)), "calibrators"),
    (lambda: SearchOptions(granularities=("group",)), "granularities"),
    (lambda: SearchOptions(strategy="bayes"), "strategy"),
    (lambda: SearchOptions(max_evals=0), "max_evals"),
    (lambda: SearchOptions(validate_top=0), "validate_top"),
    (lambda: LoopOptions(explore=1.5), "explore"),
    (lambda: HawqOptions(batches=0), "batches"),
    (lambda: HawqOptions(max_seconds=0.0), "max_seconds"),
    (lambda: TraceOptions(rel_tol=-0.1), "rel_tol"),
    (lambda: LatencyOptions(mode="fast"), "mode"),
    (lambda: LatencyOptions(runs=0), "runs"),
    (lambda: LatencyOptions(threads=0), "threads"),
])
def test_bad_values_are_rejected(make: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()  # type: ignore[operator]


def test_options_are_frozen() -> None:
    from dataclasses import FrozenInstanceError

    with pytest.raises(FrozenInstanceError):
        SearchOptions().max_evals = 5  # type: ignore[misc]
