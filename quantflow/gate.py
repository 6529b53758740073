"""The CI gate: what `--max-drop` and `--max-latency` decide, on measured numbers only.

Accuracy drop in points when the evaluation data has labels, else 100·(1 − top-1 agreement
with FP32) (or 100·(1 − mean cosine similarity) with `metric="cosine"`), within `max_drop`; and the MEASURED latency of the artifact (never the search's
table) within `max_latency_ms`. A failed gate still publishes the artifacts and the report
(the user needs them to see why); the compile then exits 10.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class GateResult:
    """report.json's `gate`."""

    passed: bool
    reason: str | None
    max_drop: float | None
    measure: str | None = None
    value: float | None = None
    max_latency_ms: float | None = None
    latency_ms: float | None = None
    reasons: tuple[str, ...] = field(default=(), repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "reasons"}
        if self.measure is None:  # keys appear only for the limits that were set
            d.pop("measure"), d.pop("value")
        if self.max_latency_ms is None:
            d.pop("max_latency_ms"), d.pop("latency_ms")
        return d


def gate(quality: dict[str, Any], max_drop: float | None, latency_ms: float | None = None,
         max_latency_ms: float | None = None, metric: str = "auto") -> GateResult:
    """Decide the gate from the evaluation's quality section and the measured latency."""
    reasons: list[str] = []
    measure = value = None
    if max_drop is not None:
        drop = quality.get("accuracy_drop")
        measure = "accuracy drop"
        if drop is None and metric == "cosine":
            drop = 100.0 * (1.0 - float(quality["quantized"]["cosine"]))
            measure = "cosine distance to FP32 (100·(1 − cos))"
        elif drop is None:
            drop = 100.0 * (1.0 - float(quality["quantized"]["agreement"]))
            measure = "top-1 disagreement with FP32"
        value = float(drop)
        if value > max_drop:
            reasons.append(f"{measure} {value:.2f} points > --max-drop {max_drop}")
    if max_latency_ms is not None:
        if latency_ms is None:
            reasons.append("latency could not be measured here, so --max-latency "
                           f"{max_latency_ms} ms is unchecked")
        elif latency_ms > max_latency_ms:
            reasons.append(f"measured latency {latency_ms:.3f} ms > --max-latency "
                           f"{max_latency_ms} ms")
    return GateResult(passed=not reasons, reason="; ".join(reasons) or None, max_drop=max_drop,
                      measure=measure, value=value, max_latency_ms=max_latency_ms,
                      latency_ms=latency_ms if max_latency_ms is not None else None,
                      reasons=tuple(reasons))
