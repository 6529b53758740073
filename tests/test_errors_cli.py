"""Every user error of compile/optimize/profile: its exit code, one line on stderr that
starts `quantflow: error:`, names the file or flag, the stage where one applies, and a fix,
and no traceback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from nets import TinyResidual

from quantflow.cli import main


def tiny_files(d: Path) -> dict[str, Path]:
    """A tiny exported model, calibration data, a wrongly shaped data file and a junk file."""
    torch.manual_seed(0)
    m = TinyResidual(width=8, classes=10).eval()
    x = torch.randn(16, 3, 16, 16)
    files = {"model": d / "tiny.pt2", "calib": d / "calib.npy", "bad": d / "bad.npy",
             "junk": d / "junk.pt2", "plan": d / "plan.json"}
    torch.export.save(torch.export.export(m, (x[:1],)), files["model"])
    np.save(files["calib"], x.numpy())
    np.save(files["bad"], np.zeros((4, 1, 8, 8), np.float32))
    files["junk"].write_bytes(b"not a model at all")
    files["plan"].write_text("{}")
    return files


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_files(tmp_path_factory.mktemp("errors"))


# (argv with {placeholders}, exit code, what the line must name); "{d}" is the files' folder
CASES = [
    (["compile", "{d}/nope.pt2", "--calib", "{calib}"], 3, ["stage load", "nope.pt2"]),
    (["compile", "{junk}", "--calib", "{calib}"], 3, ["stage load", "junk.pt2"]),
    (["compile", "zoo:no_such_model"], 3, ["stage load", "no_such_model", "quantflow zoo"]),
    (["compile", "{model}"], 3, ["stage data", "--calib"]),
    (["compile", "{model}", "--calib", "{d}/nope.npy"], 3, ["stage data", "nope.npy"]),
    (["compile", "{model}", "--calib", "{bad}"], 3, ["stage capture", "bad.npy", "shape"]),
    (["compile", "{model}", "--calib", "{calib}", "--config", "{d}/nope.json"], 2,
     ["--config", "nope.json"]),
    (["compile", "{model}", "--calib", "{calib}", "--config", "{plan}"], 2,
     ["--config", "plan.json"]),
    (["compile", "{model}", "--calib", "{calib}", "--calib-samples", "0"], 2,
     ["--calib-samples"]),
    (["optimize", "{d}/nope.pt2"], 3, ["stage load", "nope.pt2"]),
    (["profile", "{d}/nope.onnx"], 3, ["nope.onnx"]),
    (["profile", "{calib}"], 3, ["calib.npy", "not a compiled artifact"]),
    (["profile", "{d}", "--runs", "0"], 2, ["--runs"]),
]


@pytest.mark.parametrize(("argv", "code", "names"), CASES,
                         ids=[" ".join(c[0][:2]) + f"-{i}" for i, c in enumerate(CASES)])
def test_user_error_is_one_line_with_stage_and_fix(
        files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        argv: list[str], code: int, names: list[str]) -> None:
    where = {"d": files["model"].parent, **files}
    args = [a.format(**where) for a in argv]
    out = tmp_path / "o"
    if args[0] in ("compile", "optimize"):
        args += ["-o", str(out)]
    assert main(args) == code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("quantflow: error: ") and "Traceback" not in err
    assert "fix" in line, line
    for name in names:
        assert name in line, (name, line)
    assert not out.exists()  # a failed run publishes nothing


def test_memory_error_inside_a_pipeline_stage_names_it(
        files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A user error raised inside a pipeline stage (capture's memory check) is prefixed with
    that stage, once, and keeps its class's exit code (8)."""
    monkeypatch.setenv("QUANTFLOW_MAX_MEMORY", "400K")
    assert main(["compile", str(files["model"]), "--calib", str(files["calib"]), "-o",
                 str(tmp_path / "o")]) == 8
    line = capsys.readouterr().err.strip()
    assert line.startswith("quantflow: error: stage capture: ") and line.count("stage ") == 1
    assert "memory" in line and "fix:" in line and "\n" not in line
