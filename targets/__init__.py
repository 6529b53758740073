"""Lowering + profiling backends, imported lazily by name.

`get_target("ort" | "tvm" | "trt")` imports only that backend's module, so a missing optional
runtime affects only the target that needs it. The package itself imports nothing heavy (no
torch), so torch-free modules such as `quantflow.targets.ort_isa` stay cheap to import for the
CLI; `Artifact`, `Latency`, `Target`, `ParityTaps` and `TargetCaps` are loaded from
targets/base.py on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from quantflow.targets.base import Artifact, Latency, ParityTaps, Target, TargetCaps
    from quantflow.targets.ort import OrtTarget
    from quantflow.targets.trt import TrtTarget
    from quantflow.targets.tvm import TVMTarget

    # mypy checks each class against the protocols' signatures here; `isinstance(t, Target)`
    # (tests/test_target_caps.py) only sees that the members exist
    _TARGET_CLASSES: tuple[type[Target], ...] = (OrtTarget, TVMTarget, TrtTarget)
    _PARITY_TAPS: tuple[type[ParityTaps], ...] = (OrtTarget,)

TARGETS = {"ort": "quantflow.targets.ort", "tvm": "quantflow.targets.tvm",
           "trt": "quantflow.targets.trt"}
#: files each target's `load_artifact` reads (its `caps.artifact_suffixes`); kept here, torch-
#: free, so `quantflow profile` can tell which runtime a file is for without importing all
ARTIFACT_SUFFIXES = {"ort": (".onnx",), "tvm": (".so", ".json"), "trt": (".onnx",)}
#: what a `quantflow compile` output folder holds, by target (the file `load_artifact` reads)
ARTIFACT_FILES = {"tvm": "manifest.json", "ort": "model.onnx"}

__all__ = ["ARTIFACT_FILES", "ARTIFACT_SUFFIXES", "TARGETS", "Artifact", "Latency", "ParityTaps",
           "Target", "TargetCaps", "get_target"]


def __getattr__(name: str) -> Any:
    if name in ("Artifact", "Latency", "ParityTaps", "Target", "TargetCaps"):
        from quantflow.targets import base

        return getattr(base, name)
    raise AttributeError(f"module 'quantflow.targets' has no attribute {name!r}")


def get_target(name: str, **options: object) -> Target:
    """Instantiate the backend `name` (options are target-specific, e.g. tune_trials for tvm)."""
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; choose one of {sorted(TARGETS)}")
    module = importlib.import_module(TARGETS[name])
    target: Target = module.make_target(**options)
    return target
