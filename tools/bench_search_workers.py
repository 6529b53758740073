"""Wall time of the `--bits mixed` search with 1 and N local workers (issue 17), through the real
CLI, each compile a fresh process with its own empty cache (no evaluation reused from another
run), and the proof that the worker count does not change the result: the same plan and the
same trials (candidate, quality) in the same order.

What parallelizes: candidate evaluations (quantize + simulate on the calibration data), in
rounds of `LoopOptions.round_size` picks. What does not: calibration, Hessian traces, the
latency table, lowering/profiling, so the search's own seconds (search.json) are quoted next to
the whole compile's. `--workers 1` runs in-process with torch's default threads (all cores);
N workers run one torch thread each.

The measured per-layer latency table is the one input that is not reproducible (timings), so
a first, untimed compile measures it and every timed run starts from a copy of it (as reruns
on one machine share it through the cache); the search database is empty in every run.

Usage: .venv/bin/python tools/bench_search_workers.py [--model mobilenet_v2_imagenet]
       [--workers 1 2] [--out bench_results/search_workers]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from quantflow.hostcpu import host_cpu


def compile_once(model: str, workers: int, out: Path, extra: list[str],
                 name: str | None = None) -> dict[str, Any]:
    run = out / (name or f"workers{workers}")
    cmd = [sys.executable, "-m", "quantflow", "compile", f"zoo:{model}", "--target", "ort",
           "--bits", "mixed", "--workers", str(workers), "-q", "-o", str(run), *extra]
    cache = out.resolve() / f"cache_{run.name}"
    table = out.resolve() / "cache_table" / "quantflow" / "latency"
    if name is None and table.is_dir():  # the latency table the untimed first run measured
        shutil.copytree(table, cache / "quantflow" / "latency", dirs_exist_ok=True)
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 10, 11):  # a gate verdict is still a finished compile
        raise SystemExit(f"workers={workers}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    search = json.loads((run / "search.json").read_text())
    return {"workers": workers, "exit": proc.returncode, "compile_s": round(wall, 1),
            "search_s": search["seconds"], "evaluations": search["real_evaluations"],
            "plan": json.loads((run / "plan.json").read_text()),
            "trials": [(t["key"], t["quality"]) for t in search["trials"]],
            "best": search["best"]["config"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mobilenet_v2_imagenet")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default="bench_results/search_workers")
    ap.add_argument("extra", nargs="*", help="more compile options (after --)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    compile_once(args.model, 1, out, args.extra, name="table")  # measures the latency table
    runs = [compile_once(args.model, n, out, args.extra) for n in args.workers]
    base = runs[0]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    cpu = host_cpu()
    result = {"model": args.model, "commit": commit, "cpu": cpu.model, "cores": cpu.cores,
              "isa_class": cpu.isa_class, "python": platform.python_version(),
              "same_plan": all(r["plan"] == base["plan"] for r in runs),
              "same_trials": all(r["trials"] == base["trials"] for r in runs),
              "runs": [{k: v for k, v in r.items() if k not in ("plan", "trials")}
                       for r in runs]}
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [(f"`{args.model}` `--bits mixed`, commit {commit}, {cpu.model} ({cpu.cores} "
             f"logical cores, {cpu.isa_class})"), "",
             "| workers | search s | speed-up | compile s | evaluations | best |",
             "|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['workers']} | {r['search_s']:.1f} | "
                     f"{base['search_s'] / r['search_s']:.2f}x | {r['compile_s']:.1f} | "
                     f"{r['evaluations']} | {r['best']} |")
    lines += ["", (f"same plan: {result['same_plan']}; same trials (candidate, quality, "
              f"order): {result['same_trials']}")]
    (out / "result.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if result["same_plan"] and result["same_trials"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
