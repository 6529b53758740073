"""Tests of tools/bench_ort.py.

Fast: the per-ISA quality path (`_quality_rows` + `_isa_rows`) on a tiny hand-built model
and its ORT INT8 file, 3 samples, natively and under x86-avx2 emulation (`qemu-x86_64 -cpu
Haswell`; skipped with the reason where it is missing); the table per (model, tool, ISA), the
torch-simulation row, and old results without the ISA level.

Slow: a --quick run on the small Fashion-MNIST ResNet. Untrained weights (--random-weights), 8
calibration and 8 evaluation images, ORT's MinMax and default Entropy calibrators. Checks the
structure and the invariants that hold for any weights: the FP32 row is its own reference, every
quantized file is smaller than FP32, every artifact was timed, and ORT's default Entropy
calibration reproduces MinMax's ranges exactly (its KL search at num_bins = num_quantized_bins =
128 has a single candidate, the full range). Three ONNX exports plus ORT calibration; on the
shared 2-core machine it took 19 s at load average 5, 28 s at 7.5 and ~75 s at 10.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tool_loader import load_tool

ROOT = Path(__file__).resolve().parent.parent


def _tiny_models(tmp: Path, bench: Any) -> tuple[Path, Path, Any]:
    """A 1x1 conv (4 -> 16 channels) whose weights are all equal and positive, FP32 and as ORT
    U8S8 QDQ: every weight code is 127, so each pair the AVX2 kernel adds in int16 reaches
    2·127·x for activation codes x near 255 — past 32767: it saturates on AVX2, not on VNNI."""
    import onnx
    from onnx import TensorProto
    from onnx import helper as oh
    from onnx import numpy_helper as nh
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    w = np.full((16, 4, 1, 1), 0.5, np.float32)
    g = oh.make_graph(
        [oh.make_node("Conv", ["x", "w"], ["c"]), oh.make_node("Flatten", ["c"], ["y"])],
        "tiny", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4, 4])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, None)], [nh.from_array(w, "w")])
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])
    m.ir_version = 8
    fp32, int8 = tmp / "fp32.onnx", tmp / "int8.onnx"
    onnx.save(m, fp32)
    x_cal = torch.rand(8, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    quantize_static(str(fp32), str(int8), bench._Reader("x", x_cal), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    return fp32, int8, x_cal


def test_isa_rows_host_and_emulated_avx2(tmp_path: Path) -> None:
    if shutil.which("qemu-x86_64") is None:
        pytest.skip("qemu-x86_64 is missing (apt-get install qemu-user): no x86-avx2 emulation")
    bench = load_tool("bench_ort")
    fp32, int8, x_cal = _tiny_models(tmp_path, bench)
    # activations near the top of the calibrated range: uint8 codes near 255
    x_eval = 0.9 + 0.1 * torch.rand(3, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    data = bench.BenchData(x_cal, x_eval, torch.tensor([0, 5, 17]), "cal", "eval")
    args = argparse.Namespace(threads=1, isa=["x86-avx2"], isa_eval_limit=3, isa_fp32_limit=2,
                              isa_timeout=300.0)
    rows: dict[str, Any] = {"fp32": {"tool": "fp32"},
                            "ort/minmax": {"tool": "onnxruntime", "calibrator": "minmax"}}
    paths = {"fp32": fp32, "ort/minmax": int8}

    logits = bench._quality_rows(data, args, rows, paths)
    section = bench._isa_rows(data, args, rows, paths, logits)

    host = bench.host_isa()
    assert section["host"] == host and section["isas"] == [host, "x86-avx2"], section
    assert section["emulated"]["x86-avx2"]["cpu"] == "Haswell"
    assert section["emulated_eval_samples"] == 3
    for k in paths:
        assert set(rows[k]["by_isa"]) == {host, "x86-avx2"}
        assert rows[k]["by_isa"][host]["samples"] == 3
        assert rows[k]["by_isa"][host]["emulated"] is False
    # FP32 under emulation: float rounding only, on --isa-fp32-limit samples
    f = rows["fp32"]["by_isa"]["x86-avx2"]
    assert f["samples"] == 2 and f["agreement"] == 1.0 and f["accuracy_drop"] == 0.0
    assert f["sqnr_db"] is None or f["sqnr_db"] > 80.0
    q = rows["ort/minmax"]["by_isa"]["x86-avx2"]
    assert q["samples"] == 3 and q["emulated"] is True and q["emulator_s"] > 0
    assert set(q["vs_host"]) == {"identical_samples", "max_abs_diff", "top1_agreement",
                                 "sqnr_db"}
    assert q["fp32_accuracy"] == rows["ort/minmax"]["by_isa"][host]["fp32_accuracy"]
    if host == "x86-vnni":  # exact here, saturating under AVX2: the benchmark must see it
        assert q["vs_host"]["identical_samples"] < 1.0 and q["vs_host"]["max_abs_diff"] > 0
        assert q["sqnr_db"] < rows["ort/minmax"]["by_isa"][host]["sqnr_db"]
    elif host == "x86-avx2":  # the same kernels natively and emulated
        assert q["vs_host"]["identical_samples"] == 1.0

    results = {"models": {"tiny": {"rows": rows, "isa": section, "latency": {
        k: {"median_ms": 1.0, "p90_ms": 1.2} for k in paths}}}}
    table = bench.table(results).splitlines()
    assert len(table) == 2 + 4  # head, rule, 2 files x 2 ISAs
    native = [r for r in table if f"| {host} |" in r]
    emulated = [r for r in table if "| x86-avx2 |" in r]
    assert len(native) == 2 and all("| 1.000 | 1.200 | 1.00 |" in r for r in native)
    assert len(emulated) == 2 and all("| n/a | n/a | n/a |" in r for r in emulated)


def test_table_simulation_row_and_old_results() -> None:
    bench = load_tool("bench_ort")
    report = {"quality": {"simulation": {"samples": 1000, "accuracy": 92.1234, "agreement": 0.99,
                                         "sqnr_db": 33.3333, "kl": 1e-4},
                          "runtime_vs_simulation_sqnr_db": 41.0, "eval_data": "fashion-mnist"}}
    sim = bench._simulation(report)
    assert sim["samples"] == 1000 and sim["accuracy"] == 92.123 and sim["sqnr_db"] == 33.33
    assert sim["runtime_vs_simulation_sqnr_db"] == 41.0
    assert bench._simulation({"quality": {}}) is None
    sim["fp32_accuracy"], sim["accuracy_drop"] = 92.5, 0.377
    by = {"samples": 10, "accuracy": 90.0, "fp32_accuracy": 91.0, "accuracy_drop": 1.0,
          "agreement": 0.9, "sqnr_db": 30.0}
    new = {"rows": {"fp32": {"tool": "fp32", "by_isa": {"x86-vnni": {**by, "sqnr_db": None}}},
                    "quantflow": {"tool": "quantflow", "calibrator": "mse", "simulation": sim,
                                  "by_isa": {"x86-vnni": by}}},
           "isa": {"host": "x86-vnni", "isas": ["x86-vnni"]}, "latency": {}}
    rows = bench.table({"models": {"m": new}}).splitlines()[2:]
    assert [r.split(" | ")[3] for r in rows] == ["x86-vnni", "x86-vnni", "torch sim"]
    assert "| 1000 | 92.50 | 92.12 | 0.38 | 0.990 | 33.3 |" in rows[2]
    # a result written before the ISA level: its native numbers are the host row
    old = {"rows": {"fp32": {"tool": "fp32", "accuracy": 91.0, "agreement": 1.0},
                    "ort/minmax": {"tool": "onnxruntime", "calibrator": "minmax",
                                   "accuracy": 90.5, "accuracy_drop": 0.5, "agreement": 0.99,
                                   "sqnr_db": 30.0}},
           "eval": {"samples": 10000}, "latency": {"fp32": {"median_ms": 2.0, "p90_ms": 2.0},
                                                   "ort/minmax": {"median_ms": 1.0,
                                                                  "p90_ms": 1.0}}}
    rows = bench.table({"models": {"m": old}}).splitlines()[2:]
    assert len(rows) == 2 and "| host | 10000 | 91.00 | 90.50 | 0.50 | 0.990 | 30.0 |" in rows[1]
    assert "| 0.50 |" in rows[1].split("| 30.0 |")[1]  # × FP32


@pytest.mark.slow
def test_quick_run(tmp_path: Path) -> None:
    out = tmp_path / "ort.json"
    cmd = [sys.executable, str(ROOT / "tools" / "bench_ort.py"), "--quick", "--random-weights",
           "--models", "resnet_fmnist", "--calib-limit", "8", "--eval-limit", "8",
           "--out", str(out)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| resnet_fmnist | quantflow |" in proc.stdout
    assert out.with_suffix(".md").read_text().startswith("| model | tool |")

    res = json.loads(out.read_text())["models"]["resnet_fmnist"]
    rows = res["rows"]
    assert set(rows) == {"fp32", "quantflow", "ort/minmax", "ort/entropy"}
    assert rows["fp32"]["agreement"] == 1.0 and rows["fp32"]["sqnr_db"] is None
    for key in ("quantflow", "ort/minmax", "ort/entropy"):
        assert "error" not in rows[key], rows[key]
        assert rows[key]["size_bytes"] < rows["fp32"]["size_bytes"]
        assert 0.0 <= rows[key]["agreement"] <= 1.0
        # a quantized net that computes in float somewhere is a lowering bug, not a tool choice
        assert rows[key]["ort_graph"]["float_compute_ops"] == 0, rows[key]["ort_graph"]
    assert res["eval"]["samples"] == 8 and res["calib"]["samples"] == 8
    # default --isa: the host only, its entry the native numbers
    assert res["isa"]["isas"] == [res["isa"]["host"]]
    for r in rows.values():
        assert r["by_isa"][res["isa"]["host"]]["agreement"] == r["agreement"]
    assert rows["quantflow"]["simulation"]["samples"] == 8
    assert set(res["latency"]) == set(rows)
    assert all(lat["median_ms"] > 0 and lat["threads"] == 1 for lat in res["latency"].values())
    assert len(res["latency"]["fp32"]["loadavg_per_round"]) == 1
    same = res["ort_entropy_vs_minmax"]["entropy"]
    assert same["tensors"] > 0 and same["identical"] == same["tensors"]
