"""Small networks several tests share (one definition each, so the tests stay comparable)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class ConvPool(nn.Module):
    """conv3x3 -> ReLU -> global mean -> linear: the smallest real classifier."""

    def __init__(self, cin: int = 3, width: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.c = nn.Conv2d(cin, width, 3, padding=1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.c(x)).mean((2, 3)))


class TinyResidual(nn.Module):
    """conv-BN-ReLU, a depthwise conv added back (ReLU6 or ReLU), global pool, linear: BN to
    fold, a depthwise layer and a residual add in a few thousand parameters."""

    def __init__(self, width: int = 16, classes: int = 10, relu6: bool = True) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.c2 = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.fc = nn.Linear(width, classes)
        self.relu6 = relu6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn(self.c1(x)))
        b = self.c2(a)
        a = (nn.functional.relu6(b) if self.relu6 else torch.relu(b)) + a
        return self.fc(nn.functional.adaptive_avg_pool2d(a, 1).flatten(1))


class SmallCNN(nn.Module):
    """1-channel input, two strided conv-BN-ReLU stages (+ one more conv), 4 classes."""

    def __init__(self, extra_conv: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU()]
        if extra_conv:
            layers += [nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()]
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def template_task(seed: int = 0) -> tuple[nn.Module, Callable[[int], tuple[torch.Tensor,
                                                                          torch.Tensor]]]:
    """SmallCNN trained (seconds, no files) on four noisy 8x8 templates, and the sampler of
    that task: `data(n)` draws n more (x, y) from the same generator, so the draws after
    training are the same for every caller that makes them in the same order."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    templates = torch.randn(4, 1, 8, 8, generator=gen)

    def data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 4, (n,), generator=gen)
        return templates[y] + 1.2 * torch.randn(n, 1, 8, 8, generator=gen), y

    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(120):
        x, y = data(64)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), data


def template_search_task(n_test: int, seed: int = 0) -> tuple[Any, list, list, torch.Tensor,
                                                               torch.Tensor, nn.Module]:
    """What the search tests run on: the template task's deploy graph (captured, BN folded),
    64 calibration samples in two batches of 32 with their labels, `n_test` held-out samples,
    and the float model. One thread, so results do not depend on the machine's cores."""
    from quantflow.calibrate import batched
    from quantflow.ir import capture
    from quantflow.passes.cleanup import dead_code
    from quantflow.passes.fold_bn import fold_bn
    from quantflow.passes.pipeline import run_pipeline

    torch.set_num_threads(1)
    model, data = template_task(seed)
    x_cal, y_cal = data(64)
    x_test, y_test = data(n_test)
    gm = capture(model.eval(), (x_cal[:2],))
    run_pipeline(gm, (fold_bn, dead_code))
    labels = [y_cal[i:i + 32] for i in range(0, 64, 32)]
    return gm, batched(x_cal, 32), labels, x_test, y_test, model
