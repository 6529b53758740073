"""Latency tables: BOPs proxy arithmetic, per-layer attribution from a profiler, caching."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import fx, nn

from quantflow.ir import capture
from quantflow.search.latency import bops_table, layer_macs, measure_table
from quantflow.search.options import LatencyOptions
from quantflow.targets.base import Artifact, Latency, TargetCaps


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture
def gm() -> fx.GraphModule:
    torch.manual_seed(0)
    return capture(Net().eval(), (torch.randn(1, 2, 5, 5),))


def test_macs_and_bops(gm: fx.GraphModule) -> None:
    x = (torch.randn(1, 2, 5, 5),)
    macs = layer_macs(gm, x)
    # conv: 4×5×5 outputs × (2·3·3) MACs each; linear: 3 outputs × 100 inputs
    assert macs == {"conv2d": 4 * 25 * 18, "linear": 300}
    t = bops_table(gm, x, ["conv2d", "linear"], ["W8A8", "W4A8", "FP32"])
    np.testing.assert_allclose(t.ms[0], np.array([64, 32, 1024]) * 1800 / 1e9)
    assert t.method == "bops_proxy"


class FakeTarget:
    """Per-layer times that depend on the precision recorded in the graph's Q/DQ nodes."""

    name = "fake"
    caps = TargetCaps(per_layer_profile=True, threads=False)

    def __init__(self) -> None:
        self.lowered = 0

    def lower(self, g: fx.GraphModule, example_inputs: Any, out_dir: Path, *,
              precision: str) -> Artifact:
        self.lowered += 1
        info = g.meta.get("quantflow")
        labels = {k: v.label() for k, v in info.layers.items()} if info else {}
        return Artifact("fake", precision, {"model": str(out_dir / "m")}, ("x",), ("y",),
                        meta={"labels": labels})

    def run(self, artifact: Artifact, inputs: Any) -> list[np.ndarray]:
        raise NotImplementedError

    def measurement_device(self) -> str:
        return "test cpu"

    def profile(self, artifact: Artifact, inputs: Any, *, warmup: int = 10, runs: int = 50,
                threads: int | None = None, per_layer: bool = False) -> Latency:
        cost = {"W8A8": 1.0, "W8A16": 1.5, "W4A8": 0.9, "FP32": 2.0}
        per = {n: cost[artifact.meta["labels"].get(n, "FP32")] * (2 if n == "conv2d" else 1)
               for n in ("conv2d", "linear")}
        per["conv2d_weight_dq"] = 0.1  # a layer's own weight dequantize counts for the layer
        per["x_q"] = 0.25  # unattributed (activation Q/DQ)
        total = sum(per.values()) + 0.05
        return Latency(total, total, total, runs, warmup, 1, 1, "fake cpu",
                       per_layer_ms=per if per_layer else None)


def _quantizer(gm: fx.GraphModule, x: tuple[torch.Tensor, ...]
               ) -> Callable[[dict[str, str]], fx.GraphModule]:
    """quantize_with(assignment) for Net: unlisted layers FP32, other ops W8A8."""
    from quantflow.calibrate import collect_stats
    from quantflow.quantize import quantize
    from quantflow.search.space import GlobalConfig, layer_plan
    from quantflow.spec import QuantPlan


    stats = collect_stats(gm, [x])
    g0 = GlobalConfig()

    def quantize_with(assign: dict[str, str]) -> fx.GraphModule:
        return quantize(gm, QuantPlan(default=layer_plan("W8A8", g0), layers={
            n: layer_plan(assign.get(n, "FP32"), g0) for n in ("conv2d", "linear")}), stats)

    return quantize_with


def test_measured_table_attribution_and_cache(gm: fx.GraphModule, tmp_path: Path) -> None:
    x = (torch.randn(4, 2, 5, 5),)
    quantize_with = _quantizer(gm, x)

    target = FakeTarget()
    opts = ["W8A8", "W8A16", "W4A8", "FP32"]
    t = measure_table(gm, x, ["conv2d", "linear"], opts, quantize_with, target,
                      model_hash="abc", latency=LatencyOptions(cache_dir=tmp_path))
    assert t.method == "per_layer_profile" and target.lowered == 4
    np.testing.assert_allclose(t.ms[1], [1.0, 1.5, 0.9, 2.0])
    np.testing.assert_allclose(t.ms[0], [2.1, 3.1, 1.9, 4.1])
    np.testing.assert_allclose(t.rest, [0.3] * 4)
    again = measure_table(gm, x, ["conv2d", "linear"], opts, quantize_with, target,
                          model_hash="abc", latency=LatencyOptions(cache_dir=tmp_path))
    assert target.lowered == 4, "the cached table must not be measured again"
    np.testing.assert_array_equal(again.ms, t.ms)
    measure_table(gm, x, ["conv2d", "linear"], opts, quantize_with, target,
                  model_hash="other", latency=LatencyOptions(cache_dir=tmp_path))
    assert target.lowered == 8, "another model hash is another table"


def test_cached_table_with_a_switch_cost_is_still_read(gm: fx.GraphModule,
                                                       tmp_path: Path) -> None:
    """Tables cached while they also measured a Q/DQ switch cost (always 0 where measured)
    keep their key and are read as they are: the search prices the same rows."""
    import json

    x = (torch.randn(4, 2, 5, 5),)
    target = FakeTarget()
    opts = ["W8A8", "FP32"]
    timing = LatencyOptions(cache_dir=tmp_path)
    first = measure_table(gm, x, ["conv2d", "linear"], opts, _quantizer(gm, x), target,
                          model_hash="abc", latency=timing)
    (cached,) = tmp_path.glob("*.json")
    assert "switch_ms_per_kelem" not in json.loads(cached.read_text())
    cached.write_text(json.dumps({**json.loads(cached.read_text()),
                                  "switch_ms_per_kelem": 0.0}))
    again = measure_table(gm, x, ["conv2d", "linear"], opts, _quantizer(gm, x), target,
                          model_hash="abc", latency=timing)
    assert target.lowered == 2
    np.testing.assert_array_equal(again.ms, first.ms)
    assert again.rest == first.rest


class RuntimeFailure(Exception):
    """Like onnxruntime's exceptions: derived from Exception only."""


class FailingTarget(FakeTarget):
    """Lowers fine, fails to run any variant with 4-bit weights."""

    def profile(self, artifact: Artifact, inputs: Any, **kw: Any) -> Latency:
        if "W4A8" in artifact.meta["labels"].values():
            raise RuntimeFailure("INT4 kernel missing")
        return super().profile(artifact, inputs, **kw)


def test_runtime_failure_names_the_variant(gm: fx.GraphModule, tmp_path: Path) -> None:
    from quantflow.errors import TargetRuntimeError

    x = (torch.randn(4, 2, 5, 5),)
    quantize_with = _quantizer(gm, x)

    with pytest.raises(TargetRuntimeError, match=r"fake failed .* W4A8 variant.*"
                       r"RuntimeFailure: INT4 kernel missing") as err:
        measure_table(gm, x, ["conv2d", "linear"], ["W8A8", "W4A8", "FP32"], quantize_with,
                      FailingTarget(), model_hash="abc",
                      latency=LatencyOptions(cache_dir=tmp_path))
    assert isinstance(err.value.__cause__, RuntimeFailure)
    assert not list(tmp_path.rglob("*.json")), "a failed table must not be cached"
