"""Portable INT8 for ONNX Runtime, end to end, on every CPU class from any host.

The same compiled artifact runs natively and under emulation (x86 AVX2 by `qemu-x86_64 -cpu
Haswell`, arm64 by `qemu-aarch64`, where tools/setup.sh built its sysroot), and the parity
gate's per-layer comparison (quantflow.parity: each layer on the runtime's own inputs, in
output steps) says how far each layer is from the torch simulation.

- `--device portable` (the default): every layer within one step on every class.
- full int8 weights (what quantflow emitted before portability, now `--device x86-vnni`):
  exact on the host when it is VNNI-class, but tens of steps off on AVX2. This is the test
  that fails on the old code: the same check run on its artifact.
- the gate repairs: starting from full int8 weights and checking on AVX2, it repairs exactly
  the layers that were off and then passes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from quantflow import calibrate as cal
from quantflow import verify
from quantflow.errors import TargetUnavailableError
from quantflow.hostcpu import host_cpu
from quantflow.ir import capture
from quantflow.parity import BOUND_STEPS
from quantflow.passes import DEFAULT_PIPELINE, run_pipeline
from quantflow.quantize import quantizable_nodes, quantize
from quantflow.spec import KernelRules, int8_plan
from quantflow.targets import get_target, ort_isa

SAMPLES = 4


class SmallNet(nn.Module):
    """Stem conv (3 input channels: pairs straddle kernel positions), a residual block of 3x3
    convs (the symmetric-conv path), a depthwise conv and a linear layer (QGemm)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.c1 = nn.Conv2d(32, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 32, 3, padding=1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.c2(torch.relu(self.c1(x))) + x)
        x = torch.relu(self.dw(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    torch.manual_seed(0)
    net = SmallNet().eval()
    with torch.no_grad():  # trained-looking weights: a few large ones per channel
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(1.0 + 3.0 * (torch.rand_like(m.weight) > 0.9))
    x = torch.rand(32, 3, 16, 16)
    gm = capture(net, (x[:1],))
    run_pipeline(gm, DEFAULT_PIPELINE)
    stats = cal.collect_stats(gm, cal.batched(x, 16))
    return {"gm": gm, "x": x, "stats": stats, "out": tmp_path_factory.mktemp("portable")}


def _lower(setup: dict, rules: KernelRules, name: str) -> tuple:
    gm, stats = setup["gm"], setup["stats"]
    qgm = quantize(gm, int8_plan("minmax"), stats, rules)  # type: ignore[arg-type]
    out = Path(setup["out"]) / name  # type: ignore[arg-type]
    out.mkdir(exist_ok=True)
    target = get_target("ort", threads=1)
    art = target.lower(qgm, (setup["x"][:1],), out, precision="int8")  # type: ignore[index]
    return qgm, art, target


def _check(setup: dict, qgm: object, art: object, target: object, isa: str
           ) -> verify.ParityCheck:
    try:
        return verify.check(qgm, art, target, setup["x"], 1, [isa],  # type: ignore[arg-type]
                            samples=SAMPLES)
    except TargetUnavailableError as exc:
        pytest.skip(str(exc))


def _worst(result: verify.ParityCheck) -> int:
    return max(t.max_steps for ts in result.tensors.values() for t in ts)


@pytest.mark.parametrize("isa", ["host", "x86-avx2", "arm64", "arm64-dot"])
def test_portable_artifact_is_within_one_step_everywhere(setup: dict, isa: str) -> None:
    qgm, art, target = _lower(setup, KernelRules(pair_limit=ort_isa.PAIR_LIMIT), "portable")
    changed = qgm.meta["quantflow"].portability
    assert changed and "dw" not in " ".join(changed)  # depthwise convs are exempt
    result = _check(setup, qgm, art, target, isa)
    assert not result.failing(), result.to_dict()["off_layers"]
    assert _worst(result) <= BOUND_STEPS
    # every quantized tensor was compared
    assert len(result.tensors[isa]) == len(qgm.meta["quantflow"].tensors)


def test_full_int8_weights_saturate_on_avx2(setup: dict) -> None:
    """The pre-portability artifact: fails the AVX2 check, passes where kernels are exact."""
    qgm, art, target = _lower(setup, KernelRules(), "full")
    avx2 = _check(setup, qgm, art, target, "x86-avx2")
    off = {t.layer for _, t in avx2.failing()}
    assert _worst(avx2) > 10 * BOUND_STEPS, avx2.to_dict()
    assert off and off <= set(quantizable_nodes(setup["gm"]))  # type: ignore[arg-type]
    host = _check(setup, qgm, art, target, "host")
    if ort_isa.exact_on("x86-vnni", host_cpu().isa_class):
        assert not host.failing()
    else:  # an AVX2-class host shows the same layers off
        assert {t.layer for _, t in host.failing()} == off


def test_gate_repairs_the_layers_that_are_off(setup: dict) -> None:
    qgm, art, target = _lower(setup, KernelRules(), "gate")
    first = _check(setup, qgm, art, target, "x86-avx2")
    off = {t.layer for _, t in first.failing()}
    calls = []

    def requantize(rules: KernelRules) -> tuple:
        calls.append(dict(rules.repairs))
        q, a, _ = _lower(setup, rules, "gate")
        return q, a

    def run_check(q: object, a: object) -> verify.ParityCheck:
        return _check(setup, q, a, target, "x86-avx2")

    qgm2, _, rules, result = verify.gate(requantize, KernelRules(), (qgm, art), run_check,
                                         set(quantizable_nodes(setup["gm"])))  # type: ignore
    assert not result.failing()
    assert set(rules.repairs) == off and set(rules.repairs.values()) == {"pairs"}
    assert result.repaired == dict(rules.repairs) and len(calls) == 1
    assert set(qgm2.meta["quantflow"].portability) == off
