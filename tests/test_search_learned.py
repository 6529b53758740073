"""Learned 4-bit rounding inside the mixed-precision search (quantflow/search/learned.py):
the repricing formula, which layers get codes, and that a search evaluates its 4-bit layers
with them (a different, better-scoring model than nearest rounding)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from nets import template_task
from torch import fx, nn

from quantflow import evaluate as ev
from quantflow.calibrate import batched, collect_stats
from quantflow.ir import capture
from quantflow.passes import DEFAULT_PIPELINE, run_pipeline
from quantflow.quantize import quantize
from quantflow.search import Budget, search_mixed
from quantflow.search.hawq import layer_weights
from quantflow.search.learned import LearnedW4, w4_rounding
from quantflow.search.options import HawqOptions, LatencyOptions, SearchOptions
from quantflow.search.space import OPTIONS, GlobalConfig, SearchSpace, layer_plan, size_table
from quantflow.spec import KernelRules, QuantPlan

pytestmark = pytest.mark.usefixtures("one_thread")
GLOB = GlobalConfig("minmax", False, "channel")


def test_reprice_scales_only_the_weight_part_of_4_bit_options() -> None:
    rng = np.random.default_rng(0)
    sens = rng.random((3, len(OPTIONS)))
    k8, k4 = OPTIONS.index("W8A8"), OPTIONS.index("W4A8")
    sens[:, k4] = sens[:, k8] + np.array([1.0, 2.0, 3.0])
    before = sens.copy()
    space = SearchSpace(["a", "b", "c"], OPTIONS, [GLOB], {GLOB.scheme_key: sens},
                        size_table([10, 10, 10], OPTIONS))
    LearnedW4({}, {"a": 0.5, "b": 0.1}, 0.0).reprice(space)  # "c": not learned, ratio 1
    assert np.allclose(sens[:, k4], before[:, k8] + np.array([0.5, 0.2, 3.0]))
    others = [k for k, o in enumerate(OPTIONS) if o != "W4A8"]
    assert np.array_equal(sens[:, others], before[:, others])


def test_codes_go_to_4_bit_layers_only_and_key_the_database() -> None:
    codes = {"a": torch.ones(2, 2), "b": torch.zeros(2, 2)}
    lw = LearnedW4(codes, {}, 0.0)
    plan = QuantPlan(default=layer_plan("W8A8", GLOB), layers={"a": layer_plan("W4A8", GLOB),
                                                               "b": layer_plan("FP32", GLOB)})
    assert set(lw.for_plan(plan)) == {"a"}
    other = LearnedW4({"a": torch.ones(2, 2), "b": torch.ones(2, 2)}, {}, 0.0)
    assert lw.key() != other.key() and lw.key() == LearnedW4(dict(codes), {}, 1.0).key()


@pytest.fixture(scope="module")
def trained() -> tuple[fx.GraphModule, torch.Tensor, torch.Tensor, torch.Tensor, nn.Module]:
    """SmallCNN trained on four noisy templates (seconds, no files)."""
    model, data = template_task(0)
    x_cal, _ = data(128)
    x_test, y_test = data(400)
    gm = capture(model.eval(), (x_cal[:2],))
    run_pipeline(gm, DEFAULT_PIPELINE)
    return gm, x_cal, x_test, y_test, model


def test_search_evaluates_4_bit_layers_with_the_learned_codes(trained: tuple,
                                                              tmp_path: Path) -> None:
    gm, x_cal, x_test, y_test, _ = trained
    rules = KernelRules.of("ort")
    stats = collect_stats(gm, batched(x_cal, 32))
    layers = list(layer_weights(gm))
    lw = w4_rounding(gm, stats, x_cal, GLOB, layers, rules, seconds=4)
    assert set(lw.codes) == set(layers) and all(0 < r <= 1 for r in lw.ratio.values())
    w4 = QuantPlan(default=layer_plan("W8A8", GLOB),
                   layers={n: layer_plan("W4A8", GLOB) for n in layers})
    ref = ev.predict(gm, x_test)
    nearest = ev.sqnr_db(ref, ev.predict(quantize(gm, w4, stats, rules), x_test))
    learned = ev.sqnr_db(ref, ev.predict(quantize(gm, w4, stats, rules,
                                                  rounding=lw.for_plan(w4)), x_test))
    assert learned > nearest + 1.0, (nearest, learned)  # held-out; these seeds: 24.8 -> 27.0

    seen: list[fx.GraphModule] = []

    def eval_fn(g: fx.GraphModule) -> float:
        seen.append(g)
        with torch.no_grad():
            return 100.0 * float((g(x_test).argmax(-1) == y_test).double().mean())

    opts = SearchOptions(calibrators=("minmax",), schemes=(False,), granularities=("channel",),
                         pool_size=40, max_evals=4)
    res = search_mixed(gm, batched(x_cal, 32), eval_fn, Budget(max_size_ratio=0.75),
                       search=opts, hawq=HawqOptions(batches=2, max_iter=15),
                       latency=LatencyOptions(mode="proxy"), learned=lw, stats=stats,
                       db=tmp_path / "db.sqlite", progress=False)
    assert res.real_evaluations == 4
    # every evaluated graph carries the learned codes on its 4-bit layers: rebuild each
    # trial's graph with them and get the same quality
    for t in res.trials:
        plan = QuantPlan(default=layer_plan("W8A8", t.candidate.glob),
                         layers={n: layer_plan(o, t.candidate.glob)
                                 for n, o in zip(layers, t.candidate.options)})
        g = quantize(gm, plan, stats, rules, rounding=lw.for_plan(plan))
        with torch.no_grad():
            acc = 100.0 * float((g(x_test).argmax(-1) == y_test).double().mean())
        assert acc == t.quality


def test_compile_bits_mixed_with_optimize_time(trained: tuple, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The compile path: 4-bit codes learned before the search (its summary says so), then
    repair and learned rounding of the chosen plan; the artifact still passes parity."""
    from quantflow.config import CompileConfig
    from quantflow.dataset import Dataset
    from quantflow.pipeline import compile

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _, x_cal, x_test, y_test, model = trained
    rep = compile(model, (x_cal[:1],), Dataset(x_cal, None, "calib"),
                  Dataset(x_test, y_test, "test"), tmp_path / "out",
                  CompileConfig(bits="mixed", max_size_ratio=0.75, optimize_seconds=6.0,
                                profile_runs=3))
    lw = rep["search"]["learned_w4"]
    assert lw["layers"] == 4 and lw["mean_output_mse_gain_db"] > 0
    assert rep["search"]["satisfied"]  # within 0.75x the INT8 weight bytes
    assert rep["stages"]["repair"] > 0 and rep["stages"]["round"] > 0
    assert rep["rounding"]["layers"] >= 1 and rep["parity"]["passed"]
