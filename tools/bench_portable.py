"""What portability costs and what it saves: `--device portable` vs `--device x86-vnni` artifacts
of the same model, evaluated on every CPU class (issue: correct INT8 on every CPU).

For each model, `pipeline.compile` runs twice with the same calibration data and options,
once per device. Both quantized artifacts are then evaluated on the same evaluation samples:
natively (this host's class) and under emulation (`targets/emulate.py`: x86 AVX2 by
`qemu-x86_64 -cpu Haswell`, arm64 by `qemu-aarch64`), against the FP32 ONNX output computed
natively. Rows: accuracy (with labels) or top-1 agreement, output SQNR vs FP32, agreement with
the same artifact's output on this host (whose kernels are exact when it is VNNI-class: the
compile's parity gate checked it against the torch simulation, `report.quality.
runtime_vs_simulation_sqnr_db`), and the host latency ratio INT8/FP32 (timing is only
meaningful natively). The portable row also carries the compile report's own fidelity cost
(simulation SQNR with and without the pair limit, on calibration data) and the number of
layers changed.

  .venv/bin/python tools/bench_portable.py --models resnet_fmnist mobilenetv2_fmnist \\
      mobilenet_v2_imagenet --isa x86-avx2 arm64 --out bench_results/portable.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEVICES = ("portable", "x86-vnni")


def _data(dataset: str, eval_limit: int | None) -> tuple[Any, Any, Any, str]:
    from quantflow.data import builtin_dataset
    from quantflow.pipeline import Dataset

    names = ("fashion-mnist-calib", "fashion-mnist") if dataset == "fashion-mnist" \
        else ("natural-images-calib", "natural-images")
    xc, yc = builtin_dataset(names[0])
    xe, ye = builtin_dataset(names[1])
    xe, ye = xe[:eval_limit], None if ye is None else ye[:eval_limit]
    return Dataset(xc, yc, names[0]), Dataset(xe, ye, names[1]), xe, names[1]


def _quality(logits: Any, ref: Any, host: Any, labels: Any | None) -> dict[str, Any]:
    from quantflow import evaluate as ev

    h = host[:logits.shape[0]]
    out: dict[str, Any] = {
        "agreement": round(float((logits.argmax(1) == ref.argmax(1)).double().mean()), 4),
        "sqnr_db": round(ev.sqnr_db(ref, logits), 2),
        "vs_host_sqnr_db": round(ev.sqnr_db(h, logits), 2),
        "vs_host_agreement": round(float((logits.argmax(1) == h.argmax(1)).double().mean()), 4)}
    if labels is not None:
        out["accuracy"] = round(100 * float((logits.argmax(1) == labels).double().mean()), 2)
    return out


def _emulated(path: Path, input_name: str, output_name: str, x: Any, isa: str) -> Any:
    import torch

    from quantflow.targets import emulate

    feeds = [{input_name: x[i:i + 1].numpy()} for i in range(x.shape[0])]
    outs = emulate.run_onnx(path, feeds, isa, outputs=[output_name], timeout=7200)
    return torch.cat([torch.from_numpy(o[output_name]) for o in outs])


def bench_model(name: str, isas: list[str], eval_limit: int | None, isa_limit: int,
                work: Path) -> list[dict[str, Any]]:
    from quantflow import evaluate as ev
    from quantflow.hostcpu import host_cpu
    from quantflow.pipeline import CompileConfig, compile
    from quantflow.targets import get_target
    from quantflow.zoo import MODELS, get_model

    entry = MODELS[name]
    calib, evaluation, xe, _ = _data(entry.dataset, eval_limit)
    model = get_model(name)
    example = (calib.x[:1],)
    rows = []
    target = get_target("ort", threads=1)
    for device in DEVICES:
        out = work / name / device
        t0 = time.perf_counter()
        report = compile(model, example, calib, evaluation, out,
                         CompileConfig(device=device, profile_runs=30), name=name)
        seconds = time.perf_counter() - t0
        art_f = _artifact(out / "model_fp32.onnx")
        art_q = _artifact(out / "model.onnx")
        ref = ev.predict_runtime(lambda xs, a=art_f: target.run(a, xs), xe, 1)  # type: ignore
        host = ev.predict_runtime(lambda xs, a=art_q: target.run(a, xs), xe, 1)  # type: ignore
        lat = report.data.get("latency", {})
        base = {"model": name, "device": device, "compile_s": round(seconds, 1),
                "latency_ratio": round(lat["quantized"]["median_ms"] / lat["fp32"]["median_ms"],
                                       3) if "quantized" in lat else None,
                "layers_changed": len(report.data["portability"]["layers"]),
                "compile_fidelity_cost": report.data["portability"].get("simulation_sqnr_db"),
                "runtime_vs_simulation_sqnr_db":
                    report.data["quality"]["runtime_vs_simulation_sqnr_db"]}
        rows.append({**base, "isa": host_cpu().isa_class, "samples": int(xe.shape[0]),
                     **_quality(host, ref, host, evaluation.y)})
        xs = xe[:isa_limit]
        for isa in isas:
            got = _emulated(out / "model.onnx", art_q.input_names[0], art_q.output_names[0],
                            xs, isa)
            rows.append({**base, "isa": isa, "samples": int(xs.shape[0]), "latency_ratio": None,
                         **_quality(got, ref[:xs.shape[0]], host,
                                    None if evaluation.y is None else evaluation.y[:xs.shape[0]])})
        print(json.dumps(rows[-1 - len(isas):]), flush=True)
    return rows


def _artifact(path: Path) -> Any:
    import onnx

    from quantflow.targets.base import Artifact

    m = onnx.load(str(path), load_external_data=False)
    return Artifact("ort", "int8", {"model": str(path)}, tuple(i.name for i in m.graph.input),
                    tuple(o.name for o in m.graph.output))


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| model | device | CPU class | samples | accuracy | agreement | SQNR vs FP32 | "
            "agreement with host run | INT8/FP32 latency (host) | layers changed |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    lines = [f"| {r['model']} | {r['device']} | {r['isa']} | {r['samples']} | "
             f"{r.get('accuracy', '-')} | {r['agreement']} | {r['sqnr_db']} dB | "
             f"{r['vs_host_agreement']} ({r['vs_host_sqnr_db']} dB) | "
             f"{r['latency_ratio'] if r['latency_ratio'] is not None else 'n/a (emulated)'} | "
             f"{r['layers_changed']} |" for r in rows]
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet_fmnist", "mobilenetv2_fmnist",
                                                   "mobilenet_v2_imagenet"])
    p.add_argument("--isa", nargs="*", default=["x86-avx2", "arm64"])
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--isa-limit", type=int, default=2000,
                   help="evaluation samples run under emulation (~30x slower)")
    p.add_argument("--out", default="bench_results/portable.json")
    args = p.parse_args(argv)
    out = Path(args.out)
    work = out.with_name(out.stem + "_work")
    rows: list[dict[str, Any]] = []
    for name in args.models:
        rows += bench_model(name, args.isa, args.eval_limit, args.isa_limit, work)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True, check=False).stdout.strip() != ""
    from quantflow.hostcpu import host_cpu
    from quantflow.versions import installed_versions

    doc = {"commit": commit, "dirty": dirty, "host": host_cpu().to_dict(), "versions": installed_versions(),
           "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    out.with_suffix(".md").write_text(table(rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
