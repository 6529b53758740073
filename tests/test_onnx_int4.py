"""4-bit weights stored as ONNX INT4 + Cast: half the bytes, the same int8 kernels and outputs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from quantflow.calibrate import batched, collect_stats
from quantflow.ir import capture
from quantflow.passes import DEFAULT_PIPELINE, run_pipeline
from quantflow.quantize import quantize
from quantflow.search.space import GlobalConfig, layer_plan
from quantflow.spec import QuantPlan
from quantflow.targets.onnx_int4 import pack_int4_weights, packable
from quantflow.targets.ort import OrtTarget

pytestmark = pytest.mark.usefixtures("one_thread")


def _quantized() -> tuple[torch.fx.GraphModule, torch.Tensor, dict[str, int]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    x = torch.randn(16, 3, 16, 16)
    gm = capture(model, (x[:2],))
    run_pipeline(gm, DEFAULT_PIPELINE)
    stats = collect_stats(gm, batched(x, 8))
    g = GlobalConfig()
    four = {"conv2d_1": 16 * 32 * 9, "linear": 32 * 10}  # layer -> weight elements
    plan = QuantPlan(default=layer_plan("W8A8", g),
                     layers={n: layer_plan("W4A8", g) for n in four})
    return quantize(gm, plan, stats), x, four


def test_packed_model_is_smaller_and_runs_the_same_int8_kernels(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture
                                                                ) -> None:
    qgm, x, four = _quantized()
    packed = OrtTarget().lower(qgm, (x[:1],), tmp_path / "packed", precision="mixed")
    with caplog.at_level(logging.WARNING):
        plain = OrtTarget(opset=18).lower(qgm, (x[:1],), tmp_path / "plain", precision="mixed")
    assert "4-bit weights stay int8 on disk" in caplog.text
    assert packed.meta["int4_packed_weights"] == len(four) == 2
    assert plain.meta["int4_packed_weights"] == 0
    # exactly half a byte saved per 4-bit weight (element counts are even here)
    saved = plain.meta["weights_bytes"] - packed.meta["weights_bytes"]
    assert saved == sum(n // 2 for n in four.values())
    assert packed.path.stat().st_size < plain.path.stat().st_size - 0.9 * saved
    # onnxruntime folds the Cast at load: the same fused integer kernels as the int8 file
    assert packed.meta["integer_ops"] == plain.meta["integer_ops"]
    assert packed.meta["quantized_layers"] == plain.meta["quantized_layers"]
    assert packed.meta["integer_ops"].get("QLinearConv") == 3
    assert not packed.meta["float_compute_ops"]
    target = OrtTarget(threads=1)
    for i in range(4):  # the artifacts have a static batch of 1
        inputs = [x[i:i + 1].numpy()]
        a, b = target.run(packed, inputs)[0], target.run(plain, inputs)[0]
        np.testing.assert_array_equal(a, b)  # same codes, same kernels: bit-identical


def test_only_4bit_codes_are_packed(tmp_path: Path) -> None:
    qgm, x, _ = _quantized()
    art = OrtTarget(opset=21).lower(qgm, (x[:1],), tmp_path, precision="mixed")
    model = onnx.load(str(art.path))
    int4 = [i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT4]
    assert sorted(int4) == ["_qf_conv2d_1_weight_int4_packed", "_qf_linear_weight_int4_packed"]
    assert packable(model) == []  # nothing left to pack, W8 weights untouched
    codes = dict(qgm.named_buffers())["_qf_conv2d_1_weight_int4"].numpy()
    stored = {i.name: i for i in model.graph.initializer}["_qf_conv2d_1_weight_int4_packed"]
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(stored), codes)  # nibble order
    # a code outside [-8, 7] (a mislabelled 8-bit weight) is never packed
    bad = onnx.helper.make_model(onnx.helper.make_graph(
        [], "g", [], [], initializer=[onnx.numpy_helper.from_array(
            np.array([-9, 3], dtype=np.int8), "x_weight_int4")]),
        opset_imports=[onnx.helper.make_opsetid("", 21)])
    assert pack_int4_weights(bad) == []
    low = onnx.helper.make_model(onnx.helper.make_graph(
        [], "g", [], [], initializer=[onnx.numpy_helper.from_array(
            np.array([-7, 3], dtype=np.int8), "x_weight_int4")]),
        opset_imports=[onnx.helper.make_opsetid("", 18)])
    with pytest.raises(ValueError, match="opset >= 21"):
        pack_int4_weights(low)
