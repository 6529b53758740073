"""Canonical conv form: `aten.convolution` / `aten._convolution` → `aten.conv1d/2d/3d`.

Every pass, the quantizer and the targets match convs as `ir.CONV_OPS` (`aten.conv1d/2d/3d`),
the ops `torch.export` emits for `nn.Conv1d/2d/3d`. TorchScript records traced
convs as the generic op instead: torch's `TS2EPConverter` emits
`aten.convolution(x, w, b, stride, padding, dilation, transposed, output_padding, groups)`, and a
ScriptModule exported through its interpreter keeps `aten._convolution`, which takes the same
nine arguments plus backend hints (benchmark, deterministic, cudnn_enabled, allow_tf32). Left
alone, those convs would be invisible: no BN folding, no merges, no quantization.

The algebra: with transposed=False,

    convolution(x, w, b, s, p, d, False, output_padding, g) = conv{N}d(x, w, b, s, p, d, g)

for N = w.dim() − 2, because conv{N}d is defined as exactly that call (output_padding only
sizes a transposed conv's output; a direct conv ignores it), and the backend hints choose a
kernel, not a result, on the CPU. So the rewrite is exact and keeps the node's meta.

Skipped, with the reason at debug level: transposed convs (no conv1d/2d/3d form; they stay
float), weights of another rank or of unknown rank (no `meta["val"]`), and calls whose
arguments are not all positional. Runs first in `DEFAULT_PIPELINE`;
`quantflow.load_torchscript` also runs it on the TorchScript it converts, so that loaded graph
(and the conv counts the report takes before the passes) already has the canonical form.
"""

from __future__ import annotations

import torch
from torch import fx

from quantflow.ir import CONV_ND
from quantflow.passes.driver import for_each, skip

aten = torch.ops.aten

#: the generic conv ops TorchScript leaves behind
_GENERIC = (aten.convolution.default, aten._convolution.default)
#: weight rank → canonical op (a conv's weight has its spatial dims + out, in channels)
_CANONICAL = {nd + 2: op for op, nd in CONV_ND.items()}


def _canonical_one(gm: fx.GraphModule, node: fx.Node) -> bool:
    if len(node.args) < 9:
        return skip("canonical_convs", node, "arguments passed by keyword")
    x, w, b, stride, pad, dil, transposed, _out_pad, groups = node.args[:9]
    if transposed:
        return skip("canonical_convs", node, "transposed conv: no conv1d/2d/3d form")
    val = w.meta.get("val") if isinstance(w, fx.Node) else None
    rank = val.dim() if isinstance(val, torch.Tensor) else None
    op = _CANONICAL.get(rank) if rank is not None else None
    if op is None:
        return skip("canonical_convs", node,
                    f"weight rank {rank}: only 1-d, 2-d and 3-d convs have a canonical form")
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(op, (x, w, b, stride, pad, dil, groups))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return True


def canonical_convs(gm: fx.GraphModule) -> bool:
    """Rewrite every non-transposed 1-d/2-d/3-d `aten.convolution`/`_convolution` canonically."""
    return for_each(gm, lambda node: node.op == "call_function" and node.target in _GENERIC,
                    lambda node: _canonical_one(gm, node))
