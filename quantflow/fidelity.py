"""The `--optimize-time` stages: worst-tensor repair, then learned rounding, each checked.

Both are opt-in (0 s: the stages return the plan unchanged) and share the budget:
`REPAIR_SHARE` for repair (quantflow/repair.py), the rest for learned rounding
(quantflow/rounding.py; with `--bits mixed` the search has already spent
`search.compile.MIXED_ROUNDING_SHARE` on the 4-bit codes it prices with).

Learned rounding fits thousands of parameters per layer to a few dozen calibration samples;
on a model that INT8 already quantizes well it can fit that sample's noise. It learns on the
first `learn_samples(n)` calibration samples and is checked on the rest: when the model's
output SQNR on those held-out samples is lower with the learned codes than with nearest
rounding, the plan keeps nearest rounding and the report says so (`rounding.validation`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from quantflow import evaluate as ev
from quantflow.cache import cache_dir
from quantflow.config import CompileConfig
from quantflow.dataset import Dataset
from quantflow.plan import PlanResult

#: the share of `--optimize-time` that worst-tensor repair may take (learned rounding, the
#: larger win for weights, gets the rest)
REPAIR_SHARE = 0.25
#: learned rounding learns on at most this fraction of the calibration samples (the rest
#: checks it), and at most RoundingOptions.samples of them
LEARN_FRACTION = 0.75
#: fewer held-out samples than this: no check (and every sample is learned on)
MIN_CHECK_SAMPLES = 8


def repair_stage(planned: PlanResult, calib: Dataset, config: CompileConfig) -> PlanResult:
    """Worst-tensor repair within a share of `--optimize-time` (opt-in)."""
    if not config.optimize_seconds:
        return planned
    from quantflow.repair import repair
    from quantflow.targets import get_target

    integer = get_target(config.target).caps.integer_options
    skipped = {} if "W8A16" in integer else {
        "a16": f"{config.target} runs 16-bit activations as float kernels (TargetCaps)"}
    result = repair(planned.gm, planned.quantize(config.kernel_rules), calib.x,
                    skipped=skipped, seconds=REPAIR_SHARE * config.optimize_seconds)
    return replace(planned, act_qparams=result.qparams, repair_summary=result.summary())


def learn_samples(n: int, most: int) -> int:
    """How many of `n` calibration samples learned rounding learns on (the rest check it)."""
    if n - min(most, int(LEARN_FRACTION * n)) < MIN_CHECK_SAMPLES:
        return min(most, n)
    return max(1, min(most, int(LEARN_FRACTION * n)))


def round_stage(planned: PlanResult, calib: Dataset, config: CompileConfig) -> PlanResult:
    """Learned rounding within the rest of `--optimize-time` (opt-in), kept only where it
    beats nearest rounding on held-out calibration samples. Resumable: each finished layer is
    cached under the model, plan, data and options, so a compile stopped half-way (Ctrl-C)
    picks up where it was."""
    if not config.optimize_seconds:
        return planned
    from quantflow.rounding import RoundingOptions, learn_rounding, rounding_cache_key
    from quantflow.search.compile import MIXED_ROUNDING_SHARE

    # a fixed share, not "what is left": the budget is part of the cache key, and a rerun
    # must find the same key to resume
    share = 1 - REPAIR_SHARE - (MIXED_ROUNDING_SHARE if config.bits == "mixed" else 0.0)
    n = int(calib.x.shape[0])
    opts = RoundingOptions(seconds=share * config.optimize_seconds, seed=config.resolved_seed)
    opts = replace(opts, samples=learn_samples(n, opts.samples))
    rules = config.kernel_rules
    q = planned.quantize(rules)
    key = rounding_cache_key(planned.gm, q, calib.x, opts)
    result = learn_rounding(planned.gm, q, calib.x, opts, cache=cache_dir("rounding", key))
    learned = replace(planned, rounding=result.codes)
    summary: dict[str, Any] = {**result.summary(), "learned_on": opts.samples,
                               "validation": None}
    held = ev.scoring_subset(calib.x[opts.samples:])
    if held.shape[0] >= MIN_CHECK_SAMPLES and opts.samples < n:
        ref = ev.predict(planned.gm, held)
        nearest = ev.sqnr_db(ref, ev.predict(q, held))
        with_codes = ev.sqnr_db(ref, ev.predict(learned.quantize(rules), held))
        kept = with_codes >= nearest
        summary["validation"] = {"samples": int(held.shape[0]),
                                 "nearest_sqnr_db": round(nearest, 3),
                                 "learned_sqnr_db": round(with_codes, 3), "kept": kept}
        if not kept:  # fitted the calibration samples' noise: nearest rounding ships
            return replace(planned, rounding_summary=summary)
    return replace(learned, rounding_summary=summary)
