"""`quantflow debug`: per-layer parity of FP32, the simulation and the ORT artifact on the
zoo's resnet_fmnist (Fashion-MNIST). A layer broken on purpose (its input scale x1000, the
data then lands on a handful of codes) must be named first, with a calibration fix; the
healthy model has no divergent layer and ORT computes every layer within the parity bound."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from torch import fx

from quantflow import layer_fix
from quantflow.cli import main
from quantflow.parity import BOUND_STEPS
from quantflow.plan import PlanResult
from quantflow.report import SCHEMA_FILE

BROKEN = "conv2d_5"  # a conv in the middle of the network (its input is shared with conv2d_7)
#: healthy 8-bit layers of this model measure 27-47 dB alone; the W8A8 bound is 4.16 dB
HEALTHY_MARGIN_DB = 15.0
#: one calibrator on fewer samples: the analysis, not the calibration search, is under test
FAST = ["--calibrator", "percentile", "--calib-samples", "256"]


def _inject_scale(qgm: fx.GraphModule, layer: str, factor: float) -> None:
    """Multiply the scale of `layer`'s input quantize/dequantize pair by `factor`."""
    node = next(n for n in qgm.graph.nodes if n.name == layer)
    dq = node.args[0]
    assert isinstance(dq, fx.Node)
    q = dq.args[0]
    assert isinstance(q, fx.Node)
    for m in (q, dq):
        args = list(m.args)
        args[1] = float(args[1]) * factor
        m.args = tuple(args)
    qgm.recompile()


def _analysis_schema() -> dict[str, Any]:
    schema = json.loads(SCHEMA_FILE.read_text())
    return dict(schema["properties"]["analysis"]["oneOf"][0])


def test_broken_layer_is_named_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    original = PlanResult.quantize

    def broken(self: PlanResult, rules: Any) -> fx.GraphModule:
        qgm = original(self, rules)
        _inject_scale(qgm, BROKEN, 1000.0)
        return qgm

    monkeypatch.setattr(PlanResult, "quantize", broken)
    out = tmp_path / "dbg"
    code = main(["debug", "zoo:resnet_fmnist", *FAST, "--samples", "16", "--fail-on-divergence",
                 "-q", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 9, captured.err
    assert f"layer {BROKEN} diverged" in captured.err and "--calibrator" in captured.err
    assert f"first divergent layer: {BROKEN}" in captured.out
    result = json.loads((out / "debug.json").read_text())
    a = result["analysis"]
    jsonschema.validate(a, _analysis_schema())
    assert a["first_divergent"] == BROKEN
    rows = {r["name"]: r for r in a["layers"]}
    order = [r["name"] for r in a["layers"]]
    assert not any(rows[n]["diverged"] for n in order[:order.index(BROKEN)])
    row = rows[BROKEN]
    # x1000 the scale: the FP32 input spans well under one step of it, and nearly all is lost
    assert row["codes_used"] < 1 and row["local_sqnr_db"] < row["bound_db"]
    assert "wrong scale" in row["cause"] and row["fix"].startswith("--calibrator")
    assert a["worst"][0] == BROKEN


def test_healthy_model_has_no_divergence(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "dbg"
    code = main(["debug", "zoo:resnet_fmnist", *FAST, "--samples", "16", "-q", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    table = captured.out
    assert "first divergent layer: none" in table and "runtime compared: ort on" in table
    assert table.count("cause:") == 5 and table.count("fix:") == 5
    result = json.loads((out / "debug.json").read_text())
    assert result["schema"] == "quantflow.debug/1" and result["data"] == "fashion-mnist"
    a = result["analysis"]
    jsonschema.validate(a, _analysis_schema())
    assert a["first_divergent"] is None and a["runtime"] == "ort" and a["samples"] == 16
    assert len(a["layers"]) == 16 and len(a["worst"]) == 5
    for r in a["layers"]:
        assert not r["diverged"], r
        assert r["local_sqnr_db"] > r["bound_db"] + HEALTHY_MARGIN_DB, r
        assert r["sqnr_sim_db"] > 20, r
        assert r["hessian_trace"] is not None and r["hessian_trace"] >= 0, r
    # ORT on this CPU computes the simulation's codes; every layer whose output is a quantized
    # tensor is tapped (the classifier's float logits are not: evaluate compares those)
    tapped = [r for r in a["layers"] if r["runtime_steps"] is not None]
    assert [r["name"] for r in a["layers"] if r not in tapped] == ["linear"]
    assert all(r["runtime_steps"] <= BOUND_STEPS for r in tapped)
    # the worst layers are ordered, explained, and have histograms for the report
    worst = [next(r for r in a["layers"] if r["name"] == n) for n in a["worst"]]
    assert [r["local_sqnr_db"] for r in worst] == sorted(r["local_sqnr_db"] for r in worst)
    assert all(r["cause"] and r["fix"] and r["name"] in table for r in worst)
    assert set(a["histograms"]) == set(a["worst"][:3])


def _row(**kw: Any) -> dict[str, Any]:
    row = {"name": "conv2d_3", "op": "conv2d", "bits": "W8A8", "local_sqnr_db": 30.0,
           "bound_db": layer_fix.bound_db("W8A8"), "runtime_steps": 0.0, "codes_used": 200.0,
           "clipped": 0.0, "weight_only_db": 40.0, "act_only_db": 31.0}
    row.update(kw)
    return row


def test_fix_rules() -> None:
    assert layer_fix.bound_db("W8A8") == pytest.approx(4.16)
    assert layer_fix.bound_db("W4A8") == pytest.approx(6.02 * 4 - 44, abs=0.01)
    # an AVX2 CPU running an artifact made for VNNI: its int16 pair sums saturate
    row = _row(runtime_steps=37.0)
    assert layer_fix.runtime_diverged(row)
    cause, fix = layer_fix.diagnose(row, isa_class="x86-avx2", device="x86-vnni")
    assert "saturating int16" in cause and fix.startswith("--device portable")
    # the same numbers on a VNNI CPU are a runtime bug, not saturation
    cause, fix = layer_fix.diagnose(row, isa_class="x86-vnni", device="x86-vnni")
    assert "steps away" in cause and fix.startswith("--keep-float conv2d_3")
    # range far too wide, range far too narrow
    row = _row(codes_used=2.0, local_sqnr_db=-1.0)
    assert layer_fix.local_diverged(row)
    assert layer_fix.diagnose(row, isa_class="x86-vnni", device="portable")[1].startswith(
        "--calibrator mse")
    row = _row(clipped=0.2)
    assert layer_fix.local_diverged(row)
    assert layer_fix.diagnose(row, isa_class="x86-vnni", device="portable")[1].startswith(
        "--calibrator minmax")
    # which side's error dominates picks the fix
    fix = layer_fix.diagnose(_row(bits="W4A8", weight_only_db=12.0, act_only_db=30.0),
                             isa_class="x86-vnni", device="portable")[1]
    assert fix == "--bits-for conv2d_3=W8A8"
    fix = layer_fix.diagnose(_row(weight_only_db=40.0, act_only_db=20.0),
                             isa_class="x86-vnni", device="portable")[1]
    assert fix == "--bits-for conv2d_3=W8A16"
    assert not layer_fix.local_diverged(_row()) and not layer_fix.runtime_diverged(_row())


def test_runtime_isa_is_ort_only(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["debug", "zoo:resnet_fmnist", "--target", "tvm", "--runtime-isa", "x86-avx2"])
    assert code == 2 and "--runtime-isa applies to --target ort" in capsys.readouterr().err


def test_avx2_saturation_is_found_and_fixed_by_portable(
        capsys: pytest.CaptureFixture[str]) -> None:
    """An artifact made for VNNI (unconstrained weight pairs), its tensors computed by ORT's
    AVX2 kernels under emulation (qemu, targets/emulate.py): the int16 pair sums saturate, the
    debugger says so and names `--device portable` (the portable-INT8 issue)."""
    code = main(["debug", "zoo:resnet_fmnist", *FAST, "--device", "x86-vnni", "--runtime-isa",
                 "x86-avx2", "--samples", "8", "--json", "-q"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    a = json.loads(captured.out)["analysis"]
    assert a["isa"] == "x86-avx2" and a["device"] == "x86-vnni"
    off = [r for r in a["layers"] if r["diverged"]]
    assert off and a["first_divergent"] == off[0]["name"]
    for r in off:  # the simulation itself is fine: only the runtime is off
        assert r["runtime_steps"] > BOUND_STEPS and r["local_sqnr_db"] > r["bound_db"]
        assert "saturating int16" in r["cause"] and r["fix"].startswith("--device portable")


def test_fisher_trace_matches_the_closed_form() -> None:
    """One linear layer z = Wx + b with softmax: Tr(F_W) = E_x[‖x‖² (1 − Σ_c p_c²)] exactly;
    the sampled estimate (quantflow/fisher.py) must land within 3 % on 8000 samples."""
    import torch

    from quantflow.fisher import fisher_traces
    from quantflow.ir import capture
    from quantflow.search.hawq import layer_weights

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4)).eval()
    x = torch.randn(8000, 6)
    gm = capture(model, (x[:100],))
    weights = layer_weights(gm)
    got = fisher_traces(gm, weights, [[x[i:i + 100]] for i in range(0, 8000, 100)])
    (layer,) = weights
    with torch.no_grad():
        p = torch.softmax(model(x).double(), dim=-1)
    exact = float((x.double().pow(2).sum(1) * (1 - p.pow(2).sum(1))).mean()) / (6 * 4)
    assert got[layer] == pytest.approx(exact, rel=0.03)


@pytest.mark.slow  # the tapped twin of the TVM library is a second TVM build (~20-40 s)
def test_tvm_runtime_is_compared_per_layer(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["debug", "zoo:resnet_fmnist", *FAST, "--target", "tvm", "--samples", "8", "--json",
                 "-q"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    a = json.loads(captured.out)["analysis"]
    assert a["runtime"] == "tvm" and a["first_divergent"] is None
    tapped = [r for r in a["layers"] if r["runtime_steps"] is not None]
    assert len(tapped) == 15  # every conv; the classifier's float logits are not tapped
    assert all(r["runtime_steps"] <= BOUND_STEPS for r in tapped)
