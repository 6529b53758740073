"""ONNX Runtime's int8 kernels on each CPU class, probed: what targets/ort_isa.py claims.

One ONNX model holds a few hundred independent probes, each a QLinearConv (or QGemm) whose
weights are zero except for one pair of codes, fed uint8 255 everywhere: the exact result is
known, and a kernel that adds that pair in a saturating int16 returns less. The model runs
natively and, in one emulator process each, as x86 AVX2 (`qemu-x86_64 -cpu Haswell`) and on
the arm64 kernel families (`qemu-aarch64`, where tools/setup.sh built the sysroot). It checks:

- x86 AVX2 saturates exactly the pairs `quantflow.pair_limit.pair_index` names (adjacent in
  (kernel position, input channel) order) on both conv paths (MLAS's symmetric conv and
  its im2col GEMM), grouped convs and QGemm, and never for depthwise convs;
- the bound: a same-sign pair summing to 128 is exact, 129 saturates; opposite signs never;
- every arm64 family and the host (when it is not AVX2-class) compute every probe exactly,
  as `exact_on` says.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

from quantflow.devices import EMULATED_ISAS
from quantflow.errors import TargetUnavailableError
from quantflow.hostcpu import host_cpu
from quantflow.pair_limit import pair_index
from quantflow.targets import emulate, ort_isa

#: output scale: the exact results (at most 255·254 = 64770) map to codes 0..63
Y_SCALE = 1024.0

#: (name, out channels, in channels per group, groups, kernel): the paths MLAS takes
GEOMETRIES = [
    ("convsym_1x1", 16, 4, 1, 1),  # symmetric conv: cin % 4 == 0, cout >= 16
    ("convsym_3x3", 16, 8, 1, 3),
    ("gemm_cin3", 16, 3, 1, 3),  # im2col + QGEMM: odd cin, pairs straddle kernel positions
    ("gemm_cin1", 16, 1, 1, 3),
    ("gemm_cout8", 8, 4, 1, 3),  # cout < 16: QGEMM path
    ("gemm_cin5_1x1", 16, 5, 1, 1),
    ("grouped", 32, 2, 2, 3),  # groups > 1, not depthwise: QGEMM per group
    ("depthwise16", 16, 1, 16, 3),  # symmetric depthwise kernel
    ("depthwise8", 8, 1, 8, 3),  # generic depthwise kernel (groups not a multiple of 16)
]


def _qparams(inits: list, tag: str, w: np.ndarray, y_scale: float) -> list[str]:
    """Initializers of one probe: input uint8 (scale 1, zero point 0), the int8 weight with unit
    per-channel scales, the output uint8 at `y_scale`; returns the op's inputs after x."""
    n_out = w.shape[0]
    names = [f"{s}_{tag}" for s in ("xs", "xz", "w", "ws", "wz", "ys", "yz")]
    values = [np.array(1.0, np.float32), np.array(0, np.uint8), w.astype(np.int8),
              np.ones(n_out, np.float32), np.zeros(n_out, np.int8),
              np.array(y_scale, np.float32), np.array(0, np.uint8)]
    inits += [nh.from_array(v, n) for v, n in zip(values, names)]
    return names


def _conv_probe(nodes: list, inits: list, inputs: list, outputs: list, tag: str,
                w: np.ndarray, groups: int, y_scale: float = Y_SCALE, bias: int | None = None
                ) -> None:
    cout, cin_g, k, _ = w.shape
    x = f"x_{tag}"
    q = _qparams(inits, tag, w, y_scale)
    if bias is not None:
        inits.append(nh.from_array(np.full(cout, bias, np.int32), f"b_{tag}"))
        q.append(f"b_{tag}")
    nodes.append(oh.make_node("QLinearConv", [x, *q], [f"y_{tag}"], group=groups))
    inputs.append(oh.make_tensor_value_info(x, TensorProto.UINT8, [1, cin_g * groups, k, k]))
    outputs.append(oh.make_tensor_value_info(f"y_{tag}", TensorProto.UINT8, None))


def _gemm_probe(nodes: list, inits: list, inputs: list, outputs: list, tag: str,
                w: np.ndarray) -> None:
    """com.microsoft QGemm, the kernel ORT fuses DQ -> Gemm -> Q into; w is [out, in]."""
    x = f"x_{tag}"
    xs, xz, wq, ws, wz, ys, yz = _qparams(inits, tag, w, Y_SCALE)
    nodes.append(oh.make_node("QGemm", [x, xs, xz, wq, ws, wz, "", ys, yz], [f"y_{tag}"],
                              domain="com.microsoft", transB=1))
    inputs.append(oh.make_tensor_value_info(x, TensorProto.UINT8, [1, w.shape[1]]))
    outputs.append(oh.make_tensor_value_info(f"y_{tag}", TensorProto.UINT8, None))


def _probe_model() -> tuple[onnx.ModelProto, dict[str, tuple[bool, int]]]:
    """The model and, per output, (predicted to saturate on AVX2, exact code)."""
    nodes: list = []
    inits: list = []
    inputs: list = []
    outputs: list = []
    expect: dict[str, tuple[bool, int]] = {}
    rng = np.random.default_rng(0)
    for name, cout, cin_g, groups, k in GEOMETRIES:
        shape = (cout, cin_g, k, k)
        a, b = pair_index(shape)
        depthwise = cin_g == 1 and groups > 1 and cout == groups
        paired = {(int(i), int(j)) for i, j in zip(a, b)}
        candidates = sorted(paired)
        others = [p for p in itertools.combinations(range(cin_g * k * k), 2) if p not in paired]
        candidates += [others[i] for i in rng.choice(len(others), min(12, len(others)),
                                                     replace=False)]
        for n, (i, j) in enumerate(candidates):
            w = np.zeros((cout, cin_g * k * k), np.int8)
            w[:, i] = w[:, j] = 127
            tag = f"{name}_{n}"
            _conv_probe(nodes, inits, inputs, outputs, tag, w.reshape(shape), groups)
            sat = (i, j) in paired and not depthwise
            expect[f"y_{tag}"] = (sat, round(255 * 254 / Y_SCALE))
    # the bound itself, on the symmetric-conv path: (127, 1) = 128 fits, (127, 2) does not;
    # opposite signs never saturate. Output scale 1 and a bias that maps the exact sum to
    # code 100 make a saturated sum (32767 instead of 32895) land 128 codes away
    for tag, (u, v) in {"b128": (127, 1), "b129": (127, 2), "neg": (127, -127),
                        "bneg": (-127, -2)}.items():
        w = np.zeros((16, 4, 1, 1), np.int8)
        w[:, 0, 0, 0], w[:, 1, 0, 0] = u, v
        _conv_probe(nodes, inits, inputs, outputs, tag, w, 1, y_scale=1.0,
                    bias=100 - 255 * (u + v))
        expect[f"y_{tag}"] = (abs(u) + abs(v) > 128 and u * v > 0, 100)
    # QGemm (linear layers): pairs of adjacent input features
    a, b = pair_index((16, 10))
    for n, (i, j) in enumerate([(0, 1), (2, 3), (8, 9), (1, 2), (0, 9)]):
        w = np.zeros((16, 10), np.int8)
        w[:, i] = w[:, j] = 127
        _gemm_probe(nodes, inits, inputs, outputs, f"gemm_{n}", w)
        expect[f"y_gemm_{n}"] = ((i, j) in set(zip(a.tolist(), b.tolist())),
                                 round(255 * 254 / Y_SCALE))
    graph = oh.make_graph(nodes, "probes", inputs, outputs, inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13),
                                                oh.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model, expect


@pytest.fixture(scope="module")
def probes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    model, expect = _probe_model()
    path = tmp_path_factory.mktemp("probes") / "probes.onnx"
    onnx.save(model, str(path))
    feed = {i.name: np.full([d.dim_value for d in i.type.tensor_type.shape.dim], 255,
                            np.uint8) for i in model.graph.input}
    return path, expect, feed


def _run(path: Path, feed: dict, isa: str) -> dict[str, np.ndarray]:
    if isa == "host":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, feed)))
    try:
        return emulate.run_onnx(path, [feed], isa)[0]
    except TargetUnavailableError as exc:
        pytest.skip(str(exc))


def _saturated(outs: dict[str, np.ndarray], expect: dict) -> dict[str, bool]:
    return {k: bool(np.any(outs[k] != exact)) for k, (_, exact) in expect.items()}


def test_avx2_saturates_exactly_the_predicted_pairs(probes: tuple[Path, dict, dict]) -> None:
    path, expect, feed = probes
    got = _saturated(_run(path, feed, "x86-avx2"), expect)
    wrong = {k: (got[k], sat) for k, (sat, _) in expect.items() if got[k] != sat}
    assert not wrong, f"(saturated, predicted) differ on x86-avx2: {wrong}"
    assert sum(got.values()) > 50  # the probe really exercises the saturating kernels
    assert not ort_isa.exact_on("x86-vnni", "x86-avx2")
    assert ort_isa.exact_on("portable", "x86-avx2")


@pytest.mark.parametrize("isa", ["host", *[i for i in EMULATED_ISAS if i.startswith("arm64")]])
def test_exact_where_exact_on_says(probes: tuple[Path, dict, dict], isa: str) -> None:
    path, expect, feed = probes
    cls = host_cpu().isa_class if isa == "host" else isa
    got = _saturated(_run(path, feed, isa), expect)
    if ort_isa.exact_on("x86-vnni", cls):  # full int8 weights are exact on this class
        assert not any(got.values()), f"{isa} ({cls}) saturated: " \
            f"{[k for k, v in got.items() if v]}"
    else:  # an AVX2-class host: the same saturation as the emulated AVX2
        assert got == {k: sat for k, (sat, _) in expect.items()}
