"""End to end: the search meets the budget, its plan reproduces its score, and it resumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from nets import template_search_task
from torch import fx, nn

from quantflow.quantize import quantize
from quantflow.search import Budget, search_mixed
from quantflow.search.database import EvalDB
from quantflow.search.options import HawqOptions, LatencyOptions, SearchOptions
from quantflow.search.quantune import pareto_front
from quantflow.spec import QuantPlan
from quantflow.targets.base import TargetCaps

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup() -> tuple[fx.GraphModule, list, list, torch.Tensor, torch.Tensor, nn.Module]:
    return template_search_task(400)


def _acc(g: fx.GraphModule, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return 100.0 * float((g(x).argmax(-1) == y).double().mean())


def small(max_evals: int, strategy: str = "xgb") -> SearchOptions:
    """A small space and pool, so a search takes seconds."""
    return SearchOptions(calibrators=("minmax", "percentile"), schemes=(False,),
                         granularities=("channel",), pool_size=60, max_evals=max_evals,
                         strategy=strategy)


#: what every search here shares: few Hessian draws, no progress bars, proxy latency (the
#: tests with a fake target replace `latency`)
SMALL = {"hawq": HawqOptions(batches=2, max_iter=15), "latency": LatencyOptions(mode="proxy"),
         "progress": False}


def test_search_meets_size_budget_and_plan_reproduces(setup: tuple, tmp_path: Path) -> None:
    gm, batches, labels, x_test, y_test, _model = setup
    calls = []

    def eval_fn(g: fx.GraphModule) -> float:
        calls.append(1)
        return _acc(g, x_test, y_test)

    budget = Budget(max_size_ratio=0.75)
    res = search_mixed(gm, batches, eval_fn, budget, labels=labels, search=small(6),
                       db=tmp_path / "db.sqlite", **SMALL)  # type: ignore[arg-type]
    assert len(res.trials) == 6 and res.real_evaluations == 6
    assert len(calls) == 7  # the FP32 reference + 6 candidates
    assert res.satisfied
    n_layers = 4
    assert len(res.layers) == n_layers
    # size from the chosen bits and the weights' sizes: ≤ 75% of uniform W8 weight bytes
    numel = {n: t.numel for n, t in res.traces.weight.items()}
    int8 = float(sum(numel.values()))
    size = sum(numel[r["layer"]] * r["weight_bits"] / 8 for r in res.layers)
    assert size == res.best.size_bytes <= 0.75 * int8 + 1e-9
    assert any(r["weight_bits"] == 4 for r in res.layers)  # the only way below 100%
    # the best is the best satisfying trial, and the saved plan reproduces its quality
    assert res.best.quality == max(t.quality for t in res.trials
                                   if t.size_bytes <= 0.75 * int8 + 1e-9)
    res.save(tmp_path / "out")
    assert not (tmp_path / "out" / "plan.json").exists()  # the compile writes the plan, once
    res.plan.save(tmp_path / "out" / "plan.json")
    plan = QuantPlan.load(tmp_path / "out" / "plan.json")
    assert plan == res.plan
    assert _acc(quantize(gm, plan, res.stats), x_test, y_test) == res.best.quality
    assert res.pareto and all(t in res.trials for t in res.pareto)
    assert (tmp_path / "out" / "search_layers.md").read_text().count("\n") == n_layers + 2


def test_resume_after_interrupt_loses_nothing(setup: tuple, tmp_path: Path) -> None:
    gm, batches, labels, x_test, y_test, _model = setup
    db_path = tmp_path / "db.sqlite"
    calls = {"n": 0}

    def interrupted(g: fx.GraphModule) -> float:
        calls["n"] += 1
        if calls["n"] > 4:  # FP32 reference + 3 candidates, then Ctrl-C
            raise KeyboardInterrupt
        return _acc(g, x_test, y_test)

    with pytest.raises(KeyboardInterrupt):
        search_mixed(gm, batches, interrupted, Budget(max_size_ratio=0.75), labels=labels,
                     search=small(6), db=db_path, **SMALL)  # type: ignore[arg-type]
    with EvalDB(db_path) as db:
        before = {r.key for r in db.records()}
    assert len(before) == 4  # everything finished before Ctrl-C is on disk

    def counting(g: fx.GraphModule) -> float:
        calls["n"] += 1
        return _acc(g, x_test, y_test)

    calls["n"] = 0
    res = search_mixed(gm, batches, counting, Budget(max_size_ratio=0.75), labels=labels,
                       search=small(6), db=db_path, **SMALL)  # type: ignore[arg-type]
    with EvalDB(db_path) as db:
        after = {r.key for r in db.records()}
    # every call evaluated something new: nothing that was on disk ran again
    assert calls["n"] == len(after) - len(before) == res.real_evaluations
    # same seed, same trajectory: the 3 finished picks come back from disk, then it goes on
    assert res.reused_evaluations == 3 and [t.reused for t in res.trials[:3]] == [True] * 3
    assert res.real_evaluations == 3 == calls["n"]


def test_accuracy_budget_only_picks_cheapest_within_drop(setup: tuple, tmp_path: Path) -> None:
    gm, batches, labels, x_test, y_test, _model = setup
    res = search_mixed(gm, batches, lambda g: _acc(g, x_test, y_test), Budget(max_drop=1.0),
                       labels=labels, search=small(6, "random"), db=tmp_path / "db.sqlite",
                       **SMALL)  # type: ignore[arg-type]
    ok = [t for t in res.trials if t.drop <= 1.0]
    assert res.satisfied == bool(ok)
    if ok:
        assert res.best.size_bytes == min(t.size_bytes for t in ok)


def test_pareto_front_is_nondominated(setup: tuple, tmp_path: Path) -> None:
    gm, batches, labels, x_test, y_test, _model = setup
    res = search_mixed(gm, batches, lambda g: _acc(g, x_test, y_test),
                       Budget(max_size_ratio=1.0), labels=labels, search=small(5, "grid"),
                       db=tmp_path / "db.sqlite", **SMALL)  # type: ignore[arg-type]
    front = pareto_front(res.trials)
    for f in front:
        assert not any(t.quality >= f.quality and t.size_bytes < f.size_bytes
                       or t.quality > f.quality and t.size_bytes <= f.size_bytes
                       for t in res.trials)
    assert np.isfinite([t.quality for t in front]).all()


@pytest.mark.slow
def test_compile_pipeline_bits_mixed(setup: tuple, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`compile(..., bits="mixed")` runs the search, measures latency on ORT, writes the plan."""
    import json

    from quantflow.pipeline import CompileConfig, Dataset, compile

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _gm, batches, labels, x_test, y_test, model = setup
    x_cal, y_cal = torch.cat([b[0] for b in batches]), torch.cat(labels)
    rep = compile(model, (x_cal[:1],), Dataset(x_cal, y_cal, "calib"),
                  Dataset(x_test, y_test, "test"), tmp_path / "out",
                  CompileConfig(bits="mixed", max_drop=2.0, calib_batch=32))
    search = rep["search"]
    assert search["latency_method"] == "per_layer_profile"
    assert search["satisfied"] and search["best"]["drop"] <= 2.0
    # --max-drop alone: smallest plan not slower than uniform INT8 when timed end to end
    assert search["budget"]["minimize"] == "size"
    checks = search["latency_checks"]
    assert checks and all(c["measured_ms"] > 0 for c in checks)
    if checks[-1]["accepted"]:
        assert checks[-1]["config"] == search["best"]["config"]
    else:  # none passed: the fallback is uniform W8A8
        assert "W8A8x" in search["best"]["config"] and "W4A8" not in search["best"]["config"]
    assert search["latency_check"]["measured_ms"] == rep["latency"]["quantized"]["median_ms"]
    plan = QuantPlan.load(tmp_path / "out" / "plan.json")
    labels_by_layer = json.loads((tmp_path / "out" / "search.json").read_text())["layers"]
    assert {r["layer"]: r["option"] for r in labels_by_layer} == {
        k: v.label() for k, v in plan.layers.items()}
    assert (tmp_path / "cache" / "quantflow" / "search.sqlite").is_file()


class _SlowMixedTarget:
    """A target on which only uniform W8A8 is fast end to end, whatever its per-layer table
    says (a mixed plan pays for what runs around its layers)."""

    name = "fake"
    threads = 1
    caps = TargetCaps(per_layer_profile=False, threads=True)

    def lower(self, gm: fx.GraphModule, example_inputs: list[torch.Tensor], out_dir: Path, *,
              precision: str) -> fx.GraphModule:
        assert example_inputs[0].shape[0] == 1  # latency is timed at batch 1
        return gm

    def measurement_device(self) -> str:
        return "test cpu"

    def profile(self, art: fx.GraphModule, inputs: list[np.ndarray], **kw: object) -> object:
        from types import SimpleNamespace

        assert inputs[0].shape[0] == 1

        info = art.meta.get("quantflow")
        uniform = info is not None and {lp.label() for lp in info.layers.values()} == {"W8A8"}
        return SimpleNamespace(median_ms=1.0 if uniform else 5.0)


def test_latency_limit_validated_end_to_end_falls_back_to_int8(setup: tuple,
                                                               tmp_path: Path) -> None:
    """Candidates the per-layer table calls fast but that are slow end to end are rejected;
    with none left, uniform W8A8 is evaluated (database still open) and returned."""
    gm, batches, labels, x_test, y_test, _model = setup
    shared = {**SMALL, "latency": LatencyOptions(cache_dir=tmp_path / "lat")}
    res = search_mixed(gm, batches, lambda g: _acc(g, x_test, y_test),
                       Budget(max_drop=50.0, minimize="size", max_size_ratio=1.0,
                              max_latency_ratio=1.0),
                       _SlowMixedTarget(), labels=labels, search=small(5),
                       db=tmp_path / "db.sqlite", **shared)  # type: ignore[arg-type]
    assert res.latency_checks and res.latency_checks[0].limit_ms == pytest.approx(1.0 * 1.0)
    assert set(res.best.candidate.options) == {"W8A8"}
    assert all(not c.accepted for c in res.latency_checks if "W4A8" in c.config)


class _BrokenRuntimeTarget(_SlowMixedTarget):
    """A runtime that fails to time anything, with its own exception class."""

    def profile(self, art: fx.GraphModule, inputs: list[np.ndarray], **kw: object) -> object:
        raise OSError("device lost")


def test_failing_runtime_falls_back_to_proxy_only_without_latency_budget(
        setup: tuple, tmp_path: Path) -> None:
    from quantflow.errors import TargetRuntimeError

    gm, batches, labels, x_test, y_test, _model = setup
    common: dict = {**SMALL, "labels": labels, "search": small(3),
                    "latency": LatencyOptions(cache_dir=tmp_path / "lat"),
                    "db": tmp_path / "db.sqlite"}
    res = search_mixed(gm, batches, lambda g: _acc(g, x_test, y_test),
                       Budget(max_size_ratio=1.0), _BrokenRuntimeTarget(), **common)
    assert res.latency.method == "bops_proxy" and not res.latency_checks
    with pytest.raises(TargetRuntimeError, match="device lost"):
        search_mixed(gm, batches, lambda g: _acc(g, x_test, y_test),
                     Budget(max_latency_ms=1.0), _BrokenRuntimeTarget(), **common)
