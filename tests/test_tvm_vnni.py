"""TVM target, VNNI layout for integer convs (tvm_int_math.vnni_conv2d_nhwc): weight packing,
lowering vs the torch simulation (same bounds as test_target_tvm: <= 1 output step, >= 99 %
exact), which convs qualify, and (slow) that tuning really emits vpdpbusd."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

tvm = pytest.importorskip("tvm")

from test_target_tvm import MIN_EXACT, OneConv, QConv, QNet, q, steps_apart  # shared quantized nets

from quantflow.ir import capture
from quantflow.targets import get_target
from quantflow.targets.tvm import host_target
from quantflow.targets.tvm_dot import PATHS, pairs_fit
from quantflow.targets.tvm_int_math import pack_vnni_weight

pytestmark = pytest.mark.tvm


def test_pack_vnni_weight_puts_16x4_blocks_together() -> None:
    wq = np.random.default_rng(0).integers(-127, 128, (32, 8, 3, 3), dtype=np.int8)
    wp = pack_vnni_weight(wq)
    assert wp.shape == (2, 3, 3, 2, 16, 4) and wp.flags.c_contiguous
    o, i, kh, kw = np.meshgrid(*(np.arange(n) for n in wq.shape), indexing="ij")
    assert np.array_equal(wp[o // 16, kh, kw, i // 4, o % 16, i % 4], wq[o, i, kh, kw])
    # one (out block, kh, kw, in block) is a contiguous 16 x 4 = 64-byte vpdpbusd operand
    assert np.array_equal(wp[1, 2, 0, 1].ravel(), wq[16:32, 4:8, 2, 0].ravel())


class Mixed(nn.Module):
    """conv 8->16 (VNNI), depthwise 16 (groups: generic), conv 16->8 s2 (8 outputs: generic),
    conv 8->16 s2 1x1-free 3x3 with padding (VNNI, strided)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = QConv(8, 16, QNet.S_IN, seed=1)
        self.b = QConv(16, 16, QNet.S1, groups=16, seed=2)
        self.c = QConv(16, 8, QNet.S2, stride=2, seed=3)
        self.d = QConv(8, 16, QNet.S3, stride=2, seed=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = q(x, QNet.S_IN, QNet.Z_IN)
        x = q(torch.relu(self.a(x)), QNet.S1, 0)
        x = q(torch.relu(self.b(x)), QNet.S2, 0)
        x = q(torch.relu(self.c(x)), QNet.S3, 0)
        return q(self.d(x), QNet.S_OUT, QNet.Z_OUT)


def test_vnni_convs_match_simulation_and_keep_their_names(tmp_path: Path) -> None:
    x = torch.randn(1, 8, 20, 20, generator=torch.Generator().manual_seed(0))
    gm = capture(Mixed(), (x,))
    target = get_target("tvm", dot=True)
    art = target.lower(gm, (x,), tmp_path, precision="int8")
    # which convs take this host's dot-product path: every non-grouped one (channels padded
    # to whole blocks), on AVX2 only if its weights keep vpmaddubsw's pair bound; the
    # depthwise conv2d_1 runs in NHWC too, widened to int32
    path = target.dot_path(host_target())
    net = Mixed()
    fits = [name for name, c in (("conv2d", net.a), ("conv2d_2", net.c), ("conv2d_3", net.d))
            if path is not None and (not path.pair_bound or pairs_fit(c.wq.numpy()))]
    assert art.meta["dot_layers"] == fits
    assert sorted(art.meta["int_layers"]) == ["conv2d", "conv2d_1", "conv2d_2", "conv2d_3"]
    g = torch.Generator().manual_seed(1)
    for scale in (1.0, 3.0):
        xi = torch.randn(1, 8, 20, 20, generator=g) * scale
        (got,) = target.run(art, [xi.numpy()])
        d = steps_apart(got, gm(xi).detach().numpy(), QNet.S_OUT)
        assert d.max() <= 1.0 + 1e-4, f"max {d.max():.3f} steps"
        assert np.mean(d < 1e-3) >= MIN_EXACT
    lat = target.profile(art, [x.numpy()], warmup=1, runs=3, threads=1, per_layer=True)
    assert lat.per_layer_ms is not None
    assert {"conv2d", "conv2d_1", "conv2d_2", "conv2d_3"} <= set(lat.per_layer_ms), \
        sorted(lat.per_layer_ms)


def test_dot_path_follows_the_isa_class_tuned_or_not() -> None:
    """One layout in every mode, so that records tuned in one apply in the others."""
    from tvm.target import codegen

    from quantflow.targets.tvm_edge import aarch64_target

    host = host_target()
    has = bool(codegen.target_has_features("avx512vnni", host))
    lanes = {"x86-vnni": 16, "x86-avx2": 8, "arm64-dot": 4, "arm64": 4}
    assert (get_target("tvm").dot_path(host).isa == "x86-vnni") == has
    assert get_target("tvm", tune_trials=4).dot_path(host) == get_target("tvm").dot_path(host)
    assert get_target("tvm", tune_trials=4, dot=False).dot_path(host) is None
    haswell = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    assert get_target("tvm").dot_path(haswell).isa == "x86-avx2"
    sandy = tvm.target.Target({"kind": "llvm", "mcpu": "sandybridge"})
    assert get_target("tvm").dot_path(sandy) is None  # no AVX2: the widening path
    arm = get_target("tvm", device="aarch64").dot_path(aarch64_target())
    assert arm.isa == "arm64" and arm.act == "int8"
    assert {p.isa: p.lanes for p in PATHS.values()} == lanes


@pytest.mark.slow
def test_tuned_vnni_conv_runs_vpdpbusd(tmp_path: Path) -> None:
    """TVM 0.27's own dot_16x4_vnni fails LLVM verification (tvm_intrin.register_vnni_dot);
    with the fixed intrinsic, 8 trials per task already pick a tensorized schedule."""
    from tvm.target import codegen

    if not codegen.target_has_features("avx512vnni", host_target()):
        pytest.skip("this CPU has no AVX512-VNNI")
    if shutil.which("objdump") is None:
        pytest.skip("objdump not installed")
    x = torch.randn(1, 32, 14, 14, generator=torch.Generator().manual_seed(3))
    gm = capture(OneConv(32), (x,))
    target = get_target("tvm", tune_trials=8, cache_dir=tmp_path / "cache", dot=True)
    art = target.lower(gm, (x,), tmp_path / "out", precision="int8")
    assert art.meta["dot_layers"] == ["conv2d"]
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", art.files["model"]],
                         check=True, capture_output=True, text=True).stdout
    assert asm.count("vpdpbusd") >= 16, "the tuned conv does not use VNNI"
    (got,) = target.run(art, [x.numpy()])
    d = steps_apart(got, gm(x).detach().numpy(), QNet.S1)
    assert d.max() <= 1.0 + 1e-4 and np.mean(d < 1e-3) >= MIN_EXACT
