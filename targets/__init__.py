"""Lowering + profiling backends, imported lazily by name.

`get_target("ort" | "tvm" | "trt")` imports only that backend's module, so a missing optional
runtime affects only the target that needs it.
"""

from __future__ import annotations

import importlib

from quantflow.targets.base import Artifact, Latency, Target

TARGETS = {"ort": "quantflow.targets.ort", "tvm": "quantflow.targets.tvm",
           "trt": "quantflow.targets.trt"}

__all__ = ["TARGETS", "Artifact", "Latency", "Target", "get_target"]


def get_target(name: str, **options: object) -> Target:
    """Instantiate the backend `name` (options are target-specific, e.g. tune_trials for tvm)."""
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; choose one of {sorted(TARGETS)}")
    module = importlib.import_module(TARGETS[name])
    target: Target = module.make_target(**options)
    return target
