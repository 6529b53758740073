"""When a layer counts as diverged, why, and what to do about it: pure rules on the numbers
quantflow/layer_local.py and the runtime taps measured.

Bounds (one layer, alone — layer_local's `local` SQNR — so upstream error does not count):
  local SQNR  below 6.02·b − 44 dB, b = min(weight bits, activation bits): 44 dB under the
              SQNR of an ideal b-bit quantizer (6.02·b dB) is an error amplitude ~150× an
              ideal one's; 8-bit layers: 4.2 dB. Healthy 8-bit layers of the zoo CNNs measure
              30–46 dB (ResNet, Fashion-MNIST) and 10.6–58 dB (MobileNetV2, ImageNet, whose
              depthwise inputs have outliers), so only a layer that has lost its signal
              crosses it.
  input range the FP32 input spans fewer than MIN_CODES quantization steps (a scale orders of
              magnitude too large: the data lands on a handful of codes), or more than
              MAX_CLIPPED of it lies outside the range (a scale far too small).
  runtime     more than parity.BOUND_STEPS steps from the simulation on the runtime's own
              inputs (a correct integer kernel is at most one step off: a rounding tie).

Fixes name the flag that addresses the evidence: more bits where one side's error dominates,
another calibrator where the range is wrong, keep-float when 8 bits are not enough, and
`--device portable` where the CPU's int8 kernel saturates (README, "Correct INT8 on every
CPU").
"""

from __future__ import annotations

import re
from typing import Any

from quantflow.parity import BOUND_STEPS
from quantflow.targets.ort_isa import SATURATING_ISAS

MARGIN_DB = 44.0
MIN_CODES = 8.0
MAX_CLIPPED = 0.05


def bits_of(label: str) -> tuple[int, int]:
    """(weight bits, activation bits) of a plan label such as W8A8 or W4A8."""
    m = re.fullmatch(r"W(\d+)A(\d+)", label)
    return (int(m.group(1)), int(m.group(2))) if m else (32, 32)


def bound_db(label: str) -> float:
    return round(6.02 * min(bits_of(label)) - MARGIN_DB, 2)


def local_diverged(row: dict[str, Any]) -> bool:
    codes = row.get("codes_used")
    return bool(row["local_sqnr_db"] < row["bound_db"]
                or (codes is not None and codes < MIN_CODES)
                or row.get("clipped", 0.0) > MAX_CLIPPED)


def runtime_diverged(row: dict[str, Any]) -> bool:
    steps = row.get("runtime_steps")
    return steps is not None and steps > BOUND_STEPS


def diagnose(row: dict[str, Any], *, isa_class: str, device: str | None
             ) -> tuple[str, str]:
    """(cause, fix) for one layer row of the analysis."""
    name, label = row["name"], row["bits"]
    wbits, abits = bits_of(label)
    if runtime_diverged(row):
        if isa_class in SATURATING_ISAS and device not in ("portable", f"{isa_class}"):
            return ((f"the runtime is {row['runtime_steps']:.0f} steps off: this CPU's "
                    f"({isa_class}) int8 kernels add weight pairs in a saturating int16 "
                    f"and the artifact was made for {device}"),
                    "--device portable (the default: exact on every CPU)")
        return ((f"the runtime computes this layer {row['runtime_steps']:.0f} steps away from "
                "the simulation"), f"--keep-float {name} (and please report it)")
    codes = row.get("codes_used")
    if codes is not None and codes < MIN_CODES:
        return ((f"the input range is far wider than the data: it spans {codes:g} of "
                f"{2 ** abits} codes (a wrong scale)"),
                "--calibrator mse (or percentile): recalibrate the range")
    if row.get("clipped", 0.0) > MAX_CLIPPED:
        return (f"{100 * row['clipped']:.1f}% of the input is clipped by its range",
                "--calibrator minmax: a range that covers the data")
    w_db, a_db = row.get("weight_only_db"), row.get("act_only_db")
    alone = ", ".join(f"{what} alone: {db:.1f} dB" for what, db in
                      (("weights", w_db), ("input", a_db)) if db is not None)
    if w_db is not None and a_db is not None and w_db < a_db:
        return (f"weight quantization ({alone})",
                f"--bits-for {name}=W8A8" if wbits < 8 else f"--keep-float {name}")
    return (f"activation quantization ({alone})",
            f"--bits-for {name}=W8A16" if abits < 16 else f"--keep-float {name}")
