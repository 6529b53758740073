"""The CI gate: drop within --max-drop (accuracy or agreement) and measured latency within
--max-latency; every failure says which budget and by how much."""

from __future__ import annotations

from typing import Any

from quantflow.gate import gate


def _gate(*args: Any, **kwargs: Any) -> dict[str, Any]:
    return gate(*args, **kwargs).to_dict()

LABELLED = {"accuracy_drop": 0.8, "quantized": {"agreement": 0.97}}
UNLABELLED = {"accuracy_drop": None, "quantized": {"agreement": 0.985}}


def test_drop_budget_uses_accuracy_then_agreement() -> None:
    assert _gate(LABELLED, 1.0)["passed"] is True
    g = _gate(LABELLED, 0.5)
    assert g["passed"] is False and "accuracy drop 0.80 points > --max-drop 0.5" in str(g["reason"])
    g = _gate(UNLABELLED, 1.0)  # 1.5 points of top-1 disagreement
    assert g["passed"] is False and g["measure"] == "top-1 disagreement with FP32"
    assert abs(float(g["value"]) - 1.5) < 1e-9  # type: ignore[arg-type]
    assert _gate(UNLABELLED, None) == {"max_drop": None, "passed": True, "reason": None}


def test_latency_budget_is_checked_on_the_measured_latency() -> None:
    assert _gate(LABELLED, 1.0, latency_ms=0.9, max_latency_ms=1.0)["passed"] is True
    g = _gate(LABELLED, 1.0, latency_ms=1.2, max_latency_ms=1.0)
    assert g["passed"] is False and "measured latency 1.200 ms > --max-latency 1.0 ms" in str(
        g["reason"])
    g = _gate(LABELLED, 0.5, latency_ms=1.2, max_latency_ms=1.0)  # both reasons, one message
    assert "--max-drop" in str(g["reason"]) and "--max-latency" in str(g["reason"])
    g = _gate(LABELLED, None, latency_ms=None, max_latency_ms=1.0)
    assert g["passed"] is False and "could not be measured" in str(g["reason"])
