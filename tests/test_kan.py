"""KAN convolutions (issue 15 item 4): the trained `kan_fmnist` zoo model compiles; its convs
run as integer kernels on ORT with a small accuracy drop, the basis math stays float with its
reason, TVM matches the simulation within one output step, the TensorRT placement passes
the rule check; a published-style layer that hard-codes its batch captures dynamic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import fx, nn

from quantflow import batch as qb
from quantflow.calibrate import collect_stats
from quantflow.data import load_fashion_mnist
from quantflow.ir import capture, count_ops, unlift
from quantflow.passes import optimize
from quantflow.quantize import quantize
from quantflow.spec import TRT_ACT, int8_plan
from quantflow.targets import get_target
from quantflow.targets.trt_rules import check_trt_qdq
from quantflow.testing import check_pass, output_step
from quantflow.zoo import get_model
from quantflow.zoo.kan import kan_fmnist

#: leading test images the default suite evaluates (the zoo tests' subset)
SUBSET = 2500
#: the issue's bound: INT8 on ORT within half a point of FP32 on ORT
MAX_DROP_PT = 0.5


def _prepared(placement: str = "ort") -> tuple[fx.GraphModule, fx.GraphModule]:
    """(optimized float graph, quantized graph) of the trained model, calibrated on 512
    training images with minmax (seeded, file order)."""
    x_cal, _ = load_fashion_mnist("train", limit=512)
    gm = capture(get_model("kan_fmnist"), (x_cal[:8],))
    optimize(gm)
    stats = collect_stats(gm, [(x_cal[i:i + 128],) for i in range(0, 512, 128)],
                          histograms=False)
    plan = int8_plan("minmax", act=TRT_ACT) if placement == "trt" else int8_plan("minmax")
    return gm, quantize(gm, plan, stats, placement)


@pytest.fixture(scope="module")
def prepared() -> tuple[fx.GraphModule, fx.GraphModule]:
    return _prepared()


def test_kan_layers_fold_every_bn_exactly() -> None:
    torch.manual_seed(0)
    m = kan_fmnist().double()
    for bn in (mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)  # type: ignore[union-attr]
        bn.running_var.uniform_(0.5, 2.0)  # type: ignore[union-attr]
        bn.weight.data.uniform_(0.5, 2.0)
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    gm = check_pass(lambda g: bool(optimize(g).fired), m.eval(), (x,))
    assert count_ops(gm) | {"ops": 0} == {"conv": 4, "batch_norm": 0, "linear": 1, "ops": 0}


def _accuracy(target: object, art: object, x: torch.Tensor, y: torch.Tensor) -> float:
    correct = 0
    for i in range(0, len(x), 500):
        (out,) = target.run(art, [x[i:i + 500].numpy()])  # type: ignore[attr-defined]
        correct += int((np.argmax(out, 1) == y[i:i + 500].numpy()).sum())
    return 100.0 * correct / len(x)


def test_int8_on_ort_convs_integer_and_accuracy_within_half_a_point(
        prepared: tuple[fx.GraphModule, fx.GraphModule], tmp_path: Path) -> None:
    gm, qgm = prepared
    x, y = load_fashion_mnist("test", limit=SUBSET)
    target = get_target("ort", threads=2)
    fp32 = target.lower(gm, (x[:500],), tmp_path / "fp32", precision="fp32")
    int8 = target.lower(qgm, (x[:500],), tmp_path / "int8", precision="int8")
    meta = int8.meta
    assert meta["float_compute_ops"] == [], meta["float_compute_ops"]
    assert meta["integer_ops"]["QLinearConv"] == count_ops(gm)["conv"] == 4
    reasons = meta["float_op_reasons"]
    # the basis math reads the dequantized input (tanh first; acos/cos follow it in float)
    assert "Tanh" in reasons and "no QLinearTanh" in reasons["Tanh"], reasons
    assert {u.rsplit("(", 1)[1].rstrip(")") for u in meta["float_ops_on_dequantized"]} \
        <= set(reasons)
    acc_fp32, acc_int8 = _accuracy(target, fp32, x, y), _accuracy(target, int8, x, y)
    # measured (first 2500 test images, seed 0 weights): FP32 and INT8 in the message
    print(f"kan_fmnist on ORT, first {SUBSET} test images: FP32 {acc_fp32:.2f}%, "
          f"INT8 {acc_int8:.2f}%")
    assert acc_fp32 - acc_int8 <= MAX_DROP_PT, (acc_fp32, acc_int8)
    assert acc_fp32 > 80.0, acc_fp32


@pytest.mark.tvm
def test_tvm_matches_the_simulation_within_one_step(
        prepared: tuple[fx.GraphModule, fx.GraphModule], tmp_path: Path) -> None:
    _, qgm = prepared
    x, _ = load_fashion_mnist("test", limit=64)
    target = get_target("tvm")
    art = target.lower(qgm, (x,), tmp_path, precision="int8")  # TVM compiles one batch
    assert len(art.meta["int_layers"]) >= 4, art.meta["int_layers"]
    (got,) = target.run(art, [x.numpy()])
    with torch.no_grad():
        want = qgm(x).numpy()
    steps = np.abs(got - want) / output_step(qgm)
    assert steps.max() <= 1.0 + 1e-3, steps.max()


def test_trt_placement_passes_the_rule_check(tmp_path: Path) -> None:
    import onnx

    _, qgm = _prepared("trt")
    x, _ = load_fashion_mnist("test", limit=8)
    art = get_target("trt").lower(qgm, (x,), tmp_path, precision="int8")
    assert art.meta["qdq_warnings"] == []
    assert check_trt_qdq(onnx.load(art.files["onnx"])) == []


class _PublishedKALN(nn.Module):
    """torch-conv-kan's KALN layer with a LayerNorm: `x.view(orig_shape[0], -1)` before the
    norm, which a .pt2 exported at batch 1 holds as the constant 1."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.poly = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.norm = nn.LayerNorm(4 * 8 * 8)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.tanh(x)
        y = self.base(x) + self.poly(torch.cat([torch.ones_like(t), t, 1.5 * t * t - 0.5], 1))
        shape = y.shape
        y = nn.functional.silu(self.norm(y.view(shape[0], -1)).view(shape))
        return self.fc(y.mean((2, 3)))


def test_published_kan_layer_with_hard_coded_batch_is_made_dynamic() -> None:
    m = _PublishedKALN().eval()
    x1 = torch.randn(1, 1, 8, 8)
    g = unlift(torch.export.export(m, (x1,)))
    static = fx.GraphModule(g, g.graph).eval()
    gm = capture(static, (x1,))
    assert qb.describe(gm)["mode"] == "rewritten", qb.describe(gm)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), m(x), rtol=1e-5, atol=1e-6)
