"""ResNet with BasicBlocks, written in plain torch (no torchvision dependency).

Parameter and buffer names follow torchvision's ``torchvision.models.resnet`` exactly
(``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0/1``, ``fc`` ...), so a
torchvision ``resnet18`` state dict loads with ``strict=True``.

One deliberate structural difference: torchvision's ``BasicBlock`` calls the same
``nn.ReLU`` module twice. A module invoked twice is a classic trap for quantization
tooling that attaches one observer per module (the two call sites see different
tensor ranges), so each activation here has its own module (``relu`` after ``bn1`` and
``relu_out`` after the residual add). ReLU has no parameters, so state dicts are
unaffected.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["BasicBlock", "ResNet", "resnet18", "resnet_fmnist"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding and no bias (the following BN provides the shift)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution used by the projection shortcut."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN pairs plus an identity (or 1x1 projection) shortcut."""

    expansion: int = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.relu_out = nn.ReLU(inplace=True)
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        return self.relu_out(out)


class ResNet(nn.Module):
    """BasicBlock ResNet with a configurable stem, stage count and stage widths.

    ``stem="imagenet"`` is the standard 7x7/stride-2 conv followed by a 3x3/stride-2
    max-pool (for 224x224 inputs). ``stem="small"`` is a single 3x3/stride-1 conv with
    no max-pool, which keeps enough spatial resolution for 28x28/32x32 inputs.
    Stages are named ``layer1``..``layerN`` as in torchvision; the first stage keeps
    the stem's resolution and every later stage halves it.
    """

    def __init__(
        self,
        layers: Sequence[int],
        widths: Sequence[int] = (64, 128, 256, 512),
        num_classes: int = 1000,
        in_channels: int = 3,
        stem: str = "imagenet",
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if len(layers) != len(widths) or not layers:
            raise ValueError(
                f"layers ({list(layers)}) and widths ({list(widths)}) must be non-empty "
                "and of equal length"
            )
        if stem not in ("imagenet", "small"):
            raise ValueError(f"unknown stem {stem!r}; expected 'imagenet' or 'small'")
        self.inplanes = widths[0]
        self.num_stages = len(layers)
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(
                in_channels, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False
            )
        else:
            self.conv1 = conv3x3(in_channels, self.inplanes)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = (
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            if stem == "imagenet"
            else nn.Identity()
        )
        for i, (n_blocks, width) in enumerate(zip(layers, widths)):
            stage = self._make_layer(width, n_blocks, stride=1 if i == 0 else 2)
            self.add_module(f"layer{i + 1}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1] * BasicBlock.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Makes each block start as identity; helps short training runs converge.
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample: nn.Module | None = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * BasicBlock.expansion, stride),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        block_list: list[nn.Module] = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        for _ in range(1, blocks):
            block_list.append(BasicBlock(self.inplanes, planes))
        return nn.Sequential(*block_list)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def resnet18(num_classes: int = 1000) -> ResNet:
    """Standard ImageNet ResNet-18 (11.7M params); torchvision state dicts load strictly."""
    return ResNet([2, 2, 2, 2], (64, 128, 256, 512), num_classes=num_classes)


def resnet_fmnist(num_classes: int = 10) -> ResNet:
    """Small ResNet for 1x28x28 Fashion-MNIST: 3x3 stem, widths 16/32/64, 2 blocks/stage.

    This is the classic CIFAR-style ResNet-14 (~0.17M params). Feature maps are
    28x28 -> 14x14 -> 7x7 before global average pooling.
    """
    return ResNet([2, 2, 2], (16, 32, 64), num_classes=num_classes, in_channels=1, stem="small")
