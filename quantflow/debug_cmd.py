"""`quantflow debug MODEL`: where quantization goes wrong, layer by layer.

The model is quantized and lowered exactly as `quantflow compile` would with the same options
(pipeline.debug), then every layer's output is compared between FP32, the torch simulation and
the runtime artifact on real samples (quantflow/layer_debug.py). The output is a table (or
`--json`), and with `-o DIR` DIR/debug.json beside the artifacts. Every compile's report.html
shows the same analysis on fewer samples (section "Parity debugger").
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from quantflow import outdir
from quantflow.config import CompileConfig
from quantflow.dataset import Dataset
from quantflow.errors import DivergenceError
from quantflow.pipeline import debug

SCHEMA = "quantflow.debug/1"


@contextmanager
def _workdir(out: str | None) -> Iterator[tuple[Path, Any]]:
    """(where the artifacts go, the staging of -o or None): -o is published whole or not at
    all (outdir.py); without it the artifacts live in a temporary folder."""
    if out is None:
        with tempfile.TemporaryDirectory(prefix="quantflow-debug-") as tmp:
            yield Path(tmp), None
    else:
        with outdir.staging(out, "debug") as stage:
            yield stage.tmp, stage


def run(args: argparse.Namespace, loaded: Any, config: CompileConfig, calib: Dataset,
        evaluation: Dataset | None, example: Sequence[torch.Tensor]) -> int:
    with _workdir(args.out) as (work, stage):
        analysis = debug(loaded.module, example, calib, evaluation, work, config,
                         samples=args.samples, isa=args.runtime_isa)
        result = {"schema": SCHEMA, "model": loaded.name, "target": config.target,
                  "bits": config.bits, "data": (evaluation or calib).name,
                  "analysis": analysis}
        if stage is not None:
            (work / "debug.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2) if args.json else render(result))
    if stage is not None and not args.json:
        print(f"wrote {stage.out / 'debug.json'}")
    first = analysis["first_divergent"]
    if args.fail_on_divergence and first:
        row = next(r for r in analysis["layers"] if r["name"] == first)
        raise DivergenceError(f"layer {first} diverged: {row['cause']}; fix: {row['fix']}")
    return 0


def _n(v: Any, fmt: str = "{:.1f}") -> str:
    return "—" if v is None else fmt.format(v)


def render(result: dict[str, Any]) -> str:
    """The table a user reads: the first divergent layer, then the worst and every diverged
    layer with its cause and fix."""
    a = result["analysis"]
    runtime = (f"{a['runtime']} on {a['isa']}" if a["runtime"]
               else f"none ({a['runtime_skipped']})")
    lines = [(f"quantflow debug: {result['model']} -> {result['target']} (bits "
             f"{result['bits']}), {a['samples']} samples of "
             f"{result['data']}; runtime compared: {runtime}; {a['seconds']:.1f} s")]
    rows = {r["name"]: r for r in a["layers"]}
    first = a["first_divergent"]
    if first:
        r = rows[first]
        lines.append(f"first divergent layer: {first} ({r['op']}, {r['bits']}): local SQNR "
                     f"{r['local_sqnr_db']:.1f} dB (bound {r['bound_db']:.1f} dB), runtime "
                     f"{_n(r['runtime_steps'], '{:.0f}')} steps off")
    else:
        lines.append("first divergent layer: none (every layer within its bound)")
    shown = list(a["worst"]) + [r["name"] for r in a["layers"]
                                if r["diverged"] and r["name"] not in a["worst"]]
    head = (f"  {'layer':<18}{'op':<10}{'bits':<7}{'sim dB':>8}{'local dB':>10}"
            f"{'bound':>7}{'rt dB':>8}{'steps':>7}  diverged")
    lines += ["worst layers (lowest local SQNR first), then any other diverged:", head]
    for name in shown:
        r = rows[name]
        lines.append(f"  {name:<18}{r['op']:<10}{r['bits']:<7}{_n(r['sqnr_sim_db']):>8}"
                     f"{_n(r['local_sqnr_db']):>10}{_n(r['bound_db']):>7}"
                     f"{_n(r['sqnr_runtime_db']):>8}{_n(r['runtime_steps'], '{:.0f}'):>7}  "
                     f"{'YES' if r['diverged'] else 'no'}")
        if r["cause"]:
            lines.append(f"      cause: {r['cause']}")
            lines.append(f"      fix:   {r['fix']}")
    lines.append("sim dB: the layer's output, simulation vs FP32 (error accumulated so far); "
                 "local dB: the layer alone, on FP32 inputs; rt: runtime vs simulation")
    return "\n".join(lines)


__all__ = ["SCHEMA", "render", "run"]
