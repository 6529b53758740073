"""1-D and 3-D convolutions end to end: BN folding, per-channel INT8, ONNX Runtime's integer
kernels (QLinearConv, on the host and under emulated AVX2 with the pair limit), TVM's integer
path, TensorRT's rules, and the trained (2+1)-D zoo net within half a point of FP32."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from quantflow.calibrate import batched, collect_stats
from quantflow.ir import capture
from quantflow.passes import optimize
from quantflow.passes.fold_bn import fold_bn
from quantflow.placement import observed_tensors
from quantflow.quantize import quantize
from quantflow.spec import int8_plan
from quantflow.testing import check_pass


def _bn(b: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in b.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1, generator=g)
            m.running_var.uniform_(0.5, 2, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.uniform_(-0.5, 0.5, generator=g)


class Net3d(nn.Module):
    """(2+1)-D stem, a residual temporal conv, a strided 3×3×3 conv, 3-D pools."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.b1 = nn.Conv3d(1, 8, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(8)
        self.c2, self.b2 = nn.Conv3d(8, 8, (3, 1, 1), padding=(1, 0, 0)), nn.BatchNorm3d(8)
        self.c3 = nn.Conv3d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)
        _bn(self, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.b2(self.c2(y)) + y)
        y = nn.functional.max_pool3d(torch.relu(self.c3(y)), 2)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool3d(y, 1), 1))


class Net1d(nn.Module):
    """Dilated 1-D convs along time (audio/time-series style)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.b1 = nn.Conv1d(2, 16, 9, padding=4), nn.BatchNorm1d(16)
        self.c2, self.b2 = nn.Conv1d(16, 16, 5, padding=4, dilation=2), nn.BatchNorm1d(16)
        self.fc = nn.Linear(16, 4)
        _bn(self, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.b2(self.c2(y)) + y)
        return self.fc(y.mean(-1))


def _x3(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 8, 16, 16, generator=torch.Generator().manual_seed(seed))


def _x1(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 2, 64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("net,x", [(Net3d, _x3), (Net1d, _x1)], ids=["3d", "1d"])
def test_bn_folds_into_nd_convs(net: type, x: object) -> None:
    gm = check_pass(fold_bn, capture(net().eval(), (x(2),)), (x(4, seed=1),))  # type: ignore[operator]
    assert not any("batch_norm" in str(n.target) for n in gm.graph.nodes)


def _quantized(net: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    gm = capture(net.eval(), (x[:1],))
    optimize(gm)
    return quantize(gm, int8_plan("minmax"), collect_stats(gm, batched(x, 4),
                                                           nodes=observed_tensors(gm)), "ort")


@pytest.mark.parametrize("net,x,convs", [(Net3d, _x3, 3), (Net1d, _x1, 2)], ids=["3d", "1d"])
def test_nd_convs_run_as_integer_kernels_in_ort(net: type, x: object, convs: int,
                                                tmp_path: Path) -> None:
    from quantflow.targets.ort import OrtTarget

    xs = x(16)  # type: ignore[operator]
    qgm = _quantized(net(), xs)
    art = OrtTarget(threads=1).lower(qgm, (xs,), tmp_path, precision="int8")
    assert art.meta["integer_ops"].get("QLinearConv") == convs, art.meta["integer_ops"]
    assert art.meta["float_compute_ops"] == []


def test_conv3d_artifact_is_exact_under_emulated_avx2(tmp_path: Path) -> None:
    """The parity gate on the host and on a Haswell (AVX2, no VNNI) CPU under qemu: the pair
    limit holds in ORT's 3-D packing order (0 steps off on both)."""
    import shutil

    from quantflow.cli import main

    if shutil.which("qemu-x86_64") is None:
        pytest.skip("qemu-x86_64 not installed (tools/setup.sh installs qemu-user)")
    net = Net3d().eval()
    torch.export.save(torch.export.export(net, (_x3(1),)), tmp_path / "m.pt2")
    np.save(tmp_path / "calib.npy", _x3(64, seed=3).numpy())
    out = tmp_path / "out"
    assert main(["compile", str(tmp_path / "m.pt2"), "--calib", str(tmp_path / "calib.npy"),
                 "--verify-on", "x86-avx2", "--profile-runs", "3", "-o", str(out)]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["parity"]["passed"], r["parity"]
    assert r["runtime"]["integer_ops"]["QLinearConv"] == 3


@pytest.mark.tvm
@pytest.mark.parametrize("net,x", [(Net3d, _x3), (Net1d, _x1)], ids=["3d", "1d"])
def test_nd_convs_run_in_integers_in_tvm(net: type, x: object, tmp_path: Path) -> None:
    from quantflow.targets import get_target

    xs = x(8)  # type: ignore[operator]
    qgm = _quantized(net(), xs)
    target = get_target("tvm")
    art = target.lower(qgm, (xs,), tmp_path, precision="int8")
    assert sum("conv" in n for n in art.meta["int_layers"]) >= 2, art.meta
    assert art.meta["float_layers"] == {}
    (got,) = target.run(art, [xs.numpy()])
    with torch.no_grad():
        want = qgm(xs)
    # integer accumulation is exact; only the fp32 rounding of the float-output linear differs
    assert float((torch.from_numpy(got) - want).abs().max()) < 1e-4 * float(want.abs().max())


def test_conv3d_trt_placement_passes_the_rule_check(tmp_path: Path) -> None:
    import onnx

    from quantflow.plan import base_plan
    from quantflow.targets.onnx_export import export_onnx
    from quantflow.targets.trt_rules import check_trt_qdq

    xs = _x3(8)
    gm = capture(Net3d().eval(), (xs[:1],))
    optimize(gm)
    qgm = quantize(gm, base_plan("trt", "minmax"),
                   collect_stats(gm, batched(xs, 4), nodes=observed_tensors(gm)), "trt")
    export_onnx(qgm, (xs[:2],), tmp_path / "m.onnx")
    assert [str(v) for v in check_trt_qdq(onnx.load(str(tmp_path / "m.onnx")))] == []


def test_r2plus1d_zoo_net_int8_within_half_a_point_on_ort(tmp_path: Path) -> None:
    """The trained (2+1)-D net (tools/train_volumetric.py) on 1000 held-out clips: every conv a
    QLinearConv, INT8 accuracy within 0.5 pt of FP32 on ONNX Runtime."""
    from quantflow.data import builtin_dataset
    from quantflow.targets.ort import OrtTarget
    from quantflow.zoo import get_model

    cal, _ = builtin_dataset("fmnist-clips-calib")
    x, y = builtin_dataset("fmnist-clips")
    assert y is not None
    x, y = x[:1000], y[:1000]
    gm = capture(get_model("r2plus1d_fmnist"), (cal[:1],))
    optimize(gm)
    qgm = quantize(gm, int8_plan("mse"), collect_stats(gm, batched(cal[:256], 32),
                                                      nodes=observed_tensors(gm)), "ort")
    target = OrtTarget(threads=2)
    art = target.lower(qgm, (x[:250],), tmp_path, precision="int8")
    assert art.meta["integer_ops"].get("QLinearConv") == 6, art.meta["integer_ops"]
    assert art.meta["float_compute_ops"] == []
    got = torch.cat([torch.from_numpy(target.run(art, [x[i:i + 250].numpy()])[0])
                     for i in range(0, 1000, 250)])
    with torch.no_grad():
        ref = torch.cat([gm(x[i:i + 250]) for i in range(0, 1000, 250)])
    acc_fp32 = 100.0 * float((ref.argmax(1) == y).double().mean())
    acc_int8 = 100.0 * float((got.argmax(1) == y).double().mean())
    print(f"r2plus1d_fmnist, 1000 test clips: FP32 {acc_fp32:.2f}%, INT8 {acc_int8:.2f}%")
    assert acc_fp32 - acc_int8 <= 0.5 and acc_fp32 > 75.0, (acc_fp32, acc_int8)


class RepBlock3d(nn.Module):
    """RepVGG in 3-D: 3×3×3 conv+BN ‖ 1×1×1 conv+BN ‖ identity BN, summed."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.k3, self.b3 = nn.Conv3d(c, c, 3, padding=1, bias=False), nn.BatchNorm3d(c)
        self.k1, self.b1 = nn.Conv3d(c, c, 1, bias=False), nn.BatchNorm3d(c)
        self.bid = nn.BatchNorm3d(c)
        _bn(self, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.b3(self.k3(x)) + self.b1(self.k1(x)) + self.bid(x))


class DilatedRep1d(nn.Module):
    """UniRepLKNet's dilated re-parameterization along time: a 13-tap conv ‖ 5-tap dilation 2 ‖
    3-tap dilation 3, each with BN (the branches' receptive fields all fit the 13 taps)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.big, self.bb = nn.Conv1d(c, c, 13, padding=6, groups=c, bias=False), \
            nn.BatchNorm1d(c)
        self.d2, self.b2 = nn.Conv1d(c, c, 5, padding=4, dilation=2, groups=c, bias=False), \
            nn.BatchNorm1d(c)
        self.d3, self.b3 = nn.Conv1d(c, c, 3, padding=3, dilation=3, groups=c, bias=False), \
            nn.BatchNorm1d(c)
        _bn(self, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bb(self.big(x)) + self.b2(self.d2(x)) + self.b3(self.d3(x))


def _convs(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "conv" in
            str(n.target)]


@pytest.mark.parametrize("net,x,op", [(RepBlock3d, lambda: torch.randn(4, 8, 4, 6, 6),
                                       "aten.conv3d.default"),
                                      (DilatedRep1d, lambda: torch.randn(4, 8, 40),
                                       "aten.conv1d.default")], ids=["repvgg3d", "dilated1d"])
def test_reparameterization_merges_nd_branches_exactly(net: type, x: object, op: str) -> None:
    """The 2-D merge algebra (BN folding, kernel padding, dilation to a sparse kernel,
    identity as a centre tap) holds in 1-D and 3-D: one conv left, same outputs (fp32 1e-5)."""
    model = net().eval()
    xs = x()  # type: ignore[operator]
    gm = capture(model, (xs[:1],))
    optimize(gm)
    assert _convs(gm) == [op], _convs(gm)
    with torch.no_grad():
        want, got = model(xs), gm(xs)
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


@pytest.mark.parametrize("relu6", [False, True], ids=["relu", "relu6"])
def test_cross_layer_equalization_on_3d_convs_is_exact(relu6: bool) -> None:
    from quantflow.passes.equalize import equalize, equalize_relu6

    class Pair3d(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(7)
            self.a, self.b = nn.Conv3d(2, 8, 3, padding=1), nn.Conv3d(8, 4, (1, 3, 3))
            with torch.no_grad():  # channel ranges spread over 100x: what CLE evens out
                self.a.weight.mul_(torch.logspace(-1, 1, 8)[:, None, None, None, None])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            return self.b(nn.functional.relu6(y) if relu6 else torch.relu(y))

    x = torch.randn(4, 2, 4, 8, 8) * 4
    gm = check_pass(equalize_relu6 if relu6 else equalize, capture(Pair3d().eval(), (x[:1],)),
                    (x,))
    w = dict(gm.named_parameters()).get("a.weight")
    w = w if w is not None else next(t for n, t in gm.state_dict().items() if t.dim() == 5
                                     and t.shape[0] == 8)
    ranges = w.abs().amax(dim=(1, 2, 3, 4))
    assert float(ranges.max() / ranges.min()) < 10.0, ranges


def test_torchscript_conv3d_becomes_canonical(tmp_path: Path) -> None:
    """A traced 3-D net: TorchScript's generic aten.convolution turns into aten.conv3d, so BN
    folds and the quantizer sees three convs."""
    from quantflow.load import load_model

    path = tmp_path / "net3d.pt"
    torch.jit.save(torch.jit.trace(Net3d().eval(), _x3(1)), str(path))
    loaded = load_model(str(path), input_shape=(1, 1, 8, 16, 16))
    gm = capture(loaded.module, loaded.example_inputs or ())
    optimize(gm)
    assert _convs(gm) == ["aten.conv3d.default"] * 3, _convs(gm)
    with torch.no_grad():
        want, got = Net3d().eval()(_x3(4)), gm(_x3(4))
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
