"""ZeroQ: distilled inputs reproduce BN statistics and calibrate nearly as well as real data."""

from __future__ import annotations

import pytest
import torch
from nets import SmallCNN
from torch import nn

from quantflow.calibrate import batched, collect_stats
from quantflow.errors import InputError
from quantflow.ir import capture
from quantflow.passes.cleanup import dead_code
from quantflow.passes.fold_bn import fold_bn
from quantflow.passes.pipeline import run_pipeline
from quantflow.quantize import quantize
from quantflow.search.zeroq import bn_statistics_loss, bn_targets, distill
from quantflow.spec import int8_plan

#: accuracy (points) INT8 may lose when calibrated on distilled instead of real data
DISTILLED_MARGIN = 3.0


pytestmark = pytest.mark.usefixtures("one_thread")


def Net() -> nn.Module:
    return SmallCNN(extra_conv=False)


def make_data(n: int, gen: torch.Generator, templates: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(0, 4, (n,), generator=gen)
    x = templates[y] + 0.8 * torch.randn(n, 1, 8, 8, generator=gen)
    return (x - x.mean()) / x.std(), y


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor,
                                                                            torch.Tensor]]:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    templates = torch.randn(4, 1, 8, 8, generator=gen)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(150):
        x, y = make_data(64, gen, templates)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), make_data(64, gen, templates), make_data(512, gen, templates)


def _accuracy(gm: torch.fx.GraphModule, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return 100.0 * float((gm(x).argmax(-1) == y).double().mean())


def test_distilled_data_matches_bn_statistics(trained: tuple) -> None:
    model, (x_cal, _), _ = trained
    gm = capture(model, (x_cal[:2],))
    targets = bn_targets(gm)
    assert len(targets) == 2
    res = distill(gm, (1, 8, 8), n=32, steps=200, batch=32)
    assert res.inputs.shape == (32, 1, 8, 8)
    assert res.loss_end < 0.1 * res.loss_start, (res.loss_start, res.loss_end)
    # the matched statistics are about as close as real data's own batch statistics
    with torch.no_grad():
        real = float(bn_statistics_loss(gm, x_cal[:32], targets, input_stats=False))
        fake = float(bn_statistics_loss(gm, res.inputs, targets, input_stats=False))
    assert fake < 2.0 * real, (fake, real)


def test_distilled_calibration_keeps_accuracy(trained: tuple) -> None:
    model, (x_cal, _), (x_test, y_test) = trained
    gm = capture(model, (x_cal[:2],))
    distilled = distill(gm, (1, 8, 8), n=64, steps=200, batch=32).inputs
    run_pipeline(gm, (fold_bn, dead_code))
    assert not bn_targets(gm)
    fp32 = _accuracy(gm, x_test, y_test)
    acc = {}
    for name, data in (("real", x_cal), ("distilled", distilled)):
        stats = collect_stats(gm, batched(data, 32))
        acc[name] = _accuracy(quantize(gm, int8_plan("minmax"), stats), x_test, y_test)
    assert fp32 > 80.0, f"the test model did not train ({fp32:.1f}%)"
    assert acc["real"] >= fp32 - DISTILLED_MARGIN, (fp32, acc)
    assert acc["distilled"] >= acc["real"] - DISTILLED_MARGIN, (fp32, acc)


def test_no_batch_norm_is_an_input_error() -> None:
    gm = capture(nn.Sequential(nn.Conv2d(1, 2, 3)).eval(), (torch.randn(1, 1, 5, 5),))
    with pytest.raises(InputError, match="BatchNorm"):
        distill(gm, (1, 5, 5), n=4, steps=2)
