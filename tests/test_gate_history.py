"""`quantflow gate` on real compiles: a worse calibration fails on accuracy (exit 11, JUnit
failure naming the metric), the same plan compiled again passes, latency re-measured ten times
never flakes while a 2x slower artifact is flagged (exit 13), and the run history appends
atomically, skips a torn line and gives the baseline."""

from __future__ import annotations

import copy
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from quantflow import history
from quantflow.cli import main
from quantflow.config import GateThresholds
from quantflow.regress import baseline_from_history, compare, metrics_of
from quantflow.report import validate_report
from quantflow.targets import get_target
from quantflow.targets.base import spread_ms

COMPILE = ["--calibrator", "minmax", "--calib-samples", "64", "--profile-runs", "10"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three compiles of zoo:resnet_fmnist evaluated on the same 500 labelled samples: the
    baseline, the baseline's plan.json compiled again, and a calibration on inputs 40x
    narrower than the data (uniform in [0, 0.05] for inputs in [-0.8, 2.0]), which clips
    every activation range."""
    from quantflow.data import builtin_dataset

    tmp = tmp_path_factory.mktemp("gate")
    x, y = builtin_dataset("fashion-mnist")
    np.savez(tmp / "eval.npz", x=np.asarray(x[:500]), y=np.asarray(y[:500]))
    narrow = np.random.default_rng(0).uniform(0.0, 0.05, (64, 1, 28, 28)).astype(np.float32)
    np.save(tmp / "narrow.npy", narrow)
    common = ["zoo:resnet_fmnist", "--eval", str(tmp / "eval.npz"), *COMPILE]
    assert main(["compile", *common, "-o", str(tmp / "base")]) == 0
    assert main(["compile", *common, "--config", str(tmp / "base" / "plan.json"),
                 "-o", str(tmp / "same")]) == 0
    assert main(["compile", *common, "--calib", str(tmp / "narrow.npy"),
                 "-o", str(tmp / "worse")]) == 0
    return {"tmp": tmp, **{k: tmp / k / "report.json" for k in ("base", "same", "worse")}}


def _report(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _junit(path: Path) -> dict[str, ET.Element]:
    suite = ET.parse(path).getroot()  # must parse: CI systems read it
    assert suite.tag == "testsuite" and suite.get("tests") == "3"
    return {case.get("name", ""): case for case in suite.iter("testcase")}


def test_worse_calibration_fails_on_accuracy(runs: dict[str, Path],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    for key in ("base", "same", "worse"):
        validate_report(_report(runs[key]))  # with the new latency spread fields
    base, worse = _report(runs["base"])["quality"], _report(runs["worse"])["quality"]
    drop = base["quantized"]["accuracy"] - worse["quantized"]["accuracy"]
    assert drop > 5.0, f"the narrow calibration should really hurt, dropped only {drop}"
    xml = runs["tmp"] / "worse.xml"
    code = main(["gate", str(runs["worse"]), "--baseline", str(runs["base"]),
                 "--junit", str(xml)])
    assert code == 11
    err = capsys.readouterr().err
    assert err.startswith("quantflow: error: regression: accuracy:") and err.count("\n") == 1
    cases = _junit(xml)
    assert set(cases) == {"accuracy", "size", "latency"}
    failure = cases["accuracy"].find("failure")
    assert failure is not None
    msg = failure.get("message", "")
    assert msg.startswith("accuracy regressed")
    assert f"baseline {base['quantized']['accuracy']:.6g}" in msg
    assert f"candidate {worse['quantized']['accuracy']:.6g}" in msg
    assert "threshold 1 points" in msg and "rule: regression iff" in msg
    assert cases["size"].find("failure") is None  # same weights: only accuracy regressed


def test_same_plan_passes_and_latency_does_not_flake(runs: dict[str, Path],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    xml = runs["tmp"] / "same.xml"
    assert main(["gate", str(runs["same"]), "--baseline", str(runs["base"]),
                 "--junit", str(xml)]) == 0
    assert all(c.find("failure") is None for c in _junit(xml).values())
    out = capsys.readouterr().out
    assert "latency rule: regression iff candidate median > baseline median x (1 + 30%)" in out
    # ten fresh A/B timings (50 runs each, the --profile-runs default) of the two compiles'
    # artifacts, back to back (as a CI job that
    # times both does), each pair gated: a shared machine's noise must not fail any of them
    target = get_target("ort")
    feed = [np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)]
    arts = {k: target.load_artifact(runs["tmp"] / k / "model.onnx") for k in ("base", "same")}
    reports = {k: _report(runs[k]) for k in arts}
    codes, ratios = [], []
    for i in range(10):
        for k in (("base", "same") if i % 2 else ("same", "base")):
            reports[k]["latency"]["quantized"] = target.profile(arts[k], feed, warmup=10,
                                                                runs=50).to_dict()
            (runs["tmp"] / f"ab_{k}.json").write_text(json.dumps(reports[k]))
        codes.append(main(["gate", str(runs["tmp"] / "ab_same.json"), "--baseline",
                           str(runs["tmp"] / "ab_base.json")]))
        ratios.append(round(reports["same"]["latency"]["quantized"]["median_ms"]
                            / reports["base"]["latency"]["quantized"]["median_ms"], 3))
    assert codes == [0] * 10, f"latency gate flaked; candidate/baseline medians {ratios}"
    # a clearly slower artifact: the baseline's timings halved (the candidate 2x slower,
    # with the baseline's small spread halved too) must be flagged
    base = _report(runs["base"])
    q = base["latency"]["quantized"]
    for k in ("median_ms", "p90_ms", "mean_ms", "iqr_ms", "mad_ms"):
        q[k] /= 2
    fast = runs["tmp"] / "fast_baseline.json"
    fast.write_text(json.dumps(base))
    xml = runs["tmp"] / "slow.xml"
    assert main(["gate", str(runs["base"]), "--baseline", str(fast), "--junit",
                 str(xml)]) == 13
    failure = _junit(xml)["latency"].find("failure")
    assert failure is not None and "latency regressed" in failure.get("message", "")


def test_history_appends_skips_torn_lines_and_gives_the_baseline(
        runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # not a git checkout: the commit comes from the CI's variable
    monkeypatch.setenv("GITHUB_SHA", "abc123")
    hist = tmp_path / "hist"
    (runs["tmp"] / "base" / "report.html").write_text("<html></html>")  # redrawn if it can be
    assert main(["gate", str(runs["base"]), "--history", str(hist), "--record"]) == 0
    assert "no baseline yet" in capsys.readouterr().out
    with open(hist / history.FILE, "a") as f:
        f.write('{"schema": "quantflow.history/1", "metr')  # a writer killed mid-line
    assert main(["gate", str(runs["worse"]), "--history", str(hist), "--record"]) == 11
    assert "history.jsonl:2: not a complete history record, skipped" in capsys.readouterr().err
    assert main(["gate", str(runs["same"]), "--history", str(hist), "--record"]) == 0
    out = capsys.readouterr().out
    assert "median of the last 1 passing run(s)" in out  # the failed run is no baseline
    lines = (hist / history.FILE).read_text().splitlines()
    assert len(lines) == 4  # base, the torn line alone on its line, worse, same
    records = history.load(hist)
    assert [r["passed"] for r in records] == [True, False, True]
    assert {r["commit"] for r in records} == {"abc123"}
    assert records[0]["host"]["isa_class"] == _report(runs["base"])["host"]["isa_class"]
    assert records[0]["metrics"] == metrics_of(_report(runs["base"]), "base").to_dict()
    # the baseline from history: the median of the last N passing runs, their medians' IQR
    # as the noise of the baseline median, so one outlier neither moves the bar nor hides a
    # regression
    cand = metrics_of(_report(runs["same"]), "same")
    recs = []
    for i, ms in enumerate((9.0, 1.0, 1.1, 0.9, 1.0, 5.0)):
        rec = copy.deepcopy(records[0])
        rec["metrics"].update(latency_ms=ms, mad_ms=0.01, runs=10, quantized_bytes=1000 + i)
        recs.append(rec)
    b = baseline_from_history(recs, cand, last=5)
    assert b is not None and b.runs == 5 and b.latency_ms == 1.0 and b.quantized_bytes == 1003
    assert b.noise_ms == pytest.approx(spread_ms([1.0, 1.1, 0.9, 1.0, 5.0])[0])
    slow = compare(cand.__class__(**{**cand.to_dict(), "latency_ms": 2.0, "mad_ms": 0.01,
                                     "quantized_bytes": 1003}), b, GateThresholds())
    assert [c.status for c in slow][1:] == ["pass", "fail"]


def test_gate_input_errors(runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    other = _report(runs["base"])
    other["model"]["name"] = "resnet_other"
    path = runs["tmp"] / "other.json"
    path.write_text(json.dumps(other))
    assert main(["gate", str(runs["same"]), "--baseline", str(path)]) == 3
    err = capsys.readouterr().err
    assert "'resnet_fmnist' vs 'resnet_other'" in err and str(path) in err
    assert main(["gate", str(runs["same"])]) == 2
    assert main(["gate", str(runs["same"]), "--baseline", str(path), "--record"]) == 2
    assert main(["gate", str(runs["tmp"] / "narrow.npy"), "--baseline", str(path)]) == 3
    assert main(["gate", str(runs["same"]), "--baseline", str(runs["base"]), "--junit",
                 str(runs["tmp"] / "narrow.npy" / "gate.xml")]) == 2  # under a file
    assert "--junit" in capsys.readouterr().err
    assert spread_ms([1.0, 2.0, 3.0, 4.0, 100.0]) == (2.0, 1.0)  # IQR 4 - 2, MAD of 2,1,0,1,97
