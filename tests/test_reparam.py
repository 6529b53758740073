"""Structural re-parameterization from the graph alone (passes/reparam_*.py).

Every training-form block and network of `quantflow.zoo.reparam` goes through the default
pipeline (fold_bn + the reparam passes) and must (1) compute the same function: max|Δ| ≤
1e-5·max|y| in fp32 and ≤ 1e-12·max|y| in fp64, (2) end with its family's deploy conv count
and no BatchNorm, (3) be a fixpoint. BN statistics and affine parameters are randomized:
with default BN (mean 0, var 1, γ 1, β 0) a wrong bias or scale would go unnoticed.
Near-miss graphs must be left alone with the reason logged at debug level.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from quantflow.ir import capture, count_ops
from quantflow.passes.pipeline import Pass, PassReport, run_pipeline
from quantflow.passes.reparam_bn_branch import avgpool_to_conv, bn_to_conv
from quantflow.passes.reparam_parallel import merge_parallel_convs
from quantflow.passes.reparam_sequential import merge_sequential_convs
from quantflow.testing import FP32_REL, FP64_REL, check_pass, max_rel_err
from quantflow.zoo import reparam as R

torch.set_num_threads(2)
REPARAM: tuple[Pass, ...] = (bn_to_conv, avgpool_to_conv, merge_sequential_convs,
                             merge_parallel_convs)


def optimize(gm: fx.GraphModule) -> PassReport:
    """The default pipeline; until it lists every reparam pass, fold_bn + cleanup + ours."""
    import quantflow.passes as qp
    from quantflow.passes.cleanup import dead_code, remove_identity
    from quantflow.passes.fold_bn import fold_bn

    if all(p in qp.DEFAULT_PIPELINE for p in REPARAM):
        return qp.optimize(gm)
    return run_pipeline(gm, (remove_identity, fold_bn, *REPARAM, dead_code))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics/affine and non-zero residual weights, in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(1 + 0.3 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.5 * torch.randn(m.num_features, generator=g))
            elif isinstance(m, R.IdentityConv1x1):   # zero-initialized residual proves nothing
                m.weight.copy_(0.1 * torch.randn(m.weight.shape, generator=g))
    return model.eval()


def run_and_compare(model: nn.Module, shape: tuple[int, ...], dtype: torch.dtype
                    ) -> tuple[fx.GraphModule, PassReport, float]:
    model = randomize(model).to(dtype)
    x = torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
    gm = capture(model, (x,))
    report = optimize(gm)
    with torch.no_grad():
        got = gm(x)
    got = got[0] if isinstance(got, (tuple, list)) else got
    return gm, report, max_rel_err(got, want)


BLOCKS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    # name: (factory, input shape, deploy conv count)
    "repvgg": (lambda: R.RepVGGBlock(8, 8), (2, 8, 9, 9), 1),
    "repvgg_stride2": (lambda: R.RepVGGBlock(8, 16, stride=2), (2, 8, 9, 9), 1),
    "repvgg_groups2": (lambda: R.RepVGGBlock(8, 8, groups=2), (2, 8, 9, 9), 1),
    "acb": (lambda: R.ACBlock(8, 8), (2, 8, 9, 9), 1),
    "acb_k5_stride2": (lambda: R.ACBlock(8, 12, kernel=5, stride=2), (2, 8, 11, 11), 1),
    "dbb": (lambda: R.DiverseBranchBlock(8, 8), (2, 8, 9, 9), 1),
    "dbb_identity_init": (lambda: R.DiverseBranchBlock(8, 8, identity_init=True),
                          (2, 8, 9, 9), 1),
    "dbb_depthwise": (lambda: R.DiverseBranchBlock(8, 8, groups=8), (2, 8, 9, 9), 1),
    "dbb_stride2_k5": (lambda: R.DiverseBranchBlock(8, 16, kernel=5, stride=2),
                       (2, 8, 11, 11), 1),
    "replk_13_5": (lambda: R.RepLKBlock(8, 13, 5), (2, 8, 14, 14), 1),
    "replk_31_5": (lambda: R.RepLKBlock(4, 31, 5), (1, 4, 32, 32), 1),
    "unireplknet_13": (lambda: R.UniRepLKNetDilatedBlock(8, 13), (2, 8, 14, 14), 1),
    "unireplknet_7": (lambda: R.UniRepLKNetDilatedBlock(8, 7), (2, 8, 10, 10), 1),
    "mobileone_dw": (lambda: R.MobileOneBlock(8, 8, 3, groups=8, branches=3), (2, 8, 9, 9), 1),
    "mobileone_dw_stride2": (lambda: R.MobileOneBlock(8, 8, 3, 2, groups=8), (2, 8, 9, 9), 1),
    "mobileone_pw": (lambda: R.MobileOneBlock(8, 8, 1, branches=3), (2, 8, 9, 9), 1),
    "mobileone_unit": (lambda: R.MobileOneUnit(8, 16), (2, 8, 9, 9), 2),
}

NETWORKS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    # deploy conv counts: one per block (MobileOne: per stage) + the plain convs
    "repvgg_fmnist": (R.repvgg_fmnist, 7),
    "acnet_fmnist": (R.acnet_fmnist, 6),
    "dbb_fmnist": (R.dbb_fmnist, 7),
    "mobileone_fmnist": (R.mobileone_fmnist, 9),
    "unireplknet_fmnist": (R.unireplknet_fmnist, 14),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_reaches_deploy_form(name: str, dtype: torch.dtype) -> None:
    factory, shape, deploy_convs = BLOCKS[name]
    gm, report, err = run_and_compare(factory(), shape, dtype)
    tol = FP64_REL if dtype == torch.float64 else FP32_REL
    assert err <= tol, f"{name}: max|Δ|/max|y| = {err:.2e} > {tol:.0e}"
    assert report.after["conv"] == deploy_convs, report.summary()
    assert report.after["batch_norm"] == 0, report.summary()
    assert report.before["conv"] > deploy_convs  # there was something to merge
    assert not run_pipeline(gm, REPARAM).fired, "re-running the passes changed the graph"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", list(NETWORKS))
def test_network_reaches_deploy_form(name: str, dtype: torch.dtype) -> None:
    factory, deploy_convs = NETWORKS[name]
    gm, report, err = run_and_compare(factory(), (2, 1, 28, 28), dtype)
    tol = FP64_REL if dtype == torch.float64 else FP32_REL
    assert err <= tol, f"{name}: max|Δ|/max|y| = {err:.2e} > {tol:.0e}"
    assert report.after["conv"] == deploy_convs, report.summary()
    assert report.after["batch_norm"] == 0, report.summary()
    assert not optimize(gm).fired, "re-running the pipeline changed the graph"


def test_networks_are_small() -> None:
    for name, (factory, _) in NETWORKS.items():
        n_bytes = sum(p.numel() * 4 for p in factory().parameters())
        assert 50_000 < n_bytes < 1_000_000, f"{name}: {n_bytes} bytes"


# --------------------------------------------------------------------------- export forms
# The families' reference code writes its sums in place (`out += branch`), adds a literal 0
# for a missing branch, and pads with BN shifts by slice assignment. Same math, other graph.


class SliceAssignPadBN(nn.Module):
    """Pad-aware BN written as in-place strip assignment (exports as pad + slice + copy_)."""

    def __init__(self, channels: int, pad: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        bn, p = self.bn, self.pad
        assert bn.running_mean is not None and bn.running_var is not None
        v = (bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps))
        v = v.view(1, -1, 1, 1)
        y = F.pad(bn(x), [p] * 4)
        y[:, :, 0:p, :] = v
        y[:, :, -p:, :] = v
        y[:, :, :, 0:p] = v
        y[:, :, :, -p:] = v
        return y


class InPlaceDBB(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.origin = R.ConvBN(c, c, 3, 1, 1)
        self.one = R.ConvBN(c, c, 1)
        self.avg = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), SliceAssignPadBN(c, 1),
                                 nn.AvgPool2d(3, 1, 0), nn.BatchNorm2d(c))
        self.one_k = nn.Sequential(R.IdentityConv1x1(c), SliceAssignPadBN(c, 1),
                                   nn.Conv2d(c, c, 3, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: Tensor) -> Tensor:
        out = self.origin(x)
        out += self.one(x)
        out += self.avg(x)
        out += self.one_k(x)
        return F.relu(out)


class InPlaceMobileOne(nn.Module):
    def __init__(self, c: int, kernel: int, branches: int = 2) -> None:
        super().__init__()
        self.skip = nn.BatchNorm2d(c)
        self.scale = R.ConvBN(c, c, 1, groups=c) if kernel > 1 else None
        self.convs = nn.ModuleList(R.ConvBN(c, c, kernel, 1, kernel // 2, groups=c)
                                   for _ in range(branches))

    def forward(self, x: Tensor) -> Tensor:
        scale_out: Tensor | int = 0 if self.scale is None else self.scale(x)
        out = scale_out + self.skip(x)
        for conv in self.convs:
            out += conv(x)
        return F.relu(out)


class RepVGGPlusZero(nn.Module):
    """RepVGG without identity branch written as `dense + 1x1 + 0`."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.dense = R.ConvBN(c_in, c_out, 3, 2, 1)
        self.pointwise = R.ConvBN(c_in, c_out, 1, 2, 0)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.dense(x) + self.pointwise(x) + 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("factory", [lambda: InPlaceDBB(8), lambda: InPlaceMobileOne(8, 3),
                                     lambda: InPlaceMobileOne(8, 1), lambda: RepVGGPlusZero(8, 8)],
                         ids=["dbb_slice_pad", "mobileone_dw", "mobileone_pw", "repvgg_plus0"])
def test_reference_export_forms(factory: Callable[[], nn.Module], dtype: torch.dtype) -> None:
    _, report, err = run_and_compare(factory(), (2, 8, 9, 9), dtype)
    assert err <= (FP64_REL if dtype == torch.float64 else FP32_REL), err
    assert (report.after["conv"], report.after["batch_norm"]) == (1, 0), report.summary()


# --------------------------------------------------------------------------- single passes


class NestedSum(nn.Module):
    """((a + b) + c) + d with a conv on another input: three merge, one stays."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(6, 6, 5, padding=2)
        self.b = nn.Conv2d(6, 6, (1, 3), padding=(0, 1))
        self.c = nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=1)
        self.d = nn.Conv2d(6, 6, 3, padding=1)
        self.pre = nn.Conv2d(6, 6, 1)

    def forward(self, x: Tensor) -> Tensor:
        return ((self.a(x) + self.b(x)) + self.d(self.pre(x))) + self.c(x) + x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_parallel_partial_merge_keeps_the_rest(dtype: torch.dtype) -> None:
    x = torch.randn(2, 6, 8, 8, dtype=dtype)
    gm = check_pass(merge_parallel_convs, NestedSum().to(dtype), (x,))
    # a (5x5), b (1x3), c (3x3 dilated 2, same 5x5 span) and the bare x merge; d reads pre(x)
    assert count_ops(gm)["conv"] == 3
    adds = [n for n in gm.graph.nodes if n.target == torch.ops.aten.add.Tensor]
    assert len(adds) == 1


def test_sequential_pair_without_intermediate_bias_merges_with_padding() -> None:
    model = nn.Sequential(nn.Conv2d(4, 6, 1, bias=False), nn.Conv2d(6, 5, 3, padding=1))
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    gm = check_pass(merge_sequential_convs, model.double(), (x,))
    assert count_ops(gm)["conv"] == 1


def test_sequential_pair_with_valid_conv_merges_despite_bias() -> None:
    model = nn.Sequential(nn.Conv2d(4, 6, 1), nn.Conv2d(6, 5, 3, stride=2, dilation=2))
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    gm = check_pass(merge_sequential_convs, model.double(), (x,))
    assert count_ops(gm)["conv"] == 1


# --------------------------------------------------------------------------- near misses


def _debug_log(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "quantflow.passes")


def _unchanged(model: nn.Module, shape: tuple[int, ...], passes: tuple[Pass, ...] = REPARAM
               ) -> fx.GraphModule:
    x = torch.randn(*shape, dtype=torch.float64)
    gm = capture(randomize(model).double(), (x,))
    before = count_ops(gm)
    report = run_pipeline(gm, passes)
    assert not report.fired, f"near miss was rewritten: {report.fired}"
    assert count_ops(gm) == before
    return gm


class ReluOnBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.a(x)) + self.b(x)


class StrideMismatch(nn.Module):
    """3x3 stride 1 no padding and 1x1 stride 2 give the same 3x3 output from 5x5."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 1, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.a(x) + self.b(x)


class CentreMismatch(nn.Module):
    """Stride 2: 3x3 pad 1 and 2x2 pad 0 both give 4x4 from 8x8 but sample other pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.b = nn.Conv2d(4, 4, 2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.a(x) + self.b(x)


class SharedBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a = self.a(x)
        return a + self.b(x), a * 2


class DynamicWeight(nn.Module):
    """A conv whose weight depends on the input (not a constant), next to a normal conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.a.weight * x.mean(), padding=1) + self.b(x)


def test_relu_between_branch_and_add_is_not_merged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="quantflow.passes")
    _unchanged(ReluOnBranch(), (2, 4, 6, 6))
    assert "relu" in _debug_log(caplog)


def test_stride_mismatch_is_not_merged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="quantflow.passes")
    _unchanged(StrideMismatch(), (2, 4, 5, 5))
    assert "differ in stride" in _debug_log(caplog)


def test_misaligned_centres_are_not_merged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="quantflow.passes")
    _unchanged(CentreMismatch(), (2, 4, 8, 8))
    assert "centre offset" in _debug_log(caplog)


def test_branch_with_another_user_is_not_merged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="quantflow.passes")
    _unchanged(SharedBranch(), (2, 4, 6, 6))
    assert "also used outside the sum" in _debug_log(caplog)


def test_non_constant_weight_is_not_merged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="quantflow.passes")
    _unchanged(DynamicWeight(), (2, 4, 6, 6))
    assert "non-constant weight" in _debug_log(caplog)


def test_zero_padding_around_bias_is_not_merged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="quantflow.passes")
    _unchanged(nn.Sequential(nn.Conv2d(4, 6, 1), nn.Conv2d(6, 4, 3, padding=1)), (2, 4, 6, 6))
    assert "nonzero bias" in _debug_log(caplog)


def test_zero_pad_op_around_bias_is_not_merged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="quantflow.passes")

    class PadBetween(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 6, 1), nn.Conv2d(6, 4, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.b(F.pad(self.a(x), [1, 1, 1, 1]))

    _unchanged(PadBetween(), (2, 4, 6, 6))
    assert "pads with values that differ" in _debug_log(caplog)


def test_nonlinearity_between_sequential_convs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="quantflow.passes")
    _unchanged(nn.Sequential(nn.Conv2d(4, 6, 1), nn.ReLU(), nn.Conv2d(6, 4, 3)), (2, 4, 6, 6))
    assert "relu" in _debug_log(caplog) and "merge_sequential_convs" in _debug_log(caplog)


def test_bottleneck_pair_is_not_merged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="quantflow.passes")
    # 32 -> 4 -> 32: two thin 1x1 convs are much cheaper than one 32x32 conv
    _unchanged(nn.Sequential(nn.Conv2d(32, 4, 1, bias=False), nn.Conv2d(4, 32, 1)),
               (2, 32, 5, 5))
    assert "MACs" in _debug_log(caplog)


def test_lone_bn_is_left_alone(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="quantflow.passes")

    class LoneBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn, self.conv = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: Tensor) -> Tensor:
            return self.conv(F.relu(self.bn(x))) + x

    _unchanged(LoneBN(), (2, 4, 6, 6))
    assert "not a summand of an add" in _debug_log(caplog)


def test_ceil_mode_pool_is_not_converted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="quantflow.passes")

    class CeilPool(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, stride=2)
            self.pool = nn.AvgPool2d(3, 2, ceil_mode=True)

        def forward(self, x: Tensor) -> Tensor:
            return self.conv(x) + self.pool(x)

    _unchanged(CeilPool(), (2, 4, 9, 9))
    assert "ceil_mode" in _debug_log(caplog)


def test_in_place_add_into_a_view_keeps_its_write() -> None:
    class AddIntoView(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(4, 8, 3, padding=1)
            self.b, self.c = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

        def forward(self, x: Tensor) -> Tensor:
            y = self.a(x)
            view = y[:, :4]
            view += self.b(x) + self.c(x)   # writes into y: an out-of-place sum would lose it
            return y

    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    model = AddIntoView().double().eval()
    gm = capture(model, (x,))
    assert any(n.target == torch.ops.aten.add_.Tensor for n in gm.graph.nodes)
    assert run_pipeline(gm, REPARAM).fired   # b + c still merge, into the in-place add
    with torch.no_grad():
        got, want = gm(x), model(x)
    assert max_rel_err(got[0] if isinstance(got, (tuple, list)) else got, want) <= FP64_REL
