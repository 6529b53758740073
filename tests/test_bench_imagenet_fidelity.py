"""tools/bench_imagenet_fidelity.py: the plans it compares and its flip/margin arithmetic."""

from __future__ import annotations

import pytest
import torch
from tool_loader import load_tool

from quantflow.spec import int8_plan


def test_plans_quantize_one_part_at_a_time() -> None:
    plans = load_tool("bench_imagenet_fidelity").plans(int8_plan("percentile"))
    d = {k: p.default for k, p in plans.items()}
    assert d["FP32 layers"].is_float
    assert d["W8 weights only"].act is None and d["W8 weights only"].weight is not None
    assert d["A8 activations only"].weight is None
    assert d["A8 activations only"].act.bits == 8  # type: ignore[union-attr]
    a16 = d["W8A16"].act
    assert a16 is not None and (a16.bits, a16.calibrator) == (16, "minmax")
    assert d["W8A8 (--bits 8)"].act.calibrator == "percentile"  # type: ignore[union-attr]
    assert d["W8A8, min-max ranges"].act.calibrator == "minmax"  # type: ignore[union-attr]


def test_row_counts_flips_per_split_and_their_margins() -> None:
    ref = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.9], [5.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    out = ref.clone()
    out[1] = torch.tensor([0.0, 0.9, 1.0])  # a near-tie flips (calibration half)
    out[3] = torch.tensor([1.2, 0.0, 1.0])  # a clear one flips (evaluation half)
    r = load_tool("bench_imagenet_fidelity").row("x", ref, out, n_calib=2)
    assert (r["flips_calib"], r["flips_eval"], r["n_eval"]) == (1, 1, 2)
    assert r["agreement_drop_eval"] == 50.0 and r["agreement_drop_all"] == 50.0
    p = ref.softmax(-1)
    want = sorted(float(p[i].topk(2).values[0] - p[i].topk(2).values[1]) for i in (1, 3))
    assert r["flip_margins"] == pytest.approx([round(m, 3) for m in want])
    same = load_tool("bench_imagenet_fidelity").row("same", ref, ref.clone(), n_calib=2)
    assert same["sqnr_db"] is None and same["flips_calib"] == same["flips_eval"] == 0
