"""Training-form re-parameterizable blocks and small Fashion-MNIST networks built from them.

Each block is written from its paper, in the form it is trained in (parallel branches, each
conv followed by BN), and deliberately has no `switch_to_deploy()`: quantflow's reparam passes
(`passes/reparam_*.py`, after `fold_bn`) must find and merge every structure from the exported
graph alone. What each family's deploy form is (the passes must reach it):

- RepVGG (Ding et al., CVPR 2021): 3×3 conv-BN + 1×1 conv-BN + identity BN (when C_in = C_out
  and stride 1), ReLU after the sum. Deploy: one 3×3 conv.
- ACNet (Ding et al., ICCV 2019): K×K + 1×K + K×1 conv-BN, summed. Deploy: one K×K conv.
- Diverse Branch Block (Ding et al., CVPR 2021): K×K conv-BN; 1×1 conv-BN; 1×1 conv → BN →
  K×K avg-pool → BN; 1×1 conv → BN → K×K conv-BN. The BN between a 1×1 and a K×K op pads
  its output with its own per-channel shift instead of zeros (pad-aware BN), so the pair is
  one K×K conv also at the borders. Variants: `identity_init` (the 1×1 of the 1×1-K×K branch
  is identity + a learned residual, added at forward time) and depthwise (groups = C: the
  avg branch pools x directly and the 1×1-K×K branch has 2C internal channels). Deploy: one
  K×K conv. (DBB's sixth transform, depth concatenation, is how grouped convs compose; the
  passes handle groups directly, see `reparam_math.compose_pointwise`.)
- RepLKNet (Ding et al., CVPR 2022): depthwise large-kernel (13, 31) conv-BN + parallel
  depthwise 5×5 conv-BN. Deploy: one depthwise large conv.
- UniRepLKNet (Ding et al., CVPR 2024) dilated reparam block: depthwise K×K conv-BN + small
  depthwise dilated conv-BN branches (for K = 13: (k, r) = (5,1), (7,2), (3,3), (3,4), (3,5)).
  Deploy: one depthwise K×K conv.
- MobileOne (Vasu et al., CVPR 2023): k over-parameterized K×K conv-BN branches + a 1×1
  conv-BN "scale" branch (K > 1) + identity BN (C_in = C_out, stride 1), ReLU after the sum;
  a unit is a depthwise 3×3 stage then a pointwise 1×1 stage. Deploy: one conv per stage.

The `*_fmnist()` factories build 1×28×28 → 10-class networks of a few hundred KB.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "UNIREPLKNET_DILATED_BRANCHES",
    "ACBlock",
    "ConvBN",
    "DiverseBranchBlock",
    "IdentityConv1x1",
    "MobileOneBlock",
    "MobileOneUnit",
    "PadBN",
    "RepLKBlock",
    "RepVGGBlock",
    "UniRepLKNetBlock",
    "UniRepLKNetDilatedBlock",
    "acnet_crop_fmnist",
    "acnet_fmnist",
    "dbb_fmnist",
    "mobileone_fmnist",
    "repvgg_fmnist",
    "unireplknet_fmnist",
]

#: UniRepLKNet's dilated branches (kernel, dilation) per large kernel size
UNIREPLKNET_DILATED_BRANCHES: dict[int, tuple[tuple[int, int], ...]] = {
    5: ((3, 1), (3, 2)),
    7: ((5, 1), (3, 2), (3, 3)),
    9: ((5, 1), (5, 2), (3, 3), (3, 4)),
    11: ((5, 1), (5, 2), (3, 3), (3, 4), (3, 5)),
    13: ((5, 1), (7, 2), (3, 3), (3, 4), (3, 5)),
}


class ConvBN(nn.Sequential):
    """Bias-free conv followed by BN (the BN provides the shift)."""

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0, dilation: int = 1, groups: int = 1
                 ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, groups,
                              bias=False)
        self.bn = nn.BatchNorm2d(c_out)


class RepVGGBlock(nn.Module):
    """3×3 conv-BN + 1×1 conv-BN (+ identity BN) → ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.dense = ConvBN(c_in, c_out, 3, stride, 1, groups=groups)
        self.pointwise = ConvBN(c_in, c_out, 1, stride, 0, groups=groups)
        self.identity = nn.BatchNorm2d(c_in) if c_in == c_out and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        y = self.dense(x) + self.pointwise(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(y)


class ACBlock(nn.Module):
    """Asymmetric convolution block: K×K + 1×K + K×1 conv-BN, summed (no activation).

    As in the official `acb.py`: with padding p ≥ K//2 the 1×K / K×1 convs pad (p − K//2, p) /
    (p, p − K//2); with p < K//2 ("crop") they pad (0, p) / (p, 0) and read the input cropped by
    K//2 − p on the other axis (`x[..., c:-c]`), so all three slide over the same windows.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1,
                 groups: int = 1, padding: int | None = None) -> None:
        super().__init__()
        p = kernel // 2 if padding is None else padding
        self.crop = max(kernel // 2 - p, 0)
        hor, ver = ((0, p), (p, 0)) if self.crop else ((p - kernel // 2, p), (p, p - kernel // 2))
        self.square = ConvBN(c_in, c_out, kernel, stride, p, groups=groups)
        self.hor = ConvBN(c_in, c_out, (1, kernel), stride, hor, groups=groups)
        self.ver = ConvBN(c_in, c_out, (kernel, 1), stride, ver, groups=groups)

    def forward(self, x: Tensor) -> Tensor:
        c = self.crop
        x_ver, x_hor = (x[:, :, :, c:-c], x[:, :, c:-c, :]) if c else (x, x)
        return self.square(x) + self.hor(x_hor) + self.ver(x_ver)


class PadBN(nn.Module):
    """BN whose output is padded with the BN's own per-channel shift β − μ·γ/√(σ²+ε).

    That is the value a zero input maps to, so the K×K op after a 1×1 conv sees the same
    border it would see if the pair were one K×K conv of the zero-padded input.
    """

    def __init__(self, channels: int, pad: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(x)
        if self.pad == 0:
            return y
        bn = self.bn
        assert bn.running_mean is not None and bn.running_var is not None
        shift = bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)
        v = shift.view(1, -1, 1, 1)
        return F.pad(y - v, [self.pad] * 4) + v


class IdentityConv1x1(nn.Conv2d):
    """1×1 conv computing (I + W)·x: identity plus a learned residual, added at forward time."""

    def __init__(self, channels: int, groups: int = 1) -> None:
        super().__init__(channels, channels, 1, groups=groups, bias=False)
        nn.init.zeros_(self.weight)
        per = channels // groups
        eye = torch.zeros(channels, per, 1, 1)
        eye[torch.arange(channels), torch.arange(channels) % per] = 1.0
        self.eye: Tensor
        self.register_buffer("eye", eye)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight + self.eye, None, groups=self.groups)


class DiverseBranchBlock(nn.Module):
    """DBB: K×K, 1×1, 1×1→avg, 1×1→K×K branches (each ending in BN), summed (no activation)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1,
                 groups: int = 1, internal: int | None = None, identity_init: bool = False
                 ) -> None:
        super().__init__()
        p = kernel // 2
        depthwise = groups >= c_out
        self.origin = ConvBN(c_in, c_out, kernel, stride, p, groups=groups)
        self.one = ConvBN(c_in, c_out, 1, stride, 0, groups=groups)
        if depthwise:  # the pool reads x directly, zero padded (a zero input is zero)
            self.avg = nn.Sequential()
            self.avg.add_module("pool", nn.AvgPool2d(kernel, stride, p))
        else:
            self.avg = nn.Sequential()
            self.avg.add_module("conv", nn.Conv2d(c_in, c_out, 1, groups=groups, bias=False))
            self.avg.add_module("padbn", PadBN(c_out, p))
            self.avg.add_module("pool", nn.AvgPool2d(kernel, stride, 0))
        self.avg.add_module("bn", nn.BatchNorm2d(c_out))
        mid = internal or (c_in if not depthwise else 2 * c_in)
        first: nn.Module = IdentityConv1x1(c_in, groups) if identity_init and mid == c_in \
            else nn.Conv2d(c_in, mid, 1, groups=groups, bias=False)
        self.one_k = nn.Sequential()
        self.one_k.add_module("conv1", first)
        self.one_k.add_module("padbn", PadBN(mid, p))
        self.one_k.add_module("conv2", nn.Conv2d(mid, c_out, kernel, stride, 0, groups=groups,
                                                 bias=False))
        self.one_k.add_module("bn", nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        return self.origin(x) + self.one(x) + self.avg(x) + self.one_k(x)


class RepLKBlock(nn.Module):
    """RepLKNet's large-kernel conv: depthwise K×K conv-BN + depthwise small×small conv-BN."""

    def __init__(self, channels: int, kernel: int = 13, small: int = 5, stride: int = 1
                 ) -> None:
        super().__init__()
        self.large = ConvBN(channels, channels, kernel, stride, kernel // 2, groups=channels)
        self.small = ConvBN(channels, channels, small, stride, small // 2, groups=channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.large(x) + self.small(x)


class UniRepLKNetDilatedBlock(nn.Module):
    """UniRepLKNet's dilated reparam block: depthwise K×K conv-BN + dilated depthwise branches."""

    def __init__(self, channels: int, kernel: int = 13,
                 branches: Sequence[tuple[int, int]] | None = None) -> None:
        super().__init__()
        self.large = ConvBN(channels, channels, kernel, 1, kernel // 2, groups=channels)
        spec = UNIREPLKNET_DILATED_BRANCHES[kernel] if branches is None else branches
        self.dilated = nn.ModuleList(
            ConvBN(channels, channels, k, 1, (k - 1) * r // 2, dilation=r, groups=channels)
            for k, r in spec)

    def forward(self, x: Tensor) -> Tensor:
        y = self.large(x)
        for branch in self.dilated:
            y = y + branch(x)
        return y


class MobileOneBlock(nn.Module):
    """k K×K conv-BN branches + 1×1 conv-BN scale branch (K > 1) + identity BN, → ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1,
                 branches: int = 2) -> None:
        super().__init__()
        self.convs = nn.ModuleList(ConvBN(c_in, c_out, kernel, stride, kernel // 2,
                                          groups=groups) for _ in range(branches))
        self.scale = ConvBN(c_in, c_out, 1, stride, 0, groups=groups) if kernel > 1 else None
        self.skip = nn.BatchNorm2d(c_in) if c_in == c_out and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        y = self.convs[0](x)
        for conv in self.convs[1:]:
            y = y + conv(x)
        if self.scale is not None:
            y = y + self.scale(x)
        if self.skip is not None:
            y = y + self.skip(x)
        return self.act(y)


class MobileOneUnit(nn.Sequential):
    """Depthwise 3×3 MobileOne stage followed by a pointwise 1×1 MobileOne stage."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, branches: int = 2) -> None:
        super().__init__()
        self.dw = MobileOneBlock(c_in, c_in, 3, stride, groups=c_in, branches=branches)
        self.pw = MobileOneBlock(c_in, c_out, 1, 1, branches=branches)


class UniRepLKNetBlock(nn.Module):
    """UniRepLKNet block: dilated reparam dw conv → BN → 1×1 expand → GELU → 1×1 → + x."""

    def __init__(self, channels: int, kernel: int, expansion: int = 4) -> None:
        super().__init__()
        self.dw = UniRepLKNetDilatedBlock(channels, kernel)
        self.norm = nn.BatchNorm2d(channels)
        self.pw1 = nn.Conv2d(channels, expansion * channels, 1)
        self.act = nn.GELU()
        self.pw2 = nn.Conv2d(expansion * channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.pw2(self.act(self.pw1(self.norm(self.dw(x)))))


class _Classifier(nn.Module):
    """features → global average pool → linear."""

    def __init__(self, features: nn.Module, width: int, classes: int = 10) -> None:
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def repvgg_fmnist() -> nn.Module:
    """RepVGG-style net: 7 RepVGG blocks, widths 16/32/64 (deploy: 7 convs), ~0.3 MB."""
    blocks = [RepVGGBlock(1, 16), RepVGGBlock(16, 16),
              RepVGGBlock(16, 32, stride=2), RepVGGBlock(32, 32),
              RepVGGBlock(32, 64, stride=2), RepVGGBlock(64, 64), RepVGGBlock(64, 64)]
    return _Classifier(nn.Sequential(*blocks), 64)


def acnet_fmnist() -> nn.Module:
    """ACNet-style net: 6 ACBlocks, each followed by ReLU (deploy: 6 convs)."""
    layers: list[nn.Module] = []
    for c_in, c_out, s in ((1, 16, 1), (16, 16, 1), (16, 32, 2), (32, 32, 1), (32, 64, 2),
                           (64, 64, 1)):
        layers += [ACBlock(c_in, c_out, 3, s), nn.ReLU()]
    return _Classifier(nn.Sequential(*layers), 64)


def acnet_crop_fmnist() -> nn.Module:
    """ACNet net whose unpadded blocks (padding 0 < K//2) use the official crop variant:
    3×3 p=1, 5×5 p=1 (crop 1), 3×3 p=0 (crop 1), 3×3 p=1 (deploy: 4 convs)."""
    layers: list[nn.Module] = [
        ACBlock(1, 16, 3), nn.ReLU(), ACBlock(16, 32, 5, stride=2, padding=1), nn.ReLU(),
        ACBlock(32, 32, 3, padding=0), nn.ReLU(), ACBlock(32, 64, 3, stride=2), nn.ReLU()]
    return _Classifier(nn.Sequential(*layers), 64)


def dbb_fmnist() -> nn.Module:
    """DBB net: dense DBBs (one with identity-init 1×1) and a depthwise-separable DBB stage
    (deploy: 7 convs)."""
    layers: list[nn.Module] = [
        DiverseBranchBlock(1, 16, 3), nn.ReLU(),
        DiverseBranchBlock(16, 16, 3, identity_init=True), nn.ReLU(),
        DiverseBranchBlock(16, 32, 3, stride=2), nn.ReLU(),
        DiverseBranchBlock(32, 32, 3, groups=32), nn.ReLU(),            # depthwise DBB
        nn.Conv2d(32, 48, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU(),
        DiverseBranchBlock(48, 48, 3, stride=2, groups=48), nn.ReLU(),  # depthwise, strided
        DiverseBranchBlock(48, 64, 3), nn.ReLU(),
    ]
    return _Classifier(nn.Sequential(*layers), 64)


def mobileone_fmnist() -> nn.Module:
    """MobileOne-style net: 3×3 stem + 4 MobileOne units (deploy: 1 + 4·2 = 9 convs)."""
    layers: list[nn.Module] = [
        MobileOneBlock(1, 24, 3, stride=1, branches=1),
        MobileOneUnit(24, 32, stride=2), MobileOneUnit(32, 32),
        MobileOneUnit(32, 64, stride=2), MobileOneUnit(64, 64, branches=3),
    ]
    return _Classifier(nn.Sequential(*layers), 64)


def unireplknet_fmnist() -> nn.Module:
    """UniRepLKNet-style net: stem, 2 blocks with K=13 (14×14), downsample, 2 blocks with
    K=7 (7×7) (deploy: 2 + 4·3 = 14 convs)."""
    layers: list[nn.Module] = [
        nn.Conv2d(1, 24, 3, 2, 1, bias=False), nn.BatchNorm2d(24), nn.GELU(),
        UniRepLKNetBlock(24, 13), UniRepLKNetBlock(24, 13),
        nn.Conv2d(24, 48, 3, 2, 1, bias=False), nn.BatchNorm2d(48),
        UniRepLKNetBlock(48, 7), UniRepLKNetBlock(48, 7),
    ]
    return _Classifier(nn.Sequential(*layers), 48)
