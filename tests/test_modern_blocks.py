"""Modern ConvNet blocks (issue 15 item 4): official-form UniRepLKNet, ConvNeXt, InceptionNeXt,
ACNet's crop variant. The passes reach the official deploy form (BN and conv counts) with
outputs proven equal (`check_pass`), and on ORT every conv/linear runs as an integer kernel
while the float ops left say why."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import fx, nn

from quantflow.calibrate import collect_stats
from quantflow.ir import capture, count_ops
from quantflow.passes import optimize
from quantflow.passes.fold_affine import fold_affine
from quantflow.passes.fold_input_shift import fold_input_shift
from quantflow.quantize import quantize
from quantflow.spec import int8_plan
from quantflow.targets.ort import OrtTarget
from quantflow.testing import check_pass
from quantflow.zoo import modern
from quantflow.zoo.reparam import acnet_crop_fmnist

aten = torch.ops.aten


def _randomize(m: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics, GRN γ/β and layer scale (the identity ones hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            n = mod.num_features
            mod.running_mean.copy_(torch.rand(n, generator=g) - 0.5)  # type: ignore[operator]
            mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)  # type: ignore[operator]
            mod.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            mod.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
        if isinstance(mod, modern.GRN):
            mod.gamma.data.normal_(0, 0.5, generator=g)
            assert mod.beta is not None
            mod.beta.data.normal_(0, 0.5, generator=g)
        if isinstance(mod, (modern.UniRepLKNetBlockOfficial, modern.ConvNeXtBlock)) and \
                mod.gamma is not None:
            mod.gamma.data.uniform_(0.5, 1.5, generator=g)
    return m.eval()


def _ops(gm: fx.GraphModule) -> Counter[object]:
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


def _block(kernel: int = 13, dim: int = 8) -> tuple[nn.Module, torch.Tensor]:
    m = _randomize(modern.UniRepLKNetBlockOfficial(dim, kernel)).double()
    return m, torch.randn(2, dim, 15, 15, dtype=torch.float64)


def test_fold_affine_folds_bn_behind_permute_and_layer_scale() -> None:
    m, x = _block()
    gm = capture(m, (x,))
    before = _ops(gm)
    gm = check_pass(fold_affine, gm, (x,))
    after = _ops(gm)
    # the BN after Linear → permute, and the layer scale γ·y: both into the second linear
    assert before[aten.batch_norm.default] - after[aten.batch_norm.default] == 1
    assert before[aten.mul.Tensor] - after[aten.mul.Tensor] == 1
    assert count_ops(gm)["linear"] == 2


def test_fold_input_shift_projects_grn_beta_into_the_linear_bias() -> None:
    m, x = _block(kernel=3)
    gm = capture(m, (x,))
    before = _ops(gm)[aten.add.Tensor]
    gm = check_pass(fold_input_shift, gm, (x,))
    assert before - _ops(gm)[aten.add.Tensor] == 1


class _NotPerChannel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.c = nn.Parameter(torch.rand(1, 4, 6, 6))  # varies over space too
        self.lin = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        return y * self.c, self.lin(x[:, :1] + self.c[:, :1])


def test_affine_folds_refuse_what_is_not_per_channel() -> None:
    x = torch.randn(2, 3, 6, 6)
    check_pass(fold_affine, _NotPerChannel().eval(), (x,), expect_change=False)
    check_pass(fold_input_shift, _NotPerChannel().eval(), (x,), expect_change=False)


def test_unireplknet_blocks_reach_the_official_deploy_form() -> None:
    """4 official-form blocks (K = 3, 13, 7, 7): 26 convs / 22 BN → 15 convs / 0 BN, as the
    official `reparameterize()` leaves them; the 4 layer-scale muls are gone."""
    m = _randomize(modern.unireplknet_official_fmnist()).double()
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    gm = capture(m, (x,))
    muls = _ops(gm)[aten.mul.Tensor]
    assert count_ops(gm)["conv"] == 26 and count_ops(gm)["batch_norm"] == 22
    gm = check_pass(lambda g: bool(optimize(g).fired), gm, (x,))
    assert count_ops(gm)["conv"] == 15 and count_ops(gm)["batch_norm"] == 0
    assert muls - _ops(gm)[aten.mul.Tensor] == 4


@pytest.mark.slow
def test_unireplknet_a_layout_reaches_the_official_deploy_form() -> None:
    """UniRepLKNet-A's layout (12 blocks): 91 convs / 84 BN → 41 convs / 0 BN (official
    `reparameterize()`: every BN folded; 2 stem + 3 downsampling + 12 × (dw + SE's 2))."""
    m = _randomize(modern.unireplknet_a_like(dims=(8, 16, 16, 16))).double()
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    gm = capture(m, (x,))
    muls = _ops(gm)[aten.mul.Tensor]
    assert count_ops(gm)["conv"] == 91 and count_ops(gm)["batch_norm"] == 84
    gm = check_pass(lambda g: bool(optimize(g).fired), gm, (x,))
    assert count_ops(gm)["conv"] == 41 and count_ops(gm)["batch_norm"] == 0
    assert count_ops(gm)["linear"] == 25
    assert muls - _ops(gm)[aten.mul.Tensor] == 12  # every block's layer scale folded


def test_acnet_crop_variant_merges_to_the_deploy_conv_count() -> None:
    """Official ACNet crop variant (padding < K//2): 4 blocks × 3 convs → 4 convs."""
    m = _randomize(acnet_crop_fmnist()).double()
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    gm = capture(m, (x,))
    assert count_ops(gm)["conv"] == 12
    gm = check_pass(lambda g: bool(optimize(g).fired), gm, (x,))
    assert count_ops(gm)["conv"] == 4 and count_ops(gm)["batch_norm"] == 0
    assert _ops(gm)[aten.slice.Tensor] == 0


@pytest.mark.parametrize("factory", [modern.convnext_fmnist, modern.inceptionnext_fmnist])
def test_convnext_family_passes_are_exact(factory: object) -> None:
    m = _randomize(factory()).double()  # type: ignore[operator]
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    gm = check_pass(lambda g: bool(optimize(g).fired), m, (x,))
    assert _ops(gm)[aten.mul.Tensor] < _ops(capture(m, (x,)))[aten.mul.Tensor]  # γ folded


def _ort_int8(m: nn.Module, tmp: Path) -> dict[str, object]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 28, 28, generator=g)
    gm = capture(m, (x,))
    optimize(gm)
    stats = collect_stats(gm, [(torch.randn(8, 1, 28, 28, generator=g),) for _ in range(2)],
                          histograms=False)
    qgm = quantize(gm, int8_plan(), stats)
    art = OrtTarget(threads=1).lower(qgm, (x,), tmp, precision="int8")
    meta = dict(art.meta)
    meta["_convs"] = count_ops(gm)["conv"]
    meta["_linears"] = count_ops(gm)["linear"]
    return meta


def test_unireplknet_on_ort_every_conv_linear_integer_float_ops_explained(tmp_path: Path
                                                                         ) -> None:
    meta = _ort_int8(_randomize(modern.unireplknet_official_fmnist()), tmp_path)
    ints = meta["integer_ops"]
    assert isinstance(ints, dict)
    assert meta["float_compute_ops"] == [], meta["float_compute_ops"]
    assert ints["QLinearConv"] == meta["_convs"] == 15
    assert ints.get("QGemm", 0) + ints.get("QLinearMatMul", 0) == meta["_linears"] == 9
    reasons = meta["float_op_reasons"]
    assert isinstance(reasons, dict)
    unfused = meta["float_ops_on_dequantized"]
    assert isinstance(unfused, list) and unfused
    # every op type left in float on a dequantized tensor has its reason
    assert {u.rsplit("(", 1)[1].rstrip(")") for u in unfused} <= set(reasons)
    assert "no integer kernel" in reasons["LayerNormalization"]
    assert "QLinearDiv" in reasons["Div"]


@pytest.mark.slow
def test_inceptionnext_band_kernels_run_integer_on_ort(tmp_path: Path) -> None:
    meta = _ort_int8(_randomize(modern.inceptionnext_fmnist()), tmp_path)
    ints = meta["integer_ops"]
    assert isinstance(ints, dict)
    assert meta["float_compute_ops"] == []
    assert ints["QLinearConv"] == meta["_convs"]
