"""End-to-end latency validation of the search's choice.

The per-layer latency tables price a candidate as a sum of per-layer kernel times measured
in UNIFORM models, and those do not transfer exactly to mixed ones (measured on
mobilenetv2_fmnist: a plan the table priced below uniform INT8 ran at 0.29 ms vs 0.17 ms).
Not because of the Q/DQ a runtime adds where int8 and float layers meet: that was measured
at 0 (docs/benchmarks.md, `tools/bench_search.py`); a layer's time depends on what runs
around it. So when a latency limit applies, the best candidates (by the search objective)
are lowered and timed end to end on the target, in order, and the first one within the
limit wins; a ratio limit (`Budget.max_latency_ratio`) is taken relative to uniform W8A8
timed the same way. If none passes, the caller falls back to uniform W8A8.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx

#: measured latencies within this fraction of the limit pass (timing noise on a busy CPU)
TOLERANCE = 0.03


@dataclass(frozen=True)
class LatencyCheck:
    """One end-to-end measurement of a candidate against the limit."""

    config: str
    table_ms: float | None
    measured_ms: float
    limit_ms: float
    accepted: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def end_to_end_ms(graph: fx.GraphModule, example: Sequence[torch.Tensor], target: Any, *,
                  runs: int = 30, warmup: int = 5) -> float:
    """Median latency of `graph` lowered with `target` (a temporary artifact)."""
    x = [t.detach().numpy() for t in example]
    with tempfile.TemporaryDirectory() as tmp:
        art = target.lower(graph, example, Path(tmp), precision="mixed")
        return float(target.profile(art, x, warmup=warmup, runs=runs).median_ms)


def first_within(ranked: Sequence[Any], measure: Callable[[Any], float], limit_ms: float,
                 table_ms: Callable[[Any], float | None], label: Callable[[Any], str],
                 top: int = 3) -> tuple[Any | None, list[LatencyCheck]]:
    """The first of `ranked[:top]` whose measured latency is within `limit_ms` (+TOLERANCE),
    and every check made (pure: `measure` does the timing)."""
    checks: list[LatencyCheck] = []
    for item in ranked[:top]:
        ms = measure(item)
        ok = ms <= limit_ms * (1 + TOLERANCE)
        checks.append(LatencyCheck(label(item), table_ms(item), ms, limit_ms, ok))
        if ok:
            return item, checks
    return None, checks
