"""The quantizer: where Q/DQ pairs go, what the weights become, and simulation numerics."""

from __future__ import annotations

import torch
from torch import fx, nn

from quantflow.calibrate import batched, collect_stats
from quantflow.ir import capture
from quantflow.placement import plan_tensors
from quantflow.qmath import fake_quant_weight
from quantflow.quantize import model_size_bytes, quantize
from quantflow.spec import ORT_ACT, ORT_WEIGHT, TRT_ACT, LayerPlan, QSpec, QuantPlan, int8_plan

qd = torch.ops.quantized_decomposed


class ResBlockNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = torch.relu(self.c2(torch.relu(self.c1(x))) + x)
        return self.fc(nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))


def _setup() -> tuple[fx.GraphModule, torch.Tensor, dict]:
    torch.manual_seed(0)
    x = torch.randn(32, 3, 12, 12)
    gm = capture(ResBlockNet(), (x[:1],))
    return gm, x, collect_stats(gm, batched(x, 8))


def _targets_of(gm: fx.GraphModule, node_name: str) -> list[str]:
    n = next(n for n in gm.graph.nodes if n.name == node_name)
    return [str(a.target) for a in n.args if isinstance(a, fx.Node)]


def test_ort_placement_quantizes_inputs_and_outputs_after_relu() -> None:
    gm, _, _ = _setup()
    t = plan_tensors(gm, int8_plan())
    # conv inputs, the post-ReLU outputs (ReLU folds into the range), both add inputs
    assert {"x", "relu", "relu_1", "conv2d_2", "relu_2"} <= set(t)
    assert "conv2d" not in t  # conv2d → relu: the relu output is the quantized tensor
    assert all(s == ORT_ACT for s in t.values())


def test_trt_placement_leaves_weighted_outputs_alone() -> None:
    gm, _, _ = _setup()
    t = plan_tensors(gm, int8_plan(act=TRT_ACT), placement="trt")
    assert "conv2d_2" in t  # residual add input
    assert "linear" not in t and "adaptive_avg_pool2d" not in t
    assert all(s.symmetric and s.signed for s in t.values())


def test_weights_int8_per_channel_and_bias_int32() -> None:
    gm, _, stats = _setup()
    q = quantize(gm, int8_plan(), stats)
    names = {n.name: n for n in q.graph.nodes}
    wdq = names["conv2d_1_weight_dq"]
    assert wdq.target == qd.dequantize_per_channel.default
    w_int = getattr(q, wdq.args[0].target)
    assert w_int.dtype == torch.int8 and int(w_int.abs().max()) <= 127
    bdq = names["conv2d_1_bias_dq"]
    assert getattr(q, bdq.args[0].target).dtype == torch.int32
    # bias scale = input scale x weight scale, per output channel (what ORT's fusion needs)
    s_x = float(names["conv2d_1"].args[0].args[1])
    w_s = getattr(q, wdq.args[1].target)
    torch.testing.assert_close(getattr(q, bdq.args[1].target), (w_s.double() * s_x).float())
    assert model_size_bytes(q) < 0.4 * model_size_bytes(gm)


def test_simulation_matches_manual_fake_quant_of_weights() -> None:
    gm, _x, stats = _setup()
    plan = int8_plan().with_layer("linear", LayerPlan(ORT_WEIGHT, None))  # weight-only head
    q = quantize(gm, plan, stats)
    w = gm.fc.weight
    fq = fake_quant_weight(w, ORT_WEIGHT)
    wdq = next(n for n in q.graph.nodes if n.name == "linear_weight_dq")
    got = wdq.target(*[getattr(q, a.target) if isinstance(a, fx.Node) else a for a in wdq.args])
    torch.testing.assert_close(got, fq, rtol=0, atol=1e-7)
    # a float-input layer keeps its float bias (no input scale to build an int32 bias from)
    assert "linear_bias_dq" not in {n.name for n in q.graph.nodes}


def test_float_layer_and_four_bit_weights() -> None:
    gm, x, stats = _setup()
    plan = (int8_plan().with_layer("conv2d", LayerPlan())
            .with_layer("conv2d_1", LayerPlan(QSpec(bits=4, granularity="channel"), ORT_ACT)))
    q = quantize(gm, plan, stats)
    names = {n.name: n for n in q.graph.nodes}
    assert "x" not in plan_tensors(gm, plan)  # the stem is float: its input stays float
    assert names["conv2d"].args[1].op == "get_attr"  # float weight
    w4 = getattr(q, names["conv2d_1_weight_dq"].args[0].target)
    assert int(w4.abs().max()) <= 7
    with torch.no_grad():
        ref, out = gm(x), q(x)
    sqnr = 10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())
    assert sqnr > 15  # still a faithful model with one 4-bit layer


def test_int8_simulation_is_faithful_and_input_untouched() -> None:
    gm, x, stats = _setup()
    before = [n.name for n in gm.graph.nodes]
    q = quantize(gm, int8_plan(), stats)
    assert [n.name for n in gm.graph.nodes] == before
    with torch.no_grad():
        ref, out = gm(x), q(x)
    sqnr = 10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())
    assert sqnr > 30, f"INT8 simulation SQNR {sqnr:.1f} dB"


def test_bias_correction_removes_the_mean_output_shift() -> None:
    """−(Q(W) − W)·E[x] in the bias cancels the per-channel mean error of weight rounding."""
    import dataclasses

    from quantflow.quantize import bias_shift

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=0, groups=2)
    x = torch.randn(64, 8, 10, 10) + torch.linspace(-2, 3, 8).reshape(1, 8, 1, 1)  # E[x] != 0
    gm = capture(nn.Sequential(conv), (x[:1],))
    stats = collect_stats(gm, batched(x, 16))
    placeholder = next(n.name for n in gm.graph.nodes if n.op == "placeholder")
    torch.testing.assert_close(stats[placeholder].channel_mean, x.double().mean((0, 2, 3)),
                               rtol=1e-9, atol=1e-9)
    w4 = QSpec(bits=4, granularity="channel")
    plan = QuantPlan(default=LayerPlan(w4, None))  # weight-only: isolates the weight error

    def mean_err(bc: bool) -> float:
        q = quantize(gm, dataclasses.replace(plan, bias_correction=bc), stats)
        with torch.no_grad():
            return float((q(x) - gm(x)).mean((0, 2, 3)).abs().max())

    assert mean_err(True) < 0.05 * mean_err(False)
    # the pure function agrees with a direct evaluation on a constant input
    w_q = fake_quant_weight(conv.weight, w4)
    m = torch.linspace(-1, 1, 8)
    direct = nn.functional.conv2d(m.reshape(1, 8, 1, 1).expand(1, 8, 3, 3), w_q - conv.weight,
                                  groups=2).flatten()
    torch.testing.assert_close(bias_shift(conv.weight, w_q, m, 2).float(), direct, rtol=1e-5,
                               atol=1e-6)


def test_value_preserving_ops_share_their_input_quantization() -> None:
    """MaxPool/flatten outputs re-use the input's (scale, zero point): ORT keeps them uint8."""

    class PoolNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 8, 3)
            self.fc = nn.Linear(8 * 5 * 5, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = nn.functional.max_pool2d(torch.relu(self.c(x)), 2)
            return self.fc(y.flatten(1))

    x = torch.randn(16, 3, 12, 12)
    gm = capture(PoolNet(), (x[:1],))
    q = quantize(gm, int8_plan("mse"), collect_stats(gm, batched(x, 8)))
    t = q.meta["quantflow"].tensors
    assert t["max_pool2d"] == t["relu"] and t["flatten"] == t["relu"]
