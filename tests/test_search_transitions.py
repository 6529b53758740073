"""Q/DQ transitions: domain edges of a graph, the switch cost τ measured from alternating
plans, and candidates priced with it."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import fx, nn

from quantflow.calibrate import collect_stats
from quantflow.ir import capture
from quantflow.quantize import quantize
from quantflow.search.latency import measure_table
from quantflow.search.space import OPTIONS, Candidate, GlobalConfig, SearchSpace, layer_plan
from quantflow.search.transitions import Edges, alternating, layer_edges
from quantflow.spec import QuantPlan
from quantflow.targets.base import Artifact, Latency, TargetCaps


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
    e = layer_edges(gm, LAYERS, (torch.randn(1, 2, 5, 5),))
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

    def __init__(self, edges: Edges) -> None:
        self.edges = edges

    def lower(self, g: fx.GraphModule, example_inputs: Any, out_dir: Path, *,
              precision: str) -> Artifact:
        info = g.meta.get("quantflow")
        labels = {k: v.label() for k, v in info.layers.items()} if info else {}
        return Artifact("fake", precision, {"model": str(out_dir / "m")}, ("x",), ("y",),
                        meta={"labels": labels})

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


def test_switch_cost_is_measured_and_priced(gm: fx.GraphModule, tmp_path: Path) -> None:
    x = (torch.randn(4, 2, 5, 5),)
    stats = collect_stats(gm, [x])
    g0 = GlobalConfig()
    edges = layer_edges(gm, LAYERS, x)

    def quantize_with(assign: dict[str, str]) -> fx.GraphModule:
        return quantize(gm, QuantPlan(default=layer_plan("W8A8", g0), layers={
            n: layer_plan(assign.get(n, "FP32"), g0) for n in LAYERS}), stats)

    table = measure_table(gm, x, LAYERS, OPTIONS, quantize_with, SwitchingTarget(edges),
                          model_hash="m", cache_dir=tmp_path, edges=edges)
    # uniform FP32 pays the fixed crossings into the int8 add/pool: that lands in its rest
    assert table.switch_ms_per_kelem == pytest.approx(TAU, rel=1e-9)
    space = SearchSpace(LAYERS, OPTIONS, [g0], {g0.scheme_key: np.zeros((4, 4))},
                        np.ones((4, 4)), table.ms, table.rest_for("W8A8"), edges,
                        table.switch_ms_per_kelem)
    fake = SwitchingTarget(edges)
    for opts in (["W8A8"] * 4, ["W8A8", "FP32", "W4A8", "W8A8"], ["FP32", "W8A8", "FP32", "W8A16"],
                 *[[a[n] for n in LAYERS] for a in alternating(LAYERS)]):
        want = fake.profile(fake.lower(quantize_with(dict(zip(LAYERS, opts))), x, tmp_path,
                                       precision="mixed"), x).median_ms
        assert space.latency_ms(Candidate(g0, tuple(opts))) == pytest.approx(want, rel=1e-9)


def test_allocation_sees_switches() -> None:
    """Float layers are cheaper per layer here, but alternating pays switches: the exact
    allocation under the real latency keeps the int8 chain together."""
    from quantflow.search import quantune as qt

    g0 = GlobalConfig()
    n = 6
    edges = Edges(np.asarray([(i, i + 1, 1000) for i in range(n - 1)]), np.zeros(n))
    opts = ("W8A8", "FP32")
    sens = np.tile([1.0, 0.0], (n, 1))  # FP32 is free in quality
    lat = np.tile([1.0, 0.8], (n, 1))
    space = SearchSpace([f"l{i}" for i in range(n)], opts, [g0], {g0.scheme_key: sens},
                        np.tile([1.0, 4.0], (n, 1)), lat, 0.0, edges, 0.5)
    budget = qt.Budget(max_size_bytes=3 * 1.0 + 3 * 4.0, max_latency_ms=6.0)
    seeds = qt.seeds(space, budget)
    for c in seeds:
        assert space.latency_ms(c) <= 6.0 + 1e-9, c.options
    best = min(seeds, key=space.sensitivity)
    # three FP32 layers fit the size; as one block they cost one switch (0.5 ms)
    assert best.options.count("FP32") == 3
    d = [o == "FP32" for o in best.options]
    assert sum(a != b for a, b in itertools.pairwise(d)) == 1
