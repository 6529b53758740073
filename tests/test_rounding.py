"""Learned rounding (quantflow/rounding.py): it lowers the reconstruction error versus
rounding to nearest, stays on the quantization grid, and respects the kernels' pair limit.
Fixed seeds; the thresholds are what these seeds give with margin."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from nets import SmallCNN
from optimized import compile_optimized
from torch import nn

from quantflow import calibrate as cal
from quantflow import data, rounding, rounding_blocks, zoo
from quantflow import evaluate as ev
from quantflow.ir import capture
from quantflow.pair_limit import pair_index, violations
from quantflow.passes import DEFAULT_PIPELINE, run_pipeline
from quantflow.quantize import quantizable_nodes, quantize
from quantflow.rounding import (
    Layer,
    RoundingOptions,
    h,
    init_v,
    learn_layer,
    learn_rounding,
    round_reg,
    rounding_cache_key,
    use_learned,
)
from quantflow.rounding_blocks import Block, find_blocks
from quantflow.spec import KernelRules, LayerPlan, QSpec, int8_plan

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rectified_sigmoid_starts_at_the_float_and_ends_binary() -> None:
    frac = torch.linspace(0.01, 0.99, 50)
    assert torch.allclose(h(init_v(frac)), frac, atol=1e-4)
    binary = torch.tensor([-20.0, 20.0])  # h = 0 and h = 1 exactly (the stretch clips)
    assert torch.equal(h(binary), torch.tensor([0.0, 1.0]))
    assert float(round_reg(binary, 2.0)) == 0.0 and float(round_reg(torch.zeros(3), 2.0)) > 2.9


def test_one_layer_learns_a_lower_output_error_at_4_bits() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, 3, 3, generator=g) * 0.2
    scale = (w.abs().amax(dim=(1, 2, 3)) / 7).reshape(-1, 1, 1, 1)
    # correlated inputs, as images and activations are (smoothed, mixed across channels,
    # rectified): with white inputs the output error is the weight error and nearest rounding
    # is already optimal, so there would be nothing to learn
    z = F.avg_pool2d(torch.randn(32, 8, 12, 12, generator=g), 3, stride=1)
    x = torch.relu(torch.einsum("oc,nchw->nohw", torch.randn(8, 8, generator=g), z))
    conv = lambda z, ww: F.conv2d(z, ww, padding=1)
    layer = Layer("c", w, None, scale, -7, 7, conv)
    y = conv(x, w)
    codes, before, after = learn_layer(layer, x, x, y, 1000, RoundingOptions(batch=8), g)
    # these seeds give 0.0181 -> 0.0122 (1.7 dB); 1.25 dB or more is asked
    assert after < 0.75 * before, (before, after)
    # a rounding of w on the same grid: every code is floor or ceil of w / s
    u = w / scale
    assert bool(((codes >= torch.floor(u)) & (codes <= torch.ceil(u))).all())


@pytest.fixture(scope="module")
def w4a8() -> dict[str, object]:
    """The Fashion-MNIST zoo ResNet (trained weights) with 4-bit weights on every layer but
    the first and the last, 8-bit activations; calibration on the fixed train subset."""
    net = zoo.get_model("resnet_fmnist").eval()
    xc, _ = data.builtin_dataset("fashion-mnist-calib")
    gm = capture(net, (xc[:1],))
    run_pipeline(gm, DEFAULT_PIPELINE)
    stats = cal.collect_stats(gm, cal.batched(xc[:128], 32))
    names = quantizable_nodes(gm)
    w4 = LayerPlan(QSpec(bits=4, granularity="channel", calibrator="mse"),
                   int8_plan().default.act)
    plan = replace(int8_plan("minmax"), layers={n: w4 for n in names[1:-1]})
    return {"gm": gm, "x": xc[:128], "stats": stats, "plan": plan}


def test_learned_rounding_improves_the_model_on_held_out_data(w4a8: dict) -> None:
    gm, x, stats, plan = w4a8["gm"], w4a8["x"], w4a8["stats"], w4a8["plan"]
    rules = KernelRules.of("ort")
    q0 = quantize(gm, plan, stats, rules)
    res = learn_rounding(gm, q0, x, RoundingOptions(seconds=5), progress=False)
    assert set(res.codes) == set(quantizable_nodes(gm))
    assert all(after <= before for before, after in res.errors.values())
    q1 = quantize(gm, plan, stats, rules, rounding=res.codes)
    xt, yt = data.load_fashion_mnist("test", limit=500)  # held out: never seen while learning
    ref = ev.predict(gm, xt)
    p0, p1 = ev.predict(q0, xt), ev.predict(q1, xt)
    rtn, learned = ev.sqnr_db(ref, p0), ev.sqnr_db(ref, p1)
    # these seeds: 19.1 dB -> about 23.3 dB, accuracy 94.4 % -> 95.0 % (FP32 94.0 %); the
    # step count follows the clock, so the exact figure varies from run to run
    assert learned > rtn + 2.5, (rtn, learned)
    acc = [float((p.argmax(1) == yt).float().mean()) for p in (ref, p0, p1)]
    assert acc[2] >= acc[0] - 0.005, acc  # W4A8 within 0.5 pt of FP32


def test_learned_codes_never_break_the_pair_limit() -> None:
    w = torch.full((2, 4), 0.5)
    scale = torch.full((2,), 0.5 / 63.6)  # w/s = 63.6: nearest 64, the ceil 64, floor 63
    nearest = torch.full((2, 4), 64.0)
    learned = torch.full((2, 4), 65.0)  # off the grid (ceil is 64): ignored
    spec = QSpec(bits=8, granularity="channel")
    assert torch.equal(use_learned(nearest, learned, w, scale, spec, 128), nearest)
    w2 = torch.full((2, 4), 0.5)
    s2 = torch.full((2,), 0.5 / 64.4)  # floor 64, ceil 65: 65 + 65 > 128 breaks the pair
    out = use_learned(torch.full((2, 4), 64.0), torch.full((2, 4), 65.0), w2, s2, spec, 128)
    a, b = pair_index((2, 4))
    assert not bool(violations(out.reshape(2, -1), a, b, 128).any())
    free = use_learned(torch.full((2, 4), 64.0), torch.full((2, 4), 65.0), w2, s2, spec, None)
    assert torch.equal(free, torch.full((2, 4), 65.0))  # no limit: the learned codes stand


def test_compile_with_optimize_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    torch.manual_seed(0)
    net = SmallCNN().eval()
    x = torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    out = tmp_path / "o"
    r = compile_optimized(net, x, tmp_path, out, "3s")
    assert r["rounding"]["layers"] == 4 and r["stages"]["round"] > 0
    assert r["rounding"]["resumed"] == 0
    assert r["parity"]["passed"]  # the artifact with learned codes still matches its simulation
    # the same compile again: every layer's rounding comes from the cache, same artifact
    out2 = tmp_path / "o2"
    r2 = compile_optimized(net, x, tmp_path, out2, "3s")
    assert r2["rounding"]["resumed"] == 4
    assert (out / "model.onnx").read_bytes() == (out2 / "model.onnx").read_bytes()


# --- block-wise reconstruction (BRECQ), QDrop, the resumable cache -------------------------


def _units(name: str) -> dict[str, Block]:
    net = zoo.get_model(name).eval()
    xc, _ = data.builtin_dataset("fashion-mnist-calib")
    gm = capture(net, (xc[:1],))
    run_pipeline(gm, DEFAULT_PIPELINE)
    units = find_blocks(gm.graph, quantizable_nodes(gm))
    # every layer in exactly one unit
    assert sorted(k for u in units for k in u.layers) == sorted(quantizable_nodes(gm))
    return {u.name: u for u in units}


def test_blocks_are_found_from_the_graph() -> None:
    # ResNet: a basic block per residual add, ending at the ReLU after it; the stem conv and
    # the classifier are units of their own
    res = _units("resnet_fmnist")
    assert len(res) == 8 and sum(u.residual for u in res.values()) == 6
    assert res["relu__2"].input == "relu_" and res["relu__2"].layers == ("conv2d_1", "conv2d_2")
    # a projection shortcut: its 1x1 conv is in the block (it sits between fork and add)
    assert res["relu__6"].input == "relu__4"
    assert res["relu__6"].layers == ("conv2d_5", "conv2d_6", "conv2d_7")
    assert not res["conv2d"].residual and not res["linear"].residual
    # MobileNetV2: the 4 inverted residuals (expand, depthwise, project) with a skip; the
    # block input is the previous block's projection, there is no activation after the add
    mb = _units("mobilenetv2_fmnist")
    assert len(mb) == 27 and [k for k, u in mb.items() if u.residual] == [
        "add", "add_1", "add_2", "add_3"]
    assert mb["add"].input == "conv2d_5" and mb["add"].layers == ("conv2d_6", "conv2d_7",
                                                                  "conv2d_8")
    assert mb["add_3"].input == "conv2d_26" and mb["add_3"].layers == ("conv2d_27", "conv2d_28",
                                                                      "conv2d_29")


class _Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = (nn.Conv2d(4, 4, 3, padding=1) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        inner = x + self.b(torch.relu(x))
        return torch.relu(x + self.c(inner))


def test_a_nested_residual_joins_the_outer_block() -> None:
    gm = capture(_Nested().eval(), (torch.randn(1, 4, 8, 8),))
    units = find_blocks(gm.graph, quantizable_nodes(gm))
    assert [(u.name, u.input, u.layers) for u in units] == [
        ("conv2d", "x", ("conv2d",)), ("relu_1", "conv2d", ("conv2d_1", "conv2d_2"))]
    with pytest.raises(ValueError, match="granularity"):
        RoundingOptions(granularity="blocks")


def _held_out_sqnr(w4a8: dict, codes: dict[str, torch.Tensor] | None) -> float:
    gm, plan, stats = w4a8["gm"], w4a8["plan"], w4a8["stats"]
    xt, _ = data.load_fashion_mnist("test", limit=500)  # never seen while learning
    q = quantize(gm, plan, stats, KernelRules.of("ort"), rounding=codes)
    return ev.sqnr_db(ev.predict(gm, xt), ev.predict(q, xt))


def _fixed(steps: int, **kw: object) -> RoundingOptions:
    """A fixed step count: the result does not depend on the clock (reproducible)."""
    return RoundingOptions(seconds=60, min_iters=steps, max_iters=steps, **kw)  # type: ignore


@pytest.fixture(scope="module")
def block_runs(w4a8: dict) -> dict[str, object]:
    """Block-wise learned rounding of the W4A8 ResNet at 150 steps per unit, with QDrop (0.5,
    the default) and without; and round-to-nearest, all as held-out SQNR."""
    threads = torch.get_num_threads()  # module scope: set up before the one_thread fixture
    torch.set_num_threads(1)
    try:
        q0 = quantize(w4a8["gm"], w4a8["plan"], w4a8["stats"], KernelRules.of("ort"))
        out: dict[str, object] = {"nearest": _held_out_sqnr(w4a8, None), "q0": q0}
        for qdrop in (0.5, 0.0):
            res = learn_rounding(w4a8["gm"], q0, w4a8["x"],
                                 _fixed(150, granularity="block", qdrop=qdrop), progress=False)
            out[f"res{qdrop}"], out[f"sqnr{qdrop}"] = res, _held_out_sqnr(w4a8, res.codes)
        return out
    finally:
        torch.set_num_threads(threads)


def test_block_reconstruction_improves_the_model_on_held_out_data(block_runs: dict) -> None:
    res = block_runs["res0.5"]
    # the blocks found on the quantized graph are the float graph's
    assert res.blocks == {"relu__2": ["conv2d_1", "conv2d_2"], "relu__4": ["conv2d_3", "conv2d_4"],
                          "relu__6": ["conv2d_5", "conv2d_6", "conv2d_7"],
                          "relu__8": ["conv2d_8", "conv2d_9"],
                          "relu__10": ["conv2d_10", "conv2d_11", "conv2d_12"],
                          "relu__12": ["conv2d_13", "conv2d_14"]}
    assert len(res.codes) == 16 and all(a <= b for b, a in res.errors.values())
    summary = json.loads(json.dumps(res.summary()))
    assert {"layers", "seconds", "output_mse_gain_db", "blocks"} <= set(summary)
    # these seeds: nearest 19.1 dB -> 22.7 dB (layer-wise at 150 steps: 22.6 dB; on this small
    # network at W4A8 neither granularity wins consistently); 2.5 dB or more is asked
    assert block_runs["sqnr0.5"] > block_runs["nearest"] + 2.5, block_runs


def test_qdrop_effect_on_held_out_data(w4a8: dict, block_runs: dict) -> None:
    """QDrop (learning on inputs with float elements mixed in) as an option: with or without
    it, block-wise and layer-wise learned rounding beat nearest rounding on held-out data by
    more than 2 dB. Its sign is not asserted because it is not stable: measured on this model
    (150 steps per block, 100 per layer) QDrop 0.5 gave 22.1 vs 24.4 dB without (blocks) and
    23.0 vs 23.8 dB (layers); before the bias fix (quantize.py: learned layers keep the bias
    corrected for nearest codes) it helped the blocks by 0.4 dB."""
    with_qdrop, without = block_runs["sqnr0.5"], block_runs["sqnr0.0"]
    assert min(with_qdrop, without) > block_runs["nearest"] + 2.0, block_runs
    q0 = block_runs["q0"]
    layer = {qd: _held_out_sqnr(w4a8, learn_rounding(w4a8["gm"], q0, w4a8["x"],
                                                      _fixed(100, qdrop=qd), progress=False).codes)
             for qd in (0.5, 0.0)}
    assert min(layer.values()) > block_runs["nearest"] + 2.0, layer


def test_the_cache_resumes_an_interrupted_run(w4a8: dict, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    gm, x, q0 = w4a8["gm"], w4a8["x"], quantize(w4a8["gm"], w4a8["plan"], w4a8["stats"],
                                                KernelRules.of("ort"))
    opts = _fixed(10, granularity="block")
    ref = learn_rounding(gm, q0, x, opts, progress=False)  # uninterrupted, no cache
    real, calls = rounding_blocks.learn_block, []

    def interrupted(*args: object) -> object:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C while learning the third block
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(rounding_blocks, "learn_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        learn_rounding(gm, q0, x, opts, progress=False, cache=tmp_path)
    # the stem conv and two blocks were saved (a file per unit, no temporary left behind)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv2d.pt", "relu__2.pt", "relu__4.pt"]
    calls.clear()
    monkeypatch.setattr(rounding_blocks, "learn_block",
                        lambda *a: (calls.append(1), real(*a))[1])
    with caplog.at_level(logging.INFO, logger="quantflow.rounding"):
        res = learn_rounding(gm, q0, x, opts, progress=False, cache=tmp_path)
    assert "resumed 5 layers from cache" in caplog.text and res.resumed == 5
    assert len(calls) == 4  # only the four blocks left were learned
    # and the result is the uninterrupted run's, code for code
    assert res.codes.keys() == ref.codes.keys()
    assert all(torch.equal(res.codes[k], ref.codes[k]) for k in ref.codes)


def test_the_cache_loads_every_layer_on_a_rerun(w4a8: dict, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    gm, x, q0 = w4a8["gm"], w4a8["x"], quantize(w4a8["gm"], w4a8["plan"], w4a8["stats"],
                                                KernelRules.of("ort"))
    opts = _fixed(10)
    first = learn_rounding(gm, q0, x, opts, progress=False, cache=tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 16

    def never(*args: object) -> object:
        raise AssertionError("learn_layer called although every layer is cached")

    monkeypatch.setattr(rounding, "learn_layer", never)
    again = learn_rounding(gm, q0, x, opts, progress=False, cache=tmp_path)
    assert again.resumed == 16 and again.summary()["resumed"] == 16
    assert all(torch.equal(again.codes[k], first.codes[k]) for k in first.codes)
    assert again.errors == first.errors
    # the key: the same inputs give the same key; other options, data or grid another one
    key = rounding_cache_key(gm, q0, x, opts)
    assert key == rounding_cache_key(gm, q0, x.clone(), _fixed(10))
    assert key != rounding_cache_key(gm, q0, x, _fixed(10, qdrop=0.0))
    assert key != rounding_cache_key(gm, q0, x, _fixed(10, granularity="block"))
    assert key != rounding_cache_key(gm, q0, x.flip(0), opts)
    q8 = quantize(gm, int8_plan("minmax"), w4a8["stats"], KernelRules.of("ort"))
    assert key != rounding_cache_key(gm, q8, x, opts)
    # a folder written under another key is not used: the layers are learned again
    monkeypatch.setattr(rounding, "learn_layer", learn_layer)
    other = learn_rounding(gm, q0, x, _fixed(10, qdrop=0.0), progress=False, cache=tmp_path)
    assert other.resumed == 0
