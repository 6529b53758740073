"""Models exported at batch 1 that hard-code it (`x.view(1, -1)` before the classifier) compile:
the batch is made dynamic by a proven rewrite, or the graph runs in chunks of its batch
(quantflow/batch.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import fx, nn

from quantflow import batch as qb
from quantflow.calibrate import batched, collect_stats
from quantflow.cli import main
from quantflow.errors import CaptureError
from quantflow.evaluate import predict
from quantflow.ir import capture, unlift
from quantflow.quantize import quantize
from quantflow.spec import int8_plan

#: graph vs graph in fp32: max|Δ| ≤ REL_TOL · max|y| (batched and per-sample kernels may sum in
#: a different order)
REL_TOL = 1e-5
#: ORT INT8 artifact vs the torch simulation of the same quantized graph (≤ 1 output step)
MIN_RUNTIME_VS_SIM_DB = 25.0


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.shape == want.shape and float((got - want).abs().max()) <= \
        REL_TOL * float(want.abs().max())


class _Head(nn.Module):
    """conv → relu → pool, then a subclass-defined flatten before the classifier."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)


class ViewOne(_Head):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).view(1, -1))


class ReshapeConst(_Head):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).reshape(1, 8 * 4 * 4))


class ReshapeDynamic(_Head):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).reshape(x.shape[0], -1))


class TokenModel(nn.Module):
    """ViT-like: a class token expanded to the batch, padding channels from factories."""

    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.fc = nn.Linear(17 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (b, 4, 4, 4)
        b = x.shape[0]
        x = torch.cat([x, torch.zeros(b, 2, 4, 4), torch.full((b, 1, 4, 4), 0.5),
                       x.new_zeros(b, 1, 4, 4)], 1)
        t = torch.cat([self.cls.expand(b, -1, -1), x.view(b, 8, 16).transpose(1, 2)], 1)
        return self.fc(t.reshape(b, -1))


class FoldedBatch(nn.Module):
    """Folds the batch into the rows of a matrix: exact only at the exported batch, and no
    leading-size rewrite can fix it, so it runs in chunks of that batch."""

    def __init__(self, batch: int = 1) -> None:
        super().__init__()
        self.batch = batch
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, 3, 4, 4)
        y = torch.relu(self.conv(x)).reshape(self.batch * 4, 16).t()  # (16, batch·4)
        return self.fc(y.reshape(16, self.batch, 4).permute(1, 0, 2).reshape(self.batch, -1))


class MixesBatch(nn.Module):
    """`x.view(1, -1)` is rewritable, but the mean over dim 0 is the identity only at batch 1:
    the rewritten graph is not equal per sample, so the proof must reject it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.view(1, -1) - x.mean(0, keepdim=True).view(1, -1) * 0.5)


def _static_graph(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """The graph as a .pt2 exported at the example's batch holds it, as a plain GraphModule
    (what load.py returns: `ExportedProgram.module()` refuses `.eval()`)."""
    g = unlift(torch.export.export(model.eval(), (example,)))
    return fx.GraphModule(g, g.graph).eval()


def _per_chunk(gm: fx.GraphModule, x: torch.Tensor, b: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([gm(x[i:i + b]) for i in range(0, x.shape[0], b)])


# ---------------------------------------------------------------- the rewrite, proven


@pytest.mark.parametrize(("model", "shape", "rewritten"), [
    (ViewOne, (3, 8, 8), ["view"]),
    (ReshapeConst, (3, 8, 8), ["reshape"]),
    (TokenModel, (4, 4, 4), ["zeros", "full", "new_zeros", "expand", "view", "reshape"]),
])
def test_rewrite_makes_batch_dynamic_and_equal_per_sample(
        model: type[nn.Module], shape: tuple[int, ...], rewritten: list[str]) -> None:
    torch.manual_seed(0)
    m = model().eval()
    static = _static_graph(m, torch.randn(1, *shape))
    gm = capture(static, (torch.randn(1, *shape),))
    info = qb.describe(gm)
    assert info["mode"] == "rewritten" and info["rewritten"] == rewritten
    assert qb.static_batch(gm) is None
    x = torch.randn(7, *shape)
    with torch.no_grad():
        got = gm(x)
    assert _close(got, _per_chunk(static, x, 1))


def test_rewrite_batch_is_pure_graph_surgery() -> None:
    static = _static_graph(ViewOne().eval(), torch.randn(1, 3, 8, 8))
    g = copy.deepcopy(static)
    assert qb.rewrite_batch(g, 1) == ["view"]
    view = next(n for n in g.graph.nodes if n.name == "view")
    assert view.args[1] == [-1, 128]
    assert qb.rewrite_batch(g, 1) == []  # the leading size is no longer the batch
    assert qb.prove_batched(static, g, (torch.randn(1, 3, 8, 8),), 1) is None


def test_batch_read_from_the_input_is_rewritten_in_a_pt2_and_dynamic_in_the_module() -> None:
    # export at batch 1 turns `x.shape[0]` into the constant 1, so the .pt2 holds reshape(1, -1)
    pt2 = capture(_static_graph(ReshapeDynamic().eval(), torch.randn(1, 3, 8, 8)),
                  (torch.randn(1, 3, 8, 8),))
    assert qb.describe(pt2)["rewritten"] == ["reshape"]
    module = capture(ReshapeDynamic().eval(), (torch.randn(1, 3, 8, 8),))
    assert qb.describe(module) == {"mode": "dynamic"} and qb.static_batch(module) is None


# ---------------------------------------------------------------- the fallback: chunks


def test_proof_rejects_a_rewrite_that_mixes_samples() -> None:
    torch.manual_seed(0)
    static = _static_graph(MixesBatch().eval(), torch.randn(1, 3, 4, 4))
    gm = capture(static, (torch.randn(1, 3, 4, 4),))
    info = qb.describe(gm)
    assert info["mode"] == "static" and "differs" in info["reason"]
    assert qb.static_batch(gm) == 1
    x = torch.randn(9, 3, 4, 4)
    assert _close(predict(gm, x), _per_chunk(static, x, 1))


@pytest.mark.parametrize("b", [1, 4])
def test_static_graph_runs_in_chunks_everywhere(b: int) -> None:
    torch.manual_seed(0)
    m = FoldedBatch(b).eval()
    static = _static_graph(m, torch.randn(b, 3, 4, 4))
    gm = capture(m, (torch.randn(b, 3, 4, 4),))
    assert qb.describe(gm)["mode"] == "static" and qb.static_batch(gm) == b
    x = torch.randn(10, 3, 4, 4)  # 10 is not a multiple of 4: the last chunk is padded
    want = _per_chunk(static, qb.pad_rows(x, 12), b)[:10]
    assert _close(predict(gm, x, batch_size=32), want)
    # calibration re-splits the 32-sample batches it is given into chunks of b
    stats = collect_stats(gm, batched(x, 32))
    assert stats["x"].count == qb.run_size(gm, 32) * 3 * 16 * -(-10 // b)
    assert stats["x"].max == pytest.approx(float(x.max()))
    # the quantized graph is a deepcopy: it keeps the static batch, so it runs in chunks too
    qgm = quantize(gm, int8_plan("minmax"), stats, "ort")
    assert qb.static_batch(qgm) == b
    assert predict(qgm, x).shape == (10, 5)


def test_output_without_batch_is_a_capture_error() -> None:
    class Flat(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x * 2).view(-1)

    gm = capture(_static_graph(Flat(), torch.randn(1, 3)), (torch.randn(1, 3),))
    with pytest.raises(CaptureError, match="first dimension"):
        predict(gm, torch.randn(4, 3))


# ---------------------------------------------------------------- end to end through the CLI


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("static_batch")


def _export(d: Path, name: str, model: nn.Module, shape: tuple[int, ...]) -> tuple[Path, Path]:
    """`name.pt2` exported at batch 1, and 64 calibration samples for it."""
    torch.manual_seed(0)
    x = torch.randn(64, *shape)
    torch.export.save(torch.export.export(model.eval(), (x[:1],)), d / f"{name}.pt2")
    np.save(d / f"{name}.npy", x.numpy())
    return d / f"{name}.pt2", d / f"{name}.npy"


@pytest.mark.parametrize(("model", "shape", "mode"), [
    (ViewOne, (3, 8, 8), "rewritten"),
    (ReshapeConst, (3, 8, 8), "rewritten"),
    (ReshapeDynamic, (3, 8, 8), "rewritten"),
    (FoldedBatch, (3, 4, 4), "static"),
])
def test_cli_compiles_model_exported_at_batch_1(
        data_dir: Path, model: type[nn.Module], shape: tuple[int, ...], mode: str) -> None:
    torch.manual_seed(0)
    pt2, calib = _export(data_dir, model.__name__, model(), shape)
    out = data_dir / f"out_{model.__name__}"
    rc = main(["compile", str(pt2), "--calib", str(calib), "--target", "ort",
               "--calibrator", "minmax", "--equalize", "off", "--profile-runs", "5",
               "-o", str(out)])
    assert rc == 0
    r = json.loads((out / "report.json").read_text())
    batch = r["model"]["batch"]
    assert batch["mode"] == mode and batch["exported_batch"] == 1
    if mode == "rewritten":
        assert batch["rewritten"]
    q = r["quality"]
    assert q["eval_samples"] == 64
    for key in ("fp32", "quantized", "simulation"):
        assert q[key]["samples"] == 64 and q[key]["agreement"] is not None
    assert q["fp32"]["sqnr_db"] > 80  # the FP32 artifact is the FP32 graph
    assert q["runtime_vs_simulation_sqnr_db"] > MIN_RUNTIME_VS_SIM_DB
    assert r["latency"]["quantized"]["median_ms"] > 0


def test_cli_output_without_batch_exits_4(data_dir: Path) -> None:
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(12, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.flatten(1)).view(-1)

    pt2, calib = _export(data_dir, "flat", Flat(), (3, 2, 2))
    rc = main(["compile", str(pt2), "--calib", str(calib), "--target", "ort",
               "--calibrator", "minmax", "--equalize", "off", "-o", str(data_dir / "out_flat")])
    assert rc == CaptureError.exit_code
