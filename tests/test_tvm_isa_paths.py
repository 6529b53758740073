"""TVM int8 dot-product path per ISA class (targets/tvm_dot.py), without any tuning:
AVX2 (vpmaddubsw, built for -mcpu=haswell and run here: every x86 test machine has AVX2),
aarch64 with sdot and with plain NEON (cross-compiled bundles run under qemu-aarch64).

Bounds, as in test_target_tvm: integer convs + requantize vs the torch simulation <= 1 output
step. The instruction counts (objdump) show which path the library really took.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("tvm")

from test_target_tvm import QConv, QNet, TwoConvs, q, steps_apart  # shared quantized nets

from quantflow.ir import capture
from quantflow.targets import get_target
from quantflow.targets.tvm_dot import pairs_fit

pytestmark = pytest.mark.tvm


class SevenAndEight(nn.Module):
    """conv 16->32 with 7-bit weights (every vpmaddubsw pair fits int16), conv 32->16 with
    full 8-bit weights (some same-sign pairs sum past 128: would saturate)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = QConv(16, 32, QNet.S_IN, seed=5)
        with torch.no_grad():
            self.a.wq.copy_(torch.clamp(self.a.wq, -63, 63))
        self.b = QConv(32, 16, 0.02, seed=6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = q(torch.relu(self.a(q(x, QNet.S_IN, QNet.Z_IN))), 0.02, 0)
        return q(self.b(y), 0.05, 128)


def _count(tool: str, lib: str, *mnemonics: str) -> dict[str, int]:
    asm = subprocess.run([tool, "-d", "--no-show-raw-insn", lib], check=True,
                         capture_output=True, text=True).stdout
    return {m: asm.count(m) for m in mnemonics}


def test_pair_bound_is_pair_limits_rule() -> None:
    w = np.zeros((2, 4, 1, 1), np.int8)
    assert pairs_fit(w)
    w[0, 0, 0, 0], w[0, 1, 0, 0] = 64, 64  # 255 * 128 = 32640 <= 32767
    assert pairs_fit(w)
    w[0, 1, 0, 0] = 65  # 255 * 129 > 32767: saturates for large inputs
    assert not pairs_fit(w)
    w[0, 1, 0, 0] = -127  # opposite signs never add up
    assert pairs_fit(w)
    w[1, 1, 0, 0], w[1, 2, 0, 0] = 127, 127  # channels 1 and 2 are not one pair
    assert pairs_fit(w)


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump not installed")
def test_avx2_path_uses_vpmaddubsw_where_pairs_fit(tmp_path: Path) -> None:
    x = torch.randn(1, 16, 12, 12, generator=torch.Generator().manual_seed(3))
    gm = capture(SevenAndEight(), (x,))
    target = get_target("tvm", mcpu="haswell", shipped_records=False,
                        cache_dir=tmp_path / "no_cache")
    art = target.lower(gm, (x,), tmp_path / "out", precision="int8")
    assert art.meta["dot_layers"] == ["conv2d"]
    assert art.meta["pair_bound_layers"] == ["conv2d_1"]
    assert art.meta["int8_path"].startswith("x86-avx2: vpmaddubsw")
    assert art.meta["records"]["packed"] == 2  # conv2d tensorized, conv2d_1 widened
    found = _count("objdump", art.files["model"], "vpmaddubsw", "vpdpbusd", "zmm")
    assert found["vpmaddubsw"] >= 1 and found["vpdpbusd"] == found["zmm"] == 0, found
    g = torch.Generator().manual_seed(4)
    for scale in (1.0, 3.0):  # 3x: saturated input codes, the worst case for the pair sums
        xi = torch.randn(1, 16, 12, 12, generator=g) * scale
        (got,) = target.run(art, [xi.numpy()])
        assert steps_apart(got, gm(xi).detach().numpy(), 0.05).max() <= 1.0 + 1e-4


def _edge_skip_reason() -> str | None:
    from quantflow.targets.tvm_edge import missing_toolchain

    if shutil.which("aarch64-linux-gnu-objdump") is None:
        return "aarch64-linux-gnu-objdump not installed"
    return missing_toolchain(need_qemu=True)


@pytest.mark.skipif(_edge_skip_reason() is not None, reason=str(_edge_skip_reason()))
@pytest.mark.parametrize(("device", "instruction", "absent"),
                         [("aarch64-dot", "sdot", "saddlp"), ("aarch64", "saddlp", "sdot")])
def test_aarch64_bundle_dot_path_under_qemu(tmp_path: Path, device: str, instruction: str,
                                            absent: str) -> None:
    """Arm: uint8 codes shifted to int8 (sdot/NEON multiply s8 x s8), the zero-point
    correction shifted with them; outputs within one step of the simulation under qemu."""
    x = torch.randn(1, 16, 12, 12, generator=torch.Generator().manual_seed(3))
    gm = capture(TwoConvs(0.02, 0.05), (x,))
    target = get_target("tvm", device=device, cache_dir=tmp_path / "no_cache")
    art = target.lower(gm, (x,), tmp_path / "out", precision="int8")
    assert art.meta["dot_layers"] == ["conv2d", "conv2d_1"]
    assert art.meta["isa"] == ("arm64-dot" if device == "aarch64-dot" else "arm64")
    found = _count("aarch64-linux-gnu-objdump", art.files["model"], instruction, absent)
    assert found[instruction] >= 4 and found[absent] == 0, found
    g = torch.Generator().manual_seed(5)
    for xi in (x, torch.randn(1, 16, 12, 12, generator=g) * 3):
        (got,) = target.run(art, [xi.numpy()])
        assert steps_apart(got, gm(xi).detach().numpy(), 0.05).max() <= 1.0 + 1e-4
