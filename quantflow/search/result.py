"""`SearchResult`: what the mixed-precision search found and how (search/mixed.py), and the
files it writes next to the compiled artifact (search.json, search_layers.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantflow.calibrate import TensorStats
from quantflow.search import quantune as qt
from quantflow.search.hawq import HessianTraces
from quantflow.search.latency import LatencyTable
from quantflow.search.validate import LatencyCheck
from quantflow.spec import QuantPlan


@dataclass
class SearchResult:
    """What the search found and how (search/mixed.py module docstring)."""

    plan: QuantPlan
    best: qt.Trial
    satisfied: bool
    reference_quality: float
    trials: list[qt.Trial]
    pareto: list[qt.Trial]
    layers: list[dict[str, Any]]
    traces: HessianTraces
    latency: LatencyTable
    budget: qt.Budget
    real_evaluations: int
    reused_evaluations: int
    seconds: float
    stats: dict[str, TensorStats] = field(repr=False, default_factory=dict)
    latency_checks: list[LatencyCheck] = field(default_factory=list)

    @staticmethod
    def _trial(t: qt.Trial) -> dict[str, Any]:
        return {"config": t.candidate.label(), "key": t.candidate.key(), "quality": t.quality,
                "drop": t.drop, "size_bytes": t.size_bytes, "latency_ms": t.latency_ms,
                "reused": t.reused}

    def to_dict(self) -> dict[str, Any]:
        return {
            "best": self._trial(self.best), "satisfied": self.satisfied,
            "reference_quality": self.reference_quality,
            "budget": {k: v for k, v in self.budget.__dict__.items()},
            "real_evaluations": self.real_evaluations,
            "reused_evaluations": self.reused_evaluations,
            "seconds": round(self.seconds, 2),
            "latency_method": self.latency.method,
            "latency_checks": [c.to_dict() for c in self.latency_checks],
            "pareto": [self._trial(t) for t in self.pareto],
            "trials": [self._trial(t) for t in self.trials],
            "layers": self.layers,
            "hessian": self.traces.to_dict(),
        }

    def layer_table(self) -> str:
        """Markdown: per-layer sensitivity, chosen option, bits and latency gain."""
        rows = ["| layer | Tr(H)/n | Ω(chosen) | option | W bits | A bits | latency gain ms |",
                "|---|---|---|---|---|---|---|"]
        for r in self.layers:
            rows.append(f"| {r['layer']} | {r['trace_per_param']:.3g} | "
                        f"{r['sensitivity']:.3g} | {r['option']} | {r['weight_bits']} | "
                        f"{r['act_bits']} | {r['latency_gain_ms']:.4f} |")
        return "\n".join(rows)

    def save(self, out_dir: str | Path) -> None:
        """search.json and search_layers.md (the plan itself is written once, by the compile
        that ships it)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "search.json").write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        (out / "search_layers.md").write_text(self.layer_table() + "\n")
