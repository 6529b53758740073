"""Emulated ISAs take their own MLAS kernels: a QLinearConv whose U8S8 products overflow int16.

The probe: a 1x1 QLinearConv, uint8 input 255 on four channels, int8 weight 127 on two of them,
every scale 1 except the output's 1024, zero points 0. Exact: round(2 * 255 * 127 / 1024) = 63.
AVX2's `vpmaddubsw` adds the two adjacent u8*s8 products into an int16 that saturates at 32767,
so x86-avx2 prints 32; the arm64 kernels (NEON widening multiply, dot product, NEON and SVE i8mm)
all accumulate in int32 and print 63. Each emulator that is not set up here skips.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantflow.errors import TargetUnavailableError
from quantflow.targets import emulate

EXPECTED = {"x86-avx2": 32, "arm64": 63, "arm64-dot": 63, "arm64-i8mm": 63, "arm64-sve": 63}


def _probe(path: Path) -> Path:
    w = np.zeros((16, 4, 1, 1), np.int8)
    w[:, :2] = 127
    consts: dict[str, np.ndarray] = {"xs": np.array(1.0, np.float32), "xz": np.array(0, np.uint8), "w": w,
              "ws": np.array(1.0, np.float32), "wz": np.array(0, np.int8),
              "ys": np.array(1024.0, np.float32), "yz": np.array(0, np.uint8)}
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"])
    graph = helper.make_graph(
        [node], "probe", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 4, 1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 16, 1, 1])],
        [numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, path)
    return path


def test_every_emulated_isa_has_an_expectation() -> None:
    assert set(EXPECTED) == set(emulate.EMULATED_ISAS)
    with pytest.raises(ValueError, match="no emulator"):
        emulate.emulator("riscv64")


@pytest.mark.parametrize("isa", emulate.EMULATED_ISAS)
def test_qlinearconv_probe(isa: str, tmp_path: Path) -> None:
    try:
        emulate.emulator(isa)
    except TargetUnavailableError as exc:
        pytest.skip(str(exc))
    feed = {"x": np.full((1, 4, 1, 1), 255, np.uint8)}
    (out,) = emulate.run_onnx(_probe(tmp_path / "probe.onnx"), [feed], isa)
    assert out["y"].shape == (1, 16, 1, 1)
    assert set(out["y"].ravel().tolist()) == {EXPECTED[isa]}


def test_arm64_cpuinfo_views_follow_the_cpu_model() -> None:
    """The /proc/cpuinfo each arm64 model sees names its own features (onnxruntime's cpuinfo
    library reads the MIDR there; a host x86 file crashes it)."""
    try:
        views = {isa: emulate.emulator(isa) for isa in ("arm64", "arm64-dot", "arm64-sve")}
    except TargetUnavailableError as exc:
        pytest.skip(str(exc))
    features = {}
    for isa, emu in views.items():
        prefix = Path(emu.argv[emu.argv.index("-L") + 1])
        text = (prefix / "proc" / "cpuinfo").read_text()
        features[isa] = set(text.split("Features\t: ", 1)[1].split("\n", 1)[0].split())
    assert "asimd" in features["arm64"] and "asimddp" not in features["arm64"]
    assert "asimddp" in features["arm64-dot"] and "i8mm" not in features["arm64-dot"]
    assert {"asimddp", "i8mm", "sve"} <= features["arm64-sve"]
