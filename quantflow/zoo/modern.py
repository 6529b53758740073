"""Modern ConvNet blocks in their training form, written from the official code's structure.

UniRepLKNet (Ding et al., CVPR 2024; AILab-CVC/UniRepLKNet `unireplknet.py`), block by block:

    y = DilatedReparamBlock(x)      depthwise K×K conv-BN + dilated depthwise conv-BN branches
    y = BN(y)                       ("norm": the BN after the merged depthwise conv)
    y = SE(y)                       avgpool → 1×1 conv → ReLU → 1×1 conv → sigmoid → y·s
    y = permute NHWC → Linear(C, 4C) → GELU → GRN → Linear(4C, C, no bias) → permute NCHW → BN
    out = x + drop_path(γ · y)      layer scale γ; drop-path is the identity in eval

GRN (ConvNeXt V2, channels-last): Gx = ‖x‖₂ over (H, W), Nx = Gx / (mean_c Gx + 1e-6),
out = (γ·Nx + 1)·x + β. Kernel 3 blocks (and 5) have a plain depthwise conv instead of the
dilated block. The stem and downsampling layers are conv → channels-first LayerNorm (→ GELU).
The official `reparameterize()` folds every BN (the dilated branches into the large kernel, the
norm into it, the last BN and γ into the second linear, GRN's β into its bias): no BN is left.

ConvNeXt block (Liu et al., CVPR 2022): depthwise 7×7 → channels-last LayerNorm → Linear(C, 4C)
→ GELU → Linear(4C, C) → layer scale → + x. InceptionNeXt token mixer (Yu et al., CVPR 2024):
the channels split into identity, 3×3 depthwise, 1×k and k×1 depthwise band kernels, concatenated.

The `*_fmnist()` factories build small 1×28×28 → 10-class networks; `unireplknet_a_like()`
has UniRepLKNet-A's layout (depths 2/2/6/2, kernels 3/13/13/13) at a small width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantflow.zoo.reparam import UNIREPLKNET_DILATED_BRANCHES

__all__ = [
    "GRN",
    "ConvNeXtBlock",
    "DilatedReparamBlock",
    "DropPath",
    "InceptionDWConv2d",
    "LayerNorm2d",
    "SEBlock",
    "UniRepLKNetBlockOfficial",
    "convnext_fmnist",
    "inceptionnext_fmnist",
    "unireplknet_a_like",
    "unireplknet_official_fmnist",
]

#: the official default dilated branches for kernels the reparam module does not list
_BRANCHES: dict[int, tuple[tuple[int, int], ...]] = {
    **UNIREPLKNET_DILATED_BRANCHES,
    15: ((5, 1), (7, 2), (3, 3), (3, 5), (3, 7)),
    17: ((5, 1), (9, 2), (3, 4), (3, 5), (3, 7)),
}


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual per sample in training, identity in eval."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1.0 - self.p)


class LayerNorm2d(nn.Module):
    """ConvNeXt's LayerNorm over the channels of an NCHW tensor (`channels_first`), written as
    the official code writes it: mean, variance, normalize, per-channel affine."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class GRN(nn.Module):
    """Global response normalization on NHWC input (UniRepLKNet's `GRNwithNHWC`)."""

    def __init__(self, dim: int, use_bias: bool = True) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim)) if use_bias else None

    def forward(self, x: Tensor) -> Tensor:
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        y = (self.gamma * nx + 1) * x
        return y if self.beta is None else y + self.beta


class SEBlock(nn.Module):
    """Squeeze-and-excitation on NCHW: avgpool → 1×1 down → ReLU → 1×1 up → sigmoid → scale."""

    def __init__(self, channels: int, internal: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(channels, internal, 1)
        self.up = nn.Conv2d(internal, channels, 1)
        self.channels = channels

    def forward(self, inputs: Tensor) -> Tensor:
        x = F.adaptive_avg_pool2d(inputs, output_size=(1, 1))
        x = torch.sigmoid(self.up(F.relu(self.down(x))))
        return inputs * x.view(-1, self.channels, 1, 1)


class DilatedReparamBlock(nn.Module):
    """Depthwise K×K conv → BN, plus depthwise dilated k×k conv → BN branches, summed."""

    def __init__(self, channels: int, kernel: int,
                 branches: Sequence[tuple[int, int]] | None = None) -> None:
        super().__init__()
        self.lk_origin = nn.Conv2d(channels, channels, kernel, 1, kernel // 2, groups=channels,
                                   bias=False)
        self.origin_bn = nn.BatchNorm2d(channels)
        self.spec = tuple(_BRANCHES[kernel] if branches is None else branches)
        self.dil_convs = nn.ModuleList(
            nn.Conv2d(channels, channels, k, 1, (r * (k - 1) + 1) // 2, dilation=r,
                      groups=channels, bias=False) for k, r in self.spec)
        self.dil_bns = nn.ModuleList(nn.BatchNorm2d(channels) for _ in self.spec)

    def forward(self, x: Tensor) -> Tensor:
        out = self.origin_bn(self.lk_origin(x))
        for conv, bn in zip(self.dil_convs, self.dil_bns):
            out = out + bn(conv(x))
        return out


class UniRepLKNetBlockOfficial(nn.Module):
    """The official UniRepLKNet block in training form (see the module docstring)."""

    def __init__(self, dim: int, kernel: int, drop_path: float = 0.0,
                 layer_scale: float | None = 1e-6, ffn_factor: int = 4) -> None:
        super().__init__()
        self.dwconv: nn.Module = DilatedReparamBlock(dim, kernel) if kernel >= 7 else \
            nn.Conv2d(dim, dim, kernel, 1, kernel // 2, groups=dim, bias=False)
        self.norm = nn.BatchNorm2d(dim)
        self.se = SEBlock(dim, dim // 4)
        ffn = ffn_factor * dim
        self.pwconv1 = nn.Linear(dim, ffn)
        self.act = nn.GELU()
        self.grn = GRN(ffn)
        self.pwconv2 = nn.Linear(ffn, dim, bias=False)
        self.bn2 = nn.BatchNorm2d(dim)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim)) if layer_scale else None
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        y = self.se(self.norm(self.dwconv(x)))
        y = self.grn(self.act(self.pwconv1(y.permute(0, 2, 3, 1))))
        y = self.bn2(self.pwconv2(y).permute(0, 3, 1, 2))
        if self.gamma is not None:
            y = self.gamma.view(1, -1, 1, 1) * y
        return x + self.drop_path(y)


class ConvNeXtBlock(nn.Module):
    """dw 7×7 → LayerNorm (channels last) → Linear → GELU → Linear → layer scale → + x."""

    def __init__(self, dim: int, kernel: int = 7, layer_scale: float = 1e-6,
                 drop_path: float = 0.0, mixer: nn.Module | None = None) -> None:
        super().__init__()
        self.dwconv = mixer if mixer is not None else \
            nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(y)))
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class InceptionDWConv2d(nn.Module):
    """InceptionNeXt token mixer: channels split into identity / 3×3 dw / 1×k dw / k×1 dw."""

    def __init__(self, dim: int, square: int = 3, band: int = 11, ratio: float = 0.125
                 ) -> None:
        super().__init__()
        gc = int(dim * ratio)
        self.dwconv_hw = nn.Conv2d(gc, gc, square, padding=square // 2, groups=gc)
        self.dwconv_w = nn.Conv2d(gc, gc, (1, band), padding=(0, band // 2), groups=gc)
        self.dwconv_h = nn.Conv2d(gc, gc, (band, 1), padding=(band // 2, 0), groups=gc)
        self.split = [dim - 3 * gc, gc, gc, gc]

    def forward(self, x: Tensor) -> Tensor:
        x_id, x_hw, x_w, x_h = torch.split(x, self.split, dim=1)
        return torch.cat((x_id, self.dwconv_hw(x_hw), self.dwconv_w(x_w), self.dwconv_h(x_h)),
                         dim=1)


def _stem(c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, c_out // 2, 3, 2, 1), LayerNorm2d(c_out // 2), nn.GELU(),
                         nn.Conv2d(c_out // 2, c_out, 3, 1, 1), LayerNorm2d(c_out))


def _down(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, 2, 1), LayerNorm2d(c_out))


class _Net(nn.Module):
    """Stages with downsampling between them → global average pool → LayerNorm → linear."""

    def __init__(self, layers: Sequence[nn.Module], width: int, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.features(x).mean((-2, -1))))


def unireplknet_a_like(dims: Sequence[int] = (16, 32, 64, 128), in_chans: int = 3,
                       classes: int = 10) -> nn.Module:
    """UniRepLKNet-A's layout (depths 2/2/6/2, kernels 3,3 / 13,13 / 13×6 / 13,13) at small
    widths; the official stem (two stride-2 convs) and downsampling. Training form: 91 convs,
    84 BN; deploy: 2 stem + 3 downsampling + 12 × (merged dw conv + SE's two 1×1) = 41 convs,
    no BN, 25 linears."""
    kernels = ((3, 3), (13, 13), (13,) * 6, (13, 13))
    layers: list[nn.Module] = [
        nn.Conv2d(in_chans, dims[0] // 2, 3, 2, 1), LayerNorm2d(dims[0] // 2), nn.GELU(),
        nn.Conv2d(dims[0] // 2, dims[0], 3, 2, 1), LayerNorm2d(dims[0])]
    for i, ks in enumerate(kernels):
        if i:
            layers.append(_down(dims[i - 1], dims[i]))
        layers += [UniRepLKNetBlockOfficial(dims[i], k, drop_path=0.1) for k in ks]
    return _Net(layers, dims[-1], classes)


def unireplknet_official_fmnist() -> nn.Module:
    """Official-form UniRepLKNet blocks on 28×28: stem to 14×14, blocks K=3, K=13, downsample,
    blocks K=7 ×2 at 7×7."""
    layers: list[nn.Module] = [
        _stem(24), UniRepLKNetBlockOfficial(24, 3), UniRepLKNetBlockOfficial(24, 13),
        _down(24, 48), UniRepLKNetBlockOfficial(48, 7), UniRepLKNetBlockOfficial(48, 7)]
    return _Net(layers, 48)


def convnext_fmnist() -> nn.Module:
    """ConvNeXt blocks (dw 7×7, LayerNorm, GELU, layer scale) on 28×28: 2 + 2 blocks."""
    layers: list[nn.Module] = [_stem(24), ConvNeXtBlock(24), ConvNeXtBlock(24), _down(24, 48),
                               ConvNeXtBlock(48), ConvNeXtBlock(48)]
    return _Net(layers, 48)


def inceptionnext_fmnist() -> nn.Module:
    """ConvNeXt blocks with the InceptionNeXt token mixer (band kernels 1×11 / 11×1)."""
    layers: list[nn.Module] = [
        _stem(32), ConvNeXtBlock(32, mixer=InceptionDWConv2d(32)), _down(32, 64),
        ConvNeXtBlock(64, mixer=InceptionDWConv2d(64, band=7))]
    return _Net(layers, 64)
