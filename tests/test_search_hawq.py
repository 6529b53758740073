"""HAWQ: Hutchinson's per-layer Hessian traces against exact traces on a tiny fp64 model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from quantflow.ir import capture
from quantflow.search.hawq import GraphLoss, hutchinson_traces, sensitivity_table
from quantflow.search.options import TraceOptions
from quantflow.spec import ORT_ACT, ORT_WEIGHT, LayerPlan, QSpec

W4 = QSpec(bits=4, granularity="channel")


pytestmark = pytest.mark.usefixtures("one_thread")
A16 = QSpec(bits=16, signed=False, symmetric=False)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.bn(self.conv1(x)))
        x = torch.tanh(self.conv2(x))
        return self.fc(x.flatten(1))


def _setup(labels: bool) -> tuple[torch.fx.GraphModule, list, list | None]:
    torch.manual_seed(0)
    model = Tiny().double().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 2.0)
    batches = [(torch.randn(4, 1, 6, 6, dtype=torch.float64),) for _ in range(2)]
    gm = capture(model, batches[0])
    ys = [torch.randint(0, 5, (4,)) for _ in batches] if labels else None
    return gm, batches, ys


def exact_traces(gm: torch.fx.GraphModule, batches: list, ys: list | None
                 ) -> tuple[dict[str, float], dict[str, float]]:
    """Tr of the diagonal Hessian blocks, from full Hessians (autograd.functional.hessian)."""
    loss = GraphLoss(gm, batches, ys)
    w0 = loss.float_weights()
    wt: dict[str, float] = {}
    at: dict[str, float] = {}
    for n in w0:
        def f_w(w: torch.Tensor, n: str = n) -> torch.Tensor:
            return sum(bw * loss({**w0, n: w}, None, b)
                       for b, bw in enumerate(loss.batch_weight))  # type: ignore[return-value]

        h = torch.autograd.functional.hessian(f_w, w0[n])
        wt[n] = float(h.reshape(w0[n].numel(), -1).diagonal().sum())
        total = 0.0
        for b, bw in enumerate(loss.batch_weight):
            shape = loss.input_shapes[b][n]

            def f_a(d: torch.Tensor, n: str = n, b: int = b) -> torch.Tensor:
                return loss(w0, {n: d}, b)

            ha = torch.autograd.functional.hessian(f_a, torch.zeros(shape, dtype=torch.float64))
            total += bw * float(ha.reshape(math.prod(shape), -1).diagonal().sum())
        at[n] = total
    return wt, at


@pytest.mark.parametrize("labels", [True, False], ids=["cross_entropy", "kl_to_fp32"])
def test_hutchinson_matches_exact_trace(labels: bool) -> None:
    gm, batches, ys = _setup(labels)
    rel_tol = 0.05
    est = hutchinson_traces(gm, batches, ys, seed=1,
                            options=TraceOptions(rel_tol=rel_tol, max_iter=3000))
    wt, at = exact_traces(gm, batches, ys)
    assert est.converged, f"did not converge in {est.iterations} draws"
    for n in wt:
        for got, want in ((est.weight[n], wt[n]), (est.act[n], at[n])):
            # unbiased estimator: within 4 standard errors, and the stderr itself is ≤ rel_tol
            assert abs(got.trace - want) <= 4 * got.stderr + 1e-12, (n, got, want)
            assert got.stderr <= rel_tol * abs(got.trace)
            assert abs(got.trace - want) <= 4 * rel_tol * abs(want), (n, got, want)


def test_joint_product_is_unbiased() -> None:
    """One joint Hessian-vector product per draw: noisier, still centred on the exact trace."""
    gm, batches, ys = _setup(True)
    joint = TraceOptions(rel_tol=0.0, max_iter=300, per_block=False)
    est = hutchinson_traces(gm, batches, ys, options=joint)
    wt, at = exact_traces(gm, batches, ys)
    assert not est.converged
    for n in wt:
        for got, want in ((est.weight[n], wt[n]), (est.act[n], at[n])):
            assert abs(got.trace - want) <= 4 * got.stderr, (n, got, want)
            assert got.stderr < 0.5 * max(abs(t) for t in (*wt.values(), *at.values()))


def test_graph_loss_is_the_model_loss() -> None:
    """The perturbable loss at (W, δ=0) is exactly F.cross_entropy(gm(x), y)."""
    gm, batches, ys = _setup(True)
    assert ys is not None
    loss = GraphLoss(gm, batches, ys)
    for b, (x,) in enumerate(batches):
        want = torch.nn.functional.cross_entropy(gm(x), ys[b])
        got = loss(loss.float_weights(), None, b).detach()
        assert float(got) == pytest.approx(float(want.detach()), rel=1e-12)


def test_convergence_is_reported() -> None:
    gm, batches, ys = _setup(True)
    short = hutchinson_traces(gm, batches, ys,
                              options=TraceOptions(rel_tol=1e-6, max_iter=4, min_iter=2))
    assert not short.converged and short.iterations == 4
    assert len(short.history) == 4
    loose = hutchinson_traces(gm, batches, ys, options=TraceOptions(rel_tol=0.2, max_iter=2000))
    assert loose.converged and loose.iterations < 2000
    for t in loose.weight.values():
        assert t.stderr <= 0.2 * abs(t.trace)


def test_sensitivity_orders_precisions() -> None:
    """Per layer: FP32 costs nothing, W4 costs more than W8, A8 more than A16."""
    gm, batches, ys = _setup(True)
    tr = hutchinson_traces(gm, batches, ys, options=TraceOptions(rel_tol=0.1, max_iter=500))
    options = [LayerPlan(ORT_WEIGHT, ORT_ACT), LayerPlan(ORT_WEIGHT, A16),
               LayerPlan(W4, ORT_ACT), LayerPlan(None, None)]
    layers, table = sensitivity_table(gm, tr, options)
    assert layers == list(tr.weight)
    assert (table[:, 3] == 0).all()
    assert (table[:, 2] > table[:, 0]).all()
    assert (table[:, 1] < table[:, 0]).all()
