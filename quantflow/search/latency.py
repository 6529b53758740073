"""Per-layer latency tables: measured on the target (cached per device), or a BOPs proxy.

Measured: for each precision option, the whole graph is quantized with every layer at that
option, lowered with the target and profiled with `profile(..., per_layer=True)` (ORT's own
profiler: kernel time per node, mapped back to fx node names). Layer l's cost at option k is
the kernel time of l's node(s) in that run; the time no layer accounts for (Q/DQ of
activations, adds, pools) is kept as `rest` per option. That is K lowerings for the whole
table instead of L·K. Targets without per-layer profiling fall back to differential timing:
only layer l at option k, everything else FP32, end-to-end median minus the all-FP32 median
(L·K lowerings; noisy for tiny layers).

Tables are cached as JSON under `~/.cache/quantflow/latency/`, keyed by (model hash, target
name, device description, options), since a latency measured on one CPU says little about
another. The device is where the target times (`target.measurement_device()`): this host, a
board behind TVM RPC or a Ray device node (`--measure-on`), so each has its own tables.

Proxy: bit operations, BOPs = MACs · b_w · b_a (HAWQ-V3's hardware-agnostic cost), in
units of giga-BOPs. It ignores that int8 and fp32 kernels differ in more than bit width,
which is what the measured table is for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx

from quantflow.cache import cache_dir
from quantflow.errors import QuantflowError, TargetRuntimeError
from quantflow.ir import WEIGHTED_OPS, is_op
from quantflow.progress import bar
from quantflow.search.options import LatencyOptions
from quantflow.search.space import OPTION_BITS

log = logging.getLogger("quantflow.search")


@dataclass(frozen=True)
class LatencyTable:
    """ms[l, k] per layer and option, plus the unattributed time `rest[k]` of option k."""

    layers: tuple[str, ...]
    options: tuple[str, ...]
    ms: np.ndarray
    rest: tuple[float, ...]
    device: str
    target: str
    method: str  # "per_layer_profile", "differential", "bops_proxy"

    def to_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "options": list(self.options),
                "ms": self.ms.tolist(), "rest": list(self.rest), "device": self.device,
                "target": self.target, "method": self.method}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> LatencyTable:
        # files written while tables also measured a Q/DQ switch cost carry a
        # "switch_ms_per_kelem" (always 0 where measured); their ms and rest mean the same
        return LatencyTable(tuple(d["layers"]), tuple(d["options"]), np.asarray(d["ms"]),
                            tuple(d["rest"]), d["device"], d["target"], d["method"])

    def rest_for(self, option: str = "W8A8") -> float:
        return self.rest[self.options.index(option)] if option in self.options \
            else float(np.mean(self.rest))


def layer_macs(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> dict[str, int]:
    """Multiply-accumulates of each conv/linear node for one forward of `example_inputs`."""
    macs: dict[str, int] = {}

    class _Count(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if is_op(n, WEIGHTED_OPS):
                w = self.env[n.args[1]]  # type: ignore[index]
                # every output element costs (weight numel / output channels) MACs
                macs[n.name] = int(out.numel() * w[0].numel())
            return out

    with torch.no_grad():
        _Count(gm).run(*example_inputs)
    return macs


def bops_table(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], layers: Sequence[str],
               options: Sequence[str]) -> LatencyTable:
    """Giga-BOPs per layer and option (the proxy cost)."""
    macs = layer_macs(gm, example_inputs)
    ms = np.asarray([[macs[n] * OPTION_BITS[o][0] * OPTION_BITS[o][1] / 1e9 for o in options]
                     for n in layers])
    return LatencyTable(tuple(layers), tuple(options), ms, tuple(0.0 for _ in options),
                        "any", "proxy", "bops_proxy")


def profiled_total(lat: Any) -> float:
    """A profiled run's time: the per-node kernel times, plus whatever the wall-clock median
    has beyond them (framework overhead outside any node)."""
    per = sum((lat.per_layer_ms or {}).values())
    return per + max(lat.median_ms - per, 0.0)


def _cache_file(cache_dir: Path, model_hash: str, target: str, device: str,
                options: Sequence[str], threads: int | None = None,
                shapes: list[list[int]] | None = None) -> Path:
    # "v2" since tables carried a Q/DQ switch cost (no longer measured): what a v2 file's ms
    # and rest rows mean is unchanged, so the key stays and cached tables stay valid
    key = hashlib.sha256(json.dumps(["v2", model_hash, target, device, list(options)]
                                    + ([] if threads is None else [threads])
                                    + ([] if shapes is None else [shapes])).encode())
    return cache_dir / f"{model_hash}_{target}_{key.hexdigest()[:12]}.json"


def default_cache_dir() -> Path:
    return cache_dir("latency")


def measure_table(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor],
                  layers: Sequence[str], options: Sequence[str],
                  quantize_with: Callable[[dict[str, str]], fx.GraphModule], target: Any, *,
                  model_hash: str, latency: LatencyOptions | None = None,
                  progress: bool = False) -> LatencyTable:
    """Measured per-layer latency table on `target` (see module docstring), cached.

    quantize_with(assignment): the quantized graph for {layer: option} (unlisted: FP32).
    latency: where the cache is and how each variant is timed (runs, warmup, threads); its
    `mode` is the caller's business (this always measures).
    """
    timing = latency or LatencyOptions()
    threads = timing.threads
    device = target.measurement_device()  # a board's tables never mix with this host's
    cache = _cache_file(timing.cache_dir or default_cache_dir(), model_hash, target.name, device,
                        options, threads if threads is not None
                        else (target.threads if target.caps.threads else None),
                        [list(t.shape) for t in example_inputs])
    if cache.is_file():
        table = LatencyTable.from_dict(json.loads(cache.read_text()))
        if list(table.layers) == list(layers):
            log.info("latency table from cache %s", cache)
            return table
    x = [t.detach().numpy() for t in example_inputs]
    kw: dict[str, Any] = {"warmup": timing.warmup, "runs": timing.runs}
    if threads is not None:
        kw["threads"] = threads
    per_layer = target.caps.per_layer_profile
    ms = np.zeros((len(layers), len(options)))
    rest = []
    with tempfile.TemporaryDirectory() as tmp:
        def profile(assign: dict[str, str], sub: str, per: bool) -> Any:
            out = Path(tmp) / sub
            out.mkdir()
            g = quantize_with(assign) if assign else gm
            try:
                art = target.lower(g, example_inputs, out,
                                   precision="mixed" if assign else "fp32")
                return target.profile(art, x, per_layer=per, **kw) if per \
                    else target.profile(art, x, **kw)
            except QuantflowError:
                raise
            except Exception as exc:  # the runtimes raise their own classes
                # (onnxruntime's derive from Exception only); name the variant, keep the cause
                what = ", ".join(sorted(set(assign.values()))) or "FP32"
                raise TargetRuntimeError(
                    f"latency table: {target.name} failed to lower or time the {what} variant "
                    f"of the model ({type(exc).__name__}: {exc}); the search can fall back to "
                    "the BOPs proxy without a latency budget") from exc

        if per_layer:
            method = "per_layer_profile"
            for k, opt in enumerate(bar(options, f"latency table ({target.name})", "variant",
                                        disable=not progress)):
                lat = profile({n: opt for n in layers} if opt != "FP32" else {}, f"o{k}", True)
                per = lat.per_layer_ms or {}
                if not per and opt != "FP32":
                    raise TargetRuntimeError(
                        f"latency table: {target.name} on {device} returned no per-layer "
                        "times; the search can fall back to the BOPs proxy")
                attributed = 0.0
                for i, n in enumerate(layers):
                    # the layer's own node plus its weight/bias dequantize nodes
                    t = sum(v for name, v in per.items()
                            if name == n or name.startswith((f"{n}_weight", f"{n}_bias")))
                    ms[i, k] = t
                    attributed += t
                # attributed entries are a subset of `per`: the rest is never negative
                rest.append(profiled_total(lat) - attributed)
        else:
            method = "differential"
            base = profile({}, "fp32", False).median_ms
            with bar(len(layers) * len(options), f"latency table ({target.name}, per layer)",
                     "variant", disable=not progress) as shown:
                for k, opt in enumerate(options):
                    for i, n in enumerate(layers):
                        shown.update(1)
                        if opt == "FP32":
                            continue
                        ms[i, k] = profile({n: opt}, f"o{k}_{i}", False).median_ms - base
            rest = [base] * len(options)
    table = LatencyTable(tuple(layers), tuple(options), ms, tuple(rest), device, target.name,
                         method)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(table.to_dict(), indent=1) + "\n")
    return table


def assert_finite(table: LatencyTable) -> None:
    if not np.isfinite(table.ms).all() or any(not math.isfinite(r) for r in table.rest):
        raise ValueError(f"latency table ({table.method}) has non-finite entries")
