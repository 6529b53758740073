"""Learned rounding inside the mixed-precision search: 4-bit layers priced and evaluated with
AdaRound codes instead of round-to-nearest.

With `--optimize-time`, `mixed_plan` learns the rounding of every weighted layer once, at
4 bits (`w4_rounding`), before the search starts. The search then
- evaluates each candidate with those codes on its 4-bit layers (`LearnedW4.for_plan`); codes
  only apply where they are a rounding of the weight on the candidate's grid
  (quantize.use_learned), so a candidate whose 4-bit grid differs (per-tensor scales) falls
  back to nearest rounding element by element, never to wrong weights;
- prices a layer's 4-bit option with the HAWQ sensitivity of its weight part scaled by what
  learning measured on that layer's output error:

      Ω'(W4A8) = Ω(W8A8) + r · (Ω(W4A8) − Ω(W8A8)),   r = MSE_learned / MSE_nearest

  (HAWQ's Ω is Tr(H)·‖ΔW‖², a second-order estimate of the loss increase; learned rounding
  makes ‖ΔW‖ larger on purpose and the layer's output error smaller, so the weight error
  alone would price it wrongly).
Without these, a 4-bit layer is priced at its nearest-rounding error and rarely fits an
accuracy budget on ImageNet models.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx

from quantflow.calibrate import TensorStats
from quantflow.quantize import quantize
from quantflow.search.database import tensor_hash
from quantflow.search.space import OPTION_BITS, GlobalConfig, SearchSpace, layer_plan
from quantflow.spec import KernelRules, QuantPlan


@dataclass(frozen=True)
class LearnedW4:
    """Learned 4-bit codes per layer and each layer's output-MSE ratio (learned / nearest)."""

    codes: Mapping[str, torch.Tensor]
    ratio: Mapping[str, float]
    seconds: float

    def key(self) -> str:
        """Part of the evaluation database key: the same candidate with other codes is another
        model."""
        names = sorted(self.codes)
        return "learned_w4=" + tensor_hash([self.codes[n] for n in names], ",".join(names))[:16]

    def for_plan(self, plan: QuantPlan) -> dict[str, torch.Tensor]:
        """The codes of the layers `plan` puts at 4 bits."""
        out = {}
        for n, c in self.codes.items():
            w = plan.for_node(n).weight
            if w is not None and w.bits == 4:
                out[n] = c
        return out

    def reprice(self, space: SearchSpace) -> None:
        """Ω'(4-bit) = Ω(W8A8) + r·(Ω(4-bit) − Ω(W8A8)), in place (module docstring)."""
        if "W8A8" not in space.options:
            return
        k8 = space.options.index("W8A8")
        r = np.asarray([self.ratio.get(n, 1.0) for n in space.layers])
        for k, o in enumerate(space.options):
            if OPTION_BITS[o][0] != 4:
                continue
            for sens in space.sens.values():
                extra = np.maximum(sens[:, k] - sens[:, k8], 0.0)
                sens[:, k] = sens[:, k8] + r * extra

    def summary(self) -> dict[str, float | int]:
        finite = [v for v in self.ratio.values() if v > 0]
        gain = -10 * math.log10(float(np.mean(finite))) if finite else 0.0
        return {"layers": len(self.codes), "seconds": round(self.seconds, 1),
                "mean_output_mse_gain_db": round(gain, 3)}


def w4_rounding(gm: fx.GraphModule, stats: dict[str, TensorStats], x: torch.Tensor,
                glob: GlobalConfig, layers: list[str], rules: KernelRules,
                seconds: float, seed: int = 0) -> LearnedW4:
    """Learn every layer's rounding with the whole model at W4A8 (the search's 4-bit option
    under `glob`): the codes the search uses on its 4-bit layers."""
    from quantflow.rounding import RoundingOptions, learn_rounding

    plan = QuantPlan(default=layer_plan("W8A8", glob),
                     layers={n: layer_plan("W4A8", glob) for n in layers})
    q = quantize(gm, plan, stats, rules)
    res = learn_rounding(gm, q, x, RoundingOptions(seconds=seconds, seed=seed))
    ratio = {n: (a / b if b > 0 else 1.0) for n, (b, a) in res.errors.items()}
    return LearnedW4(res.codes, ratio, res.seconds)
