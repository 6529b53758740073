"""A small (2+1)-D / 3-D convolutional network and the volumetric data it is trained on.

Data (`clips`; `quantflow.data.fmnist_clips` applies it to Fashion-MNIST): each image becomes
a clip of `FRAMES` frames in which the garment drifts across the frame with a per-sample velocity (−2..2 px per frame in x and y,
wrapping around), a (N, 1, D, H, W) volume whose label is the garment's class. Built
deterministically from the installed Fashion-MNIST files (the velocity comes from the
sample index), so nothing is downloaded and every machine sees the same volumes.

Network (`r2plus1d_fmnist`): a (2+1)-D stem (1×3×3 spatial conv, then a 3×1×1 temporal conv,
as in R(2+1)D, Tran et al. CVPR 2018), a residual (2+1)-D block, two plain 3×3×3 blocks with
stride 2, global 3-D average pooling and a linear classifier; BatchNorm after every conv.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

FRAMES = 8
CLASSES = 10


def _conv_bn(cin: int, cout: int, k: tuple[int, int, int], stride: int = 1) -> nn.Sequential:
    pad = (k[0] // 2, k[1] // 2, k[2] // 2)
    return nn.Sequential(nn.Conv3d(cin, cout, k, stride=stride, padding=pad, bias=False),
                         nn.BatchNorm3d(cout), nn.ReLU())


class Block2p1d(nn.Module):
    """Spatial 1×3×3 then temporal 3×1×1, residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.spatial = _conv_bn(c, c, (1, 3, 3))
        self.temporal = nn.Sequential(nn.Conv3d(c, c, (3, 1, 1), padding=(1, 0, 0), bias=False),
                                      nn.BatchNorm3d(c))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.temporal(self.spatial(x)))


class R2plus1D(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(1, width, (1, 3, 3)), _conv_bn(width, width, (3, 1, 1)))
        self.block = Block2p1d(width)
        self.down = _conv_bn(width, 2 * width, (3, 3, 3), stride=2)
        self.down2 = _conv_bn(2 * width, 4 * width, (3, 3, 3), stride=2)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(4 * width, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = self.down2(self.down(self.block(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def r2plus1d_fmnist() -> R2plus1D:
    return R2plus1D()


def clips(images: Tensor, start: int = 0) -> Tensor:
    """(N, 1, 28, 28) images → (N, 1, FRAMES, 28, 28) drifting clips; sample i's velocity
    depends only on its index `start + i` (deterministic, class-independent)."""
    n = images.shape[0]
    idx = torch.arange(start, start + n)
    vx, vy = idx % 5 - 2, (idx // 5) % 5 - 2
    frames = []
    for t in range(FRAMES):
        shifted = torch.stack([torch.roll(images[i], shifts=(int(vy[i]) * t, int(vx[i]) * t),
                                          dims=(1, 2)) for i in range(n)])
        frames.append(shifted)
    return torch.stack(frames, dim=2)
