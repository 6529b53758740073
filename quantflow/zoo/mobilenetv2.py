"""MobileNetV2 in plain torch, mirroring torchvision's module tree and state-dict keys.

Structure (identical to ``torchvision.models.mobilenetv2``):

* ``features.0``: ``ConvBNReLU`` stem (``features.0.0`` conv, ``.1`` BN, ``.2`` ReLU6);
* ``features.1 .. features.N-1``: ``InvertedResidual`` blocks whose ``conv`` Sequential
  is ``[ConvBNReLU 1x1 expand,] ConvBNReLU 3x3 depthwise, Conv2d 1x1 project, BN``;
* ``features.N``: ``ConvBNReLU`` 1x1 to ``last_channel``;
* ``classifier.0`` Dropout, ``classifier.1`` Linear.

This is exactly why MobileNetV2 is the canonical hard case for post-training
quantization: depthwise convolutions have per-channel weight ranges that differ by
orders of magnitude (per-tensor int8 weights destroy them), ReLU6 clips activations,
and the linear bottlenecks feed residual adds with no activation in between. The
Fashion-MNIST variant keeps all of that on purpose.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "FMNIST_SETTING",
    "IMAGENET_SETTING",
    "ConvBNReLU",
    "InvertedResidual",
    "MobileNetV2",
    "make_divisible",
    "mobilenet_v2",
    "mobilenetv2_fmnist",
]

#: (expand ratio t, output channels c, repeats n, first stride s) -- torchvision's table.
IMAGENET_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)

#: Small-input table for 28x28: the same block types, fewer repeats, and only three
#: stride-2 stages (28 -> 14 -> 7 -> 4) so the last feature map is 4x4, not 1x1.
FMNIST_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 2, 2),
    (6, 64, 2, 2),
    (6, 96, 1, 1),
    (6, 160, 2, 1),
    (6, 320, 1, 1),
)


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of ``divisor`` (torchvision's ``_make_divisible``).

    Never rounds down by more than 10%, so width multipliers keep their meaning.
    """
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNReLU(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU6, as ``features.k.{0,1,2}``."""

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
    ) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(
                in_planes, out_planes, kernel_size, stride, padding, groups=groups, bias=False
            ),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(inplace=True),
        )
        self.out_channels = out_planes


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> linear project (1x1), residual when shapes match."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2, got {stride}")
        self.stride = stride
        hidden_dim = round(inp * expand_ratio)
        self.use_res_connect = self.stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(inp, hidden_dim, kernel_size=1))
        layers.extend(
            [
                ConvBNReLU(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
                nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
                nn.BatchNorm2d(oup),
            ]
        )
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 with torchvision's key layout plus knobs for small inputs.

    Args:
        num_classes: classifier outputs.
        width_mult: channel multiplier applied to every layer (``last_channel`` is only
            ever scaled up, as in torchvision).
        inverted_residual_setting: ``(t, c, n, s)`` rows; defaults to ImageNet's.
        round_nearest: channel rounding multiple.
        in_channels: input image channels (1 for grayscale).
        stem_stride: stride of the first conv (2 for 224x224, 1 for tiny images).
        last_channel: channels of the final 1x1 conv before pooling (default 1280).
        dropout: dropout probability at ``classifier.0``.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        inverted_residual_setting: Sequence[Sequence[int]] | None = None,
        round_nearest: int = 8,
        in_channels: int = 3,
        stem_stride: int = 2,
        last_channel: int = 1280,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        setting = (
            IMAGENET_SETTING if inverted_residual_setting is None else inverted_residual_setting
        )
        if len(setting) == 0 or any(len(row) != 4 for row in setting):
            raise ValueError(
                f"inverted_residual_setting should be a non-empty list of 4-element rows, got {setting}"
            )
        input_channel = make_divisible(32 * width_mult, round_nearest)
        self.last_channel = make_divisible(last_channel * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [ConvBNReLU(in_channels, input_channel, stride=stem_stride)]
        for t, c, n, s in setting:
            output_channel = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                stride = s if i == 0 else 1
                features.append(InvertedResidual(input_channel, output_channel, stride, t))
                input_channel = output_channel
        features.append(ConvBNReLU(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(self.last_channel, num_classes),
        )

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0) -> MobileNetV2:
    """Standard ImageNet MobileNetV2 (3.5M params at width 1.0), torchvision-compatible."""
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult)


def mobilenetv2_fmnist(num_classes: int = 10) -> MobileNetV2:
    """MobileNetV2 at width 0.5 for 1x28x28 inputs.

    Stem stride 1 and :data:`FMNIST_SETTING` give feature maps 28 -> 14 -> 7 -> 4;
    ``last_channel`` is 512 instead of 1280 because a 1280-wide head on 80 channels is
    pure parameter bloat for 10 classes. Depthwise convs, ReLU6 and linear bottlenecks
    with residual adds are all kept: this model is meant to be hard to quantize.
    """
    return MobileNetV2(
        num_classes=num_classes,
        width_mult=0.5,
        inverted_residual_setting=FMNIST_SETTING,
        in_channels=1,
        stem_stride=1,
        last_channel=512,
        dropout=0.1,
    )
