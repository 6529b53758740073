"""Progress on stderr: an ETA on a terminal, silence with -q, a rate limit in CI logs, and the
stage named in user errors."""

from __future__ import annotations

import io
import os
import pty
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from quantflow import progress
from quantflow.errors import ResourceError, UsageError, in_stage

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    yield
    progress.force(None)
    progress.set_quiet(None)


def _on_a_terminal(code: list[str], timeout: float = 300) -> tuple[int, str]:
    """Run `python code...` with stderr on a pseudo-terminal (no window size, like some CI
    runners: the bar must still draw); return its exit code and everything stderr got."""
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items()
           if k not in ("QUANTFLOW_QUIET", "QUANTFLOW_PROGRESS")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    proc = subprocess.Popen([sys.executable, *code], stderr=slave, stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    proc.communicate(timeout=timeout)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


CALIBRATE = """
import torch
from nets import TinyResidual
from quantflow.calibrate import batched, collect_stats
from quantflow.ir import capture
torch.manual_seed(0)
torch.set_num_threads(1)
x = torch.randn(600, 3, 16, 16)
gm = capture(TinyResidual(width=16, classes=10).eval(), (x[:1],))
collect_stats(gm, batched(x, 2), progress=True)
"""


def test_calibration_shows_rate_and_eta_on_a_terminal() -> None:
    rc, err = _on_a_terminal(["-c", CALIBRATE])
    assert rc == 0, err
    # a redraw with a known remaining time: "[elapsed<ETA, rate]", not "[00:00<?, ?batch/s]"
    eta = re.findall(r"calibrate: (?:ranges|histograms): +\d+%\|[^|]*\| *\d+/300 "
                     r"\[\d\d:\d\d<\d\d:\d\d, +[\d.]+batch/s\]", err)
    assert eta, err[-2000:]
    # leave=False: the last bar erased its line ("\r" + blanks + "\r")
    assert err.endswith("\r") and err.split("\r")[-2].strip() == "" and "Traceback" not in err


@pytest.mark.parametrize("model", ["tiny", pytest.param("zoo:resnet_fmnist",
                                                        marks=pytest.mark.slow)])
def test_quiet_compile_leaves_the_terminal_silent(model: str, tmp_path: Path) -> None:
    """-q on a terminal: no bars, no stage lines, nothing else on stderr; results on stdout.
    (Without -q the same run draws them: test_stage_lines_without_q_and_none_with_it.)"""
    from test_errors_cli import tiny_files

    out = tmp_path / "o"
    data = ["--calib-samples", "64", "--eval-samples", "256"]
    if model == "tiny":
        files = tiny_files(tmp_path)
        model = str(files["model"])
        data = ["--calib", str(files["calib"]), "--target", "ort"]
    rc, err = _on_a_terminal(["-m", "quantflow", "compile", model, *data,
                              "--profile-runs", "5", "-q", "-o", str(out)])
    assert rc == 0 and err == ""
    assert (out / "report.json").exists()


def test_stage_lines_without_q_and_none_with_it(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Forced progress prints `[i/13] stage ...` lines; -q drops them, the error stays."""
    from test_errors_cli import tiny_files

    from quantflow.cli import main
    from quantflow.pipeline import STAGES

    files = tiny_files(tmp_path)
    monkeypatch.setenv("QUANTFLOW_MAX_MEMORY", "400K")  # passes loading, fails capture
    progress.force(True)
    argv = ["compile", str(files["model"]), "--calib", str(files["calib"]), "-o",
            str(tmp_path / "o")]
    assert main(argv) == ResourceError.exit_code
    err = capsys.readouterr().err.splitlines()
    n = len(STAGES)
    assert err[0] == f"[1/{n}] capture ..."
    assert re.fullmatch(rf"\[1/{n}\] capture ... failed after \d+\.\d s", err[1])
    assert err[2].startswith("quantflow: error: stage capture: ") and len(err) == 3
    assert main([*argv, "-q"]) == ResourceError.exit_code
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("quantflow: error: stage capture: ")


def test_log_bar_is_rate_limited_and_has_no_carriage_returns() -> None:
    progress.force(True)
    interval = 0.25
    out = io.StringIO()
    t0 = time.perf_counter()
    with progress.bar(200, "work", "step", stream=out, interval=interval) as b:
        for _ in range(200):
            time.sleep(0.006)
            b.update(1)
    elapsed = time.perf_counter() - t0
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text
    assert 2 <= len(lines) <= elapsed / interval + 1, lines
    assert all(re.match(r"work: +\d+%.*step/s\]$", line) for line in lines), lines
    # work shorter than the interval leaves no line at all
    quick = io.StringIO()
    for _ in progress.bar(range(5), "quick", stream=quick, interval=interval):
        pass
    assert quick.getvalue() == ""


def test_quiet_and_terminal_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()  # not a terminal
    assert not progress.enabled(out)
    progress.force(True)
    assert progress.enabled(out)
    progress.set_quiet(True)
    assert not progress.enabled(out) and progress.bar(3, "x", stream=out).disable
    progress.set_quiet(None)
    monkeypatch.setenv("QUANTFLOW_QUIET", "1")
    assert not progress.enabled(out)
    monkeypatch.setenv("QUANTFLOW_QUIET", "0")
    assert progress.enabled(out)


def test_in_stage_names_the_innermost_stage_once_and_keeps_the_class() -> None:
    with pytest.raises(UsageError) as info, in_stage("plan"), in_stage("search"):
        raise UsageError("--config x.json: bad; fix: y")
    assert str(info.value) == "stage search: --config x.json: bad; fix: y"
    assert info.value.stage == "search" and info.value.exit_code == 2
    with pytest.raises(ValueError, match="^plain$"), in_stage("plan"):
        raise ValueError("plain")  # not a user error: a bug keeps its own message


def test_tvm_tuning_bar_counts_this_runs_database_records(tmp_path: Path) -> None:
    """MetaSchedule appends one JSON line per measured candidate; lines already there (an
    earlier, smaller tuning) are not this run's trials."""
    from quantflow.targets.tvm_tune import RECORDS, TrialWatch

    progress.force(True)
    db = tmp_path / RECORDS
    db.write_text("{}\n" * 3)
    watch = TrialWatch(tmp_path, total=8)
    with watch:
        with db.open("a") as f:
            f.write("{}\n" * 5)
        deadline = time.monotonic() + 10
        while watch.bar.n < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert watch.bar.n == 5 and watch.bar.total == 8
    assert not watch.thread.is_alive()


@pytest.mark.parametrize("argv", [["compile", "m.pt2", "-o", "o"], ["optimize", "m.pt2", "-o", "o"],
                                  ["profile", "model.onnx"], ["zoo"], ["report", "out"]])
def test_every_subcommand_takes_q_and_v(argv: list[str]) -> None:
    from quantflow.cli import build_parser

    parser = build_parser()
    assert parser.parse_args([*argv, "-q"]).quiet is True
    assert parser.parse_args([*argv, "--quiet", "-vv"]).verbose == 2
    assert parser.parse_args(argv).quiet is False
