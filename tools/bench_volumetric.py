"""A (2+1)-D conv net INT8 on ONNX Runtime: quantflow beside ORT's quantizer and NNCF, same run.

The model is the zoo's `r2plus1d_fmnist` (tools/train_volumetric.py: a (2+1)-D ResNet with six
Conv3d, trained on Fashion-MNIST clips of 8 drifting frames). Evaluation: 1000 held-out test
clips (`fmnist-clips`); calibration: 256 clips of `fmnist-clips-calib` for every row. For each
row: accuracy and its drop from FP32, top-1 agreement with FP32, median latency of one clip
(batch 1, 2 threads) and its ratio to FP32, and how many convs run as QLinearConv in the
optimized ORT graph. Rows: FP32 (the plain deploy graph; the peers quantize it), quantflow
(`quantflow compile zoo:r2plus1d_fmnist`), ORT quantize_static (QDQ, per-channel, MinMax),
NNCF (peers' venv, tools/setup_bench_peers.sh).

    python tools/bench_volumetric.py --out bench_results/volumetric_r2plus1d.json
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def qlinear_convs(path: Path) -> int:
    """Convs ORT runs as QLinearConv after its graph optimizations (the saved optimized model)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return sum(n.op_type == "QLinearConv"
                   for n in onnx.load(str(Path(tmp) / "opt.onnx")).graph.node)


def main() -> None:
    import bench_peers as bp  # tools/ is on sys.path
    import torch
    from bench_ort import export_plain_fp32

    from quantflow.data import builtin_dataset
    from quantflow.zoo import get_model

    args = bp.bench_args(__doc__, "volumetric_r2plus1d", 200).parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cal, _ = builtin_dataset("fmnist-clips-calib")
    x, y = builtin_dataset("fmnist-clips")
    assert y is not None
    cal_np, xs, labels = cal[:256].numpy(), x[:1000].numpy(), y[:1000].numpy()
    fp32 = work / "plain_fp32.onnx"
    export_plain_fp32(get_model("r2plus1d_fmnist"), torch.from_numpy(xs[:1]), fp32)
    rows: dict[str, dict[str, Any]] = {
        "fp32": {"path": fp32},
        "quantflow": bp.quantflow_row(["compile", "zoo:r2plus1d_fmnist"], work / "quantflow"),
        **bp.peer_rows(fp32, cal_np, work, args.nncf_python, transformer=False)}
    ref = bp.outputs(fp32, xs).argmax(1)
    acc0: list[float] = []

    def quality(row: dict[str, Any]) -> dict[str, Any]:
        pred = bp.outputs(row["path"], xs).argmax(1)
        acc = round(100.0 * float((pred == labels).mean()), 2)
        acc0.append(acc)  # the first row scored is FP32
        return {"accuracy": acc, "drop_pt": round(acc0[0] - acc, 2),
                "agreement": round(float((pred == ref).mean()), 4),
                "qlinear_convs": qlinear_convs(row["path"])}

    bp.score_rows(rows, xs, args.runs, quality)
    bp.write_result(Path(args.out), f"r2plus1d_fmnist INT8 on onnxruntime, {len(xs)} test clips",
                 {"model": "r2plus1d_fmnist ((2+1)-D ResNet, 6 Conv3d)", "clips": len(xs)},
                 rows, [("accuracy %", "accuracy"),
                        ("drop (pt)", "drop_pt"),
                        ("agreement", "agreement"),
                        ("QLinearConv", "qlinear_convs")])


if __name__ == "__main__":
    main()
