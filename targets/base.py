"""The target interface: lower a quantized graph, run it, profile it, price its layers.

A target turns the quantized fx GraphModule (PT2E form: `quantized_decomposed` Q/DQ nodes
around float ops, see quantflow/quantize.py) into an artifact on disk, runs it on numpy inputs,
and measures latency on the machine it runs on. The mixed-precision search asks a target for
measured per-layer costs via `layer_costs`.

Targets are imported lazily by name (`quantflow.targets.get_target`), so a missing optional
runtime (TVM, TensorRT) only affects that target, with a message saying what to install.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import fx


@dataclass(frozen=True)
class Artifact:
    """A lowered model on disk. `files` maps a role ("model", "fp32", "library", ...) to a path."""

    target: str
    precision: str  # "int8", "mixed", "fp32"
    files: dict[str, str]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return Path(self.files["model"])

    def size_bytes(self) -> int:
        return Path(self.files["model"]).stat().st_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save_manifest(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


@dataclass(frozen=True)
class Latency:
    """Wall-clock latency of repeated single-batch runs after warm-up, in milliseconds."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    runs: int
    warmup: int
    threads: int
    batch: int
    device: str
    per_layer_ms: dict[str, float] | None = None
    # the spread of the same timed runs, so a later comparison (`quantflow gate`) can tell a
    # slower artifact from a noisy machine: interquartile range and median absolute deviation
    iqr_ms: float | None = None
    mad_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def device_description() -> str:
    """CPU model and core count, recorded with every latency so numbers are comparable."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"{cpu} ({os.cpu_count()} logical cores, {platform.system()} {platform.machine()})"


def spread_ms(times: Sequence[float]) -> tuple[float, float]:
    """(IQR, MAD) of timed runs: 75th - 25th percentile (inclusive method) and the median
    absolute deviation from the median; both 0.0 for a single run."""
    if len(times) < 2:
        return 0.0, 0.0
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    med = statistics.median(times)
    return q3 - q1, statistics.median(abs(t - med) for t in times)


def time_runs(fn: Callable[[], object], *, warmup: int, runs: int, threads: int, batch: int,
              device: str | None = None, min_seconds: float = 0.0) -> Latency:
    """Time `fn` after `warmup` calls: `runs` timed calls (more if `min_seconds` not reached)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < runs or (time.perf_counter() - start) < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 20 * runs:
            break
    times.sort()
    iqr, mad = spread_ms(times)
    p90 = times[min(len(times) - 1, round(0.9 * (len(times) - 1)))]
    return Latency(median_ms=statistics.median(times), p90_ms=p90,
                   mean_ms=statistics.fmean(times), runs=len(times), warmup=warmup,
                   threads=threads, batch=batch, device=device or device_description(),
                   iqr_ms=iqr, mad_ms=mad)


@dataclass(frozen=True)
class TargetCaps:
    """What a target can do, declared by the target (class attribute `caps`); callers ask
    this instead of probing signatures or attributes.

    per_layer_profile: `profile(..., per_layer=True)` fills `Latency.per_layer_ms`.
    threads: the runtime honours a thread count (`profile(threads=...)`, `target.threads`).
    devices: what an artifact can be compiled for (`--device`), the default first.
    integer_options: the per-layer options of the mixed-precision search
      (quantflow.search.space.OPTIONS labels) that run as integer kernels on this target; the
      others run float kernels between Q/DQ nodes (e.g. W8A16 on ONNX Runtime, which has no
      int16 conv).
    parity_taps: `tensor_codes(artifact, names, feeds, isa)` reports every quantized tensor's
      integer codes (the parity gate, quantflow.verify).
    layer_taps: `layer_codes(artifact, qgm, names, feeds, isa)` reports the integer codes of
      every quantized tensor of the graph `artifact` was built from (the parity debugger,
      quantflow/layer_debug.py); implied by parity_taps.
    artifact_suffixes: files `load_artifact(path)` reads back (`quantflow profile`).
    """

    per_layer_profile: bool = False
    threads: bool = True
    devices: tuple[str, ...] = ("host",)
    integer_options: frozenset[str] = frozenset({"W8A8", "W4A8"})
    parity_taps: bool = False
    layer_taps: bool = False
    artifact_suffixes: tuple[str, ...] = ()


@runtime_checkable
class Target(Protocol):
    """What every backend provides; what a backend can do beyond this, it declares in `caps`
    (callers ask `caps`, never probe). See targets/ort.py for the reference implementation.

    `isinstance(obj, Target)` checks that every member below exists (not their signatures:
    mypy does that where a target is used as a `Target`, e.g. tests/test_target_caps.py).
    """

    name: str

    @property
    def caps(self) -> TargetCaps:
        """What this target can do; a class attribute in every target (read-only here, so
        a `ClassVar` on a dataclass target conforms too)."""
        ...

    #: the runtime's thread count for run/profile (None: the runtime's default); honoured
    #: where `caps.threads`
    threads: int | None

    def lower(self, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor],
              out_dir: Path, *, precision: str) -> Artifact:
        """Write the artifact for `gm` (quantized or float) under `out_dir`."""
        ...

    def run(self, artifact: Artifact, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Execute the artifact on numpy inputs, return numpy outputs."""
        ...

    def profile(self, artifact: Artifact, inputs: Sequence[np.ndarray], *, warmup: int = 10,
                runs: int = 50, threads: int | None = None, per_layer: bool = False) -> Latency:
        """Latency on this machine with the target's own runtime. `per_layer=True` fills
        `Latency.per_layer_ms` where `caps.per_layer_profile`; elsewhere it stays None."""
        ...

    def measurement_device(self) -> str:
        """The machine `profile` times on, as `Latency.device` names it (a board behind TVM
        RPC, a Ray device node, else this one): latency caches key on it."""
        ...

    def load_artifact(self, path: str | Path) -> Artifact:
        """An artifact this target wrote, read back from one of `caps.artifact_suffixes`."""
        ...

    def artifact_warning(self, artifact: Artifact) -> str | None:
        """Why this host may not run `artifact` exactly, or None."""
        ...


@runtime_checkable
class ParityTaps(Protocol):
    """What a target with `caps.parity_taps` adds: the integer codes of quantized tensors, as
    the runtime computes them on `isa` ("host" or an emulated CPU class), per run of `feeds`
    (the parity gate, quantflow.verify)."""

    def tensor_codes(self, artifact: Artifact, names: Sequence[str],
                     feeds: Sequence[Sequence[np.ndarray]], isa: str = "host"
                     ) -> list[dict[str, np.ndarray]]:
        ...


@runtime_checkable
class LayerTaps(Protocol):
    """What a target with `caps.layer_taps` adds: like `ParityTaps.tensor_codes`, given also
    the quantized graph the artifact was built from (a target may rebuild a tapped twin)."""

    def layer_codes(self, artifact: Artifact, qgm: fx.GraphModule, names: Sequence[str],
                    feeds: Sequence[Sequence[np.ndarray]], isa: str = "host"
                    ) -> list[dict[str, np.ndarray]]:
        ...
