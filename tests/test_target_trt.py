"""TensorRT target: the Q/DQ rule checker, the deployable bundle, numerics through onnxruntime.

TensorRT is not installable here (no GPU; PyPI's `tensorrt` is a downloader stub), so:
- every checker rule is proven on purpose-built bad graphs: the good TRT-style graph (quantflow's
  own `quantize(..., placement="trt")` output) is edited in exactly one place per test, and the
  violation must name the edited node;
- `build_engine.py` is compiled and executed against a recording stand-in for the `tensorrt`
  module (it checks the call sequence and file outputs, not TensorRT itself);
- numerics: the bundle's model.onnx run in onnxruntime (same Q/DQ semantics as TensorRT's
  explicit quantization) vs the torch simulation. Both compute each layer in float32 on
  dequantized values (TensorRT placement leaves conv outputs unquantized, so ORT keeps float
  convs) and round once at the next QuantizeLinear: they can differ only at a rounding tie
  within float32 noise, by one step. Contract on the quantized output: max|Δ| ≤ 1 step (+1e-3
  for float noise in the dequantized value) and ≥ 99 % bit-identical; on the float logits: at
  most one step of every quantized input of the head, propagated through |W| (+1e-5 relative).
Tests needing TensorRT and a GPU are skipped with the reason when either is missing.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import py_compile
import shlex
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import fx, nn

from quantflow import calibrate as cal
from quantflow.errors import TargetUnavailableError, UnsupportedOpError
from quantflow.ir import capture, get_tensor
from quantflow.quantize import quantize
from quantflow.spec import TRT_ACT, int8_plan
from quantflow.targets import get_target
from quantflow.targets.base import Artifact
from quantflow.targets.trt import TrtTarget
from quantflow.targets.trt_bundle import fold_int32_bias_dq, load_build_script, trtexec_command
from quantflow.targets.trt_engine import tensorrt_unavailable_reason
from quantflow.targets.trt_rules import RULES, Violation, check_trt_qdq
from quantflow.testing import FP32_REL

TRT_REASON = tensorrt_unavailable_reason()
needs_tensorrt = pytest.mark.skipif(TRT_REASON is not None,
                                    reason=f"TensorRT engine tests need TensorRT + GPU: "
                                           f"{TRT_REASON}")
MAX_STEPS = 1.0 + 1e-3
MIN_IDENTICAL = 0.99


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.c2(torch.relu(self.c1(x))) + x)


class Net(nn.Module):
    """stem conv -> residual block -> head conv -> mean -> linear; also returns the block output
    (the head conv's input, hence Q/DQ'd under TRT placement: a quantized graph output)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.block = Block(c)
        self.head = nn.Conv2d(c, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.block(torch.relu(self.stem(x)))
        return self.fc(torch.relu(self.head(y)).mean((2, 3))), y


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(8, 3, 16, 16)


def _quantized(data: torch.Tensor, placement: str, int_bias: bool | None = None
               ) -> fx.GraphModule:
    torch.manual_seed(1)
    gm = capture(Net().eval(), (data[:1],))
    stats = cal.collect_stats(gm, cal.batched(data, 4), histograms=False)
    plan = int8_plan("minmax", act=TRT_ACT) if placement == "trt" else int8_plan("minmax")
    return quantize(gm, plan, stats, placement, int_bias=int_bias)


@pytest.fixture(scope="module")
def qgm(data: torch.Tensor) -> fx.GraphModule:
    return _quantized(data, "trt")


@pytest.fixture(scope="module")
def lowered(qgm: fx.GraphModule, data: torch.Tensor,
            tmp_path_factory: pytest.TempPathFactory) -> tuple[TrtTarget, Artifact]:
    target = TrtTarget()
    art = target.lower(qgm, (data,), tmp_path_factory.mktemp("trt"), precision="int8")
    return target, art


@pytest.fixture()
def good(lowered: tuple[TrtTarget, Artifact]) -> onnx.ModelProto:
    """A fresh copy of the lowered TRT-style model, to edit in one place."""
    return onnx.load(lowered[1].files["onnx"])


# -- graph-editing helpers ----------------------------------------------------------------------


def _producer(m: onnx.ModelProto, value: str) -> onnx.NodeProto:
    return next(n for n in m.graph.node if value in n.output)


def _nodes(m: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [n for n in m.graph.node if n.op_type == op]


def _const(m: onnx.ModelProto, node: onnx.NodeProto, idx: int, value: np.ndarray) -> None:
    """Give `node` its own constant for input `idx` (shared initializers stay untouched)."""
    name = f"{node.name}_in{idx}_edit"
    m.graph.initializer.append(numpy_helper.from_array(value, name))
    while len(node.input) <= idx:
        node.input.append("")
    node.input[idx] = name


def _set_attr(node: onnx.NodeProto, name: str, value: Any) -> None:
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


def _stem_pair(m: onnx.ModelProto) -> tuple[onnx.NodeProto, onnx.NodeProto]:
    """The activation Q and DQ in front of the first Conv."""
    dq = _producer(m, _nodes(m, "Conv")[0].input[0])
    return _producer(m, dq.input[0]), dq


def _found(vs: list[Violation], rule: str, node: onnx.NodeProto) -> list[Violation]:
    hits = [v for v in vs if v.rule == rule and node.name in str(v)]
    assert hits, f"expected {rule} on {node.name}, got:\n" + "\n".join(map(str, vs))
    return hits


# -- the checker --------------------------------------------------------------------------------


def test_quantflow_trt_placement_passes_every_rule(good: onnx.ModelProto,
                                                   lowered: tuple[TrtTarget, Artifact]) -> None:
    assert _nodes(good, "QuantizeLinear") and _nodes(good, "Add")
    assert check_trt_qdq(good) == []
    assert lowered[1].meta["qdq_warnings"] == []
    # the trt placement keeps biases float: nothing for the target to fold
    assert lowered[1].meta["folded_int32_bias"] == []


def test_every_rule_cites_the_documentation() -> None:
    for rule in RULES:
        assert rule.__doc__ and any(tag in rule.__doc__ for tag in ("[EQ", "[OPS", "[WQT",
                                                                     "[ONNX")), rule.__name__


def test_asymmetric_zero_point(good: onnx.ModelProto) -> None:
    q, dq = _stem_pair(good)
    for node in (q, dq):
        _const(good, node, 2, np.array(3, np.int8))
    vs = check_trt_qdq(good)
    for node in (q, dq):
        assert _found(vs, "symmetric-zero-point", node)[0].severity == "error"
    assert all(v.node in (q.name, dq.name) for v in vs)


def test_uint8_activation(good: onnx.ModelProto) -> None:
    q, dq = _stem_pair(good)
    for node in (q, dq):
        _const(good, node, 2, np.array(0, np.uint8))
    vs = check_trt_qdq(good)
    assert "UINT8" in str(_found(vs, "int8-type", q)[0])
    _found(vs, "int8-type", dq)


def test_omitted_zero_point_means_uint8(good: onnx.ModelProto) -> None:
    q, _ = _stem_pair(good)
    del q.input[2]  # ONNX: no zero point -> uint8 output
    _found(check_trt_qdq(good), "int8-type", q)


def test_int4_activation_is_rejected(good: onnx.ModelProto) -> None:
    q, dq = _stem_pair(good)
    for node in (q, dq):
        good.graph.initializer.append(helper.make_tensor(f"{node.name}_i4", TensorProto.INT4,
                                                         [], [0]))
        node.input[2] = f"{node.name}_i4"
    assert "weight-only" in str(_found(check_trt_qdq(good), "int8-type", dq)[0])


def test_int32_bias_dq_is_an_error_until_folded(data: torch.Tensor, tmp_path: Path) -> None:
    import onnxruntime as ort

    qgm = _quantized(data, "trt", int_bias=True)  # an ORT-style int32 bias in a TRT graph
    from quantflow.targets.onnx_export import export_onnx

    path = tmp_path / "raw.onnx"
    export_onnx(qgm, (data,), path)
    raw = onnx.load(str(path))
    int32_dq = [n for n in _nodes(raw, "DequantizeLinear")
                if any(i.name == n.input[0] and i.data_type == TensorProto.INT32
                       for i in raw.graph.initializer)]
    assert int32_dq
    errs = [v for v in check_trt_qdq(raw) if v.rule == "int8-type"]
    assert {v.node for v in errs} == {n.name for n in int32_dq}
    folded = copy.deepcopy(raw)
    assert sorted(fold_int32_bias_dq(folded)) == sorted(n.output[0] for n in int32_dq)
    assert check_trt_qdq(folded) == []
    # the fold computes (x - zp) * s in float32 exactly as DequantizeLinear does: the folded
    # constants equal onnxruntime's DequantizeLinear outputs bit for bit
    probe = copy.deepcopy(raw)
    for n in int32_dq:
        probe.graph.output.append(helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT,
                                                                None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(probe.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    got = sess.run([n.output[0] for n in int32_dq], {"x": data.numpy()})
    consts = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer}
    for n, value in zip(int32_dq, got):
        np.testing.assert_array_equal(consts[n.output[0]], value)


@pytest.mark.parametrize("bad", [-0.01, 0.0, float("inf")])
def test_scale_must_be_positive_and_finite(good: onnx.ModelProto, bad: float) -> None:
    _, dq = _stem_pair(good)
    _const(good, dq, 1, np.array(bad, np.float32))
    _found(check_trt_qdq(good), "scale", dq)


def test_activation_must_be_per_tensor(good: onnx.ModelProto) -> None:
    _, dq = _stem_pair(good)
    _const(good, dq, 1, np.full(3, 0.02, np.float32))
    _const(good, dq, 2, np.zeros(3, np.int8))
    _set_attr(dq, "axis", 1)
    vs = check_trt_qdq(good)
    _found(vs, "activation-per-tensor", dq)
    assert {v.rule for v in vs} == {"activation-per-tensor"}


def test_conv_weight_axis_must_be_output_channels(good: onnx.ModelProto) -> None:
    conv = _nodes(good, "Conv")[1]  # 8 -> 8 channels: a wrong axis with the right scale count
    wdq = _producer(good, conv.input[1])
    _set_attr(wdq, "axis", 1)
    hit = _found(check_trt_qdq(good), "weight-channel-axis", wdq)[0]
    assert "axis 1" in hit.message and "output-channel axis 0" in hit.message


def test_gemm_weight_scale_count(good: onnx.ModelProto) -> None:
    gemm = _nodes(good, "Gemm")[0]  # B [5, 8], transB=1: output channels on axis 0
    wdq = _producer(good, gemm.input[1])
    _set_attr(wdq, "axis", 1)  # 5 scales on an axis of size 8
    _found(check_trt_qdq(good), "weight-channel-axis", wdq)


def test_gemm_without_transb_uses_axis_1(good: onnx.ModelProto) -> None:
    gemm = _nodes(good, "Gemm")[0]
    wdq = _producer(good, gemm.input[1])
    init = next(i for i in good.graph.initializer if i.name == wdq.input[0])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).T.copy(), init.name))
    _set_attr(gemm, "transB", 0)
    assert any(v.rule == "weight-channel-axis" for v in check_trt_qdq(good))  # still axis 0
    _set_attr(wdq, "axis", 1)  # B [8, 5]: output channels on axis 1
    assert check_trt_qdq(good) == []


def _matmul_graph(axis: int) -> onnx.ModelProto:
    """What the exporter writes for linear() on a 3-D input: DQ(W[N,K]) -> Transpose -> MatMul."""
    inits = [numpy_helper.from_array(np.ones((6, 4), np.int8), "w"),
             numpy_helper.from_array(np.full(6, 0.01, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(6, np.int8), "wz"),
             numpy_helper.from_array(np.array(0.1, np.float32), "xs"),
             numpy_helper.from_array(np.array(0, np.int8), "xz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], "q_x"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xdq"], "dq_x"),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wdq"], "dq_w", axis=axis),
             helper.make_node("Transpose", ["wdq"], ["wt"], "transpose_w", perm=[1, 0]),
             helper.make_node("MatMul", ["xdq", "wt"], ["y"], "matmul")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_matmul_weight_axis_through_transpose() -> None:
    assert check_trt_qdq(_matmul_graph(axis=0)) == []  # W[N,K] axis 0 = consumed [K,N] axis 1
    hit = [v for v in check_trt_qdq(_matmul_graph(axis=1)) if v.rule == "weight-channel-axis"]
    assert len(hit) == 1 and hit[0].node == "dq_w" and "matmul" in hit[0].message


def test_per_channel_needs_opset_13(good: onnx.ModelProto) -> None:
    next(o for o in good.opset_import if o.domain in ("", "ai.onnx")).version = 12
    wdq = _producer(good, _nodes(good, "Conv")[0].input[1])
    assert _found(check_trt_qdq(good), "opset", wdq)[0].severity == "error"


def test_weight_code_minus_128_is_flagged(good: onnx.ModelProto) -> None:
    wdq = _producer(good, _nodes(good, "Conv")[0].input[1])
    init = next(i for i in good.graph.initializer if i.name == wdq.input[0])
    w = numpy_helper.to_array(init).copy()
    w.flat[0] = -128
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    assert _found(check_trt_qdq(good), "weight-range", wdq)[0].severity == "warning"


def test_quantized_weight_with_float_input_is_a_float_layer(good: onnx.ModelProto) -> None:
    conv = _nodes(good, "Conv")[1]
    dq = _producer(good, conv.input[0])
    conv.input[0] = _producer(good, dq.input[0]).input[0]  # bypass the Q/DQ pair
    vs = check_trt_qdq(good)
    assert _found(vs, "float-layer", conv)[0].severity == "warning"
    assert not [v for v in vs if v.severity == "error"]


def test_residual_add_with_one_float_input(good: onnx.ModelProto) -> None:
    add = _nodes(good, "Add")[0]
    skip_dq = _producer(good, add.input[1])
    float_value = _producer(good, skip_dq.input[0]).input[0]
    add.input[1] = float_value  # the skip branch without its Q/DQ
    hit = _found(check_trt_qdq(good), "residual-add", add)[0]
    assert float_value in hit.message and hit.severity == "warning"


def test_residual_add_may_read_the_raw_conv_output(good: onnx.ModelProto) -> None:
    """TensorRT's recommended form: conv output (unquantized) + DQ'd skip, fused in the conv."""
    add = _nodes(good, "Add")[0]
    conv_dq = _producer(good, add.input[0])
    conv_out = _producer(good, conv_dq.input[0]).input[0]
    assert _producer(good, conv_out).op_type == "Conv"
    add.input[0] = conv_out
    assert check_trt_qdq(good) == []


def test_qdq_pair_before_float_only_op(good: onnx.ModelProto) -> None:
    mean = _nodes(good, "ReduceMean")[0]
    src = mean.input[0]
    scale = np.array(0.05, np.float32)
    good.graph.initializer.extend([numpy_helper.from_array(scale, "edit_s"),
                                   numpy_helper.from_array(np.array(0, np.int8), "edit_zp")])
    q = helper.make_node("QuantizeLinear", [src, "edit_s", "edit_zp"], ["edit_q"], "edit_Q")
    dq = helper.make_node("DequantizeLinear", ["edit_q", "edit_s", "edit_zp"], ["edit_dq"],
                          "edit_DQ")
    idx = list(good.graph.node).index(mean)
    good.graph.node.insert(idx, dq)
    good.graph.node.insert(idx, q)
    mean.input[0] = "edit_dq"
    hit = _found(check_trt_qdq(good), "qdq-before-float-op", dq)[0]
    assert "ReduceMean" in hit.message


# -- lowering, bundle, numerics, profiling ------------------------------------------------------


def test_get_target_builds_a_trt_target() -> None:
    t = get_target("trt", workspace_mb=256, fp16_fallback=False)
    assert isinstance(t, TrtTarget) and t.name == "trt" and t.workspace_mb == 256


def test_lower_rejects_ort_style_quantization(data: torch.Tensor, tmp_path: Path) -> None:
    ort_style = _quantized(data, "ort")  # uint8 asymmetric activations
    with pytest.raises(UnsupportedOpError) as exc:
        TrtTarget().lower(ort_style, (data,), tmp_path, precision="int8")
    msg = str(exc.value)
    first_q = _stem_pair(onnx.load(str(tmp_path / "model.onnx")))[0]
    assert first_q.name in msg and "symmetric" in msg and "placement='trt'" in msg
    assert json.loads((tmp_path / "qdq_check.json").read_text())


def test_bundle_is_complete(lowered: tuple[TrtTarget, Artifact]) -> None:
    _, art = lowered
    out = Path(art.files["onnx"]).parent
    for name in ("model.onnx", "build_engine.py", "trtexec.txt", "README.md", "qdq_check.json"):
        assert (out / name).is_file(), name
    py_compile.compile(str(out / "build_engine.py"), doraise=True)
    cmd = shlex.split((out / "trtexec.txt").read_text())
    assert cmd[0] == "trtexec" and "--onnx=model.onnx" in cmd and "--saveEngine=model.engine" in cmd
    assert {"--int8", "--fp16", "--timingCacheFile=timing.cache",
            "--profilingVerbosity=detailed", "--exportLayerInfo=layers.json"} <= set(cmd)
    readme = (out / "README.md").read_text()
    assert "target device" in readme and "TensorRT >=" in readme and "calibrat" in readme
    assert art.meta["build_flags"] == {"int8": True, "fp16": True, "strongly_typed": False,
                                       "workspace_mb": 1024}
    if TRT_REASON is not None:
        assert art.meta["engine_built"] is False and TRT_REASON in art.meta["message"]
        assert art.files["model"] == art.files["onnx"]


def test_build_script_without_tensorrt_says_what_to_do(lowered: tuple[TrtTarget, Artifact]
                                                        ) -> None:
    if TRT_REASON is None or importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is importable here")
    proc = subprocess.run([sys.executable, lowered[1].files["build_script"]],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "TensorRT Python package" in proc.stderr
    assert "trtexec.txt" in proc.stderr


def test_fp32_baseline_gets_its_own_bundle(data: torch.Tensor, tmp_path: Path) -> None:
    gm = capture(Net().eval(), (data[:1],))
    art = TrtTarget().lower(gm, (data,), tmp_path, precision="fp32")
    assert Path(art.files["onnx"]) == tmp_path / "fp32" / "model.onnx"
    assert art.meta["build_flags"]["int8"] is False and art.meta["build_flags"]["fp16"] is False
    cmd = shlex.split(Path(art.files["trtexec"]).read_text())
    assert "--int8" not in cmd and "--fp16" not in cmd
    # the shipped build_engine.py defaults to the same (non-default) flags
    script = load_build_script(Path(art.files["build_script"]))
    assert script.DEFAULTS == art.meta["build_flags"]
    assert script.DEFAULTS["int8"] is False
    assert "float (FP32 baseline)" in Path(art.files["readme"]).read_text()
    with torch.no_grad():
        ref = [t.numpy() for t in gm(data)]
    for got, want in zip(TrtTarget().run(art, [data.numpy()]), ref):  # fp32 contract
        assert np.abs(got - want).max() <= FP32_REL * np.abs(want).max()


def test_strongly_typed_sets_no_precision_flags() -> None:
    cmd = shlex.split(trtexec_command(int8=True, fp16=True, strongly_typed=True,
                                      workspace_mb=64))
    assert "--stronglyTyped" in cmd and "--int8" not in cmd and "--fp16" not in cmd
    assert "--memPoolSize=workspace:64M" in cmd


def test_run_matches_torch_simulation(qgm: fx.GraphModule, data: torch.Tensor,
                                      lowered: tuple[TrtTarget, Artifact]) -> None:
    target, art = lowered
    logits, y = target.run(art, [data.numpy()])
    with torch.no_grad():
        ref_logits, ref_y = (t.numpy() for t in qgm(data))
    # quantized output (the block output, DQ'd as the head conv's input): steps of its scale
    scale = float(next(n for n in qgm.graph.nodes if n.name == "output").args[0][1].args[1])
    steps = np.abs(y - ref_y) / scale
    assert steps.max() <= MAX_STEPS and np.mean(steps < 1e-3) >= MIN_IDENTICAL
    # float logits: one step of each quantized head input, through |W| (+ float noise)
    lin = next(n for n in qgm.graph.nodes if n.name == "linear")
    fc_in_scale = float(lin.args[0].args[1])
    w_codes, w_scale = (get_tensor(qgm, a) for a in lin.args[1].args[:2])
    assert w_codes is not None and w_scale is not None
    bound = float((w_codes.double().abs().sum(1) * w_scale.double()).max()) * fc_in_scale
    assert np.abs(logits - ref_logits).max() <= bound + 1e-5 * np.abs(ref_logits).max()


def test_profile_needs_the_device_unless_proxy(lowered: tuple[TrtTarget, Artifact],
                                               data: torch.Tensor) -> None:
    _, art = lowered
    if TRT_REASON is None:
        pytest.skip("TensorRT is available: profile measures the engine")
    with pytest.raises(TargetUnavailableError, match="only be measured on the device"):
        TrtTarget().profile(art, [data.numpy()], warmup=1, runs=2)
    lat = TrtTarget(allow_ort_proxy=True).profile(art, [data.numpy()], warmup=1, runs=3)
    assert "PROXY" in lat.device and "NOT TensorRT" in lat.device and lat.runs >= 3


# -- build_engine.py against a recording stand-in for the tensorrt module -----------------------


INSPECTOR_JSON = {"Layers": [
    {"Name": "Reformatting CopyNode for Input Tensor 0 to conv", "LayerType": "Reformat",
     "Inputs": [{"Format/Datatype": "Row major linear FP32"}],
     "Outputs": [{"Format/Datatype": "Int8 NC/32HW32"}]},
    {"Name": "conv + add + relu", "LayerType": "CaskConvolution",
     "Inputs": [{"Format/Datatype": "Int8 NC/32HW32"}],
     "Outputs": [{"Format/Datatype": "Half NC/8HW8"}]},
    {"Name": "mean", "LayerType": "Reduce", "Inputs": [{"Format/Datatype": "Half NC/8HW8"}],
     "Outputs": [{"Format/Datatype": "Half"}]},
    {"Name": "softmax", "LayerType": "Softmax",
     "Inputs": [{"Format/Datatype": "Row major linear FP32"}],
     "Outputs": [{"Format/Datatype": "Row major linear FP32"}]}]}


def _fake_tensorrt(calls: list[tuple[Any, ...]]) -> types.ModuleType:
    """Just enough of the documented Python API for build(): records every call."""
    trt = types.ModuleType("tensorrt")
    ns = types.SimpleNamespace
    trt.NetworkDefinitionCreationFlag = ns(EXPLICIT_BATCH=0, STRONGLY_TYPED=5)  # type: ignore
    trt.BuilderFlag = ns(INT8="INT8", FP16="FP16")  # type: ignore[attr-defined]
    trt.MemoryPoolType = ns(WORKSPACE="WORKSPACE")  # type: ignore[attr-defined]
    trt.ProfilingVerbosity = ns(DETAILED="DETAILED")  # type: ignore[attr-defined]
    trt.LayerInformationFormat = ns(JSON="JSON")  # type: ignore[attr-defined]

    class Logger:
        WARNING, VERBOSE = "W", "V"

        def __init__(self, level: str) -> None:
            pass

    class Cache:
        def __init__(self, blob: bytes) -> None:
            self.blob = blob

        def serialize(self) -> bytes:
            return self.blob + b"+timed"

    class Config:
        profiling_verbosity = None

        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            calls.append(("pool", pool, size))

        def set_flag(self, flag: str) -> None:
            calls.append(("flag", flag))

        def create_timing_cache(self, blob: bytes) -> Cache:
            calls.append(("cache_in", bytes(blob)))
            self.cache = Cache(bytes(blob))
            return self.cache

        def set_timing_cache(self, cache: Cache, ignore_mismatch: bool) -> bool:
            return True

        def get_timing_cache(self) -> Cache:
            return self.cache

    class Builder:
        def __init__(self, logger: Logger) -> None:
            pass

        def create_network(self, flags: int) -> str:
            calls.append(("network_flags", flags))
            return "network"

        def create_builder_config(self) -> Config:
            self.config = Config()
            return self.config

        def build_serialized_network(self, network: str, config: Config) -> bytes:
            calls.append(("build", config.profiling_verbosity))
            return b"ENGINE"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network: str, logger: Logger) -> None:
            pass

        def parse_from_file(self, path: str) -> bool:
            calls.append(("parse", Path(path).name))
            return True

    class Engine:
        def create_engine_inspector(self) -> Any:
            return ns(get_engine_information=lambda fmt: json.dumps(INSPECTOR_JSON))

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            pass

        def deserialize_cuda_engine(self, blob: bytes) -> Engine:
            assert blob == b"ENGINE"
            return Engine()

    for cls in (Logger, Builder, OnnxParser, Runtime):
        setattr(trt, cls.__name__, cls)
    return trt


@pytest.fixture()
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[Any, ...]]]:
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(calls))
    yield calls


def test_build_script_call_sequence(lowered: tuple[TrtTarget, Artifact], tmp_path: Path,
                                    fake_trt: list[tuple[Any, ...]]) -> None:
    script = load_build_script(Path(lowered[1].files["build_script"]))
    cache, engine = tmp_path / "timing.cache", tmp_path / "model.engine"
    rc = script.main(["--onnx", lowered[1].files["onnx"], "--engine", str(engine),
                      "--timing-cache", str(cache), "--layers", str(tmp_path / "layers.json")])
    assert rc == 0 and engine.read_bytes() == b"ENGINE"
    assert ("parse", "model.onnx") in fake_trt and ("network_flags", 1) in fake_trt
    assert ("flag", "INT8") in fake_trt and ("flag", "FP16") in fake_trt
    assert ("pool", "WORKSPACE", 1024 << 20) in fake_trt and ("build", "DETAILED") in fake_trt
    assert ("cache_in", b"") in fake_trt and cache.read_bytes() == b"+timed"
    assert json.loads((tmp_path / "layers.json").read_text()) == INSPECTOR_JSON
    fake_trt.clear()  # a second build reuses the timing cache written by the first
    summary = script.build(lowered[1].files["onnx"], engine, int8=False, fp16=False,
                           strongly_typed=True, timing_cache=str(cache))
    assert ("cache_in", b"+timed") in fake_trt and ("network_flags", 1 << 5) in fake_trt
    assert not [c for c in fake_trt if c[0] == "flag"]
    assert summary == {"layers": 4, "by_precision": {"int8": 2, "fp16": 1, "fp32": 1},
                       "fp32_layers": ["softmax"],
                       "reformat_layers": ["Reformatting CopyNode for Input Tensor 0 to conv"]}


def test_lower_builds_in_process_when_tensorrt_is_present(
        qgm: fx.GraphModule, data: torch.Tensor, tmp_path: Path,
        fake_trt: list[tuple[Any, ...]], monkeypatch: pytest.MonkeyPatch) -> None:
    """The gated branch of lower(): runs the shipped build_engine.py, records the engine."""
    import quantflow.targets.trt as trt_mod

    sys.modules["tensorrt"].__version__ = "10.fake"  # type: ignore[attr-defined]
    monkeypatch.setattr(trt_mod, "tensorrt_unavailable_reason", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "FakeGPU")
    art = TrtTarget(fp16_fallback=False).lower(qgm, (data,), tmp_path, precision="mixed")
    assert art.meta["engine_built"] is True and art.meta["tensorrt"] == "10.fake"
    assert art.files["model"] == str(tmp_path / "model.engine")
    assert (tmp_path / "model.engine").read_bytes() == b"ENGINE"
    assert (tmp_path / "timing.cache").is_file() and (tmp_path / "layers.json").is_file()
    assert ("flag", "INT8") in fake_trt and ("flag", "FP16") not in fake_trt
    assert art.meta["layers"]["fp32_layers"] == ["softmax"]


# -- on a device with TensorRT ------------------------------------------------------------------


@needs_tensorrt
def test_engine_matches_onnxruntime(qgm: fx.GraphModule, data: torch.Tensor,
                                    tmp_path: Path) -> None:
    target = TrtTarget(fp16_fallback=False)  # FP32 float layers: compare int8 numerics only
    art = target.lower(qgm, (data,), tmp_path, precision="int8")
    assert art.meta["engine_built"] and Path(art.files["model"]).is_file()
    assert (tmp_path / "timing.cache").is_file() and (tmp_path / "layers.json").is_file()
    _, y = target.run(art, [data.numpy()])
    with torch.no_grad():
        ref_y = qgm(data)[1].numpy()
    scale = float(next(n for n in qgm.graph.nodes if n.name == "output").args[0][1].args[1])
    steps = np.abs(y - ref_y) / scale
    # int8 kernels accumulate exactly but requantize with their own rounding: ≤ 1 step
    assert steps.max() <= MAX_STEPS and np.mean(steps < 1e-3) >= 0.95
    lat = target.profile(art, [data[:1].numpy()], warmup=5, runs=20)
    assert lat.median_ms > 0 and "TensorRT" in lat.device
