"""The Q/DQ switch measurement of tools/bench_search_latency.py: domain edges of a graph, and
the switch cost τ recovered from the alternating plans on a runtime whose τ is known."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tool_loader import load_tool
from torch import fx, nn

from quantflow.calibrate import collect_stats
from quantflow.ir import capture
from quantflow.quantize import quantize
from quantflow.search.latency import measure_table
from quantflow.search.options import LatencyOptions
from quantflow.search.space import OPTIONS, Candidate, GlobalConfig, SearchSpace, layer_plan
from quantflow.spec import QuantPlan
from quantflow.targets.base import Artifact, Latency, TargetCaps

bench = load_tool("bench_search_latency")


class Residual(nn.Module):
    """conv0 -> relu -> conv1 -> (+ relu(conv0)) -> conv2 -> pool -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.conv0(x))
        b = self.conv1(a) + a
        c = torch.relu(self.conv2(b))
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(c, 1).flatten(1))


@pytest.fixture
def gm() -> fx.GraphModule:
    torch.manual_seed(0)
    return capture(Residual().eval(), (torch.randn(1, 2, 5, 5),))


LAYERS = ["conv2d", "conv2d_1", "conv2d_2", "linear"]


def test_edges_link_layers_and_always_int8_ops(gm: fx.GraphModule) -> None:
    e = bench.layer_edges(gm, LAYERS, (torch.randn(1, 2, 5, 5),))
    # conv0 feeds conv1 directly (through relu): one layer-to-layer edge of 4x5x5 elements
    assert sorted(map(tuple, e.pairs.tolist())) == [(0, 1, 100)]
    # the add and the pool are quantized whatever the layers do: conv0 and conv1 feed the add
    # (100 each), the add feeds conv2 (100), conv2 feeds the pool (6x5x5), the pool feeds fc
    np.testing.assert_array_equal(e.fixed, [100, 100, 100 + 150, 6])
    assert e.crossing_kelems(["W8A8"] * 4) == 0.0
    assert e.crossing_kelems(["FP32"] * 4) == pytest.approx(0.456)
    assert e.crossing_kelems(["W8A8", "FP32", "W4A8", "W8A8"]) == pytest.approx(0.2)
    assert e.crossing_kelems(["W8A16", "W8A8", "W8A8", "W8A8"]) == pytest.approx(0.2)


TAU = 0.5  # ms per 1000 crossing elements, the fake runtime's true switch cost


class SwitchingTarget:
    """Per-layer times by option, plus TAU per 1000 crossing elements, reported on Q/DQ nodes
    that no layer owns (as onnxruntime's profiler would)."""

    name = "fake"
    caps = TargetCaps(per_layer_profile=True, threads=False)

    def __init__(self, edges: Any) -> None:
        self.edges = edges

    def lower(self, g: fx.GraphModule, example_inputs: Any, out_dir: Path, *,
              precision: str) -> Artifact:
        info = g.meta.get("quantflow")
        labels = {k: v.label() for k, v in info.layers.items()} if info else {}
        return Artifact("fake", precision, {"model": str(out_dir / "m")}, ("x",), ("y",),
                        meta={"labels": labels})

    def measurement_device(self) -> str:
        return "test cpu"

    def profile(self, artifact: Artifact, inputs: Any, *, warmup: int = 10, runs: int = 50,
                threads: int | None = None, per_layer: bool = False) -> Latency:
        cost = {"W8A8": 1.0, "W8A16": 1.5, "W4A8": 0.9, "FP32": 2.0}
        labels = [artifact.meta["labels"].get(n, "FP32") for n in LAYERS]
        per = {n: cost[o] for n, o in zip(LAYERS, labels)}
        per["input_q"] = 0.2
        per["switch_q_dq"] = TAU * self.edges.crossing_kelems(labels)
        total = sum(per.values())
        return Latency(total, total, total, runs, warmup, 1, 1, "fake cpu",
                       per_layer_ms=per if per_layer else None)


def test_switch_cost_is_measured(gm: fx.GraphModule, tmp_path: Path) -> None:
    x = (torch.randn(4, 2, 5, 5),)
    stats = collect_stats(gm, [x])
    g0 = GlobalConfig()
    edges = bench.layer_edges(gm, LAYERS, x)
    target = SwitchingTarget(edges)

    def quantize_with(assign: dict[str, str]) -> fx.GraphModule:
        return quantize(gm, QuantPlan(default=layer_plan("W8A8", g0), layers={
            n: layer_plan(assign.get(n, "FP32"), g0) for n in LAYERS}), stats)

    table = measure_table(gm, x, LAYERS, OPTIONS, quantize_with, target, model_hash="m",
                          latency=LatencyOptions(cache_dir=tmp_path))
    # uniform FP32 pays the fixed crossings into the int8 add/pool: that lands in its rest
    tau = bench.switch_cost(table, edges, quantize_with, x, target, runs=5)
    assert tau == pytest.approx(TAU, rel=1e-9)
    # with τ, table + rest + τ · crossings is the runtime's time for any plan
    space = SearchSpace(LAYERS, OPTIONS, [g0], {g0.scheme_key: np.zeros((4, 4))},
                        np.ones((4, 4)), table.ms, table.rest_for("W8A8"))
    for opts in (["W8A8"] * 4, ["W8A8", "FP32", "W4A8", "W8A8"], ["FP32", "W8A8", "FP32", "W8A16"],
                 *[[a[n] for n in LAYERS] for a in bench.alternating(LAYERS)]):
        want = target.profile(target.lower(quantize_with(dict(zip(LAYERS, opts))), x, tmp_path,
                                           precision="mixed"), x).median_ms
        lat = space.latency_ms(Candidate(g0, tuple(opts)))
        assert lat is not None
        assert lat + tau * edges.crossing_kelems(opts) == pytest.approx(want, rel=1e-9)
