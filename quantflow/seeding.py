"""`--seed`: one number for every random choice of a compile.

The search, the Hessian draws, ZeroQ and learned rounding take their seed explicitly
(CompileConfig.resolved_seed); `seed_everything` also seeds the global generators (python,
numpy, torch) for any code that draws from them, so the same options give the same plan.json
and a byte-identical artifact.
"""

from __future__ import annotations

import random

import numpy as np
import torch

#: the seed of a compile that passes none (--seed), so two plain runs agree too
DEFAULT_SEED = 0


def seed_everything(seed: int | None) -> int:
    """Seed python's `random`, numpy's global generator and torch; returns the seed used."""
    s = DEFAULT_SEED if seed is None else int(seed)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    return s
