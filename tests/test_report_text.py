"""The text summary says "larger"/"slower" when the quantized artifact is the worse one
(untuned TVM INT8 can be bigger and slower than FP32) instead of "x0.64 smaller"."""

from __future__ import annotations

from typing import Any

import pytest

from quantflow.report_text import render, times


@pytest.mark.parametrize(("ratio", "words"), [
    (4.0, "4.00x smaller"), (1.0, "1.00x smaller"), (0.64, "1.56x larger"),
    (0.30, "3.33x larger")])
def test_times_words(ratio: float, words: str) -> None:
    assert times(ratio, "smaller", "larger") == words


def _report(ratio: float, speedup: float) -> dict[str, Any]:
    lat = {"median_ms": 1.0, "p90_ms": 1.1, "threads": 2, "device": "cpu"}
    return {"model": {"name": "m"}, "target": "tvm", "bits": "8",
            "size": {"fp32_bytes": 1_000_000, "quantized_bytes": int(1_000_000 / ratio),
                     "ratio": ratio},
            "latency": {"fp32": lat, "quantized": {**lat, "median_ms": 1.0 / speedup},
                        "speedup": speedup}}


def test_summary_of_a_worse_artifact_says_larger_and_slower() -> None:
    text = render(_report(0.64, 0.30))
    assert "1.56x larger" in text and "3.33x slower" in text
    assert "smaller" not in text and "faster" not in text


def test_summary_of_a_better_artifact_says_smaller_and_faster() -> None:
    text = render(_report(3.9, 2.5))
    assert "3.90x smaller" in text and "2.50x faster" in text
