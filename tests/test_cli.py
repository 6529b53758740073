"""End to end through the command line on a tiny model: artifacts, report, gate, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from nets import TinyResidual
from torch import nn

from quantflow.cli import main
from quantflow.pipeline import STAGES
from quantflow.report import validate_report
from quantflow.spec import ORT_ACT, LayerPlan, QSpec, QuantPlan


def Tiny() -> nn.Module:
    return TinyResidual(width=16, classes=10, relu6=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    m = Tiny().eval()
    with torch.no_grad():  # non-trivial BN so folding matters
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
        m.bn.weight.uniform_(0.5, 1.5)
    x = torch.randn(96, 3, 16, 16)
    torch.export.save(torch.export.export(m, (x[:1],)), d / "tiny.pt2")
    np.save(d / "calib.npy", x[:64].numpy())
    with torch.no_grad():
        y = m(x[64:]).argmax(1)  # labels = FP32 predictions: FP32 accuracy is 100%
    np.savez(d / "eval.npz", x=x[64:].numpy(), y=y.numpy())
    torch.save(m.state_dict(), d / "tiny_state.pt")
    return {"dir": d, "model": d / "tiny.pt2", "calib": d / "calib.npy", "eval": d / "eval.npz",
            "state": d / "tiny_state.pt"}


def _compile(files: dict[str, Path], out: Path, *extra: str) -> int:
    return main(["compile", str(files["model"]), "--target", "ort", "--bits", "8",
                 "--calib", str(files["calib"]), "--eval", str(files["eval"]),
                 "--calibrator", "minmax", "--equalize", "off", "--profile-runs", "5",
                 "-o", str(out), *extra])


def test_compile_writes_checked_artifacts_and_report(files: dict[str, Path],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = files["dir"] / "out"
    assert _compile(files, out, "--max-drop", "10") == 0
    text = capsys.readouterr().out
    assert "accuracy" in text and "latency" in text and "BN before" in text
    r = json.loads((out / "report.json").read_text())
    assert r["schema"] == "quantflow.report/2"
    validate_report(r)  # report.schema.json
    assert list(r["stages"]) == list(STAGES)  # every stage, timed under its own name
    # the parity debugger's analysis: every quantized layer, the runtime tapped, none diverged
    a = r["analysis"]
    assert a["runtime"] == "ort" and a["first_divergent"] is None
    assert {row["name"] for row in a["layers"]} == {row["name"] for row in r["layers"]}
    tapped = [row for row in a["layers"] if row["runtime_steps"] is not None]
    assert tapped and all(row["runtime_steps"] <= 1 for row in tapped)
    assert r["passes"]["before"]["batch_norm"] == 1 and r["passes"]["after"]["batch_norm"] == 0
    assert r["quality"]["fp32"]["accuracy"] == pytest.approx(100.0)
    assert r["quality"]["accuracy_drop"] <= 10 and r["gate"]["passed"]
    assert r["quality"]["quantized"]["sqnr_db"] > 20
    for key in ("fp32", "quantized"):
        lat = r["latency"][key]
        assert 0 < lat["median_ms"] <= lat["p90_ms"] and lat["threads"] >= 1
    # per-layer times of the quantized artifact, under the graph's own (fx) layer names
    per = r["latency"]["quantized"]["per_layer_ms"]
    convs = [layer["name"] for layer in r["layers"]]
    assert per and set(convs) <= set(per) and all(v >= 0 for v in per.values())
    assert "slowest" in text
    # file sizes of a 2k-parameter model are dominated by graph overhead; weights must shrink
    assert r["size"]["weights_quantized_bytes"] < 0.7 * r["size"]["weights_fp32_bytes"]
    for f in ("model.onnx", "model_fp32.onnx", "plan.json"):
        assert (out / f).exists()
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")), full_check=True)
    assert QuantPlan.load(out / "plan.json").default.act is not None


def test_gate_fails_with_distinct_exit_code(files: dict[str, Path], tmp_path: Path) -> None:
    """4-bit per-tensor weights on inputs at the FP32 decision boundary must trip --max-drop 0.

    Evaluation samples are the 64 (of 4000) with the smallest top-1/top-2 logit margin, labelled
    with the FP32 prediction, so any real perturbation of the logits flips some of them.
    """
    m = Tiny().eval()
    m.load_state_dict(torch.load(files["state"]))
    x = torch.randn(4000, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = m(x)
    top2 = logits.topk(2, dim=1).values
    idx = (top2[:, 0] - top2[:, 1]).argsort()[:64]
    np.savez(tmp_path / "edge.npz", x=x[idx].numpy(), y=logits[idx].argmax(1).numpy())
    plan = QuantPlan(default=LayerPlan(QSpec(bits=4, granularity="tensor"), ORT_ACT),
                     bias_correction=False)
    plan.save(tmp_path / "w4.json")
    code = main(["compile", str(files["model"]), "--calib", str(files["calib"]),
                 "--eval", str(tmp_path / "edge.npz"), "--config", str(tmp_path / "w4.json"),
                 "--profile-runs", "3", "--max-drop", "0", "-o", str(tmp_path / "o")])
    assert code == 10
    r = json.loads((tmp_path / "o" / "report.json").read_text())  # written even on failure
    assert r["gate"]["passed"] is False and r["quality"]["accuracy_drop"] > 0


def test_input_errors_exit_3_and_name_the_file(files: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.pt2"
    assert main(["compile", str(missing), "--calib", str(files["calib"]), "-o",
                 str(tmp_path / "o")]) == 3
    assert str(missing) in capsys.readouterr().err
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((4, 1, 8, 8), np.float32))  # wrong shape for the model
    assert main(["compile", str(files["model"]), "--calib", str(bad), "-o",
                 str(tmp_path / "o")]) == 3
    assert not (tmp_path / "o").exists()  # a failed run leaves no output folder
    assert "shape" in capsys.readouterr().err


def test_usage_error_exit_2() -> None:
    with pytest.raises(SystemExit) as e:
        main(["compile", "x.pt2", "--bits", "3", "-o", "o"])
    assert e.value.code == 2


def test_optimize_writes_deploy_form(files: dict[str, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["optimize", str(files["model"]), "-o", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "1 BN before" in text and "0 BN after" in text
    ep = torch.export.load(tmp_path / "model.pt2")
    assert not any("batch_norm" in str(n.target) for n in ep.graph.nodes)
    onnx.checker.check_model(onnx.load(str(tmp_path / "model.onnx")))


def test_profile_command(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    model = files["dir"] / "out" / "model.onnx"
    if not model.exists():
        pytest.skip("runs after test_compile_writes_checked_artifacts_and_report")
    assert main(["profile", str(model), "--runs", "5", "--warmup", "2"]) == 0
    assert "median" in capsys.readouterr().out


def test_help_lists_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["compile", "--help"])
    out = capsys.readouterr().out
    assert "--max-drop" in out and "budget exceeded" in out


@pytest.mark.parametrize("target", ["tvm", "trt"])
def test_compile_other_targets(files: dict[str, Path], tmp_path: Path, target: str,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """TVM: a real int8 library, run and profiled here. TensorRT (not installable here): the
    explicit-quantization bundle, numerics through onnxruntime, latency reported unavailable."""
    out = tmp_path / target
    code = main(["compile", str(files["model"]), "--target", target, "--calib",
                 str(files["calib"]), "--eval", str(files["eval"]), "--calibrator", "minmax",
                 "--equalize", "off", "--profile-runs", "3", "--max-drop", "10", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    r = json.loads((out / "report.json").read_text())
    assert r["target"] == target and r["gate"]["passed"]
    assert r["quality"]["quantized"]["sqnr_db"] > 20
    # no per-layer taps in TVM's library or the TensorRT bundle: simulation vs FP32 only
    assert r["analysis"]["runtime"] is None and "taps" in r["analysis"]["runtime_skipped"]
    if target == "tvm":
        assert (out / "model.so").exists() and r["latency"]["quantized"]["median_ms"] > 0
    else:
        for f in ("model.onnx", "build_engine.py", "trtexec.txt", "README.md"):
            assert (out / f).exists(), f
        assert "unavailable" in r["latency"]


def test_device_portable_by_default_and_recorded(files: dict[str, Path], tmp_path: Path) -> None:
    """The default artifact is portable, passes the parity gate on the host and on emulated
    AVX2 (`--verify-on`), and report, plan and file say what it is for and on what CPU."""
    from quantflow.targets.ort import artifact_device

    out = tmp_path / "p"
    try:
        import shutil

        verify = ["--verify-on", "x86-avx2"] if shutil.which("qemu-x86_64") else []
    except ImportError:  # pragma: no cover
        verify = []
    assert _compile(files, out, *verify) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["device"]["resolved"] == "portable" and r["device"]["host_exact"] is True
    assert set(r["device"]["exact_on"]) >= {"x86-avx2", "x86-vnni", "arm64"}
    assert r["parity"]["passed"] and max(r["parity"]["max_steps"].values()) <= 1
    assert r["parity"]["isas"][0] == "host" and r["parity"]["samples"] > 0
    assert r["host"]["isa_class"] and "onnxruntime" in r["versions"]
    assert r["runtime"]["device"] == "portable"
    assert artifact_device(onnx.load(str(out / "model.onnx"))) == "portable"
    plan = json.loads((out / "plan.json").read_text())
    assert plan["compiled"]["device"] == "portable"
    assert plan["compiled"]["portability"] == r["portability"]["layers"]
    for layer, why in r["portability"]["layers"].items():
        assert why["fix"] == "pairs" and why["channels_changed"] >= 1, layer
    # the fc layer (16 inputs) and c1 (27 inputs) have large same-sign neighbours; the
    # depthwise c2 never needs a change
    assert not any(n.startswith("conv2d_1") for n in r["portability"]["layers"])


def test_device_flags_are_validated(files: dict[str, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    # an artifact for VNNI CPUs cannot be held to AVX2 exactness
    code = _compile(files, tmp_path / "v", "--device", "x86-vnni", "--verify-on", "x86-avx2")
    assert code == 2 and "not meant to be exact there" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        _compile(files, tmp_path / "v", "--verify-on", "sparc")
    assert e.value.code == 2
    code = main(["compile", str(files["model"]), "--target", "tvm", "--device", "x86-vnni",
                 "--calib", str(files["calib"]), "-o", str(tmp_path / "t")])
    assert code == 2 and "--device for --target tvm" in capsys.readouterr().err


def test_vnni_artifact_warns_on_an_avx2_host(files: dict[str, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`--device x86-vnni` keeps full int8 weights (no layer changed); compiled or profiled
    on an AVX2-class CPU, the report and `quantflow profile` say it is not exact there."""
    from quantflow import hostcpu

    out = tmp_path / "vnni"
    assert _compile(files, out, "--device", "x86-vnni") == 0
    r = json.loads((out / "report.json").read_text())
    assert r["portability"]["layers"] == {} and r["device"]["pair_limit"] is None
    avx2 = hostcpu.CpuInfo("x86_64", "AVX2 test CPU", frozenset({"avx2", "fma"}), 2)
    monkeypatch.setattr(hostcpu, "host_cpu", lambda: avx2)
    capsys.readouterr()
    assert main(["profile", str(out / "model.onnx"), "--runs", "3", "--warmup", "1"]) == 0
    err = capsys.readouterr().err
    assert "--device x86-vnni" in err and "x86-avx2" in err
    assert _compile(files, tmp_path / "vnni2", "--device", "x86-vnni") == 0
    r = json.loads((tmp_path / "vnni2" / "report.json").read_text())
    assert r["device"]["host_exact"] is False and "portable" in r["device"]["warning"]
    assert "host" in r["parity"]["skipped"]


def test_report_schema_catches_drift(files: dict[str, Path]) -> None:
    """The schema is strict enough to fail: a missing section, an unknown one, a wrong type."""
    import jsonschema

    r = json.loads((files["dir"] / "out" / "report.json").read_text())
    for broken in ({k: v for k, v in r.items() if k != "quality"}, {**r, "surprise": 1},
                   {**r, "gate": {**r["gate"], "passed": "yes"}},
                   {**r, "stages": {**r["stages"], "calibrate": 1.0}}):
        with pytest.raises(jsonschema.ValidationError):
            validate_report(broken)
