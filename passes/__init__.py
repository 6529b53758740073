"""Graph passes over the exported fx graph, and the default pipeline.

Every pass is a plain `(gm: fx.GraphModule) -> bool` function (mutates in place, returns
whether it changed anything). `DEFAULT_PIPELINE` is the explicit, ordered tuple `optimize` runs
to a fixpoint:

  canonical_convs   TorchScript's aten.convolution/_convolution → conv1d/2d/3d (canonical.py)
  remove_identity   dropout/clone/detach/no-op casts and reshapes, asserts (cleanup.py)
  fold_bn           conv/linear → BN folded into the layer (fold_bn.py)
  decompose_sdpa    scaled_dot_product_attention → matmul/softmax/matmul (decompose_sdpa.py)
  fold_scale        conv/linear → (moves) → × scalar folded into the layer (fold_scale.py)
  fold_affine       per-channel BN behind a permute, constant scale/shift (layer scale)
                    after a conv/linear folded into it (fold_affine.py)
  fold_input_shift  linear(y + β) → linear(y) with b + W·β (GRN's β; fold_input_shift.py)
  <reparam passes>  standalone BN → conv, parallel/sequential conv merges (reparam_*.py)
  dead_code         unused nodes, then unused parameters/buffers/submodules (cleanup.py)

Canonical convs come first: every other pass matches only conv1d/2d/3d. Identity removal
runs next so that e.g. conv → dropout → BN becomes a foldable conv → BN;
dead_code runs last to drop the constants the folds replaced. Cross-layer equalization
(`quantflow.passes.equalize.equalize` / `equalize_relu6`) is exact but optional, so it is not in
the default tuple: `EQUALIZE_PIPELINE` runs it (quantflow/plan.py, when it helps fidelity).
"""

from __future__ import annotations

from torch import fx

from quantflow.passes.canonical import canonical_convs
from quantflow.passes.cleanup import dead_code, remove_identity
from quantflow.passes.decompose_sdpa import decompose_sdpa as _decompose_sdpa
from quantflow.passes.equalize import equalize as _equalize
from quantflow.passes.fold_affine import fold_affine as _fold_affine
from quantflow.passes.fold_bn import fold_bn as _fold_bn
from quantflow.passes.fold_input_shift import fold_input_shift as _fold_input_shift
from quantflow.passes.fold_scale import fold_scale as _fold_scale
from quantflow.passes.pipeline import Pass, PassReport, run_pipeline
from quantflow.passes.reparam_bn_branch import avgpool_to_conv, bn_to_conv
from quantflow.passes.reparam_parallel import merge_parallel_convs
from quantflow.passes.reparam_sequential import merge_sequential_convs

# Pass functions named like their module (`fold_bn`, `equalize`) are deliberately not re-bound
# here: `quantflow.passes.fold_bn` must stay the module (a function of the same name would shadow
# it for `import quantflow.passes.fold_bn as m`); import them from their modules.

DEFAULT_PIPELINE: tuple[Pass, ...] = (
    canonical_convs,
    remove_identity,
    _fold_bn,
    _decompose_sdpa,
    _fold_scale,
    _fold_affine,
    _fold_input_shift,
    bn_to_conv,
    avgpool_to_conv,
    merge_sequential_convs,
    merge_parallel_convs,
    dead_code,
)


#: cross-layer equalization (exact); a second run finds nothing, so it reaches a fixpoint
EQUALIZE_PIPELINE: tuple[Pass, ...] = (_equalize,)


def optimize(gm: fx.GraphModule) -> PassReport:
    """Run `DEFAULT_PIPELINE` on `gm` in place to a fixpoint."""
    return run_pipeline(gm, DEFAULT_PIPELINE)


__all__ = [
    "DEFAULT_PIPELINE",
    "EQUALIZE_PIPELINE",
    "Pass",
    "PassReport",
    "canonical_convs",
    "dead_code",
    "optimize",
    "remove_identity",
    "run_pipeline",
]
