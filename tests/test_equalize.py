"""Cross-layer equalization: the per-channel algebra, exactness of the graph pass (fp32 and fp64)
on conv/linear chains including depthwise and ReLU6, skips, and that it actually helps
per-tensor INT8 weight quantization on a network whose channel ranges differ widely."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import fx, nn

from quantflow.ir import WEIGHTED_OPS, capture, get_tensor
from quantflow.passes import optimize
from quantflow.passes.equalize import (
    TOL,
    channel_ranges,
    equalize,
    equalize_pair,
    equalize_relu6,
    input_channel_ranges,
    scale_in_channels,
    weight_range_spread,
)
from quantflow.testing import check_pass

aten = torch.ops.aten
DTYPES = [torch.float32, torch.float64]


def skew(first: nn.Conv2d | nn.Linear, second: nn.Conv2d | nn.Linear, seed: int,
         decades: float = 2.0) -> None:
    """Scale output channel i of `first` by k_i and input channel i of `second` by 1/k_i,
    k_i = 10^U(-decades, decades): same function (through ReLU), badly balanced ranges."""
    g = torch.Generator().manual_seed(seed)
    k = 10 ** (torch.rand(first.weight.shape[0], generator=g) * 2 * decades - decades)
    with torch.no_grad():
        first.weight.mul_(k.reshape(-1, *[1] * (first.weight.dim() - 1)))
        if isinstance(first.bias, torch.Tensor):
            first.bias.mul_(k)
        w2 = second.weight
        groups = getattr(second, "groups", 1)
        w2.copy_(scale_in_channels(w2, 1 / k, groups))


def pair(kind: str, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """Small skewed networks covering every supported chain shape, and their input shape."""
    torch.manual_seed(seed)
    if kind.startswith("linear"):
        la, lb = nn.Linear(6, 12), nn.Linear(12, 5)
        skew(la, lb, seed)
        return nn.Sequential(la, nn.ReLU(), lb), (4, 6)
    if kind == "mobilenet":  # 1x1 expand -> dw 3x3 -> 1x1 project, pairs (1x1, dw), (dw, 1x1)
        a, dw, c = nn.Conv2d(4, 16, 1), nn.Conv2d(16, 16, 3, padding=1, groups=16), \
            nn.Conv2d(16, 8, 1)
        skew(a, dw, seed)
        skew(dw, c, seed + 1)
        return nn.Sequential(a, nn.ReLU(), dw, nn.ReLU(), c), (2, 4, 7, 7)
    act = {"relu": nn.ReLU(), "none": nn.Identity(), "leaky": nn.LeakyReLU(0.1),
           "relu6": nn.ReLU6()}[kind.split("_")[-1]]
    groups = 2 if kind.startswith("grouped") else 1
    a, b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 3, stride=2, groups=groups)
    skew(a, b, seed)
    return nn.Sequential(a, act, b), (2, 3, 9, 9)


CASES = ["conv_relu", "conv_none", "conv_leaky", "grouped_relu", "mobilenet", "linear_relu"]


def weights(gm: fx.GraphModule) -> list[torch.Tensor]:
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in WEIGHTED_OPS:
            w = get_tensor(gm, n.args[1])
            assert w is not None
            out.append(w)
    return out


# ----------------------------------------------------------------------------- math

def test_equalize_pair_balances_ranges() -> None:
    a, b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 6, 3)
    skew(a, b, seed=1)
    assert a.bias is not None
    w1, b1, w2 = (t.detach().double() for t in (a.weight, a.bias, b.weight))
    r1, r2 = channel_ranges(w1), input_channel_ranges(w2)
    w1n, b1n, w2n, s = equalize_pair(w1, b1, w2)
    geo = torch.sqrt(r1 * r2)
    torch.testing.assert_close(channel_ranges(w1n), geo, rtol=1e-12, atol=0)
    torch.testing.assert_close(input_channel_ranges(w2n), geo, rtol=1e-12, atol=0)
    assert b1n is not None
    torch.testing.assert_close(b1n * s, b1, rtol=1e-12, atol=0)
    assert float(r1.max() / r1.min()) > 100  # the skew was real ...
    assert float(geo.max() / geo.min()) < float(r1.max() / r1.min()) / 10  # ... and it shrank


def test_grouped_input_channels_match_loop() -> None:
    """Input channel i of a groups=g conv is column i mod C/g of group i div C/g."""
    g = torch.Generator().manual_seed(2)
    w2 = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)  # C = 8 inputs, 2 groups
    s = torch.rand(8, generator=g, dtype=torch.float64) + 0.5
    want, want_r = w2.clone(), torch.zeros(8, dtype=torch.float64)
    for i in range(8):
        grp, j = divmod(i, 4)
        want[grp * 3:(grp + 1) * 3, j] *= s[i]
        want_r[i] = w2[grp * 3:(grp + 1) * 3, j].abs().max()
    torch.testing.assert_close(scale_in_channels(w2, s, groups=2), want, rtol=0, atol=0)
    torch.testing.assert_close(input_channel_ranges(w2, groups=2), want_r, rtol=0, atol=0)
    dw = torch.randn(8, 1, 3, 3, generator=g, dtype=torch.float64)  # depthwise: filter i
    torch.testing.assert_close(input_channel_ranges(dw, groups=8), channel_ranges(dw))


# ----------------------------------------------------------------------------- graph pass

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", CASES)
def test_equalize_is_exact_and_balances(kind: str, dtype: torch.dtype,
                                        caplog: pytest.LogCaptureFixture) -> None:
    model, shape = pair(kind)
    model = model.to(dtype)
    gm = capture(model, (torch.randn(shape, dtype=dtype),))
    spread0 = weight_range_spread(gm)
    with caplog.at_level(logging.WARNING, logger="quantflow.passes"):
        gm = check_pass(equalize, gm, (torch.randn(shape, dtype=dtype),))
    warnings = [r for r in caplog.records
                if r.name == "quantflow.passes" and r.levelno >= logging.WARNING]
    assert not warnings, "equalization did not converge"
    spread1 = weight_range_spread(gm)
    assert spread1.keys() == spread0.keys()
    first = next(iter(spread0))
    assert spread1[first] < spread0[first] / 5, (spread0, spread1)
    if kind != "mobilenet":  # single pair: converged ranges agree to the stopping tolerance
        w1, w2 = weights(gm)
        groups = 2 if kind.startswith("grouped") else 1
        ratio = channel_ranges(w1) / input_channel_ranges(w2, groups)
        assert float(ratio.log().abs().max()) < 2 * TOL


class TwoUsers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
        skew(self.a, self.b, seed=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        return self.b(y) + y  # the add would see the scaled y


def test_multi_user_output_is_skipped() -> None:
    check_pass(equalize, TwoUsers(), (torch.randn(1, 3, 5, 5),), expect_change=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_relu6_skipped_by_default_rewritten_by_opt_in(dtype: torch.dtype) -> None:
    model, shape = pair("conv_relu6")
    model = model.to(dtype)
    x = torch.randn(shape, dtype=dtype) * 20  # large enough that the clip at 6 is active
    gm = capture(model, (x,))
    check_pass(equalize, gm, (x,), expect_change=False)
    gm = check_pass(equalize_relu6, gm, (x,))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert aten.hardtanh.default not in targets
    assert aten.relu.default in targets and aten.minimum.default in targets
    assert not equalize(gm)  # the default pass follows the bound and finds nothing to do


def test_equalize_relu6_on_folded_inverted_residual() -> None:
    """MobileNetV2's block (BN folded first, in-place ReLU6 and a residual add)."""
    mnv2 = pytest.importorskip("quantflow.zoo.mobilenetv2")
    block = mnv2.InvertedResidual(8, 8, stride=1, expand_ratio=6).eval()
    g = torch.Generator().manual_seed(4)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.05)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g) * 3)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    x = torch.randn(2, 8, 7, 7) * 3
    gm = capture(block, (x,))
    optimize(gm)
    gm = check_pass(equalize_relu6, gm, (x,))
    assert sum(n.target == aten.minimum.default for n in gm.graph.nodes) == 2


# ----------------------------------------------------------------------------- it helps

def fake_quant_weights(gm: fx.GraphModule) -> fx.GraphModule:
    """Copy of gm with every conv/linear weight per-tensor symmetric INT8 fake-quantized."""
    q = copy.deepcopy(gm)
    with torch.no_grad():
        for w in weights(q):
            scale = w.abs().max() / 127
            w.copy_(torch.clamp(torch.round(w / scale), -127, 127) * scale)
    return q


def sqnr_db(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - got).pow(2).sum()))


@pytest.mark.parametrize("kind", ["conv_relu", "mobilenet"])
def test_equalization_improves_per_tensor_int8(kind: str) -> None:
    model, shape = pair(kind, seed=5)
    x = torch.randn(64, *shape[1:], generator=torch.Generator().manual_seed(6))
    gm = capture(model, (x,))
    with torch.no_grad():
        ref = gm(x)
        before = sqnr_db(ref, fake_quant_weights(gm)(x))
        assert equalize(gm)
        gm.recompile()
        after = sqnr_db(ref, fake_quant_weights(gm)(x))
    # ranges spread over 4 decades leave most channels with a handful of INT8 levels; after
    # equalization every channel of a pair has the same range, so the error must drop a lot
    assert after > before + 10, (before, after)


def test_replaced_weights_leave_the_module() -> None:
    """The pre-equalization weights are deleted, so sizes and attributes do not double."""
    from quantflow.quantize import model_size_bytes

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    skew(net[0], net[2], seed=1)
    gm = capture(net, (torch.randn(2, 3, 12, 12),))
    size, n_attrs = model_size_bytes(gm), len(list(gm.named_buffers()) +
                                              list(gm.named_parameters()))
    assert equalize(gm)
    gm.recompile()  # passes leave recompiling to run_pipeline
    gm(torch.randn(2, 3, 12, 12))  # the deleted attributes are not referenced any more
    assert model_size_bytes(gm) == size
    assert len(list(gm.named_buffers()) + list(gm.named_parameters())) == n_attrs
