"""ONNX Runtime vs TVM (no records, shipped records, tuned from them) on the same quantized graph.

Per model, one FP32 deploy-form graph (captured, quantflow's default passes, no CLE) and one
INT8 torch simulation of it (uint8 asymmetric activations, int8 per-channel weights, ORT
placement, one calibrator: `--calibrator`, default percentile) are lowered eight ways:

  ort/fp32, ort/int8          targets/ort.py (QDQ ONNX, ORT_ENABLE_ALL, CPU EP)
  tvm/fp32-bare, int8-bare    targets/tvm.py with no tuning records at all: TVM's default
                              loops (elementwise kernels: quantflow's default schedule)
  tvm/fp32, tvm/int8          the default: no tuning, the records shipped for this CPU's ISA
                              class (targets/tvm_records/<class>/, tools/build_tvm_records.py)
  tvm/fp32-tuned, int8-tuned  `--tune-time` of MetaSchedule on this machine, starting from the
                              shipped records (transfer tuning); cache under `--work`/tvm_cache
                              (a rerun reuses it and reports the tuning time of the run that
                              filled it)
INT8 convs use the VNNI layout on AVX512-VNNI hosts (TVMTarget.use_vnni).

Numerics, on `--eval-limit` evaluation images, one at a time (the artifacts are batch 1):
max |Δ| of the logits against the torch reference (FP32 model for fp32 artifacts, the INT8
simulation for int8 ones), top-1 agreement with that reference, and accuracy.

Latency: batch 1, every artifact at every thread count in `--threads`, in interleaved rounds
(A B C ... A B C ...), so a load spike on the shared machine hits all alike; reported median
and p90 are the medians over rounds of each round's median / p90 (`--runs` timed runs after
`--warmup`), with `os.getloadavg()` stored per round. Per-kernel times of the TVM artifacts
(1 thread, named after fx layers) and the count of AVX512-VNNI `vpdpbusd` instructions in each
TVM library (objdump) go to the JSON. The markdown ends with the issue-18 checks: TVM INT8
(shipped records, and tuned) over ORT INT8, and TVM INT8 over TVM FP32 of the same kind.

Usage:
  nice -n 5 .venv/bin/python tools/bench_targets.py --models resnet_fmnist \
      mobilenet_v2_imagenet --tune-time 15m
  .venv/bin/python tools/bench_targets.py --quick   # smoke run: 20 s tuning, few samples
Writes bench_results/tvm_records.json and .md (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parent.parent
ROWS = ("ort/fp32", "ort/int8", "tvm/fp32-bare", "tvm/int8-bare", "tvm/fp32", "tvm/int8",
        "tvm/fp32-tuned", "tvm/int8-tuned")


def prepare(name: str, calibrator: str, calib_limit: int, eval_limit: int) -> dict[str, Any]:
    """Deploy-form FP32 graph, its INT8 simulation, data, example input."""
    from quantflow.config import CompileConfig
    from quantflow.data import builtin_dataset
    from quantflow.dataset import Dataset
    from quantflow.ir import capture
    from quantflow.passes import DEFAULT_PIPELINE, run_pipeline
    from quantflow.plan import choose_uniform
    from quantflow.quantize import quantize
    from quantflow.zoo import MODELS, get_model

    entry = MODELS[name]
    calib_set, eval_set = {"fashion-mnist": ("fashion-mnist-calib", "fashion-mnist"),
                           "sentences": ("sentences-calib", "sentences")}.get(
        entry.dataset, ("natural-images-calib", "natural-images"))
    x_cal, _ = builtin_dataset(calib_set)
    x_ev, y_ev = builtin_dataset(eval_set)
    x_cal, x_ev = x_cal[:calib_limit], x_ev[:eval_limit]
    y_ev = None if y_ev is None else y_ev[:eval_limit]
    example = (x_ev[:1].clone(),)
    gm = capture(get_model(name).eval(), example)
    run_pipeline(gm, DEFAULT_PIPELINE)
    config = CompileConfig(calibrator=calibrator, equalize="off")
    planned = choose_uniform(gm, Dataset(x_cal, None, calib_set), config)
    gm, plan, stats, scores = planned.gm, planned.plan, planned.stats, planned.candidates
    qgm = quantize(gm, plan, stats, config.placement)
    return {"gm": gm, "qgm": qgm, "example": example, "x": x_ev, "y": y_ev,
            "calib": {"set": calib_set, "samples": int(x_cal.shape[0]), "calibrator": calibrator,
                      "sqnr_db": scores}, "eval": {"set": eval_set, "samples": int(x_ev.shape[0])}}


def lower_all(m: dict[str, Any], work: Path, seconds: float, rows: list[str],
              mcpu: str | None = None) -> dict[str, tuple[Any, Any, dict]]:
    """row -> (target, artifact, lowering info)."""
    from quantflow.targets import get_target

    ort = get_target("ort")
    tvm = {"bare": get_target("tvm", shipped_records=False, cache_dir=work / "no_cache",
                              mcpu=mcpu),
           "": get_target("tvm", cache_dir=work / "no_cache", mcpu=mcpu),
           "tuned": get_target("tvm", tune_seconds=seconds, cache_dir=work / "tvm_cache",
                               mcpu=mcpu)}
    out: dict[str, tuple[Any, Any, dict]] = {}
    for row in rows:
        backend, kind = row.split("/")
        precision, _, mode = kind.partition("-")
        target = ort if backend == "ort" else tvm[mode]
        graph = m["gm"] if precision == "fp32" else m["qgm"]
        t0 = time.perf_counter()
        art = target.lower(graph, m["example"], work / row.replace("/", "_"), precision=precision)
        info: dict[str, Any] = {"lower_s": round(time.perf_counter() - t0, 2),
                                "size_bytes": art.size_bytes()}
        if "tuning" in art.meta:
            tuning = dict(art.meta["tuning"])
            spent = Path(tuning["work_dir"]) / f"bench_tuning_{precision}.json"
            if tuning["cache_hit"] and spent.exists():  # report what the tuning cost
                tuning["tuned_in_earlier_run_s"] = json.loads(spent.read_text())["tuning_s"]
            elif not tuning["cache_hit"]:
                spent.write_text(json.dumps({"tuning_s": tuning["tuning_s"]}) + "\n")
            info["tuning"] = tuning
            info["compile_time_latency"] = {"untuned": art.meta.get("untuned_latency"),
                                            "tuned": art.meta.get("tuned_latency")}
        if backend == "tvm":
            info["vpdpbusd"] = count_instruction(Path(art.files["model"]), "vpdpbusd")
            info["int_layers"] = len(art.meta.get("int_layers", []))
            info["vnni_layers"] = len(art.meta.get("vnni_layers", []))
            info["records"] = art.meta.get("records")
            info["int8_path"] = art.meta.get("int8_path")
            info["target"] = art.meta.get("target_string")
        # one runtime object per backend for run/profile (TVM caches VMs per library)
        out[row] = (ort if backend == "ort" else tvm["bare"], art, info)
        print(f"  lowered {row:16s} {info['lower_s']:8.1f} s", flush=True)
    return out


def count_instruction(lib: Path, mnemonic: str) -> int | None:
    """How often `mnemonic` occurs in the disassembly of `lib` (None without objdump)."""
    if shutil.which("objdump") is None:
        return None
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(lib)], check=True,
                         capture_output=True, text=True).stdout
    return sum(1 for line in asm.splitlines() if f"\t{mnemonic} " in line or
               line.rstrip().endswith(f"\t{mnemonic}"))


def numerics(m: dict[str, Any], arts: dict[str, tuple[Any, Any, dict]]) -> dict[str, Any]:
    import torch

    from quantflow import evaluate as ev

    with torch.no_grad():
        refs = {"fp32": ev.predict(m["gm"], m["x"]), "int8": ev.predict(m["qgm"], m["x"])}
    out: dict[str, Any] = {"torch/fp32": _quality(refs["fp32"], refs["fp32"], m["y"]),
                           "torch/int8-sim": _quality(refs["int8"], refs["fp32"], m["y"])}
    for row, (target, art, _info) in arts.items():
        got = ev.predict_runtime(functools.partial(target.run, art), m["x"], 1)
        out[row] = _quality(got, refs[art.precision], m["y"])
    return out


def _quality(got: Any, ref: Any, labels: Any | None) -> dict[str, Any]:
    from quantflow import evaluate as ev

    q = ev.quality(got, labels, ref)
    return {"max_abs_diff_vs_ref": float(f"{float((got - ref).abs().max()):.3g}"),
            "ref_max_abs": float(f"{float(ref.abs().max()):.3g}"),
            "agreement_vs_ref": round(float(q.agreement or 0.0), 4),
            "accuracy": None if q.accuracy is None else round(q.accuracy, 3)}


def latency(m: dict[str, Any], arts: dict[str, tuple[Any, Any, dict]], threads: list[int],
            rounds: int, runs: int, warmup: int) -> dict[str, Any]:
    x0 = [t.numpy() for t in m["example"]]
    per: dict[str, dict[int, list[tuple[float, float]]]] = {r: {t: [] for t in threads}
                                                            for r in arts}
    loads: list[float] = []
    for _ in range(rounds):
        loads.append(round(os.getloadavg()[0], 2))
        for n in threads:
            for row, (target, art, _info) in arts.items():
                lat = target.profile(art, x0, warmup=warmup, runs=runs, threads=n)
                per[row][n].append((lat.median_ms, lat.p90_ms))
    out: dict[str, Any] = {"loadavg_per_round": loads, "rows": {}}
    for row, by_t in per.items():
        out["rows"][row] = {str(n): {"median_ms": round(statistics.median(v[0] for v in s), 4),
                                     "p90_ms": round(statistics.median(v[1] for v in s), 4)}
                            for n, s in by_t.items()}
    tvm_rows = {r: v for r, v in arts.items() if r.startswith("tvm")}
    out["tvm_per_layer_1thread_ms"] = {
        row: {k: round(v, 4) for k, v in sorted(
            (target.profile(art, x0, warmup=warmup, runs=max(5, runs // 2), threads=1,
                            per_layer=True).per_layer_ms or {}).items(), key=lambda kv: -kv[1])}
        for row, (target, art, _i) in tvm_rows.items()}
    return out


def markdown(results: dict[str, Any]) -> str:
    threads = results["config"]["threads"]
    lines = [(f"Batch 1; latency median / p90 in ms (medians over "
              f"{results['config']['rounds']} interleaved rounds); max |Δ| of the logits vs the "
              f"torch reference (FP32 model for fp32 rows, the INT8 simulation for int8 rows); "
              f"tuned = `--tune-time {results['config']['tune_time']}` from the shipped "
              f"records. {results['device']}; TVM rows for ISA class {results.get('isa')}"
              f"{' (-mcpu ' + results['config']['mcpu'] + ', ORT rows on the host)' if results['config'].get('mcpu') else ''}"
              f"; commit {results.get('commit', '?')}."), ""]
    head = "| model | artifact | " + " | ".join(f"{n} thread{'s' if n > 1 else ''}"
                                                for n in threads)
    head += " | max abs diff vs ref | agreement | accuracy | tuning | schedules | vpdpbusd |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results["models"].items():
        for row in ROWS:
            if row not in r["latency"]["rows"]:
                continue
            lat = r["latency"]["rows"][row]
            cells = [f"{lat[str(n)]['median_ms']:.3f} / {lat[str(n)]['p90_ms']:.3f}"
                     for n in threads]
            q = r["numerics"][row]
            info = r["lowering"][row]
            tuning = info.get("tuning", {})
            tune_s = tuning.get("tuned_in_earlier_run_s", tuning.get("tuning_s"))
            tune = f"{tune_s:.0f} s, {tuning.get('tasks')} workloads" if tune_s else ""
            rec = info.get("records") or {}
            sched = " ".join(f"{n} {src}" for src, n in (rec.get("records") or {}).items())
            sched += f" {rec['no_record']} none" if rec.get("no_record") else ""
            acc = "" if q["accuracy"] is None else f"{q['accuracy']:.2f} %"
            vnni = "" if info.get("vpdpbusd") is None else str(info["vpdpbusd"])
            lines.append(f"| {name} | {row} | " + " | ".join(cells) +
                         f" | {q['max_abs_diff_vs_ref']:.3g} | {q['agreement_vs_ref']:.4f} | "
                         f"{acc} | {tune} | {sched.strip()} | {vnni} |")
        loads = r["latency"]["loadavg_per_round"]
        lines.append(f"| {name} | load average during timing | {min(loads):.2f}–{max(loads):.2f}"
                     + " |" * (len(threads) + 6))
    lines += ["", "Checks (1 thread; issue 18's targets):", ""]
    for name, r in results["models"].items():
        ms = {row: v["1"]["median_ms"] for row, v in r["latency"]["rows"].items() if "1" in v}
        for tvm_row, fp32_row, bound in (("tvm/int8", "tvm/fp32", 2.0),
                                         ("tvm/int8-tuned", "tvm/fp32-tuned", 1.2)):
            if {tvm_row, fp32_row, "ort/int8"} <= set(ms):
                ratio = ms[tvm_row] / ms["ort/int8"]
                lines.append(
                    f"- {name}: {tvm_row} / ort/int8 = {ratio:.2f}x (target <= {bound}x: "
                    f"{'met' if ratio <= bound else 'NOT met'}); {tvm_row} / {fp32_row} = "
                    f"{ms[tvm_row] / ms[fp32_row]:.2f}x (target < 1: "
                    f"{'met' if ms[tvm_row] < ms[fp32_row] else 'NOT met'})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--models", nargs="+", default=["resnet_fmnist"])
    p.add_argument("--tune-time", default="15m", help="MetaSchedule budget per model and "
                   "precision for the -tuned rows (e.g. 15m, 300s)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--calibrator", default="percentile")
    p.add_argument("--calib-limit", type=int, default=256)
    p.add_argument("--eval-limit", type=int, default=500)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--work", type=Path, default=ROOT / "bench_results" / "targets_work")
    p.add_argument("--out", type=Path, default=ROOT / "bench_results" / "tvm_records.json")
    p.add_argument("--quick", action="store_true", help="smoke run: 20 s tuning, tiny sizes")
    p.add_argument("--no-tune", action="store_true", help="skip the -tuned rows")
    p.add_argument("--mcpu", help="TVM rows for this LLVM CPU instead of the host's (e.g. "
                   "haswell: the AVX2 path, run here); the ORT rows stay on the host's kernels")
    args = p.parse_args(argv)
    if args.quick:
        args.tune_time, args.calib_limit, args.eval_limit = "20s", 32, 16
        args.rounds, args.runs, args.warmup = 1, 5, 2
    from quantflow.cli import _duration
    from quantflow.targets.base import device_description

    seconds = _duration(args.tune_time)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            check=False, capture_output=True, text=True).stdout.strip()

    results: dict[str, Any] = {
        "device": device_description(), "python": platform.python_version(),
        "commit": commit, "isa": _isa(args.mcpu),
        "date": time.strftime("%Y-%m-%d %H:%M"), "config": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "models": {}}
    for name in args.models:
        print(f"{name}: preparing", flush=True)
        m = prepare(name, args.calibrator, args.calib_limit, args.eval_limit)
        rows = [r for r in ROWS if not (args.no_tune and r.endswith("tuned"))]
        arts = lower_all(m, args.work / (name + (f"_{args.mcpu}" if args.mcpu else "")),
                         seconds, rows, args.mcpu)
        print(f"{name}: numerics", flush=True)
        num = numerics(m, arts)
        print(f"{name}: latency", flush=True)
        lat = latency(m, arts, args.threads, args.rounds, args.runs, args.warmup)
        results["models"][name] = {"calib": m["calib"], "eval": m["eval"], "numerics": num,
                                   "latency": lat,
                                   "lowering": {r: v[2] for r, v in arts.items()}}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")  # partial results survive
    md = markdown(results)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


def _isa(mcpu: str | None) -> str:
    from quantflow.targets.tvm import host_target
    from quantflow.targets.tvm_records import isa_class

    return isa_class(host_target(mcpu=mcpu))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
