"""Transformer encoders: the attention passes, SmoothQuant, the placement that keeps the residual
stream and the attention mask float, the integer kernels ONNX Runtime runs, and all-MiniLM-L6-v2
(real weights, real sentences) quantized to INT8."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantflow.calibrate import batched, collect_stats
from quantflow.ir import capture
from quantflow.passes import optimize
from quantflow.passes.decompose_sdpa import decompose_sdpa
from quantflow.passes.fold_scale import fold_scale
from quantflow.passes.smooth import smooth, smooth_scales
from quantflow.placement import observed_tensors, plan_tensors
from quantflow.quantize import quantize
from quantflow.spec import int8_plan
from quantflow.testing import aten_op_counts, check_pass

aten = torch.ops.aten
minilm = pytest.importorskip("quantflow.zoo.minilm")
GOLDEN = Path(__file__).parent / "golden" / "minilm_hf_8.npy"


class Encoder(nn.Module):
    """One post-LayerNorm BERT layer on (N, L, D) with a padding mask, SDPA attention; its
    LayerNorm output has outlier channels (as trained BERTs do), seeded."""

    def __init__(self, d: int = 32, heads: int = 4, mask: str = "float", causal: bool = False,
                 seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.d, self.h, self.mask, self.causal = d, heads, mask, causal
        self.pre = nn.LayerNorm(d)
        with torch.no_grad():
            self.pre.weight[:3] = 20.0  # three outlier channels
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm1 = nn.LayerNorm(d)
        self.ffn_in, self.ffn_out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.norm2 = nn.LayerNorm(d)

    def forward(self, x: Tensor) -> Tensor:
        n, length, _ = x.shape
        x = self.pre(x)
        keep = x[..., -1] > -1.5  # a data-dependent padding mask (N, L)
        if self.mask == "bool":
            mask: Tensor | None = keep[:, None, None, :]
        elif self.mask == "float":
            mask = ((~keep).float() * -10000.0)[:, None, None, :]
        else:
            mask = None

        def heads(t: Tensor) -> Tensor:
            return t.view(n, length, self.h, self.d // self.h).transpose(1, 2)

        a = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)),
                                           attn_mask=mask, is_causal=self.causal)
        x = self.norm1(x + self.o(a.transpose(1, 2).reshape(n, length, self.d)))
        return self.norm2(x + self.ffn_out(F.gelu(self.ffn_in(x))))


def _x(n: int = 4, length: int = 12, d: int = 32, seed: int = 1) -> Tensor:
    return torch.randn(n, length, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mask", ["float", "bool", "none"])
def test_decompose_sdpa_writes_out_attention_exactly(mask: str) -> None:
    gm = capture(Encoder(mask=mask), (_x(),))
    assert aten_op_counts(gm).get("scaled_dot_product_attention.default") == 1
    gm = check_pass(decompose_sdpa, gm, (_x(seed=2),))
    ops = aten_op_counts(gm)
    assert "scaled_dot_product_attention.default" not in ops
    assert ops["matmul.default"] == 2 and ops["softmax.int"] == 1


def test_decompose_sdpa_skips_causal_attention_with_a_reason(caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    gm = capture(Encoder(mask="none", causal=True), (_x(),))
    with caplog.at_level("DEBUG", logger="quantflow.passes"):
        assert not decompose_sdpa(gm)
    assert "is_causal=True" in caplog.text


def test_fold_scale_moves_the_attention_scale_into_the_query_projection() -> None:
    gm = capture(Encoder(), (_x(),))
    assert decompose_sdpa(gm)
    muls = aten_op_counts(gm).get("mul.Tensor", 0)
    gm = check_pass(fold_scale, gm, (_x(seed=3),))
    assert aten_op_counts(gm).get("mul.Tensor", 0) == muls - 1  # the 1/sqrt(d) on q is gone


def _calibrated(gm: torch.fx.GraphModule) -> dict:
    return collect_stats(gm, [(_x(8, seed=s),) for s in range(4)], nodes=observed_tensors(gm))


def test_smooth_is_exact_and_flattens_the_outlier_channels() -> None:
    gm = capture(Encoder(), (_x(),))
    optimize(gm)
    stats = _calibrated(gm)
    absmax = {k: v.channel_absmax for k, v in stats.items() if v.channel_absmax is not None}
    before = absmax["layer_norm"]
    assert float(before.max() / before.median()) > 10  # the outliers are there
    muls = aten_op_counts(gm).get("mul.Tensor", 0)
    gm = check_pass(lambda g: smooth(g, absmax, 0.5), gm, (_x(seed=5),))
    # the residual reader of each smoothed LayerNorm, and the GELU before ffn_out, get a mul
    assert aten_op_counts(gm)["mul.Tensor"] == muls + 3
    after = _calibrated(gm)["layer_norm"].channel_absmax
    assert after is not None
    # s_j ∝ sqrt(max|x_j|): the spread of the channel ranges shrinks to about its square root
    ratio_before, ratio_after = float(before.max() / before.min()), float(after.max() / after.min())
    assert ratio_after < ratio_before ** 0.75, (ratio_before, ratio_after)


def test_smooth_scales_math() -> None:
    s = smooth_scales(torch.tensor([16.0, 1.0, 0.0]), torch.tensor([1.0, 4.0, 2.0]), 0.5)
    assert torch.allclose(s, torch.tensor([4.0, 0.5, 1.0], dtype=torch.float64))


def test_ort_placement_keeps_residual_stream_and_mask_float() -> None:
    gm = capture(Encoder(), (_x(),))
    optimize(gm)
    wanted = plan_tensors(gm, int8_plan("minmax"), "ort")
    nodes = {n.name: n for n in gm.graph.nodes}
    adds = [n for n in gm.graph.nodes if n.target == aten.add.Tensor]
    assert adds and not any(a.name in wanted for a in adds)  # mask add, residual adds
    softmax = next(n for n in gm.graph.nodes if n.target == aten.softmax.int)
    assert softmax.name in wanted and softmax.args[0].name not in wanted  # P quantized, scores not
    linears = [n for n in gm.graph.nodes if n.target == aten.linear.default]
    read_by_matmul = {n.name for n in linears[:3]}  # q, k, v: read by the two matmuls
    assert {n.name for n in linears if n.name in wanted} == read_by_matmul
    assert all(nodes[n].target != aten.layer_norm.default or n in wanted for n in wanted)


@pytest.fixture(scope="module")
def minilm_sim() -> dict:
    model = minilm.minilm_pretrained()
    calib, evaluation = minilm.sentence_ids(True)[:64], minilm.sentence_ids(False)[:64]
    gm = capture(model, (calib[:1],))
    optimize(gm)
    return {"model": model, "gm": gm, "calib": calib, "eval": evaluation}


def test_minilm_matches_the_hugging_face_implementation() -> None:
    """Our plain-module MiniLM vs transformers' BertModel + mean pooling + normalize (4.46.3,
    recorded once in tests/golden; the model code shares nothing with it)."""
    ids = minilm.MiniLMTokenizer()(minilm.sentences()[:8])
    with torch.no_grad():
        got = minilm.minilm_pretrained()(ids)
    want = torch.from_numpy(np.load(GOLDEN))
    assert float((got - want).abs().max()) < 1e-5


def test_minilm_captures_with_attention_written_out(minilm_sim: dict) -> None:
    ops = aten_op_counts(minilm_sim["gm"])
    assert "scaled_dot_product_attention.default" not in ops
    assert ops["matmul.default"] == 12 and ops["linear.default"] == 36
    with torch.no_grad():
        a, b = minilm_sim["gm"](minilm_sim["eval"]), minilm_sim["model"](minilm_sim["eval"])
    assert float((a - b).abs().max()) < 1e-5


def test_smoothquant_raises_minilm_int8_fidelity(minilm_sim: dict) -> None:
    """Per-tensor int8 on LayerNorm outputs loses the outlier channels; SmoothQuant migrates
    them into the weights. Simulation, 64 held-out sentences, mse calibrator."""
    gm, calib, x = minilm_sim["gm"], minilm_sim["calib"], minilm_sim["eval"]
    plan = int8_plan("mse")
    with torch.no_grad():
        ref = gm(x)
    stats = collect_stats(gm, batched(calib, 32), nodes=observed_tensors(gm))
    with torch.no_grad():
        plain = F.cosine_similarity(quantize(gm, plan, stats, "ort")(x), ref).mean()
    from quantflow.plan import smoothed

    g2 = smoothed(gm, stats, 0.8)
    assert g2 is not None
    stats2 = collect_stats(g2, batched(calib, 32), nodes=observed_tensors(g2))
    with torch.no_grad():
        smooth_cos = F.cosine_similarity(quantize(g2, plan, stats2, "ort")(x), ref).mean()
    assert float(plain) < 0.992 and float(smooth_cos) > 0.996, (float(plain), float(smooth_cos))


def test_minilm_compiles_to_integer_onnxruntime_kernels(tmp_path: Path) -> None:
    """The CLI end to end on real sentences: every linear and both attention matmuls run as
    integer kernels, the parity gate passes and the embeddings keep cosine ≥ 0.99."""
    from quantflow.cli import main

    out = tmp_path / "out"
    assert main(["compile", "zoo:minilm", "--calib-samples", "64", "--eval-samples", "100",
                 "--calibrator", "mse", "--profile-runs", "3", "--max-drop", "1",
                 "-o", str(out)]) == 0
    r = json.loads((out / "report.json").read_text())
    ops = r["runtime"]["integer_ops"]
    assert ops.get("QGemm", 0) + ops.get("MatMulIntegerToFloat", 0) >= 36 - 6, ops
    assert ops.get("QLinearMatMul", 0) + ops.get("MatMulIntegerToFloat", 0) >= 6 + 6, ops
    assert r["runtime"]["float_compute_ops"] == []
    assert r["calibration"]["smooth"] > 0  # a SmoothQuant variant won
    assert r["quality"]["quantized"]["cosine"] >= 0.99, r["quality"]
    assert r["gate"]["measure"].startswith("cosine")


def test_trt_attention_placement_passes_the_mha_rule(tmp_path: Path) -> None:
    """TensorRT: Q, K, V and softmax's output Q/DQ'd, scores and the residual stream float;
    the MHA rule finds nothing, and flags a BMM whose one input loses its Q/DQ."""
    import onnx

    from quantflow.plan import base_plan
    from quantflow.targets.onnx_export import export_onnx
    from quantflow.targets.trt_qdq_graph import QdqGraph
    from quantflow.targets.trt_rules import check_attention, check_trt_qdq

    x = _x()
    gm = capture(Encoder(), (x,))
    optimize(gm)
    qgm = quantize(gm, base_plan("trt", "minmax"), _calibrated(gm), "trt")
    path = tmp_path / "m.onnx"
    export_onnx(qgm, (x,), path)
    model = onnx.load(str(path))
    assert [str(v) for v in check_trt_qdq(model)] == []
    g = QdqGraph(model)

    def activation(v: str) -> bool:
        dq = g.dq_through(v)
        return not g.is_const(v) and (dq is None or not g.is_weight_qdq(dq))

    bmm = [n for n in model.graph.node if n.op_type == "MatMul" and all(map(activation, n.input))]
    assert len(bmm) == 2  # Q·Kᵀ and P·V
    dq = g.dq_through(bmm[0].input[1])
    assert dq is not None
    bmm[0].input[1] = g.producer[dq.input[0]].input[0]  # read the float tensor before its Q
    assert [v.rule for v in check_attention(QdqGraph(model))] == ["attention-bmm"]


@pytest.mark.slow
def test_minilm_mixed_precision_returns_a_plan_within_the_drop(tmp_path: Path) -> None:
    """`--bits mixed --max-drop 1` on a transformer: HAWQ traces, latency tables and the search
    run on it and return a plan within the cosine budget (measured: W8A8x35 W4A8x1, 0.995)."""
    from quantflow.cli import main

    out = tmp_path / "out"
    assert main(["compile", "zoo:minilm", "--bits", "mixed", "--max-drop", "1",
                 "--calib-samples", "64", "--eval-samples", "200", "--profile-runs", "3",
                 "-o", str(out)]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["search"] and r["gate"]["passed"]
    assert 100 * (1 - r["quality"]["quantized"]["cosine"]) <= 1.0


@pytest.mark.tvm
def test_tvm_runs_attention_matmuls_in_integers(tmp_path: Path) -> None:
    """TVM: every linear and both attention matmuls run as integer kernels (int32 products of
    the zero-point-shifted codes), and the output equals the torch simulation up to fp32
    summation order (measured: max |Δ| < 1e-5, 139.7 dB). The padding mask reads x[..., -1],
    which TVM 0.27 mis-lowered (tvm_frontend.select)."""
    from quantflow.targets import get_target

    x = _x()
    gm = capture(Encoder(), (x,))
    optimize(gm)
    qgm = quantize(gm, int8_plan("minmax"), _calibrated(gm), "ort")
    target = get_target("tvm")
    art = target.lower(qgm, (x,), tmp_path, precision="int8")
    ints = art.meta["int_layers"]
    assert sum("matmul" in n for n in ints) == 2 and sum("linear" in n for n in ints) == 6, ints
    (got,) = target.run(art, [x.numpy()])
    with torch.no_grad():
        want = qgm(x)
    assert float((torch.from_numpy(got) - want).abs().max()) < 1e-4
