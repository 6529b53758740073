"""The parity gate: after lowering, the runtime must match the simulation layer by layer.

On every CPU class it is asked to check (the host, natively; others through an emulator),
the target runs the artifact on a few calibration samples and reports the integer codes of
each quantized tensor; quantflow.parity compares them with the simulation layer by layer
(each layer on the runtime's own inputs). A layer more than `BOUND_STEPS` off is repaired and
the artifact lowered again: first with the pair limit on that layer (pair-aware rounding,
targets/ort_isa.py), then with 7-bit weights; a layer still off after both, or one without
weights to change (an add, a pool), fails the compile with ParityError (exit 7).

A target opts in by declaring `caps.parity_taps` and so providing `tensor_codes(artifact, names,
feeds, isa)` (targets.base.ParityTaps); TVM and TensorRT keep their own numerics checks
(runtime output vs simulation, in their tests).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import fx

from quantflow.errors import ParityError
from quantflow.parity import BOUND_STEPS, TensorParity, layer_parity, quantized_tensors
from quantflow.progress import bar
from quantflow.spec import KernelRules

log = logging.getLogger("quantflow")

#: calibration samples the gate runs (a saturating layer is off on almost any input)
PARITY_SAMPLES = 8
#: repairs in the order tried on a layer that is off
REPAIR_ORDER = ("pairs", "7bit")


@dataclass
class ParityCheck:
    """The gate's record for report.json."""

    isas: list[str]
    samples: int
    bound_steps: int = BOUND_STEPS
    tensors: dict[str, list[TensorParity]] = field(default_factory=dict)  # isa -> results
    repaired: dict[str, str] = field(default_factory=dict)  # layer -> repair applied
    skipped: dict[str, str] = field(default_factory=dict)  # isa -> why not checked

    def failing(self) -> list[tuple[str, TensorParity]]:
        return [(isa, t) for isa, ts in self.tensors.items() for t in ts if not t.ok]

    def to_dict(self) -> dict[str, Any]:
        worst = {isa: max((t.max_steps for t in ts), default=0)
                 for isa, ts in self.tensors.items()}
        return {"isas": self.isas, "samples": self.samples, "bound_steps": self.bound_steps,
                "passed": not self.failing(), "max_steps": worst,
                "repaired": self.repaired, "skipped": self.skipped,
                "off_layers": [{"isa": isa, **t.to_dict()} for isa, t in self.failing()]}


def _runs(x: torch.Tensor, batch: int, n: int) -> list[list[torch.Tensor]]:
    """`n` samples as runs of the artifact's static batch."""
    n = max(batch, min(n, int(x.shape[0])) // batch * batch)
    return [[x[i:i + batch]] for i in range(0, min(n, int(x.shape[0])), batch)
            if x[i:i + batch].shape[0] == batch]


def check(qgm: fx.GraphModule, artifact: Any, target: Any, x: torch.Tensor, batch: int,
          isas: Sequence[str], samples: int = PARITY_SAMPLES) -> ParityCheck:
    """Per-layer parity of `artifact` with `qgm` on each ISA ("host" or an emulated one)."""
    runs = _runs(x, batch, samples)
    names = quantized_tensors(qgm)
    result = ParityCheck(list(isas), sum(int(r[0].shape[0]) for r in runs))
    feeds = [[t.numpy() for t in r] for r in runs]
    for isa in bar(isas, f"verify: per-layer parity ({len(runs)} runs per CPU)", "CPU"):
        codes = target.tensor_codes(artifact, names, feeds, isa=isa)
        result.tensors[isa] = layer_parity(qgm, runs, codes)
    return result


def gate(requantize: Callable[[KernelRules], tuple[fx.GraphModule, Any]], rules: KernelRules,
         first: tuple[fx.GraphModule, Any], run_check: Callable[[fx.GraphModule, Any],
                                                                ParityCheck],
         weighted: set[str]) -> tuple[fx.GraphModule, Any, KernelRules, ParityCheck]:
    """Check, repair the layers that are off, re-lower, check again; ParityError if stuck.

    `requantize(rules)` quantizes and lowers with the given rules; `weighted`: the layers
    that have weights a repair can change.
    """
    qgm, art = first
    result = run_check(qgm, art)
    repaired: dict[str, str] = {}
    while True:
        failing = result.failing()
        if not failing:
            result.repaired = repaired
            return qgm, art, rules, result
        fixes = dict(rules.repairs)
        stuck = []
        for isa, t in failing:
            tried = fixes.get(t.layer)
            if t.layer not in weighted or tried == REPAIR_ORDER[-1]:
                stuck.append((isa, t))
                continue
            fixes[t.layer] = REPAIR_ORDER[REPAIR_ORDER.index(tried) + 1] if tried \
                else REPAIR_ORDER[0]
        if stuck:
            raise ParityError(_message(stuck, repaired))
        for layer, fix in fixes.items():
            if rules.repairs.get(layer) != fix:
                log.warning("parity: layer %s is off the simulation; repairing it (%s)",
                            layer, fix)
        repaired.update(fixes)
        rules = replace(rules, repairs=fixes)
        qgm, art = requantize(rules)
        result = run_check(qgm, art)


def _message(stuck: list[tuple[str, TensorParity]], repaired: dict[str, str]) -> str:
    isa, t = max(stuck, key=lambda it: it[1].max_steps)
    tried = f" after repairing it ({repaired[t.layer]})" if t.layer in repaired else ""
    return (f"parity check failed: layer {t.layer!r} ({t.op}) computes {t.max_steps} "
            f"quantization steps off the simulation on {isa}{tried} ({t.off} of {t.elements} "
            f"values beyond {BOUND_STEPS} step); {len(stuck)} tensor(s) off in all. "
            "fix: compile with --device portable (the default) if this artifact targeted "
            "another CPU; keep this layer in float with a --config plan "
            '(layers: {"' + t.layer + '": {"weight": null, "act": null}}); '
            "or report it with the model, since the kernel does something quantflow does not "
            "model")

