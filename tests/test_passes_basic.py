"""canonical_convs, fold_bn, remove_identity, dead_code and the default pipeline: exact
equivalence on models with randomized BN statistics/affine parameters (identity-initialized BN
would prove nothing)."""

from __future__ import annotations

import io
import logging
import operator
from collections.abc import Callable
from typing import TypeVar

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

from quantflow.ir import capture, count_ops, unlift
from quantflow.passes import DEFAULT_PIPELINE, canonical_convs, dead_code, optimize, remove_identity
from quantflow.passes.fold_bn import fold_bn, fold_bn_weights
from quantflow.testing import check_pass

aten = torch.ops.aten
DTYPES = [torch.float32, torch.float64]


M = TypeVar("M", bound=nn.Module)


def randomize_bn(model: M, seed: int = 0) -> M:
    """Random running stats and affine params on every BN, so folding is really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.05)
            if m.affine:
                m.weight.data.copy_(torch.randn(n, generator=g))
                m.bias.data.copy_(torch.randn(n, generator=g))
    return model.eval()


def n_ops(gm: fx.GraphModule, *ops: object) -> int:
    return sum(n.op == "call_function" and n.target in ops for n in gm.graph.nodes)


def as_bool(gm: fx.GraphModule) -> bool:
    """optimize() as a pass: did any pass fire."""
    return bool(optimize(gm).fired)


# ----------------------------------------------------------------------------- fold_bn math

def test_fold_bn_weights_matches_bn_applied_after_linear() -> None:
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, generator=g,
                                                                          dtype=torch.float64)
    mean, var = torch.randn(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64) + 0.1
    gamma, beta = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    w0 = w.clone()
    x = torch.randn(5, 4, dtype=torch.float64)
    want = torch.nn.functional.batch_norm(x @ w.T + b, mean, var, gamma, beta, False, 0.0, 1e-3)
    w2, b2 = fold_bn_weights(w, b, mean, var, 1e-3, gamma, beta)
    torch.testing.assert_close(x @ w2.T + b2, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(w, w0), "fold_bn_weights mutated its input"
    # no bias, no affine
    want = torch.nn.functional.batch_norm(x @ w.T, mean, var, None, None, False, 0.0, 1e-5)
    w3, b3 = fold_bn_weights(w, None, mean, var, 1e-5, None, None)
    torch.testing.assert_close(x @ w3.T + b3, want, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- fold_bn graph

def conv_bn(conv: nn.Module, bn: nn.Module) -> nn.Module:
    return randomize_bn(nn.Sequential(conv, bn))


#: name -> (model factory, input shape)
CONV_CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "plain": (lambda: conv_bn(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)), (2, 4, 9, 9)),
    "depthwise": (lambda: conv_bn(nn.Conv2d(6, 12, 3, groups=6, bias=False),
                                  nn.BatchNorm2d(12)), (2, 6, 9, 9)),
    "grouped": (lambda: conv_bn(nn.Conv2d(4, 6, 3, groups=2, padding=2), nn.BatchNorm2d(6)),
                (2, 4, 9, 9)),
    "dilation": (lambda: conv_bn(nn.Conv2d(4, 6, 3, dilation=2, padding=2), nn.BatchNorm2d(6)),
                 (2, 4, 9, 9)),
    "stride": (lambda: conv_bn(nn.Conv2d(4, 6, 3, stride=2, bias=False), nn.BatchNorm2d(6)),
               (2, 4, 9, 9)),
    "no_bias": (lambda: conv_bn(nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6)),
                (2, 4, 9, 9)),
    "affine_false": (lambda: conv_bn(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6, affine=False)),
                     (2, 4, 9, 9)),
    "conv1d": (lambda: conv_bn(nn.Conv1d(4, 6, 3, stride=2, padding=1), nn.BatchNorm1d(6)),
               (2, 4, 10)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_fold_conv_bn(case: str, dtype: torch.dtype) -> None:
    factory, shape = CONV_CASES[case]
    model = factory().to(dtype)
    x = torch.randn(shape, dtype=dtype)
    gm = capture(model, (x,))
    before = count_ops(gm)
    gm = check_pass(fold_bn, gm, (x,))
    after = count_ops(gm)
    assert before["batch_norm"] == 1 and after["batch_norm"] == 0
    assert after["conv"] == before["conv"] == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", [True, False])
def test_fold_linear_bn1d(dtype: torch.dtype, affine: bool) -> None:
    model = randomize_bn(nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7, affine=affine),
                                       nn.ReLU())).to(dtype)
    gm = check_pass(fold_bn, model, (torch.randn(4, 5, dtype=dtype),))
    assert count_ops(gm) == {"conv": 0, "batch_norm": 0, "linear": 1, "ops": 2}


def test_linear_bn1d_on_3d_output_is_not_folded() -> None:
    # Linear on (N, L, C_in) gives (N, L, C_out); BatchNorm1d(L) normalizes dim 1 = L, which is
    # not the linear's output feature: folding would be wrong even though L == C_out here.
    model = randomize_bn(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)))
    gm = check_pass(fold_bn, model, (torch.randn(2, 4, 5),), expect_change=False)
    assert count_ops(gm)["batch_norm"] == 1


class TwoUsers(nn.Module):
    """conv output feeds the BN and a residual add: folding would change the add's input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def test_conv_with_two_users_is_skipped() -> None:
    gm = check_pass(fold_bn, randomize_bn(TwoUsers()), (torch.randn(1, 4, 6, 6),),
                    expect_change=False)
    assert count_ops(gm)["batch_norm"] == 1


class SharedConv(nn.Module):
    """The same conv weight used twice, once before a BN: the shared tensor must not change."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.conv(x * 2)


def test_shared_weight_is_not_mutated() -> None:
    model = randomize_bn(SharedConv())
    w0 = model.conv.weight.detach().clone()
    gm = check_pass(fold_bn, model, (torch.randn(1, 3, 6, 6),))
    assert count_ops(gm) == {"conv": 2, "batch_norm": 0, "linear": 0, "ops": 4}
    assert torch.equal(model.conv.weight, w0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fold_native_batch_norm_legit_no_training(dtype: torch.dtype) -> None:
    """The inference-IR form: a tuple-returning BN consumed through getitem 0."""
    model = conv_bn(nn.Conv2d(3, 5, 3, groups=1), nn.BatchNorm2d(5)).to(dtype)
    x = torch.randn(2, 3, 7, 7, dtype=dtype)
    table = torch.export.default_decompositions()
    del table[aten.conv2d.default]  # keep conv2d (CompositeImplicit) undecomposed
    gm = unlift(torch.export.export(model, (x,)).run_decompositions(table))
    assert n_ops(gm, aten._native_batch_norm_legit_no_training.default) == 1
    gm = check_pass(fold_bn, gm, (x,))
    assert count_ops(gm)["batch_norm"] == 0
    assert n_ops(gm, operator.getitem) == 0


@settings(max_examples=30, deadline=None)
@given(groups=st.sampled_from([1, 2, 4]), out_mult=st.integers(1, 3),
       kernel=st.integers(1, 3), stride=st.integers(1, 2), dilation=st.integers(1, 2),
       padding=st.integers(0, 2), bias=st.booleans(), affine=st.booleans(),
       seed=st.integers(0, 2**16))
def test_fold_bn_property(groups: int, out_mult: int, kernel: int, stride: int, dilation: int,
                          padding: int, bias: bool, affine: bool, seed: int) -> None:
    torch.manual_seed(seed)
    out_ch = groups * out_mult * 2
    model = randomize_bn(nn.Sequential(
        nn.Conv2d(4, out_ch, kernel, stride, padding, dilation, groups, bias),
        nn.BatchNorm2d(out_ch, affine=affine)), seed).double()
    gm = check_pass(fold_bn, model, (torch.randn(1, 4, 8, 8, dtype=torch.float64),))
    assert count_ops(gm)["batch_norm"] == 0 and count_ops(gm)["conv"] == 1


# ----------------------------------------------------------------------------- remove_identity

class Identities(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.drop = nn.Conv2d(3, 4, 3), nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(self.conv(x)).clone().detach().contiguous()
        y = y.to(torch.float32) * 1 + 0
        y = y.view(y.shape).reshape(y.shape[0], 4, 6, 6) - 0
        z = (y > 0).long() * 1.0  # int -> float promotion: not an identity
        return y.reshape(y.shape[0], -1) * 2 + z.flatten(1)


def test_remove_identity() -> None:
    x = torch.randn(2, 3, 8, 8)
    gm0 = capture(Identities(), (x,))
    assert n_ops(gm0, aten.dropout.default, aten.clone.default, aten.detach.default,
                 aten.to.dtype, aten._assert_tensor_metadata.default) == 7
    gm = check_pass(remove_identity, gm0, (x,))
    assert n_ops(gm, aten.dropout.default, aten.clone.default, aten.detach.default,
                 aten.view.default, aten.sub.Tensor, aten._assert_tensor_metadata.default) == 0
    # kept: the bool -> int64 cast, the promoting `* 1.0`, the real reshape, `* 2`, the sum
    assert n_ops(gm, aten.to.dtype) == 1 and n_ops(gm, aten.mul.Tensor) == 2
    assert n_ops(gm, aten.reshape.default) == 1 and n_ops(gm, aten.add.Tensor) == 1


class ProtectedClone(nn.Module):
    """The clone shields y from the in-place add: removing it would change the output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(x)
        z = y.clone()
        z.add_(1)
        return y * 2 + z


class MutatedBeforeClone(nn.Module):
    """The mutation happens before the copy, so the copy protects nothing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(x)
        y.add_(1)
        return y.clone() * 3


def test_clone_protecting_inplace_op_is_kept() -> None:
    x = torch.randn(2, 5)
    gm = check_pass(remove_identity, ProtectedClone(), (x,), expect_change=False)
    assert n_ops(gm, aten.clone.default) == 1
    gm = check_pass(remove_identity, MutatedBeforeClone(), (x,))
    assert n_ops(gm, aten.clone.default) == 0


# ----------------------------------------------------------------------------- dead_code

def _nbytes(gm: fx.GraphModule) -> int:
    buf = io.BytesIO()
    torch.save(gm.state_dict(), buf)
    return buf.tell()


def test_dead_code_drops_folded_constants() -> None:
    model = conv_bn(nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16))
    x = torch.randn(1, 8, 6, 6)
    gm = capture(model, (x,))
    assert fold_bn(gm)
    keys, size = set(gm.state_dict()), _nbytes(gm)
    gm = check_pass(dead_code, gm, (x,))
    assert not any(k.startswith(("0.", "1.")) for k in gm.state_dict()), gm.state_dict().keys()
    assert len(gm.state_dict()) == 2 < len(keys)
    assert _nbytes(gm) < size
    assert [name for name, _ in gm.named_modules()] == [""]  # unused submodules gone


# ----------------------------------------------------------------------------- canonical_convs

class GenericConvs(nn.Module):
    """Convs the way TorchScript records them: `aten.convolution` (TS2EPConverter) and
    `aten._convolution` (export through the interpreter), grouped/strided/dilated, 2-d and 1-d,
    then a BN (foldable only once the conv is canonical) and a transposed conv (no canonical
    form)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w2 = nn.Parameter(torch.randn(8, 2, 3, 3, generator=g))
        self.b2 = nn.Parameter(torch.randn(8, generator=g))
        self.w3 = nn.Parameter(torch.randn(6, 8, 3, 3, generator=g))
        self.w1 = nn.Parameter(torch.randn(5, 6, 3, generator=g))
        self.wt = nn.Parameter(torch.randn(5, 4, 3, generator=g))
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = aten.convolution.default(x, self.w2, self.b2, [2, 1], [1, 1], [1, 1], False,
                                     [0, 0], 2)
        y = aten._convolution.default(y, self.w3, None, [1, 1], [2, 2], [2, 2], False, [0, 0],
                                      1, False, False, True, True)
        y = self.bn(y).flatten(2)
        y = aten.convolution.default(y, self.w1, None, [1], [1], [1], False, [0], 1)
        return aten.convolution.default(y, self.wt, None, [1], [0], [1], True, [0], 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_canonical_convs(dtype: torch.dtype, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="quantflow.passes")
    model = randomize_bn(GenericConvs()).to(dtype)
    gm = check_pass(canonical_convs, model, (torch.randn(2, 4, 10, 10, dtype=dtype),))
    assert n_ops(gm, aten.conv2d.default) == 2 and n_ops(gm, aten.conv1d.default) == 1
    assert n_ops(gm, aten._convolution.default) == 0
    assert n_ops(gm, aten.convolution.default) == 1  # the transposed one, with its reason
    assert "canonical_convs: skip" in caplog.text and "transposed" in caplog.text


def test_pipeline_folds_bn_after_a_generic_conv() -> None:
    """canonical_convs runs first, so fold_bn sees conv2d in the same pipeline run."""
    x = torch.randn(2, 4, 10, 10)
    gm = check_pass(as_bool, randomize_bn(GenericConvs()), (x,))
    assert count_ops(gm)["batch_norm"] == 0 and count_ops(gm)["conv"] == 3


# ----------------------------------------------------------------------------- pipeline

class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                  nn.BatchNorm2d(cout)) if stride != 1 or cin != cout else None
        self.relu_out = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.down is None else self.down(x)
        y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu_out(y + idt)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU(inplace=True))
        self.layers = nn.Sequential(Block(8, 8, 1), Block(8, 16, 2))
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(16, 10), nn.BatchNorm1d(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layers(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def test_default_pipeline_order() -> None:
    assert DEFAULT_PIPELINE[:3] == (canonical_convs, remove_identity, fold_bn)
    assert DEFAULT_PIPELINE[-1] is dead_code


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_optimize_tiny_resnet(dtype: torch.dtype) -> None:
    model = randomize_bn(TinyResNet(), seed=3).to(dtype)
    x = torch.randn(2, 1, 12, 12, dtype=dtype)
    gm = capture(model, (x,))
    before = count_ops(gm)
    gm = check_pass(as_bool, gm, (x,))
    after = count_ops(gm)
    assert before["batch_norm"] == 7 and after["batch_norm"] == 0
    assert after["conv"] == before["conv"] == 6 and after["linear"] == 1
    assert n_ops(gm, aten.dropout.default) == 0
    assert not any(".bn" in k or "running" in k for k in gm.state_dict())


@pytest.mark.parametrize("name", [
    "resnet_fmnist",
    pytest.param("mobilenetv2_fmnist", marks=pytest.mark.slow),  # capture alone takes ~3-8 s
])
def test_optimize_zoo(name: str) -> None:
    zoo = pytest.importorskip("quantflow.zoo")
    if not hasattr(zoo, "get_model"):
        pytest.skip("quantflow.zoo.get_model not available yet")
    model = randomize_bn(zoo.get_model(name, pretrained=False), seed=7)
    x = torch.randn(2, 1, 28, 28)
    gm = capture(model, (x,))
    before = count_ops(gm)
    gm = check_pass(as_bool, gm, (x,))
    after = count_ops(gm)
    assert before["batch_norm"] > 0 and after["batch_norm"] == 0
    # the re-parameterization passes may merge convs, never add any
    assert 0 < after["conv"] <= before["conv"]
