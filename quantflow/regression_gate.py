"""`quantflow gate REPORT (--baseline BASE | --history DIR)`: the CI regression gate.

Reads a compile's report.json, holds it to a baseline (another report, or the recent passing
runs in DIR/history.jsonl) by the rules in quantflow/regress.py, prints one line per metric
and the latency rule, optionally writes JUnit XML and (`--record`) appends the run to the
history and redraws report.html with it. Exit 0, or 11/12/13 for an accuracy / size /
latency regression (quantflow/errors.py); 3 for an unreadable or mismatched report.

Not the in-compile gate (quantflow/gate.py, `compile --max-drop`, exit 10).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from quantflow import history, junit
from quantflow.config import GateThresholds
from quantflow.errors import (
    InputError,
    LatencyRegressionError,
    RegressionError,
    SizeRegressionError,
    UsageError,
)
from quantflow.regress import (
    Baseline,
    Check,
    Metrics,
    baseline_from_history,
    baseline_of,
    check_comparable,
    compare,
    latency_rule,
    metrics_of,
)

log = logging.getLogger(__name__)
_ERRORS: dict[str, type[RegressionError]] = {
    "accuracy": RegressionError, "size": SizeRegressionError,
    "latency": LatencyRegressionError}


def read_report(path: Path) -> dict[str, Any]:
    """A report.json as a dict, or an InputError naming the file and the fix."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such report; fix: pass the report.json that "
                         "`quantflow compile -o DIR` wrote") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable JSON report ({exc}); fix: pass the "
                         "report.json that `quantflow compile -o DIR` wrote") from None
    if not isinstance(data, dict) or not str(data.get("schema", "")).startswith(
            "quantflow.report/"):
        raise InputError(f"{path}: not a quantflow report (no quantflow.report schema); fix: "
                         "pass the report.json that `quantflow compile -o DIR` wrote")
    return data


def _baseline(args: argparse.Namespace, cand: Metrics, t: GateThresholds
              ) -> tuple[Baseline | None, list[dict[str, Any]]]:
    """The baseline and the history records of the candidate's kind (for the HTML plot)."""
    if args.baseline:
        path = Path(args.baseline)
        base = metrics_of(read_report(path), str(path))
        check_comparable(cand, base, args.report, str(path))
        records = history.matching(history.load(args.history), cand) if args.history else []
        return baseline_of(base, f"report {path}"), records
    records = history.matching(history.load(args.history), cand)
    return baseline_from_history(records, cand, t.history_runs), records


def run(args: argparse.Namespace, t: GateThresholds) -> int:
    if not (args.baseline or args.history):
        raise UsageError("quantflow gate needs a baseline: --baseline BASE.json or "
                         "--history DIR")
    if args.record and not args.history:
        raise UsageError("--record appends to the history: add --history DIR")
    report_path = Path(args.report)
    report = read_report(report_path)
    cand = metrics_of(report, str(report_path))
    base, records = _baseline(args, cand, t)
    checks = compare(cand, base, t)
    source = base.source if base else "none (no earlier run of this kind)"
    print(f"quantflow gate: {cand.model} / {cand.target} / {cand.device} on {cand.isa_class}"
          f"; baseline: {source}")
    for c in checks:
        print(f"  {c.status.upper():4s} {c.metric:8s} {c.message}")
    print(f"  latency rule: {latency_rule(t)}")
    failed = [c for c in checks if c.status == "fail"]
    if args.junit:
        with _writing(args.junit, "--junit"):
            junit.write(Path(args.junit), checks, name=cand.model, baseline=source)
    if args.record:
        rec = history.record_of(report, cand, passed=not failed,
                                report_path=str(report_path))
        with _writing(args.history, "--history"):
            path = history.append(Path(args.history), rec)
        print(f"  recorded in {path}")
        _redraw_html(report_path.parent, [*records, rec])
    if failed:
        raise _ERRORS[failed[0].metric](_summary(failed))
    return 0


@contextlib.contextmanager
def _writing(path: str, flag: str) -> Iterator[None]:
    """An unwritable output is a usage error naming the flag, not a crash."""
    try:
        yield
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot write ({exc.strerror or exc}); fix: pass a "
                         "writable location") from None


def _summary(failed: list[Check]) -> str:
    return "regression: " + "; ".join(f"{c.metric}: {c.message}" for c in failed) + (
        "; fix: find the change that made it worse, or move the baseline on purpose "
        "(record a new run with --record, or pass a newer --baseline)")


def _redraw_html(out_dir: Path, records: list[dict[str, Any]]) -> None:
    """Rebuild report.html beside the report with the history plot, when there is one and
    the HTML renderer (quantflow/report_html.py) is installed."""
    if not (out_dir / "report.html").exists():
        return
    try:
        from quantflow import report_html  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return  # an older quantflow without the HTML report: nothing to redraw
    report_html.write_html(out_dir, history=records)
    log.info("redrew %s with %d history run(s)", out_dir / "report.html", len(records))
