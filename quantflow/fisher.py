"""Per-layer curvature for the report when no mixed-precision search measured it: the trace of
the Fisher information of the model's own predictive distribution, per weight.

At the FP32 weights the loss quantization perturbs, KL(FP32 output ‖ model output), has zero
gradient, so its Hessian is the Gauss-Newton matrix Jᵀ H_z J, which equals the Fisher
E_y[∇ log p(y|x) ∇ log p(y|x)ᵀ] with y drawn from the model's own output distribution
(softmax for logits; a unit Gaussian around the output otherwise). Its trace is therefore an
unbiased, never-negative estimate of Tr(H): one backward pass per sampled y, versus
Hutchinson's v·Hv, whose few-draw estimates of the same trace scatter around zero for the
flat layers (3 draws on ImageNet MobileNetV2 gave -6 for a layer whose trace is positive).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import fx

log = logging.getLogger("quantflow")


def _weight(gm: fx.GraphModule, path: str) -> torch.Tensor:
    obj: object = gm
    for part in path.split("."):
        obj = getattr(obj, part)
    assert isinstance(obj, torch.Tensor), path
    return obj


def _sampled_nll(out: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """-log p(y | x) summed over the batch, y drawn from the model's own output."""
    flat = out.reshape(out.shape[0], -1)
    if out.dim() == 2 and flat.shape[1] > 1:  # class logits
        probs = torch.softmax(flat.detach().double(), dim=-1)
        y = torch.multinomial(probs, 1, generator=gen).view(-1)
        return F.cross_entropy(flat, y, reduction="sum")
    y = flat.detach() + torch.randn(flat.shape, generator=gen, dtype=flat.dtype)
    return 0.5 * (flat - y).pow(2).sum()


def fisher_traces(gm: fx.GraphModule, weights: dict[str, str],
                  runs: Sequence[Sequence[torch.Tensor]], seed: int = 0) -> dict[str, float]:
    """layer -> Tr(F)/n of its weight (n = its element count), averaged over the samples of
    `runs` (each run one graph call). `weights`: layer -> get_attr path of its weight."""
    tensors = {k: _weight(gm, p) for k, p in weights.items()}
    had_grad = {k: t.requires_grad for k, t in tensors.items()}
    acc = dict.fromkeys(tensors, 0.0)
    gen = torch.Generator().manual_seed(seed)
    samples = 0
    try:
        for t in tensors.values():
            t.requires_grad_(True)
        for xs in runs:
            out = gm(*xs)
            out = out[0] if isinstance(out, (tuple, list)) else out
            grads = torch.autograd.grad(_sampled_nll(out, gen), list(tensors.values()),
                                        allow_unused=True)
            # a batch's gradient is the sum of its samples'; their cross terms have mean
            # zero (y is drawn independently per sample), so ‖Σ g‖² stays unbiased
            for k, g in zip(tensors, grads):
                if g is not None:
                    acc[k] += float(g.double().pow(2).sum())
            samples += int(xs[0].shape[0])
    finally:
        for k, t in tensors.items():
            t.requires_grad_(had_grad[k])
    return {k: acc[k] / max(samples, 1) / tensors[k].numel() for k in tensors}
