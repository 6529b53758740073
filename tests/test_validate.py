"""quantflow.validate and quantflow.resources, piece by piece (the corpus covers them end to
end through the CLI)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import fx, nn

from quantflow import resources, validate
from quantflow.errors import CaptureError, InputError, ResourceError, UsageError
from quantflow.load import LoadedModel
from quantflow.spec import LayerPlan, int8_plan


@pytest.mark.parametrize(("text", "n"), [("512M", 512 * 2**20), ("2G", 2 * 2**30),
                                         ("1048576", 2**20), ("1.5k", 1536), ("3GiB", 3 * 2**30)])
def test_parse_bytes(text: str, n: int) -> None:
    assert resources.parse_bytes(text) == n


@pytest.mark.parametrize("text", ["", "lots", "-1G", "nanM", "infG", "1X"])
def test_parse_bytes_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        resources.parse_bytes(text)


def test_env_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(resources.ENV_LIMIT, "1M")
    assert resources.available_bytes() == 2**20
    with pytest.raises(ResourceError, match=r"needs 2\.0 MiB.*1\.0 MiB is available.*fix: x"):
        resources.check_alloc(2 * 2**20, "thing", "x")
    resources.check_alloc(2**20, "thing", "x")
    monkeypatch.setenv(resources.ENV_LIMIT, "plenty")
    with pytest.raises(ResourceError, match="QUANTFLOW_MAX_MEMORY"):
        resources.available_bytes()


def test_tensor_bytes_has_no_overflow() -> None:
    assert resources.tensor_bytes((10**10, 10**10)) == 4 * 10**20
    assert resources.tensor_bytes((3, 2), torch.float64) == 48


class _Chain(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(x)
        b = torch.sigmoid(a)
        return torch.tanh(b)


def test_graph_peak_frees_after_last_use() -> None:
    """x -> relu -> sigmoid -> tanh: at most two activations are alive at once."""
    from quantflow.ir import capture

    gm = capture(_Chain().eval(), (torch.randn(1, 4, 8, 8),))
    one = 4 * 8 * 8 * 4
    assert resources.graph_peak_bytes(gm, 1) == 2 * one
    assert resources.graph_peak_bytes(gm, 10) == 20 * one  # the batch is symbolic


@pytest.mark.parametrize(("value", "ok"), [(0.0, True), (100.0, True), (-0.1, False),
                                           (math.nan, False), (math.inf, False), (101, False)])
def test_number(value: float, ok: bool) -> None:
    if ok:
        validate.number("--max-drop", value, low=0, high=100)
    else:
        with pytest.raises(UsageError, match="--max-drop"):
            validate.number("--max-drop", value, low=0, high=100)


def test_count() -> None:
    validate.count("--runs", None)
    validate.count("--warmup", 0, low=0)
    with pytest.raises(UsageError, match="--runs 0: must be at least 1"):
        validate.count("--runs", 0)


class _Two(nn.Module):
    def forward(self, image: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return image if mask is None else image * mask


class _Needs2(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


def test_single_input() -> None:
    validate.single_input(LoadedModel(_Two(), None, "pickle", "m.pt", "m"))  # mask optional
    with pytest.raises(CaptureError, match=r"m\.pt: the model takes 2 inputs \(a, b\)"):
        validate.single_input(LoadedModel(_Needs2(), None, "pickle", "m.pt", "m"))
    x = torch.zeros(1, 3)
    with pytest.raises(CaptureError, match="2 inputs"):
        validate.single_input(LoadedModel(nn.Identity(), (x, x), "zoo", "zoo:x", "x"))


def test_model_finite_names_graph_constants() -> None:
    gm = fx.symbolic_trace(nn.Linear(3, 2))
    validate.model_finite(gm, "m.pt2")
    gm.register_buffer("k", torch.tensor([1.0, math.inf]))
    gm._plain = torch.tensor([0.0, math.nan])  # a constant: neither parameter nor buffer
    with gm.graph.inserting_before(next(iter(gm.graph.nodes))), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fx warns about attributes that are not buffers
        gm.graph.get_attr("_plain")
    with pytest.raises(InputError, match=r"buffer 'k' holds 0 NaN and 1 infinite.*\(1,\)"):
        validate.model_finite(gm, "m.pt2")
    del gm.k
    with pytest.raises(InputError, match="constant '_plain'"):
        validate.model_finite(gm, "m.pt2")


def test_samples_and_labels() -> None:
    x = torch.zeros(6, 1, 2, 2)
    x[4, 0, 1, 1] = math.nan
    with pytest.raises(InputError, match=r"d\.npy: 1 sample\(s\).*samples 4;.*x\[4, 0, 1, 1\]"):
        validate.samples_finite(x, "d.npy")
    validate.labels_in_range(torch.tensor([0, 9]), 10, "e.npz")
    with pytest.raises(InputError, match=r"e\.npz: 1 label.*10 classes \(0\.\.9\), e\.g\. y\[1\]"):
        validate.labels_in_range(torch.tensor([0, 10]), 10, "e.npz")
    with pytest.raises(InputError, match="counting from 0"):
        validate.labels_in_range(torch.tensor([-1]), None, "e.npz")


def test_plan_layers() -> None:
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(3, 2), nn.ReLU()))
    plan = int8_plan().with_layer("ghost", LayerPlan()).with_layer("also_gone", LayerPlan())
    with pytest.raises(UsageError, match=r"p\.json: names 2 layer\(s\).*also_gone, ghost"):
        validate.plan_layers(plan, gm, "p.json")
    validate.plan_layers(int8_plan(), gm, "p.json")  # no per-layer entries: nothing to check


def test_data_dtype_must_match_the_model_input() -> None:
    """Non-negative integers load as token ids; given to an image model they are refused with
    the fix, and float data given to a token-id model likewise."""
    ints, floats = torch.zeros(4, 3, 8, 8, dtype=torch.int64), torch.zeros(4, 3, 8, 8)
    validate.data_matches_input(floats, floats[:1], "--calib x.npy")
    validate.data_matches_input(ints, ints[:1], "--calib x.npy")
    with pytest.raises(InputError, match=r"--calib x.npy: the model takes floating-point input "
                                         r"but the data are integers.*--preprocess"):
        validate.data_matches_input(ints, floats[:1], "--calib x.npy")
    with pytest.raises(InputError, match=r"integer input .*token ids"):
        validate.data_matches_input(floats, ints[:1], "--eval y.npy")
