"""`quantflow report OUT/ [--history DIR]`: rebuild OUT/report.html from OUT/report.json.

For a report written before the HTML existed, after a rendering failure during a compile (the
compile only warns), or to add the run history of `quantflow gate --record` (the records of
the same model, target, device and CPU class as the report, as the gate plots them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from quantflow import history
from quantflow.errors import UsageError
from quantflow.regress import metrics_of
from quantflow.report_html import read, write_html


def out_dir_of(arg: str) -> Path:
    """OUT for `OUT/` or `OUT/report.json`."""
    path = Path(arg)
    return path.parent if path.name == "report.json" or path.is_file() else path


def run(args: argparse.Namespace) -> int:
    out = out_dir_of(args.out)
    records = None
    if args.history:
        if not Path(args.history).is_dir():
            raise UsageError(f"--history {args.history}: no such directory; fix: pass the "
                             "folder given to `quantflow gate --history`")
        report = read(out)
        records = history.matching(history.load(args.history),
                                   metrics_of(report, str(out / "report.json")))
    try:
        path = write_html(out, history=records)
    except OSError as exc:
        raise UsageError(f"{out}: cannot write report.html ({exc.strerror or exc}); fix: pass "
                         "a writable output directory") from None
    runs = f" with {len(records)} history run(s)" if records is not None else ""
    print(f"quantflow: wrote {path} ({path.stat().st_size / 1024:.0f} KB){runs}")
    return 0
