"""The --optimize-time stages (quantflow/fidelity.py): how the calibration samples split
between learning and checking, and that learned codes which lose on the held-out samples are
not shipped."""

from __future__ import annotations

import pytest
import torch
from nets import SmallCNN

from quantflow import calibrate as cal
from quantflow import evaluate as ev
from quantflow import fidelity
from quantflow.config import CompileConfig
from quantflow.dataset import Dataset
from quantflow.ir import capture
from quantflow.passes import DEFAULT_PIPELINE, run_pipeline
from quantflow.plan import PlanResult
from quantflow.rounding import RoundingResult
from quantflow.spec import int8_plan

pytestmark = pytest.mark.usefixtures("one_thread")


def test_learning_and_checking_samples() -> None:
    assert fidelity.learn_samples(80, 64) == 60  # natural-images-calib: 60 learn, 20 check
    assert fidelity.learn_samples(512, 64) == 64  # Fashion-MNIST calibration: 448 check
    assert fidelity.learn_samples(10, 64) == 10  # too few to hold any out: all learn
    assert fidelity.learn_samples(40, 64) == 30


def _planned(monkeypatch: pytest.MonkeyPatch, codes: str) -> tuple[PlanResult, Dataset]:
    torch.manual_seed(0)
    gm = capture(SmallCNN().eval(), (torch.randn(1, 1, 16, 16),))
    run_pipeline(gm, DEFAULT_PIPELINE)
    x = torch.randn(80, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    stats = cal.collect_stats(gm, cal.batched(x, 32))
    planned = PlanResult(gm, int8_plan("minmax"), stats)
    q = planned.quantize(CompileConfig().kernel_rules)

    def fake_learn(gm: object, qgm: object, x: torch.Tensor, opts: object, **kw: object
                   ) -> RoundingResult:
        # "bad": every weight rounded away from its nearest grid point (floor <-> ceil), a
        # rounding the quantizer accepts (on the grid) that is worse everywhere; "same": the
        # nearest codes themselves
        out = {}
        for name, layer in _layer_grid(planned, q).items():
            u = layer[0] / layer[1]
            near = torch.round(u)
            other = torch.where(near > u, torch.floor(u), torch.ceil(u))
            out[name] = near if codes == "same" else other
        return RoundingResult(out, {k: (1.0, 1.0) for k in out}, 0.1)

    monkeypatch.setattr("quantflow.rounding.learn_rounding", fake_learn)
    return planned, Dataset(x, None, "calib")


def _layer_grid(planned: PlanResult, q: torch.fx.GraphModule
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from quantflow.rounding import _layers

    return {k: (v.w, v.scale) for k, v in _layers(q, planned.gm).items()}


@pytest.mark.parametrize("codes", ["bad", "same"])
def test_codes_that_lose_on_held_out_samples_are_not_shipped(
        monkeypatch: pytest.MonkeyPatch, tmp_path: object, codes: str) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    planned, calib = _planned(monkeypatch, codes)
    config = CompileConfig(optimize_seconds=10.0)
    out = fidelity.round_stage(planned, calib, config)
    val = out.rounding_summary["validation"]  # type: ignore[index]
    assert val["samples"] == 20 and out.rounding_summary["learned_on"] == 60  # type: ignore
    if codes == "bad":
        # these seeds: 47.1 vs 48.1 dB (activation noise dominates at 8 bits)
        assert val["learned_sqnr_db"] < val["nearest_sqnr_db"] - 0.5 and not val["kept"]
        assert out.rounding is None  # nearest rounding ships
    else:
        assert val["learned_sqnr_db"] == val["nearest_sqnr_db"] and val["kept"]
        assert out.rounding is not None
    # what ships is what the check measured
    held = calib.x[60:]
    ref = ev.predict(planned.gm, held)
    shipped = ev.sqnr_db(ref, ev.predict(out.quantize(config.kernel_rules), held))
    assert shipped == pytest.approx(max(val["learned_sqnr_db"], val["nearest_sqnr_db"]),
                                    abs=1e-3)
