"""`quantflow profile` on TVM artifacts: a real zoo model compiled by `quantflow compile
--target tvm` (untuned, 8 bits), profiled through the CLI in-process, with per-layer times
named after the fx layers (tvm_tune.kernel_layers)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("tvm")

from quantflow.cli import main

pytestmark = pytest.mark.tvm

LINE = re.compile(r"median ([\d.]+) ms, p90 ([\d.]+) ms over (\d+) runs \(warm-up (\d+)\), "
                  r"(\d+) threads, batch (\d+)")
LAYER = re.compile(r"^\s+([\d.]+) ms  (\S.*)$", re.MULTILINE)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tvm_resnet") / "out"
    code = main(["compile", "zoo:resnet_fmnist", "--target", "tvm", "--bits", "8",
                 "--calibrator", "minmax", "--equalize", "off", "--calib-samples", "32",
                 "--eval-samples", "32", "--profile-runs", "2", "-o", str(out)])
    assert code == 0
    return out


def conv_names() -> list[str]:
    """fx names of resnet_fmnist's convs in deploy form (what the quantizer keeps)."""
    from quantflow.ir import capture
    from quantflow.load import load_model
    from quantflow.passes import DEFAULT_PIPELINE, run_pipeline

    loaded = load_model("zoo:resnet_fmnist")
    gm = capture(loaded.module, (torch.zeros(1, 1, 28, 28),))
    run_pipeline(gm, DEFAULT_PIPELINE)
    return [n.name for n in gm.graph.nodes if n.target == torch.ops.aten.conv2d.default]


def profile(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[dict[str, float],
                                                                           dict[str, float], str]:
    assert main(["profile", *argv]) == 0
    out = capsys.readouterr().out
    m = LINE.search(out)
    assert m, out
    median, p90, runs, warmup, threads, batch = (float(g) for g in m.groups())
    stats = {"median": median, "p90": p90, "runs": runs, "warmup": warmup, "threads": threads,
             "batch": batch}
    layers = {name: float(ms) for ms, name in LAYER.findall(out)}
    return stats, layers, out


@pytest.mark.parametrize("which", ["model.so", "manifest.json", "."])
def test_profile_tvm_artifact(compiled: Path, which: str,
                              capsys: pytest.CaptureFixture[str]) -> None:
    stats, layers, out = profile([str(compiled / which), "--runs", "5", "--warmup", "1",
                                  "--threads", "1", "--per-layer"], capsys)
    assert "(tvm, int8)" in out
    assert 0 < stats["median"] <= stats["p90"]
    assert stats["runs"] >= 5 and stats["warmup"] == 1
    assert stats["threads"] == 1 and stats["batch"] == 1
    device = re.search(r"^device: (.+)$", out, re.MULTILINE)
    assert device and "cores" in device.group(1)
    # 15 convs, their pads, layout transposes (VNNI hosts) and the linear: the top 25 show
    # every conv, each named after its fx node
    convs = conv_names()
    assert len(convs) == 15
    assert set(convs) <= set(layers), sorted(layers)
    assert all(layers[c] > 0 for c in convs)
    # the linear is named too, though it may rank below the 25 shown
    kernels = json.loads((compiled / "manifest.json").read_text())["meta"]["kernel_layers"]
    assert "linear" in kernels.values()
    # the kernels run back to back inside one timed call: their sum cannot exceed it much
    total = float(re.search(r"sum ([\d.]+) ms", out).group(1))  # type: ignore[union-attr]
    assert sum(layers[c] for c in convs) <= total <= 3 * stats["p90"]


def test_profile_fp32_library_names_float_convs(compiled: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Float convs of equal shape share one kernel (FuseOps); each call still gets its layer."""
    stats, layers, out = profile([str(compiled / "model_fp32.so"), "--runs", "3", "--warmup",
                                  "1", "--per-layer"], capsys)
    assert "(tvm, fp32)" in out and stats["median"] > 0
    assert set(conv_names()) <= set(layers), sorted(layers)
    assert not any(k.startswith("fused_conv2d") for k in layers)


def test_profile_rejects_wrong_target_and_tampered_library(compiled: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    assert main(["profile", str(compiled / "model.so"), "--target", "ort"]) == 3
    assert "--target" in capsys.readouterr().err
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in ("model.so", "manifest.json"):
        (copy / f).write_bytes((compiled / f).read_bytes())
    with (copy / "model.so").open("ab") as fh:
        fh.write(b"\0")
    assert main(["profile", str(copy / "model.so")]) == 3
    assert "sha256" in capsys.readouterr().err


def test_profile_threads_are_real(compiled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """TVM caps its pool at half the cores on x86 unless TVM_NUM_THREADS says otherwise; the
    target raises it to all cores, and a request beyond the pool fails instead of timing
    fewer threads than it reports."""
    cores = os.cpu_count() or 1
    stats, _layers, _out = profile([str(compiled), "--runs", "3", "--warmup", "1",
                                    "--threads", str(cores)], capsys)
    assert stats["threads"] == cores
    assert main(["profile", str(compiled), "--runs", "3", "--threads", str(cores + 1)]) == 6
    assert "TVM_NUM_THREADS" in capsys.readouterr().err
