"""The trained (2+1)-D zoo net (`r2plus1d_fmnist`) on TVM and TensorRT's placement: TVM runs
its six 3-D convs and the linear in integers within one output step of the simulation; the
TensorRT Q/DQ placement passes the rule check and, run on ONNX Runtime as the stand-in, keeps
accuracy within half a point of FP32 on 500 held-out clips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from quantflow.calibrate import batched, collect_stats
from quantflow.data import builtin_dataset
from quantflow.ir import capture
from quantflow.passes import optimize
from quantflow.placement import observed_tensors
from quantflow.plan import base_plan
from quantflow.quantize import quantize
from quantflow.spec import int8_plan
from quantflow.testing import output_step
from quantflow.zoo import get_model


@pytest.fixture(scope="module")
def r2plus1d() -> dict:
    cal, _ = builtin_dataset("fmnist-clips-calib")
    x, y = builtin_dataset("fmnist-clips")
    assert y is not None
    gm = capture(get_model("r2plus1d_fmnist"), (cal[:1],))
    optimize(gm)
    stats = collect_stats(gm, batched(cal[:256], 32), nodes=observed_tensors(gm))
    return {"gm": gm, "stats": stats, "x": x[:500], "y": y[:500]}


@pytest.mark.tvm
def test_r2plus1d_on_tvm_within_one_step_of_the_simulation(r2plus1d: dict,
                                                          tmp_path: Path) -> None:
    from quantflow.targets import get_target

    qgm = quantize(r2plus1d["gm"], int8_plan("mse"), r2plus1d["stats"], "ort")
    x = r2plus1d["x"][:32]
    target = get_target("tvm")
    art = target.lower(qgm, (x,), tmp_path, precision="int8")  # TVM compiles one batch
    assert len(art.meta["int_layers"]) == 7, art.meta["int_layers"]  # 6 convs + the linear
    (got,) = target.run(art, [x.numpy()])
    with torch.no_grad():
        want = qgm(x).numpy()
    steps = np.abs(got - want) / output_step(qgm)
    assert steps.max() <= 1.0 + 1e-3, steps.max()


def test_r2plus1d_trt_placement_passes_the_rules_and_keeps_accuracy(r2plus1d: dict,
                                                                   tmp_path: Path) -> None:
    import onnx

    from quantflow.targets import get_target
    from quantflow.targets.ort import OrtTarget
    from quantflow.targets.trt_rules import check_trt_qdq

    qgm = quantize(r2plus1d["gm"], base_plan("trt", "minmax"), r2plus1d["stats"], "trt")
    x, y = r2plus1d["x"], r2plus1d["y"]
    art = get_target("trt").lower(qgm, (x[:1],), tmp_path, precision="int8")
    assert art.meta["qdq_warnings"] == []
    model = onnx.load(art.files["onnx"])
    assert check_trt_qdq(model) == []
    assert sum(n.op_type == "Conv" for n in model.graph.node) == 6
    # the stand-in: TensorRT's Q/DQ graph run by ONNX Runtime
    ort_t = OrtTarget(threads=2)
    sa = ort_t.lower(qgm, (x[:100],), tmp_path / "ort", precision="int8")
    got = np.concatenate([ort_t.run(sa, [x[i:i + 100].numpy()])[0] for i in range(0, 500, 100)])
    with torch.no_grad():
        ref = r2plus1d["gm"](x).argmax(1)
    fp32 = 100.0 * float((ref == y).double().mean())
    int8 = 100.0 * float((torch.from_numpy(got).argmax(1) == y).double().mean())
    assert fp32 - int8 <= 0.5 and fp32 > 75.0, (fp32, int8)
