"""ONNX Runtime target: QDQ export, integer kernels, numerics vs the torch simulation, profiling.

Numerics contract (derivation). The torch simulation computes each quantized op in float32 on
dequantized values and rounds once at the next QuantizeLinear. ORT's fused kernel
(QLinearConv, QGemm, QLinearAdd, QLinearGlobalAveragePool) computes the same sum exactly in
int32 and requantizes with the float multiplier s_x·s_w/s_y. Both round half-to-even, so they
disagree only where the real value lies within float32 rounding error (~1e-6 relative) of a
rounding tie, and then by one step: **a kernel whose inputs agree is off by at most one step**
(`test_single_kernels_within_one_step`).

Downstream, that flip is an input difference: one step of tensor t moves a consumer's value by
gain·(steps of t), gain = s_t/s_out for add and pooling, max|w|·s_t/s_out for conv/linear
(flips are rare, ~1e-4 of the elements, so a receptive field meets at most one flip source).
The gain can exceed 1: with s_conv2/s_add = 1.46 one tie in relu1 (value 94.50001 steps)
flipped conv2 and showed up as a 2-step difference after the residual add. So on a multi-layer
net the bound per tensor is D(t) = floor(Σ gain·D(input)) + 1, D(graph input) = 1, computed
from the graph's scales and weights (`_output_step_bounds`), and at least 99 % of the outputs
must be bit-identical. That fraction holds for a block or two; through a whole deep network
a single early flip reaches every logit (ResNet-18: 77 % identical logits, max 1 step).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

# registers the quantized_decomposed ops used to build quantized graphs by hand
import torch.ao.quantization.fx._decomposed
import torch.nn.functional as F
from torch import fx, nn

from quantflow.errors import CaptureError, UnsupportedOpError
from quantflow.ir import capture
from quantflow.pair_limit import fit_pairs, pair_bound, pair_index
from quantflow.targets import Target, get_target
from quantflow.targets.onnx_export import BASE_OPSET, WIDE_QDQ_OPSET, export_onnx
from quantflow.targets.ort import OrtTarget
from quantflow.targets.ort_graph import per_node_ms, summarize_graph

qd = torch.ops.quantized_decomposed
aten = torch.ops.aten

#: |ORT − torch| of one kernel, in quantization steps: one rounding flip (+ float noise of DQ)
MAX_STEPS = 1.0 + 1e-3
#: fraction of outputs that must be bit-identical (ties are rare)
MIN_IDENTICAL = 0.99
BATCH = 8
C = 64


def _u8_qparams(lo: float, hi: float) -> tuple[float, int]:
    """Asymmetric uint8 scale/zero point covering [lo, hi] ∪ {0} (ONNX conventions)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = float(np.float32(max(hi - lo, 1e-8) / 255))
    return scale, int(np.clip(round(-lo / scale), 0, 255))


def _qdq(t: torch.Tensor, qp: tuple[float, int]) -> torch.Tensor:
    """uint8 quantize -> dequantize pair (the activation form of the "ort" placement)."""
    q = qd.quantize_per_tensor.default(t, qp[0], qp[1], 0, 255, torch.uint8)
    return qd.dequantize_per_tensor.default(q, qp[0], qp[1], 0, 255, torch.uint8)


def _w_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8 codes and float32 scales, within the int16 pair limit
    of x86 CPUs without VNNI (as `quantflow.quantize` makes them for portable artifacts):
    without it ORT's AVX2 kernels saturate and these tests would fail on such hosts."""
    scale = (w.abs().amax(dim=tuple(range(1, w.ndim))) / 127).float()
    a, b = pair_index(tuple(w.shape))
    fit = fit_pairs(w.reshape(w.shape[0], -1), scale, 127, a, b, pair_bound(255))
    return fit.codes.reshape(w.shape).to(torch.int8), fit.scale.float()


def _init(m: nn.Conv2d | nn.Linear, g: torch.Generator, w_std: float) -> None:
    assert m.bias is not None
    with torch.no_grad():
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * w_std)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def _register_int_weight_bias(owner: nn.Module, prefix: str, layer: nn.Conv2d | nn.Linear,
                              x_scale: float) -> None:
    """int8 per-channel weight + int32 bias (scale s_x·s_w) buffers; drop the float ones."""
    assert layer.bias is not None
    wq, ws = _w_int8(layer.weight.detach())
    bq = torch.round(layer.bias.detach().double() / (ws.double() * x_scale)).to(torch.int32)
    owner.register_buffer(f"{prefix}_wq", wq)
    owner.register_buffer(f"{prefix}_ws", ws)
    owner.register_buffer(f"{prefix}_wz", torch.zeros(ws.numel(), dtype=torch.int64))
    owner.register_buffer(f"{prefix}_bq", bq)
    del layer.weight, layer.bias  # the quantized graph holds only the integer tensors


def _dq_weight_bias(owner: nn.Module, prefix: str, x_scale: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    wq, ws, wz, bq = (getattr(owner, f"{prefix}_{k}") for k in ("wq", "ws", "wz", "bq"))
    w = qd.dequantize_per_channel.default(wq, ws, wz, 0, -127, 127, torch.int8)
    b = qd.dequantize_per_channel.default(bq, ws * x_scale, wz, 0, -(2**31), 2**31 - 1,
                                          torch.int32)
    return w, b


class ResBlockNet(nn.Module):
    """Conv-ReLU-Conv-Add-ReLU-GlobalAvgPool-Linear, float or hand-quantized (PT2E form).

    `calibrate(x)` records the float range of every quantized edge, `quantize()` switches the
    forward to Q/DQ pairs with uint8 activations, per-channel int8 weights and int32 biases
    with scale s_x·s_w: the form `quantflow.quantize` produces for the "ort" placement.
    Outputs: logits and the block's feature map (many values, for the agreement statistic).
    """

    EDGES = ("x", "relu1", "conv2", "relu2", "pool", "fc")

    def __init__(self, channels: int = C, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.fc = nn.Linear(channels, 10)
        for m in (self.conv1, self.conv2, self.fc):
            _init(m, g, w_std=(2.0 / m.weight[0].numel()) ** 0.5)
        self.ranges: dict[str, tuple[float, float]] = {}
        self.qparams: dict[str, tuple[float, int]] = {}
        self.quantized = False
        self.calibrating = False

    def _edge(self, t: torch.Tensor, name: str) -> torch.Tensor:
        if not self.quantized:
            if self.calibrating:
                lo, hi = self.ranges.get(name, (0.0, 0.0))
                self.ranges[name] = (min(lo, float(t.min())), max(hi, float(t.max())))
            return t
        return _qdq(t, self.qparams[name])

    def _wb(self, layer: str, x_edge: str) -> tuple[torch.Tensor, torch.Tensor]:
        m = getattr(self, layer)
        if not self.quantized:
            return m.weight, m.bias
        return _dq_weight_bias(self, layer, self.qparams[x_edge][0])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._edge(x, "x")
        a = self._edge(F.relu(F.conv2d(x, *self._wb("conv1", "x"), padding=1)), "relu1")
        b = self._edge(F.conv2d(a, *self._wb("conv2", "relu1"), padding=1), "conv2")
        c = self._edge(F.relu(b + a), "relu2")
        p = self._edge(F.adaptive_avg_pool2d(c, 1), "pool").flatten(1)
        # flatten is data movement: its output re-uses the pool's parameters (as quantize does)
        p = self._edge(p, "pool")
        return self._edge(F.linear(p, *self._wb("fc", "pool")), "fc"), c

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> ResBlockNet:
        self.quantized, self.calibrating = False, True
        self(x)
        self.calibrating = False
        self.qparams = {k: _u8_qparams(*self.ranges[k]) for k in self.EDGES}
        return self

    def quantize(self) -> ResBlockNet:
        for layer, x_edge in (("conv1", "x"), ("conv2", "relu1"), ("fc", "pool")):
            _register_int_weight_bias(self, layer, getattr(self, layer),
                                      self.qparams[x_edge][0])
        self.quantized = True
        return self


def _inputs(seed: int) -> torch.Tensor:
    return torch.randn(BATCH, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def lowered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The float and the quantized block, lowered once for all tests of this module."""
    x = _inputs(0)
    float_net = ResBlockNet()
    float_gm = capture(float_net, (x,))
    qnet = ResBlockNet().calibrate(torch.cat([_inputs(s) for s in range(1, 5)])).quantize()
    qgm = capture(qnet, (x,))
    target = get_target("ort", threads=1)
    out = tmp_path_factory.mktemp("ort")
    return {"target": target, "x": x, "qnet": qnet, "qgm": qgm, "float_gm": float_gm,
            "int8": target.lower(qgm, (x,), out, precision="int8"),
            "fp32": target.lower(float_gm, (x,), out, precision="fp32")}


def _steps(got: np.ndarray, want: torch.Tensor, step: float) -> np.ndarray:
    return np.abs(got.astype(np.float64) - want.double().numpy()) / step


def _agreement(got: np.ndarray, want: torch.Tensor, step: float) -> tuple[float, float]:
    """(max |Δ| in steps, fraction bit-identical)."""
    d = _steps(got, want, step)
    return float(d.max()), float((d < 1e-3).mean())


_LIPSCHITZ_1 = (aten.relu.default, aten.max_pool2d.default, aten.adaptive_avg_pool2d.default,
                aten.mean.dim, aten.flatten.using_ints, aten.view.default, aten.reshape.default)


def _output_step_bounds(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]
                        ) -> list[tuple[float, int]]:
    """(step, max |Δ| in steps) of each output: the recursion of the module docstring.

    E(t) is the largest real difference ORT vs torch on tensor t; a Q/DQ pair of scale s turns
    it into D = floor(E/s) + 1 steps (shift plus its own rounding flip), i.e. E = D·s.
    conv/linear: max|w|·E(x) (one flip source per receptive field); add: E(a) + E(b);
    relu, pools, reshapes: E(x). The outputs must be dequantize_per_tensor nodes, or a float
    linear output whose "step" is then its whole bound E.
    """
    values: dict[str, object] = {}

    class Record(fx.Interpreter):
        def run_node(self, n: fx.Node) -> object:
            values[n.name] = out = super().run_node(n)
            return out

    with torch.no_grad():
        Record(gm).run(*inputs)
    err: dict[fx.Node, float] = {}
    consts: set[fx.Node] = set()
    for n in gm.graph.nodes:
        args = [a for a in n.args if isinstance(a, fx.Node)]
        if n.op == "get_attr" or (n.op == "call_function" and all(a in consts for a in args)):
            consts.add(n)  # weights, biases, their scales: identical constants on both sides
            err[n] = 0.0
        elif n.op == "placeholder":
            err[n] = 0.0
        elif n.target == qd.quantize_per_tensor.default:
            scale = float(n.args[1])
            err[n] = (math.floor(err[args[0]] / scale) + 1) * scale
        elif n.target == qd.dequantize_per_tensor.default or n.target in _LIPSCHITZ_1:
            err[n] = err[args[0]]
        elif n.target in (aten.conv2d.default, aten.linear.default):
            w = values[args[1].name]
            assert isinstance(w, torch.Tensor)
            err[n] = float(w.abs().max()) * err[args[0]]
        elif n.target == aten.add.Tensor:
            err[n] = sum(err[a] for a in args)
        elif n.op == "output":
            continue
        else:
            raise AssertionError(f"no error bound for {n.format_node()}")
    (outs,) = [n.args[0] for n in gm.graph.nodes if n.op == "output"]
    bounds = []
    for o in outs:
        if o.target == aten.linear.default:
            # a float output (the ORT placement leaves an unread linear output float: QGemm /
            # MatMulIntegerToFloat write float): the bound is E(o) itself, as one "step"
            bounds.append((err[o], 1))
            continue
        assert o.target == qd.dequantize_per_tensor.default, o.format_node()
        scale = float(o.args[1])
        bounds.append((scale, round(err[o] / scale)))
    return bounds


def test_numerics_match_torch_simulation(lowered: dict) -> None:
    target, qgm, art = lowered["target"], lowered["qgm"], lowered["int8"]
    for seed in (10, 11):
        x = _inputs(seed) * 1.2  # a little beyond the calibrated range: saturation included
        with torch.no_grad():
            want = qgm(x)
        got = target.run(art, [x.numpy()])
        bounds = _output_step_bounds(qgm, (x,))
        for name, g, w, (step, bound) in zip(art.output_names, got, want, bounds):
            worst, identical = _agreement(g, w, step)
            assert worst <= bound + 1e-3, f"{name}: max |Δ| = {worst:.3f} > {bound} steps"
            assert identical >= MIN_IDENTICAL, f"{name}: only {identical:.2%} identical"


class _OneDeepNet(nn.Module):
    """Four integer kernels, each reading tensors quantized straight from a graph input:
    conv+relu (QLinearConv), add (QLinearAdd), spatial mean (QLinearGlobalAveragePool),
    linear (QGemm). Their inputs agree exactly, so each output is within one step."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        conv, fc = nn.Conv2d(3, 16, 3, padding=1), nn.Linear(24, 12)
        for m in (conv, fc):
            _init(m, g, w_std=0.3)
        # calibrated-looking scales: round ratios such as 0.02/0.04 put many sums exactly on a
        # rounding tie, where float32 ratio arithmetic (ORT) and sum-then-divide (torch) split
        self.qp = {"x": (0.02137, 128), "y": (0.03071, 100), "z": (0.02459, 120),
                   "conv": (0.03313, 0), "add": (0.04177, 110), "pool": (0.00419, 128),
                   "fc": (0.05233, 130)}
        _register_int_weight_bias(self, "conv", conv, self.qp["x"][0])
        _register_int_weight_bias(self, "fc", fc, self.qp["z"][0])

    def forward(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        qp = self.qp
        x, y, z = _qdq(x, qp["x"]), _qdq(y, qp["y"]), _qdq(z, qp["z"])
        conv = F.relu(F.conv2d(x, *_dq_weight_bias(self, "conv", qp["x"][0]), padding=1))
        fc = F.linear(z, *_dq_weight_bias(self, "fc", qp["z"][0]))
        return (_qdq(conv, qp["conv"]), _qdq(x + y, qp["add"]),
                _qdq(x.mean((2, 3), keepdim=True), qp["pool"]), _qdq(fc, qp["fc"]))


def test_single_kernels_within_one_step(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    inputs = (torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, 16, generator=g),
              torch.randn(64, 24, generator=g))
    net = _OneDeepNet()
    gm = capture(net, inputs)
    target = OrtTarget(threads=1)
    art = target.lower(gm, inputs, tmp_path, precision="int8")
    assert art.meta["integer_ops"] == {"QGemm": 1, "QLinearAdd": 1, "QLinearConv": 1,
                                       "QLinearGlobalAveragePool": 1}, art.meta
    assert art.meta["float_ops_on_dequantized"] == [], art.meta
    with torch.no_grad():
        want = gm(*inputs)
    got = target.run(art, [t.numpy() for t in inputs])
    for edge, g_out, w_out in zip(("conv", "add", "pool", "fc"), got, want):
        worst, identical = _agreement(g_out, w_out, net.qp[edge][0])
        assert worst <= MAX_STEPS, f"{edge}: max |Δ| = {worst:.3f} steps"
        assert identical >= MIN_IDENTICAL, f"{edge}: only {identical:.2%} identical"


def test_every_quantized_layer_runs_integer_kernels(lowered: dict) -> None:
    meta = lowered["int8"].meta
    assert meta["float_compute_ops"] == [], meta["op_histogram"]
    assert meta["integer_ops"] == {"QGemm": 1, "QLinearAdd": 1, "QLinearConv": 2,
                                   "QLinearGlobalAveragePool": 1}, meta["op_histogram"]
    assert set(meta["quantized_layers"]) == {"conv2d", "conv2d_1", "add", "adaptive_avg_pool2d",
                                           "linear"}
    assert meta["float_ops_on_dequantized"] == [] and meta["requantize_pairs"] == [], meta
    fp32 = lowered["fp32"].meta
    assert fp32["integer_ops"] == {}
    assert fp32["float_compute_ops"] == ["conv2d", "conv2d_1", "linear"]  # all float


def test_weights_stay_int8_in_the_file(lowered: dict) -> None:
    int8, fp32 = lowered["int8"], lowered["fp32"]
    model = onnx.load(str(int8.path))
    dq_inputs = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    inits = {i.name: i for i in model.graph.initializer}
    weights = [inits[n] for n in dq_inputs if n in inits and len(inits[n].dims) >= 2]
    assert len(weights) == 3 and all(w.data_type == onnx.TensorProto.INT8 for w in weights)
    assert not [i.name for i in model.graph.initializer
                if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) >= 2], \
        "a weight DequantizeLinear was constant-folded into a float initializer"
    ratio = int8.meta["weights_bytes"] / fp32.meta["weights_bytes"]
    assert 0.25 <= ratio <= 0.30, ratio  # int8 weights; int32 biases and fp32 scales on top
    assert int8.size_bytes() < 0.32 * fp32.size_bytes()  # the graph itself is a few kB
    assert int8.meta["opset"] == fp32.meta["opset"] == BASE_OPSET
    assert int8.input_names == fp32.input_names == ("x",)
    assert int8.output_names == fp32.output_names == ("output_0", "output_1")


def test_fp32_artifact_matches_torch(lowered: dict) -> None:
    target, gm, x = lowered["target"], lowered["float_gm"], lowered["x"]
    with torch.no_grad():
        want = gm(x)
    for g, w in zip(target.run(lowered["fp32"], [x.numpy()]), want):
        assert np.abs(g - w.numpy()).max() <= 1e-5 * float(w.abs().max())


def test_profile_is_sane(lowered: dict) -> None:
    target, x = lowered["target"], lowered["x"].numpy()
    assert isinstance(target, Target) and target.name == "ort"
    lat = target.profile(lowered["int8"], [x], warmup=2, runs=5, threads=1)
    assert 0 < lat.median_ms <= lat.p90_ms
    assert lat.runs >= 5 and lat.warmup == 2 and lat.threads == 1 and lat.batch == BATCH
    assert lat.per_layer_ms is None


def test_per_layer_profile_names_conv_layers(lowered: dict) -> None:
    target, x = lowered["target"], lowered["x"].numpy()
    lat = target.profile(lowered["int8"], [x], warmup=1, runs=3, threads=1, per_layer=True)
    assert lat.per_layer_ms is not None
    assert {"conv2d", "conv2d_1", "linear"} <= set(lat.per_layer_ms), lat.per_layer_ms
    assert all(v >= 0 for v in lat.per_layer_ms.values())


def test_per_node_ms_uses_only_timed_runs() -> None:
    def run(ts: int) -> dict:
        return {"cat": "Session", "name": "model_run", "ts": ts, "dur": 100}

    def kernel(name: str, ts: int, dur: int) -> dict:
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur}

    trace = [run(0), kernel("node_conv2d", 10, 5000),  # warm-up run: excluded
             run(1000), kernel("node_conv2d_token_3", 1010, 40), kernel("node_add", 1060, 10),
             run(2000), kernel("node_conv2d_token_3", 2010, 60)]
    assert per_node_ms(json.loads(json.dumps(trace)), runs=2) == \
        {"conv2d": pytest.approx(0.05), "add": pytest.approx(0.005)}


class _SmallResNet(nn.Module):
    """Stem conv-BN-ReLU, max pool, a basic residual block, global pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16),
                                  nn.ReLU(), nn.MaxPool2d(2))
        self.c1 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 10)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, as after training
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.c2(self.c1(x)) + x)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_quantizer_output_runs_integer_and_matches(tmp_path: Path) -> None:
    """End to end through quantflow.quantize (ort placement): fusions and numerics contract."""
    from quantflow.calibrate import collect_stats
    from quantflow.passes.fold_bn import fold_bn
    from quantflow.quantize import quantize
    from quantflow.spec import int8_plan

    g = torch.Generator().manual_seed(5)
    x = torch.randn(BATCH, 3, 32, 32, generator=g)
    gm = capture(_SmallResNet(), (x,))
    assert fold_bn(gm)
    calib = [(torch.randn(BATCH, 3, 32, 32, generator=g),) for _ in range(4)]
    qgm = quantize(gm, int8_plan(), collect_stats(gm, calib, histograms=False))
    target = OrtTarget(threads=1)
    art = target.lower(qgm, (x,), tmp_path, precision="int8")
    meta = art.meta
    assert meta["integer_ops"] == {"NhwcMaxPool": 1, "QGemm": 1, "QLinearAdd": 1,
                                   "QLinearConv": 3, "QLinearGlobalAveragePool": 1}, meta
    assert meta["float_compute_ops"] == [] and meta["float_ops_on_dequantized"] == [], meta
    assert meta["requantize_pairs"] == [], meta
    # ONNX/ORT names are the quantized graph's own names (its Q/DQ nodes are `<tensor>_q`)
    names = {n.name for n in qgm.graph.nodes}
    assert set(meta["quantized_layers"]) <= names, meta["quantized_layers"]
    model = onnx.load(str(art.path))
    assert {n.name.removeprefix("node_") for n in model.graph.node
            if n.op_type == "QuantizeLinear"} <= names
    x_test = torch.randn(BATCH, 3, 32, 32, generator=g)
    with torch.no_grad():
        want = qgm(x_test)
    (got,) = target.run(art, [x_test.numpy()])
    ((step, bound),) = _output_step_bounds(qgm, (x_test,))
    worst, identical = _agreement(got, want, step)
    assert worst <= bound + 1e-3 and identical >= MIN_IDENTICAL, (worst, bound, identical)


def test_onnx_names_are_the_graph_names(tmp_path: Path) -> None:
    """Re-export renames nodes after their op; export_onnx maps them back, even permuted."""
    x = _inputs(0)
    gm = capture(ResBlockNet(channels=4), (x,))
    rename = {"conv2d": "conv2d_1", "conv2d_1": "stem", "linear": "conv2d"}
    for n in gm.graph.nodes:  # two passes: the new names permute existing ones
        if n.name in rename:
            n.name = f"tmp_{rename[n.name]}"
    for n in gm.graph.nodes:
        n.name = n.name.removeprefix("tmp_")
    gm.recompile()
    info = export_onnx(gm, (x,), tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"))
    by_op = {n.name: n.op_type for n in model.graph.node}
    assert by_op["node_conv2d_1"] == by_op["node_stem"] == "Conv" and by_op["node_conv2d"] == "Gemm"
    assert len(by_op) == len(model.graph.node)  # node names stay unique
    assert info.output_names == ("output_0", "output_1")


def test_summarize_graph_flags_float_islands() -> None:
    """An ORT graph where a conv stayed float between DQ and Q, and a DQ -> Q round trip."""
    h = onnx.helper
    nodes = [h.make_node("DequantizeLinear", ["xq", "s", "z"], ["x_dq"], name="node_x_dq"),
             h.make_node("FusedConv", ["x_dq", "w"], ["conv"], name="node_relu_nchwc",
                         domain="com.microsoft"),
             h.make_node("QuantizeLinear", ["conv", "s", "z"], ["conv_q"], name="node_conv_q"),
             h.make_node("DequantizeLinear", ["conv_q", "s", "z"], ["c_dq"], name="node_c_dq"),
             h.make_node("QuantizeLinear", ["c_dq", "s", "z"], ["act_q"], name="node_act_q"),
             h.make_node("QLinearConv", ["act_q"], ["y"], name="node_conv2d_1_token_7")]
    summary = summarize_graph(h.make_model(h.make_graph(nodes, "g", [], [])),
                              aliases={"relu": "conv2d"})
    assert summary["float_compute_ops"] == ["conv2d"]
    assert summary["float_ops_on_dequantized"] == ["conv2d (FusedConv)"]
    assert summary["requantize_pairs"] == ["c_dq -> act_q"]
    assert summary["quantized_layers"] == ["conv2d_1"]
    assert summary["integer_ops"] == {"QLinearConv": 1}


@torch.library.custom_op("quantflow_test::triple", mutates_args=())
def _triple(x: torch.Tensor) -> torch.Tensor:
    return x * 3


@_triple.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class _CustomOpNet(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _triple(torch.relu(x)) + 1


def test_unsupported_op_names_the_node(tmp_path: Path) -> None:
    x = torch.randn(2, 3)
    gm = capture(_CustomOpNet(), (x,))
    with pytest.raises(UnsupportedOpError, match=r"node 'triple'.*quantflow_test\.triple"):
        OrtTarget().lower(gm, (x,), tmp_path, precision="fp32")


class _U16Net(nn.Module):
    """A conv with uint16 activations: Q/DQ of a 16-bit type needs opset 21."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("w", torch.randint(-127, 128, (4, 3, 3, 3), dtype=torch.int8))
        self.register_buffer("ws", torch.full((4,), 0.01))
        self.register_buffer("wz", torch.zeros(4, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def qdq(t: torch.Tensor, s: float) -> torch.Tensor:
            q = qd.quantize_per_tensor.default(t, s, 32768, 0, 65535, torch.uint16)
            return qd.dequantize_per_tensor.default(q, s, 32768, 0, 65535, torch.uint16)

        w = qd.dequantize_per_channel.default(self.w, self.ws, self.wz, 0, -127, 127, torch.int8)
        return qdq(F.conv2d(qdq(x, 1e-4), w), 1e-3)


def test_16bit_activations_choose_opset_21(tmp_path: Path) -> None:
    x = torch.randn(1, 3, 8, 8)
    gm = capture(_U16Net(), (x,))
    art = OrtTarget(threads=1).lower(gm, (x,), tmp_path, precision="mixed")
    assert art.meta["opset"] == WIDE_QDQ_OPSET and "uint16" in art.meta["qdq_dtypes"]
    with torch.no_grad():
        want = gm(x)
    got = OrtTarget(threads=1).run(art, [x.numpy()])[0]
    assert _steps(got, want, 1e-3).max() <= MAX_STEPS
    with pytest.raises(ValueError, match="opset >= 21"):
        export_onnx(gm, (x,), tmp_path / "low.onnx", opset=BASE_OPSET)


def test_opset_the_exporter_cannot_write_is_an_error(tmp_path: Path) -> None:
    x = torch.randn(2, 3)
    gm = capture(nn.ReLU(), (x,))
    assert export_onnx(gm, (x,), tmp_path / "a.onnx", opset=17).opset == 17
    with pytest.raises(CaptureError, match="asked for opset 13 but the exporter wrote"):
        export_onnx(gm, (x,), tmp_path / "b.onnx", opset=13)


def test_unknown_precision_is_rejected(tmp_path: Path) -> None:
    gm: fx.GraphModule = capture(nn.ReLU(), (torch.randn(2),))
    with pytest.raises(ValueError, match="precision"):
        OrtTarget().lower(gm, (torch.randn(2),), tmp_path, precision="int4")
