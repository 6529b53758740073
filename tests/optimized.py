"""The CLI compile with `--optimize-time` that the fidelity tests share: a model saved as .pt2
with its calibration samples, compiled with fixed choices (minmax, no CLE) so that what the
optimize stages do is all that varies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch


def compile_optimized(net: torch.nn.Module, x: torch.Tensor, folder: Path, out: Path,
                      seconds: str) -> dict[str, Any]:
    """Save `net` and calibration data `x` under `folder` (once), compile with
    `--optimize-time seconds` into `out`; the report.json as a dict."""
    from quantflow.cli import main

    model, calib = folder / "m.pt2", folder / "calib.npy"
    if not model.exists():
        torch.export.save(torch.export.export(net, (x[:1],)), model)
        np.save(calib, x.numpy())
    assert main(["compile", str(model), "--calib", str(calib), "--calibrator", "minmax",
                 "--equalize", "off", "--optimize-time", seconds, "--profile-runs", "3",
                 "-o", str(out)]) == 0
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    return report
