"""The deterministic results of a fixed set of compiles, to prove a refactoring changed nothing.

Runs `quantflow compile` (in-process, through the CLI) on the built-in models for each target
and precision the README reports, and keeps only what must not move when behaviour is
unchanged: accuracy, agreement and SQNR of the simulation and of the runtime artifact, the
chosen calibrator and plan (hashed), artifact sizes, which layers run as integer kernels, the
portability changes, the parity verdict, the mixed-precision search's choice. Latencies and
wall times are left out (they vary run to run). Two snapshots are compared with `--compare`.

  .venv/bin/python tools/snapshot_results.py --out bench_results/snapshot_before.json
  .venv/bin/python tools/snapshot_results.py --out bench_results/snapshot_after.json \\
      --compare bench_results/snapshot_before.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

#: (name, CLI arguments after the model); eval samples are limited to keep this to minutes
RUNS: dict[str, list[str]] = {
    "resnet_ort_int8": ["zoo:resnet_fmnist", "--target", "ort", "--eval-samples", "2000"],
    "mobilenetv2_ort_int8": ["zoo:mobilenetv2_fmnist", "--target", "ort", "--eval-samples",
                             "2000"],
    "resnet_ort_vnni": ["zoo:resnet_fmnist", "--target", "ort", "--device", "x86-vnni",
                        "--calibrator", "minmax", "--equalize", "off", "--eval-samples", "2000"],
    "resnet_trt": ["zoo:resnet_fmnist", "--target", "trt", "--calibrator", "percentile",
                   "--equalize", "off", "--eval-samples", "1000"],
    "resnet_tvm": ["zoo:resnet_fmnist", "--target", "tvm", "--calibrator", "percentile",
                   "--equalize", "off", "--eval-samples", "300", "--profile-runs", "3"],
    "resnet_mixed": ["zoo:resnet_fmnist", "--bits", "mixed", "--max-drop", "1",
                     "--calib-samples", "256", "--eval-samples", "1000"],
}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def keep(report: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any]:
    """The fields of a report that must not change when behaviour does not."""
    q = report.get("quality", {})
    rt = report.get("runtime", {})
    plan = {k: v for k, v in plan.items() if k != "compiled"}
    out = {
        "calibration": {k: report.get("calibration", {}).get(k)
                        for k in ("calibrator", "equalize", "candidates")},
        "quality": {k: q.get(k) for k in ("fp32", "quantized", "simulation", "accuracy_drop",
                                           "runtime_vs_simulation_sqnr_db")},
        "size": {k: report.get("size", {}).get(k)
                 for k in ("quantized_bytes", "weights_quantized_bytes")},
        "plan": _hash(plan),
        "integer_layers": sorted(rt.get("quantized_layers", []) or []),
        "float_layers": sorted(rt.get("float_compute_ops", []) or []),
        "portability": sorted((report.get("portability") or {}).get("layers", {})),
        "parity_passed": (report.get("parity") or {}).get("passed"),
        "gate": (report.get("gate") or {}).get("passed"),
    }
    search = report.get("search")
    if search:
        out["search"] = {"best": search.get("best", {}).get("config"),
                         "satisfied": search.get("satisfied")}
    return out


def snapshot(names: list[str]) -> dict[str, Any]:
    from quantflow.cli import main

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="qf-snapshot-") as tmp:
        for name in names:
            out = Path(tmp) / name
            code = main(["compile", *RUNS[name], "-o", str(out)])
            report = json.loads((out / "report.json").read_text()) if code in (0, 10) else {}
            plan = json.loads((out / "plan.json").read_text()) if code in (0, 10) else {}
            results[name] = {"exit": code, **(keep(report, plan) if report else {})}
            print(name, json.dumps(results[name])[:300], flush=True)
    return results


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Paths where two snapshots differ."""
    diffs: list[str] = []

    def walk(x: Any, y: Any, path: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{path}.{k}" if path else k)
        elif x != y:
            diffs.append(f"{path}: {x!r} != {y!r}")

    walk(a, b, "")
    return diffs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--compare", help="an earlier snapshot to compare with")
    args = p.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True, check=False).stdout.strip()
    doc = {"commit": commit, "runs": snapshot(args.runs)}
    Path(args.out).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        diffs = compare(before["runs"], doc["runs"])
        print(f"{len(diffs)} difference(s) vs {args.compare} ({before.get('commit')}):")
        for d in diffs:
            print("  " + d)
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
