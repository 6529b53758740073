"""The lower and verify stages: artifacts for the target, then the parity gate.

`lower` writes the FP32 baseline and the quantized artifact and says what the artifact is for
(`device`). `verify` runs the parity gate (quantflow.verify) where the target declares it can
tap its tensors (ORT), repairing and re-lowering layers that are off, and records what
portability cost: the layers whose weights were kept within the kernels' pair limit and the
simulation's SQNR with and without that change.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import fx

from quantflow import evaluate as ev
from quantflow import hostcpu, verify
from quantflow.config import CompileConfig
from quantflow.dataset import Dataset
from quantflow.devices import DEVICES
from quantflow.plan import PlanResult
from quantflow.quantize import quantizable_nodes
from quantflow.spec import KernelRules
from quantflow.targets import ort_isa

log = logging.getLogger("quantflow")



@dataclass(frozen=True)
class Lowered:
    """What the lower (and then verify) stage built: the target, both artifacts, the quantized
    graph the artifact was made from and the kernel rules it respects."""

    target: Any
    fp32: Any
    quantized: Any
    qgm: fx.GraphModule
    rules: KernelRules
    precision: str
    device: dict[str, Any]


def device_section(config: CompileConfig) -> dict[str, Any]:
    """What the artifact is for, and whether this host runs it exactly (report.json)."""
    cpu = hostcpu.host_cpu()
    section: dict[str, Any] = {"requested": config.device or DEVICES[config.target][0],
                               "resolved": config.resolved_device}
    if config.target == "ort":
        device = config.resolved_device
        limit = ort_isa.pair_limit(device)
        section.update(
            exact_on=[c for c in ort_isa.ISA_CLASSES if ort_isa.exact_on(device, c)],
            pair_limit=limit.to_dict() if limit else None,
            host_exact=ort_isa.exact_on(device, cpu.isa_class))
        warning = ort_isa.host_warning(device, cpu.isa_class)
        if warning:
            log.warning(warning)
            section["warning"] = warning
    return section


def lower(planned: PlanResult, qgm: fx.GraphModule, rules: KernelRules,
          example_inputs: Sequence[torch.Tensor], config: CompileConfig, out: Path) -> Lowered:
    """FP32 and quantized artifacts of the target under `out`."""
    from quantflow.targets import get_target

    target = get_target(config.target, **config.target_options())
    precision = "mixed" if config.bits == "mixed" else "int8"
    art_fp32 = target.lower(planned.gm, example_inputs, out, precision="fp32")
    art_q = target.lower(qgm, example_inputs, out, precision=precision)
    return Lowered(target, art_fp32, art_q, qgm, rules, precision, device_section(config))


def verify_stage(planned: PlanResult, lowered: Lowered, calib: Dataset,
                 example_inputs: Sequence[torch.Tensor], config: CompileConfig, out: Path
                 ) -> tuple[Lowered, verify.ParityCheck | None, dict[str, Any]]:
    """The parity gate where the target declares tensor taps; then the portability section."""
    parity = None
    if lowered.target.caps.parity_taps:
        lowered, parity = _parity(planned, lowered, calib, example_inputs, config, out)
    return lowered, parity, portability(planned, lowered.qgm, calib, config)


def _parity(planned: PlanResult, lowered: Lowered, calib: Dataset,
            example_inputs: Sequence[torch.Tensor], config: CompileConfig, out: Path
            ) -> tuple[Lowered, verify.ParityCheck]:
    """The parity gate (quantflow.verify) on the host and the --verify-on CPUs."""
    isas = list(config.verify_isas)
    skipped = {}
    host = hostcpu.host_cpu().isa_class
    if ort_isa.exact_on(config.resolved_device, host):
        isas.insert(0, "host")
    else:  # the artifact is not meant for this CPU: nothing to hold it to here
        skipped["host"] = (f"this CPU ({host}) is not one the --device "
                           f"{config.resolved_device} artifact is exact on")
    batch = int(example_inputs[0].shape[0])
    target = lowered.target

    def requantize(r: KernelRules) -> tuple[fx.GraphModule, Any]:
        q = planned.quantize(r)
        return q, target.lower(q, example_inputs, out, precision=lowered.precision)

    def run_check(q: fx.GraphModule, art: Any) -> verify.ParityCheck:
        return verify.check(q, art, target, calib.x, batch, isas)

    weighted = set(quantizable_nodes(planned.gm))
    qgm, art_q, rules, parity = verify.gate(requantize, lowered.rules,
                                            (lowered.qgm, lowered.quantized), run_check, weighted)
    parity.skipped = skipped
    return replace(lowered, qgm=qgm, quantized=art_q, rules=rules), parity


def portability(planned: PlanResult, qgm: fx.GraphModule, calib: Dataset,
                config: CompileConfig) -> dict[str, Any]:
    """The layers changed so the kernels cannot saturate, why, and what it cost in fidelity:
    output SQNR (vs FP32, calibration data) of the simulation with and without the change."""
    info = qgm.meta["quantflow"]
    section: dict[str, Any] = {"device": config.resolved_device, "layers": info.portability}
    if not info.portability:
        return section
    x = ev.scoring_subset(calib.x[:256])
    ref = ev.predict(planned.gm, x)
    free = planned.quantize(KernelRules(placement=config.placement))
    with_fix, without = ev.sqnr_db(ref, ev.predict(qgm, x)), ev.sqnr_db(ref, ev.predict(free, x))
    section["simulation_sqnr_db"] = {"portable": round(with_fix, 3),
                                     "unconstrained": round(without, 3),
                                     "cost": round(without - with_fix, 3),
                                     "samples": int(x.shape[0])}
    return section
