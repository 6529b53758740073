"""Build the TVM tuning records quantflow ships for one ISA class (targets/tvm_records/<isa>/).

For every model, the same deploy-form graphs as tools/bench_targets.py (the FP32 graph and
its INT8 simulation) are lowered by the TVM target with a time budget each (`--tune-time`),
all into one tuning cache (`--work`, kept between runs: a rerun adds trials). Then every
model is compiled with the cache's records and with the default schedules only, and each
kernel timed inside the model: a record slower there than the default schedule is left out
(tuning times kernels alone). The best record of every other workload that built and ran is
written to `targets/tvm_records/<isa>/` (a MetaSchedule JSON database, gzipped, indexed by
anchor block: targets/tvm_records.py) with `provenance.json` (models, budget, CPU, commit,
the records left out). A compile for a target of that ISA class
uses these records when it has none of its own, and a tuning starts from them.

ISA classes and where they are measured:
  x86-vnni    this CPU (must have AVX512-VNNI), its own LLVM CPU name
  x86-avx2    this CPU running code built for -mcpu=haswell (AVX2/FMA, no AVX-512), so an
              AVX-512 machine measures AVX2 code; its cache is keyed on that target string
  arm64-dot, arm64  need a board: --rpc-tracker HOST:PORT --rpc-key KEY (docs/tvm_rpc.md)

Usage:
  nice -n 5 .venv/bin/python tools/build_tvm_records.py --isa x86-vnni \\
      --models resnet_fmnist mobilenet_v2_imagenet --tune-time 8m
  nice -n 5 .venv/bin/python tools/build_tvm_records.py --isa x86-avx2 --models resnet_fmnist
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

MCPU = {"x86-vnni": None, "x86-avx2": "haswell"}


def tune_model(name: str, isa: str, seconds: float, work: Path, precisions: list[str],
               rpc: dict[str, str]) -> list[dict[str, Any]]:
    from bench_targets import prepare

    from quantflow.targets import get_target

    m = prepare(name, "percentile", 256, 8)
    device = "aarch64" if isa.startswith("arm64") else "host"
    target = get_target("tvm", device=device, tune_seconds=seconds, cache_dir=work / "cache",
                        mcpu=MCPU.get(isa), shipped_records=False, **rpc)
    got = target.target()
    from quantflow.targets.tvm_records import isa_class

    if isa_class(got) != isa:
        raise SystemExit(f"build_tvm_records: --isa {isa}, but the target is {isa_class(got)} "
                         f"({got}); run it on a machine of that class")
    out = []
    for precision in precisions:
        graph = m["gm"] if precision == "fp32" else m["qgm"]
        art = target.lower(graph, m["example"], work / f"{name}_{precision}", precision=precision)
        tuning = art.meta["tuning"]
        out.append({"model": name, "precision": precision, "tune_time_s": seconds,
                    "tasks": tuning["tasks"],
                    "tuned_tasks": tuning["tuned_tasks"], "trials": tuning.get("trials", 0),
                    "tuning_s": round(tuning["tuning_s"], 1),
                    "records": art.meta["records"]["records"],
                    "latency_ms": {"before": art.meta["untuned_latency"]["median_ms"],
                                   "after": art.meta["tuned_latency"]["median_ms"]}})
        print(f"  {name}/{precision}: {out[-1]}", flush=True)
    return out


def losing_anchors(name: str, isa: str, cache: Path, precisions: list[str]) -> dict[str, Any]:
    """Workloads whose record ran slower inside the model than the default schedule (tuning
    times each kernel alone), per model and precision: {"model/precision": {kernel: anchor}}.
    The model compiled twice, with the records of `cache` and with default schedules only;
    every kernel timed in the model (tvm_profile.slower_kernels)."""
    import tvm
    from bench_targets import prepare

    from quantflow.targets import get_target, tvm_records, tvm_tune
    from quantflow.targets.tvm_anchor import anchor_key
    from quantflow.targets.tvm_frontend import to_relax
    from quantflow.targets.tvm_profile import slower_kernels

    m = prepare(name, "percentile", 256, 8)
    target = get_target("tvm", mcpu=MCPU.get(isa), shipped_records=False)
    llvm = target.target()
    path = target.dot_path(llvm)
    records = tvm_records.load(cache) or {}
    inputs = [t.numpy() for t in m["example"]]
    out: dict[str, Any] = {}
    for precision in precisions:
        graph = m["gm"] if precision == "fp32" else m["qgm"]
        mod, _stats = to_relax(graph, m["example"], dot=path)
        mod = tvm_tune.prepare(mod, llvm)
        plain, _ = tvm_records.apply(mod, llvm, [], path)
        tuned, _ = tvm_records.apply(mod, llvm, [("cache", records)], path)
        slower = slower_kernels(tvm.compile(plain, llvm), tvm.compile(tuned, llvm), inputs)
        anchors = {str(gv.name_hint): anchor_key(f) for gv, f in mod.functions_items()}
        out[f"{name}/{precision}"] = {k: a for k, a in anchors.items()
                                      if k in slower and a is not None}
        print(f"  {name}/{precision}: {len(out[f'{name}/{precision}'])} records slower in the "
              "model than the default schedule (left out)", flush=True)
    return out


def write_pruned(cache: Path, dest: Path, leave_out: set[str]) -> int:
    """The best record per workload (anchor) of `cache` that built and ran, except the
    anchors in `leave_out`, as a JSON database in `dest` (replaced whole: written next to
    it, then renamed)."""
    import tvm.s_tir.meta_schedule as ms

    from quantflow.targets.tvm_records import EQUALITY, RECORDS, WORKLOADS, load

    best = load(cache)
    if best is None:
        raise SystemExit(f"build_tvm_records: no tuning records in {cache}")
    best = {k: v for k, v in best.items() if k not in leave_out}
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    db = ms.database.JSONDatabase(work_dir=str(tmp), module_equality=EQUALITY)
    for rec in best.values():
        db.commit_tuning_record(ms.database.TuningRecord(
            rec.trace, db.commit_workload(rec.workload.mod), rec.run_secs, rec.target,
            rec.args_info))
    del db
    for name in (WORKLOADS, RECORDS):  # shipped gzipped (tvm_records.unpacked)
        with (tmp / name).open("rb") as src, gzip.open(tmp / f"{name}.gz", "wb", 9) as dst:
            shutil.copyfileobj(src, dst)
        (tmp / name).unlink()
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return len(best)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--isa", required=True,
                   choices=["x86-vnni", "x86-avx2", "arm64-dot", "arm64"])
    p.add_argument("--models", nargs="+", default=["resnet_fmnist", "mobilenet_v2_imagenet"])
    p.add_argument("--precisions", nargs="+", default=["int8", "fp32"])
    p.add_argument("--tune-time", default="8m",
                   help="per model and precision (e.g. 8m, 300s; 0: no tuning, only check "
                        "the records in the cache against the default schedules and write)")
    p.add_argument("--rpc-tracker")
    p.add_argument("--rpc-key")
    p.add_argument("--work", type=Path, default=ROOT / "bench_results" / "tvm_records_work")
    args = p.parse_args(argv)
    from quantflow.cli import _duration
    from quantflow.targets.tvm_records import SHIPPED
    from quantflow.targets.tvm_tune import cache_dir_for

    seconds = _duration(args.tune_time)
    rpc = {"rpc_tracker": args.rpc_tracker, "rpc_key": args.rpc_key} if args.rpc_tracker else {}
    work = args.work / args.isa
    runs = []
    t0 = time.perf_counter()
    for name in args.models if seconds else ():
        runs += tune_model(name, args.isa, seconds, work, args.precisions, rpc)
    from quantflow.targets import get_target

    target = get_target("tvm", device="aarch64" if args.isa.startswith("arm64") else "host",
                        mcpu=MCPU.get(args.isa), **rpc)
    cache = cache_dir_for(target.target(), work / "cache", target.rpc)
    losing: dict[str, Any] = {}
    for name in args.models if not rpc else ():  # a board's kernels cannot be timed here
        losing.update(losing_anchors(name, args.isa, cache, args.precisions))
    prov = SHIPPED / args.isa / "provenance.json"
    checked = {f"{m}/{p}" for m in args.models for p in args.precisions}
    try:  # runs of earlier invocations into the same cache (e.g. another model's budget)
        before = json.loads(prov.read_text())
        earlier = [r for r in before["runs"]
                   if (r["model"], r["precision"]) not in {(x["model"], x["precision"])
                                                           for x in runs}]
        losing = {k: v for k, v in before.get("left_out_slower_in_model", {}).items()
                  if k not in checked} | losing
    except (OSError, ValueError, KeyError):
        earlier = []
    n = write_pruned(cache, SHIPPED / args.isa,
                     {a for kernels in losing.values() for a in kernels.values()})
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            check=False, capture_output=True, text=True).stdout.strip()
    from quantflow.targets.base import device_description

    prov.write_text(json.dumps({
        "isa": args.isa, "records": n, "target": str(target.target()),
        "measured_on": device_description(), "machine": platform.machine(), "commit": commit,
        "last_command": "python tools/build_tvm_records.py " + " ".join(sys.argv[1:]),
        "last_total_s": round(time.perf_counter() - t0, 1), "runs": earlier + runs,
        "left_out_slower_in_model": losing},
        indent=1) + "\n")
    print(f"wrote {n} records to {SHIPPED / args.isa}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
