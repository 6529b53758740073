"""TVM target: integer lowering vs the torch simulation, float baseline, artifact, profile,
tuning cache, aarch64 bundle.

Tolerances (all against the torch simulation of the same graph):
- one integer layer + requantize: <= 1 output quantization step, and >= 99% of elements
  exact (the int32 accumulator is exact; the simulation's fp32 sum differs from it by
  rounding, which flips the requantize only when it straddles a rounding boundary).
- whole quantized nets: a flipped intermediate code propagates, so the bound is per test:
  <= 1 output step for QNet (measured over seeded inputs), and for float logits out of an
  integer linear: one flipped input code, s_in * max|w| (`_one_flip_bound`).
- float graphs: max|Δ| <= 1e-5 * max|y| (TVM and torch sum in different orders).
- aarch64 vs x86 build: <= 1 output step (observed identical).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.ao.quantization.fx._decomposed
from nets import TinyResidual
from torch import nn

pytest.importorskip("tvm")

from quantflow.ir import capture
from quantflow.targets import get_target
from quantflow.targets.tvm_artifact import sha256_file
from quantflow.targets.tvm_int_math import integer_bias

pytestmark = pytest.mark.tvm
qd = torch.ops.quantized_decomposed
FLOAT_REL = 1e-5
MIN_EXACT = 0.99


class QConv(nn.Module):
    """A PT2E-style quantized conv: int8 per-channel weights, int32 bias at scale sx*sw."""

    def __init__(self, cin: int, cout: int, sx: float, *, groups: int = 1, stride: int = 1,
                 padding: int = 1, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(cout, cin // groups, 3, 3, generator=g) * 0.3
        sw = w.abs().amax(dim=(1, 2, 3)) / 127
        b = torch.randn(cout, generator=g) * 0.1
        self.register_buffer("wq", torch.round(w / sw[:, None, None, None]).to(torch.int8))
        self.register_buffer("sw", sw)
        self.register_buffer("zw", torch.zeros(cout, dtype=torch.int64))
        self.register_buffer("bq", torch.round(b / (sx * sw)).to(torch.int32))
        self.register_buffer("sb", sx * sw)
        self.stride, self.padding, self.groups = stride, padding, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = qd.dequantize_per_channel.default(self.wq, self.sw, self.zw, 0, -127, 127, torch.int8)
        b = qd.dequantize_per_channel.default(self.bq, self.sb, self.zw, 0, -2**31, 2**31 - 1,
                                              torch.int32)
        return torch.ops.aten.conv2d.default(x, w, b, [self.stride] * 2, [self.padding] * 2,
                                             [1, 1], self.groups)


def q(x: torch.Tensor, s: float, z: int) -> torch.Tensor:
    """quantize + dequantize (uint8, asymmetric), as PT2E inserts it."""
    x = qd.quantize_per_tensor.default(x, s, z, 0, 255, torch.uint8)
    return qd.dequantize_per_tensor.default(x, s, z, 0, 255, torch.uint8)


class QNet(nn.Module):
    """conv-relu, depthwise conv, residual add, max pool, global pool, linear: a tiny zoo net."""

    S_IN, Z_IN, S1, S2, S3, S_OUT, Z_OUT = 0.03, 120, 0.02, 0.025, 0.03, 0.05, 100

    def __init__(self) -> None:
        super().__init__()
        self.c1 = QConv(3, 8, self.S_IN, seed=1)
        self.c2 = QConv(8, 8, self.S1, groups=8, seed=2)
        self.c3 = QConv(8, 16, self.S2, stride=2, seed=3)
        g = torch.Generator().manual_seed(4)
        w = torch.randn(10, 16, generator=g) * 0.3
        sw = w.abs().amax(dim=1) / 127
        self.register_buffer("lw", torch.round(w / sw[:, None]).to(torch.int8))
        self.register_buffer("lsw", sw)
        self.register_buffer("lz", torch.zeros(10, dtype=torch.int64))
        self.register_buffer("lb", torch.round(torch.randn(10, generator=g) / (self.S3 * sw))
                             .to(torch.int32))
        self.register_buffer("lsb", self.S3 * sw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = q(x, self.S_IN, self.Z_IN)
        a = q(torch.relu(self.c1(x)), self.S1, 0)
        b = q(self.c2(a), self.S2, 128)
        b = q(torch.relu(b + a), self.S2, 0)  # residual add in float between Q/DQ
        c = q(torch.relu(self.c3(b)), self.S3, 0)
        c = torch.nn.functional.max_pool2d(c, 2)
        c = q(torch.mean(c, dim=(2, 3)), self.S3, 0)
        w = qd.dequantize_per_channel.default(self.lw, self.lsw, self.lz, 0, -127, 127,
                                              torch.int8)
        bias = qd.dequantize_per_channel.default(self.lb, self.lsb, self.lz, 0, -2**31,
                                                 2**31 - 1, torch.int32)
        y = torch.ops.aten.linear.default(c, w, bias)
        return q(y, self.S_OUT, self.Z_OUT)


def FNet() -> nn.Module:
    torch.manual_seed(0)
    return TinyResidual(width=8, classes=5, relu6=False)


def quantized_gm() -> tuple[torch.fx.GraphModule, torch.Tensor]:
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    return capture(QNet(), (x,)), x


def steps_apart(got: np.ndarray, want: np.ndarray, step: float) -> np.ndarray:
    return np.abs(got - want) / step


# ----------------------------------------------------------------------------- pure math

def test_zero_point_correction_with_padding_equals_centered_conv() -> None:
    """conv(pad(xq, zx), wq) + integer_bias == conv(xq - zx, wq, zero padding) + bq, exactly."""
    g = torch.Generator().manual_seed(0)
    xq = torch.randint(0, 256, (1, 4, 7, 7), generator=g)
    wq = torch.randint(-127, 128, (6, 2, 3, 3), generator=g)
    bq = torch.randint(-5000, 5000, (6,), generator=g)
    zx = 37
    ref = torch.nn.functional.conv2d((xq - zx).double(), wq.double(), bq.double(), padding=1,
                                     groups=2)
    padded = torch.nn.functional.pad(xq, (1, 1, 1, 1), value=zx)
    corr = torch.from_numpy(integer_bias(bq.numpy().astype(np.int32), wq.numpy(), zx))
    got = torch.nn.functional.conv2d(padded.double(), wq.double(), corr.double(), groups=2)
    assert torch.equal(got, ref)


# ----------------------------------------------------------------------------- host lowering

@pytest.fixture(scope="module")
def int8_artifact(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    gm, x = quantized_gm()
    target = get_target("tvm")
    art = target.lower(gm, (x,), tmp_path_factory.mktemp("tvm_int8"), precision="int8")
    return target, art, gm, x


def test_int8_uses_integer_kernels_and_matches_simulation(int8_artifact) -> None:  # type: ignore[no-untyped-def]
    """End to end, a flipped intermediate rounding can propagate; for this net the output
    stays within 1 step (the per-layer bound is tested exactly below)."""
    target, art, gm, _x = int8_artifact
    assert sorted(art.meta["int_layers"]) == ["conv2d", "conv2d_1", "conv2d_2", "linear"]
    assert art.meta["float_layers"] == {}
    g = torch.Generator().manual_seed(11)
    for scale in (1.0, 2.0, 3.0):
        xi = (torch.randn(1, 3, 16, 16, generator=g) * scale).numpy()
        (got,) = target.run(art, [xi])
        want = gm(torch.from_numpy(xi)).detach().numpy()
        assert got.shape == want.shape and got.dtype == np.float32
        d = steps_apart(got, want, QNet.S_OUT)
        assert d.max() <= 1.0 + 1e-4, f"max {d.max():.3f} steps"


class OneConv(nn.Module):
    """One quantized conv (+ReLU) to 32 channels, between Q/DQ pairs."""

    def __init__(self, in_channels: int = 16) -> None:
        super().__init__()
        self.conv = QConv(in_channels, 32, QNet.S_IN, seed=5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return q(torch.relu(self.conv(q(x, QNet.S_IN, QNet.Z_IN))), QNet.S1, 3)


def test_single_int_conv_within_one_step_mostly_exact(tmp_path: Path) -> None:
    """One layer: integer conv + folded requantize vs fp32 simulation: <= 1 step everywhere,
    and a flip needs the fp32 sum to straddle a rounding boundary, so >= 99% are exact."""
    x = torch.randn(1, 16, 24, 24, generator=torch.Generator().manual_seed(3))
    gm = capture(OneConv(), (x,))
    target = get_target("tvm")
    art = target.lower(gm, (x,), tmp_path, precision="int8")
    assert art.meta["int_layers"] == ["conv2d"]
    (got,) = target.run(art, [x.numpy()])
    want = gm(x).detach().numpy()
    d = steps_apart(got, want, QNet.S1)
    assert d.max() <= 1.0 + 1e-4
    assert np.mean(d < 1e-3) >= MIN_EXACT


def test_fp32_graph_matches_torch_and_shares_out_dir(int8_artifact) -> None:  # type: ignore[no-untyped-def]
    """The pipeline lowers fp32 and int8 into one out_dir: neither may clobber the other."""
    host, int8_art, _gm, x = int8_artifact
    (before,) = host.run(int8_art, [x.numpy()])
    model = FNet().eval()
    xf = torch.randn(2, 3, 12, 12)
    target = get_target("tvm")
    out_dir = Path(int8_art.files["model"]).parent
    art = target.lower(capture(model, (xf,)), (xf,), out_dir, precision="fp32")
    assert art.meta["int_layers"] == []
    assert Path(art.files["model"]).name == "model_fp32.so"
    assert Path(art.files["manifest"]).name == "manifest_fp32.json"
    (got,) = target.run(art, [xf.numpy()])
    want = model(xf).detach().numpy()
    assert np.abs(got - want).max() <= FLOAT_REL * np.abs(want).max()
    (after,) = get_target("tvm").run(int8_art, [x.numpy()])
    assert np.array_equal(before, after)


def test_manifest_and_fresh_process_reload(int8_artifact) -> None:  # type: ignore[no-untyped-def]
    target, art, _gm, x = int8_artifact
    manifest = json.loads(Path(art.files["manifest"]).read_text())
    assert manifest["inputs"] == [{"name": art.input_names[0], "shape": [1, 3, 16, 16],
                                   "dtype": "float32"}]
    assert manifest["outputs"][0]["shape"] == [1, 10]
    assert manifest["sha256"]["model.so"] == sha256_file(Path(art.files["model"]))
    np.save(Path(art.files["model"]).parent / "x.npy", x.numpy())
    script = textwrap.dedent(f"""
        import numpy as np, tvm
        from tvm import relax
        d = {str(Path(art.files["model"]).parent)!r}
        vm = relax.VirtualMachine(tvm.runtime.load_module(d + "/model.so"), tvm.cpu())
        out = vm["main"](tvm.runtime.tensor(np.load(d + "/x.npy")))
        np.save(d + "/y.npy", out[0].numpy())
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    fresh = np.load(Path(art.files["model"]).parent / "y.npy")
    (same,) = target.run(art, [x.numpy()])
    assert np.array_equal(fresh, same)


def test_profile_reports_latency_and_kernels(int8_artifact) -> None:  # type: ignore[no-untyped-def]
    target, art, _gm, x = int8_artifact
    lat = target.profile(art, [x.numpy()], warmup=2, runs=5, threads=1, per_layer=True)
    assert lat.runs >= 5 and lat.threads == 1 and lat.batch == 1
    assert 0 < lat.median_ms <= lat.p90_ms
    assert lat.per_layer_ms is not None
    # one fused kernel per integer layer, named after its fx node; the pads in front of the
    # padded convs (c1, c2; c3 too) are their own kernels, named after the conv they feed
    layers = set(lat.per_layer_ms)
    assert {"conv2d", "conv2d_1", "conv2d_2", "linear"} <= layers, sorted(layers)
    assert {"conv2d_1 (pad)", "conv2d_2 (pad)"} <= layers, sorted(layers)
    assert not any(k.startswith("fused_conv2d") for k in layers), sorted(layers)
    assert all(v >= 0 for v in lat.per_layer_ms.values())
    assert sum(lat.per_layer_ms.values()) <= 5 * lat.p90_ms


@pytest.mark.parametrize("placement", ["ort", "trt"])
def test_quantflow_quantizer_output_lowers_to_integer_layers(tmp_path: Path,
                                                            placement: str) -> None:
    """The real quantizer's graph (ort: int32 bias; trt: float bias, no Q after convs)."""
    from quantflow.calibrate import collect_stats
    from quantflow.passes.fold_bn import fold_bn
    from quantflow.quantize import quantize
    from quantflow.spec import int8_plan

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 12, 12, generator=g)
    gm = capture(FNet().eval(), (x,))
    fold_bn(gm)
    stats = collect_stats(gm, [(torch.randn(4, 3, 12, 12, generator=g),) for _ in range(4)])
    qgm = quantize(gm, int8_plan("minmax"), stats, placement)
    target = get_target("tvm")
    art = target.lower(qgm, (x,), tmp_path, precision="int8")
    assert sorted(art.meta["int_layers"]) == ["conv2d", "conv2d_1", "linear"], art.meta
    (got,) = target.run(art, [x.numpy()])
    want = qgm(x).detach().numpy()
    # The logits leave the last (integer) linear in float, so they differ from the simulation
    # by fp32 rounding, unless an upstream requantize flipped: one flipped input code of the
    # linear moves logit o by at most s_in * max_k |w[o, k]|.
    assert np.abs(got - want).max() <= max(_one_flip_bound(qgm, "linear"),
                                           1e-5 * np.abs(want).max())


def _one_flip_bound(qgm: torch.fx.GraphModule, name: str) -> float:
    node = next(n for n in qgm.graph.nodes if n.name == name)
    x_dq, w_dq = node.args[0], node.args[1]
    s_in = float(x_dq.args[1])
    wq, sw = (getattr(qgm, str(a.target)) for a in w_dq.args[:2])
    return s_in * float((wq.float().abs() * sw[:, None]).max())


# ----------------------------------------------------------------------------- tuning

class TwoConvs(nn.Module):
    """Two quantized convs whose requantize scales are constructor arguments: a stand-in for
    one model calibrated twice (same weights and shapes, other activation scales)."""

    def __init__(self, s_mid: float, s_out: float) -> None:
        super().__init__()
        self.c1 = QConv(16, 32, QNet.S_IN, seed=5)
        self.c2 = QConv(32, 16, s_mid, seed=6)
        self.s_mid, self.s_out = s_mid, s_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = q(torch.relu(self.c1(q(x, QNet.S_IN, QNet.Z_IN))), self.s_mid, 0)
        return q(self.c2(a), self.s_out, 128)


def test_recalibration_reuses_every_tuning_record(tmp_path: Path) -> None:
    """Records are keyed by workload (the conv), not by the calibration's scale literals in
    the fused requantize: the second calibration tunes nothing, every conv gets a record
    (replayed on the new epilogue), and the outputs still match its own simulation (<= 1
    step). A second model sharing one conv shape tunes only its new workload."""
    x = torch.randn(1, 16, 12, 12, generator=torch.Generator().manual_seed(3))
    target = get_target("tvm", tune_trials=1, cache_dir=tmp_path / "cache",
                        shipped_records=False)
    first_gm = capture(TwoConvs(0.02, 0.05), (x,))
    first = target.lower(first_gm, (x,), tmp_path / "a", precision="int8")
    tuning = first.meta["tuning"]
    assert tuning["cache_hit"] is False and tuning["tuned_tasks"] == tuning["tasks"] >= 2
    # each workload's default schedule was measured into the database before tuning
    assert tuning["defaults_measured"] == tuning["tasks"]
    assert first.meta["records"]["records"] == {"cache": tuning["tasks"]}
    # the measured defaults read back as such (a kernel whose best record is one keeps its
    # own default schedule, epilogue included): one per workload
    import tvm.s_tir.meta_schedule as ms

    from quantflow.targets.tvm_anchor import anchor_key
    from quantflow.targets.tvm_records import EQUALITY, read_trials
    from quantflow.targets.tvm_schedules import is_default_record

    db = ms.database.JSONDatabase(work_dir=tuning["work_dir"], module_equality=EQUALITY)
    path = target.dot_path(target.target())
    defaults = {anchor_key(next(f for _g, f in r.workload.mod.functions_items()))
                for r in db.get_all_tuning_records() if is_default_record(r, path)}
    tuned = set(read_trials(Path(tuning["work_dir"])))
    assert len(tuned) == tuning["tasks"] and tuned <= defaults
    recal_gm = capture(TwoConvs(0.031, 0.043), (x,))  # other scales: other TIR literals
    recal = target.lower(recal_gm, (x,), tmp_path / "b", precision="int8")
    assert recal.meta["tuning"]["cache_hit"] is True
    assert recal.meta["tuning"]["tuned_tasks"] == 0
    assert recal.meta["tuning"]["reused_tasks"] == tuning["tasks"]
    assert recal.meta["tuning"]["work_dir"] == tuning["work_dir"]
    assert recal.meta["records"]["records"] == {"cache": tuning["tasks"]}
    assert recal.meta["records"]["no_record"] == []
    for art, gm, step in ((first, first_gm, 0.05), (recal, recal_gm, 0.043)):
        (got,) = target.run(art, [x.numpy()])
        assert steps_apart(got, gm(x).detach().numpy(), step).max() <= 1.0 + 1e-4
    # untuned (tune_trials=0), the same cache: the records are used without tuning
    plain = get_target("tvm", cache_dir=tmp_path / "cache", shipped_records=False)
    art = plain.lower(recal_gm, (x,), tmp_path / "c", precision="int8")
    assert "tuning" not in art.meta and art.meta["records"]["records"] == {"cache": 2}
    # another model: its first conv is the same workload, its second conv is new
    other_gm = capture(OneConv(), (x,))
    other = target.lower(other_gm, (x,), tmp_path / "d", precision="int8")
    assert other.meta["tuning"]["reused_tasks"] >= 1
    assert other.meta["tuning"]["tuned_tasks"] == other.meta["tuning"]["tasks"] - \
        other.meta["tuning"]["reused_tasks"]


def test_a_kernel_slower_in_the_model_is_put_back(tmp_path: Path) -> None:
    """After tuning, kernels are timed inside the model and any that got slower is put back
    as it was (tuning times kernels alone). Stand-in for a bad tuning: TVM's naive loops as
    the "tuned" module, the default schedules as "before": every conv comes back with its
    default schedule."""
    import tvm
    import tvm_ffi

    from quantflow.targets import tvm_records, tvm_tune
    from quantflow.targets.tvm_anchor import anchor_key
    from quantflow.targets.tvm_cpu import set_threads
    from quantflow.targets.tvm_frontend import to_relax
    from quantflow.targets.tvm_profile import keep_faster

    x = torch.randn(1, 16, 12, 12, generator=torch.Generator().manual_seed(3))
    target = get_target("tvm", shipped_records=False)
    llvm = target.target()
    path = target.dot_path(llvm)
    mod, _stats = to_relax(capture(TwoConvs(0.02, 0.05), (x,)), (x,), dot=path)
    naive = tvm_tune.prepare(mod, llvm)
    default, _counts = tvm_records.apply(naive, llvm, [], path)
    # one thread: on a loaded machine (the parallel test run) a parallel kernel waits for
    # descheduled pool threads, which would time the thread pool, not the schedules
    previous = set_threads(1)
    try:
        out, kept = keep_faster(default, naive, tvm.compile(default, llvm),
                                tvm.compile(naive, llvm), [x.numpy()])
    finally:
        set_threads(previous)
    convs = {str(gv.name_hint): gv for gv, f in naive.functions_items()
             if isinstance(f, tvm.tirx.PrimFunc) and anchor_key(f) is not None}
    assert len(convs) == 2 and set(convs) <= set(kept)
    for gv in convs.values():
        assert tvm_ffi.structural_equal(out[gv], default[gv])


def test_an_unreadable_tuning_cache_is_a_clear_error(tmp_path: Path) -> None:
    """TVM replays every record when it reads a tuning database; a record whose trace does
    not replay (seen after tuning MiniLM) makes the next tuning into that cache fail. That is
    a TargetRuntimeError naming the folder and the fix, not TVM's traceback."""
    from quantflow.errors import TargetRuntimeError

    x = torch.randn(1, 16, 12, 12, generator=torch.Generator().manual_seed(3))
    target = get_target("tvm", tune_trials=1, cache_dir=tmp_path / "cache",
                        shipped_records=False)
    art = target.lower(capture(OneConv(), (x,)), (x,), tmp_path / "a", precision="int8")
    records = Path(art.meta["tuning"]["work_dir"]) / "database_tuning_record.json"
    first = json.loads(records.read_text().splitlines()[0])
    first[1][0][0][0] = ["GetSBlock", [], ["no_such_block", "main"], ["b0"]]
    with records.open("a") as f:
        f.write(json.dumps(first) + "\n")
    with pytest.raises(TargetRuntimeError, match="cannot be read back.*fix: delete"):
        target.lower(capture(OneConv(8), (x[:, :8],)), (x[:, :8],), tmp_path / "b",
                     precision="int8")


@pytest.mark.slow
def test_tune_time_budget_ends_tuning(tmp_path: Path) -> None:
    """--tune-time alone: up to 512 trials per workload, ended by the clock (short rounds
    that start only while time is left; every measured record is counted)."""
    x = torch.randn(1, 16, 12, 12, generator=torch.Generator().manual_seed(3))
    gm = capture(TwoConvs(0.02, 0.05), (x,))
    target = get_target("tvm", tune_seconds=20, cache_dir=tmp_path / "cache",
                        shipped_records=False)
    art = target.lower(gm, (x,), tmp_path / "a", precision="int8")
    tuning = art.meta["tuning"]
    assert tuning["stopped_by_time"] is True and 20 <= tuning["tuning_s"] < 120
    assert 0 < tuning["trials"] < 512 * tuning["tasks"]
    counted = json.loads((Path(tuning["work_dir"]) / "trials.json").read_text())
    assert sum(counted.values()) == tuning["trials"]
    (got,) = target.run(art, [x.numpy()])
    assert steps_apart(got, gm(x).detach().numpy(), 0.05).max() <= 1.0 + 1e-4


# ----------------------------------------------------------------------------- aarch64 bundle

def _edge_skip_reason() -> str | None:
    from quantflow.targets.tvm_edge import missing_toolchain

    return missing_toolchain(need_qemu=True)


@pytest.mark.skipif(_edge_skip_reason() is not None, reason=str(_edge_skip_reason()))
def test_aarch64_bundle_runs_under_qemu_like_x86(int8_artifact, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Same integer math on both ISAs; float epilogues may contract to FMA on Arm, so the
    bound is 1 output step (observed: identical)."""
    host, host_art, gm, x = int8_artifact
    edge = get_target("tvm", device="aarch64")
    art = edge.lower(gm, (x,), tmp_path, precision="int8")
    out = subprocess.run(["file", "-L", art.files["model"], art.files["runner"]],
                         check=True, capture_output=True, text=True).stdout
    assert out.count("ARM aarch64") == 2, out
    manifest = json.loads(Path(art.files["manifest"]).read_text())
    for name in ("model.so", "runner", "libtvm_runtime.so", "libtvm_ffi.so"):
        assert name in manifest["sha256"]
    assert "qemu-aarch64 -L /usr/aarch64-linux-gnu ./runner" in Path(art.files["readme"]).read_text()
    g = torch.Generator().manual_seed(5)
    for xi in (x.numpy(), torch.randn(1, 3, 16, 16, generator=g).numpy()):
        (got,) = edge.run(art, [xi])
        (want,) = host.run(host_art, [xi])
        assert got.dtype == want.dtype and got.shape == want.shape
        assert steps_apart(got, want, QNet.S_OUT).max() <= 1.0 + 1e-4


@pytest.mark.slow
@pytest.mark.skipif(_edge_skip_reason() is not None, reason=str(_edge_skip_reason()))
def test_aarch64_fp32_bundle_matches_torch(tmp_path: Path) -> None:
    model = FNet().eval()
    x = torch.randn(1, 3, 12, 12)
    edge = get_target("tvm", device="aarch64")
    art = edge.lower(capture(model, (x,)), (x,), tmp_path, precision="fp32")
    (got,) = edge.run(art, [x.numpy()])
    want = model(x).detach().numpy()
    assert np.abs(got - want).max() <= FLOAT_REL * np.abs(want).max()


# ----------------------------------------------------------------------------- errors

def test_errors_name_the_problem(tmp_path: Path) -> None:
    from quantflow.errors import UnsupportedOpError

    class Bessel(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.special.bessel_j0(x)

    x = torch.randn(1, 4)
    with pytest.raises(UnsupportedOpError, match=r"special_bessel_j0"):
        get_target("tvm").lower(capture(Bessel(), (x,)), (x,), tmp_path, precision="fp32")
    with pytest.raises(ValueError, match="device"):
        get_target("tvm", device="riscv")
    with pytest.raises(ValueError, match="tune_trials=0"):
        get_target("tvm", device="aarch64", tune_trials=4)


@pytest.mark.tvm
def test_select_with_a_negative_index_reads_the_right_element(tmp_path: Path) -> None:
    """x[..., -1]: TVM 0.27's own converter took -1 literally (3.06 off on random inputs)."""
    from quantflow.ir import capture
    from quantflow.targets import get_target

    class Last(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[..., -1] * 2.0 + x[:, 0, :].sum(-1, keepdim=True)

    x = torch.randn(4, 12, 32, generator=torch.Generator().manual_seed(0))
    gm = capture(Last(), (x,))
    target = get_target("tvm")
    art = target.lower(gm, (x,), tmp_path, precision="fp32")
    (got,) = target.run(art, [x.numpy()])
    with torch.no_grad():
        assert float((torch.from_numpy(got) - gm(x)).abs().max()) < 1e-5
