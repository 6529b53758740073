"""KAN convolutions (Kolmogorov-Arnold convolutions, the torch-conv-kan design) and a small
Fashion-MNIST network built from them.

A KAN conv replaces each input channel x by a few basis functions of x, computed elementwise
from the input, and convolves their concatenation: the learned kernel weighs every basis
function of every input pixel (a learnable univariate function per edge, as in KAN).

- `KACNConv2d` (Chebyshev, torch-conv-kan `KACNConvNDLayer`): T_k(t) = cos(k·acos t) for
  t = tanh(x) clamped to (−1, 1), k = 0..d; the d+1 maps of each channel are interleaved
  ((N, C, d+1, H, W) flattened to C·(d+1) channels), then one bias-free conv, then a norm.
- `KALNConv2d` (Legendre, torch-conv-kan `KALNConvNDLayer`): a base conv of x plus a conv of
  the Legendre polynomials P_0..P_d (P_{n+1} = ((2n+1)·t·P_n − n·P_{n−1})/(n+1)) of t, summed,
  normalized, then SiLU. The published layer maps x to [−1, 1] with the min/max of the whole
  batch, which makes a sample's output depend on the other samples in its batch; here t = tanh(x)
  as in the Chebyshev layer (same range, per sample).

The norm is BatchNorm (the published layers take `norm_layer`; InstanceNorm is their default):
at inference it folds into the conv. What stays float after quantization is the elementwise
basis math (tanh, acos, cos, the recurrence's products): ORT has no integer kernel for it; the
convs and the classifier are quantized.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["KACNConv2d", "KALNConv2d", "kan_fmnist"]


class KACNConv2d(nn.Module):
    """Chebyshev KAN conv: cos(k·acos(tanh x)), k = 0..degree → conv → BatchNorm."""

    def __init__(self, c_in: int, c_out: int, kernel: int, degree: int = 3, stride: int = 1,
                 padding: int = 0, eps: float = 1e-7) -> None:
        super().__init__()
        self.conv = nn.Conv2d((degree + 1) * c_in, c_out, kernel, stride, padding, bias=False)
        nn.init.normal_(self.conv.weight, 0.0, 1.0 / (c_in * (degree + 1) * kernel ** 2))
        self.norm = nn.BatchNorm2d(c_out)
        self.eps = eps
        self.arange: Tensor
        self.register_buffer("arange", torch.arange(degree + 1.0))

    def forward(self, x: Tensor) -> Tensor:
        t = torch.clamp(torch.tanh(x), -1 + self.eps, 1 - self.eps)
        basis = (torch.acos(t).unsqueeze(2) * self.arange.view(1, 1, -1, 1, 1)).flatten(1, 2).cos()
        return self.norm(self.conv(basis))


class KALNConv2d(nn.Module):
    """Legendre KAN conv: SiLU(BN(conv(x) + conv([P_0..P_d](tanh x))))."""

    def __init__(self, c_in: int, c_out: int, kernel: int, degree: int = 3, stride: int = 1,
                 padding: int = 0) -> None:
        super().__init__()
        self.degree = degree
        self.base = nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False)
        self.poly = nn.Conv2d((degree + 1) * c_in, c_out, kernel, stride, padding, bias=False)
        nn.init.kaiming_uniform_(self.base.weight, nonlinearity="linear")
        nn.init.kaiming_uniform_(self.poly.weight, nonlinearity="linear")
        self.norm = nn.BatchNorm2d(c_out)

    def legendre(self, t: Tensor) -> Tensor:
        polys = [torch.ones_like(t), t]
        for n in range(1, self.degree):
            polys.append(((2 * n + 1) * t * polys[-1] - n * polys[-2]) / (n + 1))
        return torch.cat(polys[: self.degree + 1], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x) + self.poly(self.legendre(torch.tanh(x)))
        return F.silu(self.norm(y))


class _KANNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            KACNConv2d(1, 16, 3, degree=3, padding=1),
            KACNConv2d(16, 32, 3, degree=3, stride=2, padding=1),
            KALNConv2d(32, 48, 3, degree=2, stride=2, padding=1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(48, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def kan_fmnist() -> nn.Module:
    """KAN-conv net: Chebyshev 1→16 (28×28), Chebyshev 16→32 (14×14), Legendre 32→48 (7×7),
    global average pool, linear. ~55k parameters."""
    return _KANNet()
