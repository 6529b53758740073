"""Every target in `quantflow.targets.TARGETS` is a `Target` and declares `caps` that match what
it does: per-layer profiling, thread counts, devices, parity taps, and the artifact files it
reads back (`load_artifact` on what `lower` wrote). Callers trust `caps` instead of probing, so
a declaration that drifts from the behaviour would silently skip or break a feature. (The
protocol's signatures are checked by mypy, in targets/__init__.py; `isinstance` sees names.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from nets import ConvPool
from torch import fx, nn

from quantflow.devices import DEVICES
from quantflow.ir import capture
from quantflow.search.space import OPTIONS
from quantflow.targets import ARTIFACT_SUFFIXES, TARGETS, get_target
from quantflow.targets.base import Artifact, LayerTaps, ParityTaps, Target, TargetCaps

#: constructor options per target for this test: TensorRT is not installable here, so its
#: latency is the (labelled) onnxruntime proxy, which `profile` refuses without this flag
OPTIONS_FOR_TEST: dict[str, dict[str, Any]] = {"trt": {"allow_ort_proxy": True}}


def make(name: str, **options: Any) -> Target:
    if name == "tvm":
        pytest.importorskip("tvm")
    return get_target(name, **{**OPTIONS_FOR_TEST.get(name, {}), **options})


def Tiny() -> nn.Module:
    return ConvPool(width=8, classes=4)


@pytest.fixture(scope="module")
def tiny() -> tuple[fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    return capture(Tiny(), (x,)), x


@pytest.fixture(scope="module")
def lowered(tiny: tuple[fx.GraphModule, torch.Tensor], tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, tuple[Target, Artifact]]:
    """Each target's artifact of the tiny model, lowered once (TVM compiles: seconds)."""
    out: dict[str, tuple[Target, Artifact]] = {}
    gm, x = tiny
    for name in TARGETS:
        if name == "tvm" and not _has_tvm():
            continue
        target = make(name)
        out[name] = (target, target.lower(gm, (x,), tmp_path_factory.mktemp(name),
                                          precision="fp32"))
    return out


def _has_tvm() -> bool:
    import importlib.util

    return importlib.util.find_spec("tvm") is not None


def _get(lowered: dict[str, tuple[Target, Artifact]], name: str) -> tuple[Target, Artifact]:
    if name not in lowered:
        pytest.skip(f"{name}: runtime not installed")
    return lowered[name]


def test_the_table_lists_the_three_targets() -> None:
    assert set(TARGETS) == {"ort", "tvm", "trt"} == set(DEVICES) == set(ARTIFACT_SUFFIXES)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_declarations(name: str) -> None:
    target = make(name)
    assert isinstance(target, Target)
    assert target.name == name
    caps = target.caps
    assert isinstance(caps, TargetCaps)
    assert type(target).caps is caps  # declared by the class, not computed per instance
    assert caps.devices == DEVICES[name]
    assert caps.artifact_suffixes == ARTIFACT_SUFFIXES[name]
    assert caps.integer_options <= set(OPTIONS) - {"FP32"}
    assert caps.parity_taps == isinstance(target, ParityTaps)
    assert caps.layer_taps == isinstance(target, LayerTaps)
    assert caps.layer_taps or not caps.parity_taps  # tapping the artifact is a layer tap
    # a target with a choice of devices takes each as `device=`, and refuses others
    if len(caps.devices) > 1:
        for device in caps.devices:
            make(name, device=device)
        with pytest.raises(ValueError):
            make(name, device="no-such-device")


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_profile_matches_caps(name: str, lowered: dict[str, tuple[Target, Artifact]],
                              tiny: tuple[fx.GraphModule, torch.Tensor]) -> None:
    target, art = _get(lowered, name)
    x = [tiny[1].numpy()]
    plain = target.profile(art, x, warmup=1, runs=3, threads=1)
    assert plain.per_layer_ms is None and plain.median_ms > 0
    assert (plain.threads == 1) == target.caps.threads
    layered = target.profile(art, x, warmup=1, runs=3, threads=1, per_layer=True)
    assert bool(layered.per_layer_ms) == target.caps.per_layer_profile
    if layered.per_layer_ms:
        assert all(ms >= 0 for ms in layered.per_layer_ms.values())


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_load_artifact_reads_back_what_lower_wrote(
        name: str, lowered: dict[str, tuple[Target, Artifact]],
        tiny: tuple[fx.GraphModule, torch.Tensor]) -> None:
    target, art = _get(lowered, name)
    files = sorted({Path(f) for f in art.files.values()
                    if Path(f).suffix in target.caps.artifact_suffixes})
    assert files, art.files
    x = [tiny[1].numpy()]
    want = target.run(art, x)
    for file in files:
        back = target.load_artifact(file)
        assert back.target == name, file
        assert (back.input_names, back.output_names) == (art.input_names, art.output_names)
        assert [list(s["shape"]) for s in back.meta["input_specs"]] == [list(x[0].shape)]
        got = target.run(back, x)
        assert all(np.array_equal(a, b) for a, b in zip(got, want)), file
        warning = target.artifact_warning(back)
        assert warning is None or isinstance(warning, str)
