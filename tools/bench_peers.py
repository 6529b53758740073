"""What the model benchmarks beside the peers share: the same rows, scored the same way.

Each of tools/bench_transformer.py, bench_crepe.py, bench_vit_onnx.py and bench_volumetric.py
compiles one model with quantflow, quantizes the same FP32 ONNX file with ORT's quantize_static
and NNCF (`peer_rows`), scores every row with its own quality function plus latency and size
(`score_rows`), and writes bench_results/NAME.json and .md with the commit, CPU and ISA
(`write_result`). Latency: median of `runs` single-sample runs after 20 warm-ups, 2 threads.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Row = dict[str, Any]


def outputs(path: Path, x: np.ndarray, threads: int = 2) -> np.ndarray:
    """The first output of `path` for every sample of `x`, run one sample at a time (quantflow's
    artifacts have the fixed batch they were lowered at)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


def latency_ms(path: Path, x: np.ndarray, runs: int, threads: int = 2) -> dict[str, float]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = {s.get_inputs()[0].name: x[:1]}
    for _ in range(20):
        s.run(None, feed)
    t = []
    for _ in range(runs):
        t0 = time.perf_counter()
        s.run(None, feed)
        t.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": round(float(np.median(t)), 3),
            "p90_ms": round(float(np.percentile(t, 90)), 3)}


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


def quantflow_row(args: Sequence[str], out: Path) -> Row:
    """`quantflow compile ARGS -o OUT` through the CLI; the row of its model.onnx."""
    from quantflow.cli import main as qf_main

    t0 = time.perf_counter()
    rc = qf_main([*args, "--profile-runs", "3", "-o", str(out)])
    assert rc == 0, f"quantflow compile exited {rc}"
    return {"path": out / "model.onnx", "quantize_s": round(time.perf_counter() - t0, 1)}


def peer_rows(fp32: Path, cal: np.ndarray, work: Path, nncf_python: str,
              transformer: bool) -> dict[str, Row]:
    """ORT quantize_static (QDQ, per-channel, MinMax) and NNCF on the same FP32 file and
    calibration samples; a row with "error" says why a peer did not run."""
    return {"ort_static_minmax": {"path": work / "ort_static.onnx",
                                  **ort_static(fp32, work / "ort_static.onnx", cal)},
            "nncf": {"path": work / "nncf.onnx",
                     **nncf_quantize(nncf_python, fp32, work / "nncf.onnx", cal, work,
                                     transformer=transformer)}}


def score_rows(rows: dict[str, Row], x: np.ndarray, runs: int,
               quality: Callable[[Row], dict[str, Any]]) -> None:
    """Fill each row with `quality(row)`, latency (and its ratio to the first row) and size."""
    base = None
    for row in rows.values():
        if "error" in row:
            continue
        row.update(quality(row))
        row.update(latency_ms(row["path"], x, runs))
        base = base or row["median_ms"]
        row["latency_vs_fp32"] = round(row["median_ms"] / base, 3)
        row["size_mb"] = round(row["path"].stat().st_size / 1e6, 3)


def bench_args(doc: str | None, name: str, runs: int = 200) -> argparse.ArgumentParser:
    """--out bench_results/NAME.json, --work bench_results/NAME_work, --runs, --nncf-python."""
    ap = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    ap.add_argument("--out", default=f"bench_results/{name}.json")
    ap.add_argument("--work", default=f"bench_results/{name}_work")
    ap.add_argument("--runs", type=int, default=runs)
    ap.add_argument("--nncf-python", default="/tmp/benchvenv/bin/python")
    return ap


#: the columns every table ends with
SPEED_COLUMNS = (("ms (batch 1)", "median_ms"), ("× FP32", "latency_vs_fp32"), ("MB", "size_mb"))


def write_result(out: Path, title: str, meta: dict[str, Any], rows: dict[str, Row],
                 columns: Sequence[tuple[str, str | Callable[[Row], Any]]]) -> None:
    """bench_results JSON (meta + rows + commit/CPU/ISA) and a markdown table (`columns`:
    header and row key or function, then `SPEED_COLUMNS`); prints it."""
    from bench_ort import host_isa

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    result = {**meta, "commit": commit, "cpu": platform.processor() or platform.machine(),
              "isa": host_isa(),
              "rows": {k: {kk: (str(vv) if isinstance(vv, Path) else vv) for kk, vv in v.items()}
                       for k, v in rows.items()}}
    out.write_text(json.dumps(result, indent=2) + "\n")
    columns = [*columns, *SPEED_COLUMNS]
    heads = ["row", *(h for h, _ in columns)]
    lines = [f"{title}, commit {commit}, {result['isa']}", "", "| " + " | ".join(heads) + " |",
             "|" + "---|" * len(heads)]
    for name, r in result["rows"].items():
        if "error" in r:
            cells = [f"skipped: {r['error'][:120]}"] + [""] * (len(columns) - 1)
        else:
            cells = [str(r[f] if isinstance(f, str) else f(r)) for _, f in columns]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "_nncf":
    _nncf_main(*sys.argv[2:6])  # nncf_quantize runs this file in the peers' venv
