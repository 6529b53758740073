"""ZeroQ data distillation (`--calib distilled`): calibration inputs without any real data.

A trained network's BatchNorm layers store the mean μ_l and variance σ_l² of their inputs over
the training data. ZeroQ (Cai et al., 2020) synthesizes inputs x whose batch statistics
reproduce them at every BN layer:

    min_x  Σ_l ‖μ̂_l(x) − μ_l‖₂ + ‖σ̂_l(x) − σ_l‖₂     (+ the same for the input vs N(0, 1))

where μ̂_l, σ̂_l are the per-channel mean / standard deviation of BN l's input over the batch
and the spatial positions. Starting from Gaussian noise and running Adam on x (the weights are
fixed) gives a batch whose internal activations have the training data's ranges, which is what
activation calibration needs.

It must run on the float graph BEFORE BN folding (the folds remove the very statistics it
matches), i.e. on the captured graph: BN nodes are `aten.batch_norm.default` (or
`_native_batch_norm_legit_no_training`) with running mean/var as `get_attr` constants. The
distilled inputs then calibrate the folded graph like real data would.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from quantflow.batch import run_size, static_batch
from quantflow.errors import InputError
from quantflow.ir import BN_OPS, get_tensor, is_op

log = logging.getLogger("quantflow.search")


@dataclass(frozen=True)
class BNTarget:
    """One BN layer's stored input statistics (per channel)."""

    node: str
    mean: torch.Tensor
    std: torch.Tensor


@dataclass
class DistillResult:
    """Distilled inputs and how well they matched the BN statistics."""

    inputs: torch.Tensor
    loss_start: float
    loss_end: float
    steps: int
    history: list[float] = field(default_factory=list)


def bn_targets(gm: fx.GraphModule) -> list[BNTarget]:
    """Running statistics of every BN node whose mean/var are constants."""
    out = []
    for n in gm.graph.nodes:
        if not is_op(n, BN_OPS):
            continue
        mean, var = n.args[3], n.args[4]
        eps = float(n.args[7] if n.target == torch.ops.aten.batch_norm.default else n.args[6])
        if not (isinstance(mean, fx.Node) and mean.op == "get_attr"
                and isinstance(var, fx.Node) and var.op == "get_attr"):
            continue
        m, v = get_tensor(gm, mean), get_tensor(gm, var)
        assert m is not None and v is not None
        out.append(BNTarget(n.name, m.detach().clone(), (v.detach() + eps).sqrt()))
    return out


class _BNInputs(fx.Interpreter):
    """Runs the graph and keeps the input tensor of each watched BN node (with its graph)."""

    def __init__(self, gm: fx.GraphModule, watch: set[str]) -> None:
        super().__init__(gm)
        self.watch = watch
        self.seen: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.name in self.watch:
            self.seen[n.name] = self.env[n.args[0]]  # type: ignore[index]
        return super().run_node(n)


def bn_statistics_loss(gm: fx.GraphModule, x: torch.Tensor, targets: list[BNTarget],
                       input_stats: bool = True) -> torch.Tensor:
    """The ZeroQ objective Σ_l ‖μ̂_l − μ_l‖₂ + ‖σ̂_l − σ_l‖₂ for the batch x."""
    interp = _BNInputs(gm, {t.node for t in targets})
    interp.run(x)
    terms = []
    for t in targets:
        a = interp.seen[t.node]
        dims = [d for d in range(a.dim()) if d != 1]
        mu = a.mean(dim=dims)
        sd = (a.var(dim=dims, unbiased=False) + 1e-12).sqrt()
        terms.append(torch.linalg.vector_norm(mu - t.mean.to(a.dtype))
                     + torch.linalg.vector_norm(sd - t.std.to(a.dtype)))
    if input_stats:  # the data is normalized: per-channel mean 0, std 1
        dims = [d for d in range(x.dim()) if d != 1]
        terms.append(torch.linalg.vector_norm(x.mean(dim=dims))
                     + torch.linalg.vector_norm(x.std(dim=dims) - 1.0))
    return torch.stack(terms).sum()


def distill(gm: fx.GraphModule, input_shape: tuple[int, ...], n: int = 64, *,
            steps: int = 500, lr: float = 0.1, batch: int = 32, seed: int = 0,
            input_stats: bool = True) -> DistillResult:
    """Synthesize `n` inputs of shape `input_shape` (without the batch dim) by ZeroQ.

    Batches of `batch` samples are optimized separately (statistics are batch statistics, as
    in ZeroQ; a graph with a static batch takes batches of exactly that size, the surplus
    dropped). `input_stats` adds the N(0, 1) prior on the (normalized) input.
    """
    targets = bn_targets(gm)
    if not targets:
        raise InputError("--calib distilled needs BatchNorm statistics, but the captured graph "
                         "has no batch_norm node with stored running mean/var; fix: pass real "
                         "calibration data with --calib FILE (or distill before BN folding)")
    gen = torch.Generator().manual_seed(seed)
    dtype = next((t.mean.dtype for t in targets), torch.float32)
    chunks, starts, ends = [], [], []
    history: list[float] = []
    static = static_batch(gm)  # a static-batch graph optimizes whole chunks of its batch
    batch = run_size(gm, batch)
    for i in range(0, n, batch):
        b = min(batch, n - i) if static is None else batch
        x = torch.randn((b, *input_shape), generator=gen, dtype=dtype).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        loss = bn_statistics_loss(gm, x, targets, input_stats)
        starts.append(float(loss.detach()))
        for _ in range(steps):
            opt.zero_grad()
            loss = bn_statistics_loss(gm, x, targets, input_stats)
            (grad,) = torch.autograd.grad(loss, [x])
            x.grad = grad
            opt.step()
            sched.step()
            if i == 0:
                history.append(float(loss.detach()))
        with torch.no_grad():
            ends.append(float(bn_statistics_loss(gm, x, targets, input_stats)))
        chunks.append(x.detach())
    result = DistillResult(torch.cat(chunks)[:n], sum(starts) / len(starts), sum(ends) / len(ends),
                           steps, history)
    log.info("zeroq: BN statistics loss %.4g -> %.4g over %d steps (%d inputs)",
             result.loss_start, result.loss_end, steps, n)
    return result


def distilled_calibration(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...],
                          n: int = 256, **kwargs: Any) -> torch.Tensor:
    """`--calib distilled`: n synthetic inputs shaped like example_inputs[0] (minus batch).

    `gm` must be the captured graph BEFORE the passes (see module docstring); the result is
    used as calibration data for the folded graph exactly like a real calibration tensor.
    """
    return distill(gm, tuple(example_inputs[0].shape[1:]), n, **kwargs).inputs
