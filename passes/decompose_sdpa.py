"""Write `scaled_dot_product_attention` out as the ops quantization can see.

    sdpa(q, k, v, mask, scale=s) = softmax((s·q) @ kᵀ + mask) @ v
                                  (a bool mask: where(mask, ·, -inf) instead of the add)

torch.export keeps `aten.scaled_dot_product_attention` as one op (Hugging Face BERT and
`nn.MultiheadAttention` both call it), so the two activation × activation products inside it
(Q·Kᵀ and P·V) could never be quantized or run as integer kernels. The scale multiplies q (as
torch's reference math path does, and where `fold_scale` can move it into the query
projection); dropout is dropped (eval). Skipped, with a reason: `is_causal=True` (the mask
would depend on the dynamic sequence length: kept as one float op), grouped-query attention
(`enable_gqa`), and a non-zero dropout probability.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from quantflow.passes.driver import for_each, skip

aten = torch.ops.aten
PASS = "decompose_sdpa"


def _is_sdpa(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target == aten.scaled_dot_product_attention.default


def _arg(n: fx.Node, i: int, name: str, default: object) -> object:
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


def _val(node: fx.Node, fn: object, *args: object) -> None:
    """meta["val"] of a new node from its inputs' fake values (shape facts later passes read)."""
    vals = [a.meta.get("val") if isinstance(a, fx.Node) else a for a in args]
    if all(v is not None for v in vals):
        node.meta["val"] = fn(*vals)  # type: ignore[operator]


def _rewrite(gm: fx.GraphModule, n: fx.Node) -> bool:
    q, k, v = n.args[:3]
    mask = _arg(n, 3, "attn_mask", None)
    if float(_arg(n, 4, "dropout_p", 0.0)) != 0.0:  # type: ignore[arg-type]
        return skip(PASS, n, "dropout_p != 0 (a training graph)")
    if _arg(n, 5, "is_causal", False):
        return skip(PASS, n, "is_causal=True: the mask depends on the dynamic sequence length")
    if _arg(n, 7, "enable_gqa", False):
        return skip(PASS, n, "enable_gqa=True (grouped-query attention) is not decomposed")
    qv = q.meta.get("val") if isinstance(q, fx.Node) else None
    if qv is None:
        return skip(PASS, n, "the query has no shape (meta['val']): head size unknown")
    scale = _arg(n, 6, "scale", None)
    s = float(scale) if scale is not None else 1.0 / math.sqrt(int(qv.shape[-1]))  # type: ignore[arg-type]
    g = gm.graph
    with g.inserting_before(n):
        qs = g.call_function(aten.mul.Tensor, (q, s))
        _val(qs, aten.mul.Tensor, q, s)
        kt = g.call_function(aten.transpose.int, (k, -2, -1))
        _val(kt, aten.transpose.int, k, -2, -1)
        scores = g.call_function(aten.matmul.default, (qs, kt))
        _val(scores, aten.matmul.default, qs, kt)
        if isinstance(mask, fx.Node):
            mv = mask.meta.get("val")
            if mv is not None and mv.dtype == torch.bool:
                scores2 = g.call_function(aten.masked_fill.Scalar,
                                          (scores, g.call_function(aten.logical_not.default,
                                                                   (mask,)), float("-inf")))
            else:
                scores2 = g.call_function(aten.add.Tensor, (scores, mask))
                _val(scores2, aten.add.Tensor, scores, mask)
            scores = scores2
        probs = g.call_function(aten.softmax.int, (scores, -1))
        _val(probs, aten.softmax.int, scores, -1)
        out = g.call_function(aten.matmul.default, (probs, v))
        _val(out, aten.matmul.default, probs, v)
    for key in ("nn_module_stack", "stack_trace"):
        if key in n.meta:
            for new in (qs, kt, scores, probs, out):
                new.meta[key] = n.meta[key]
    n.replace_all_uses_with(out)
    g.erase_node(n)
    return True


def decompose_sdpa(gm: fx.GraphModule) -> bool:
    """Every eligible `scaled_dot_product_attention` → matmul/softmax/matmul; whether any."""
    changed = for_each(gm, _is_sdpa, lambda n: _rewrite(gm, n))
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed
