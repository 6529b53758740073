"""Graphs exported at a fixed batch: make the batch dynamic where that is exact, else run in
chunks of the exported batch.

Published model code often hard-codes the batch it was exported at (`x.view(1, -1)`,
`reshape(1, C*H*W)`, `cls.expand(1, -1, -1)`, `torch.zeros(1, ...)`), so `torch.export` with a
dynamic batch fails and `ir.capture` falls back to static shapes. Calibration and evaluation
run many samples at once, which such a graph cannot take. Two remedies, in order:

1. `make_batch_dynamic` rewrites the batch out of the shape arguments (`rewrite_batch`):
   view-likes of batch-carrying tensors that keep the batch outermost get `[-1, *rest]`;
   `expand` and size-taking factories (`zeros`, `full`, `new_zeros`, ...) whose leading size
   is the batch get the input's runtime batch (`sym_size`). The rewritten graph is re-exported
   with a dynamic batch (export refuses anything that still specializes it) and PROVEN: on
   `PROOF_SAMPLES` distinct inputs it must equal the original graph run at its own batch,
   within `PROOF_REL_TOL`. Only then is it used.
2. Otherwise the static graph is kept and tagged `gm.meta[STATIC_BATCH] = B`. Everything that
   runs a graph on data asks `run_size`/`chunks`/`rebatch` how to batch it, so a static graph
   runs in chunks of B (the last chunk padded by repeating its last sample, outputs trimmed).

`gm.meta[BATCH_CAPTURE]` says which happened (for the report); deepcopy keeps `meta`, so
equalized and quantized copies carry both keys.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, fx
from torch.utils import _pytree as pytree

from quantflow.export import export_dynamic_batch

log = logging.getLogger("quantflow")
aten = torch.ops.aten

#: gm.meta key: the batch a static graph must run at (absent: any batch)
STATIC_BATCH = "static_batch"
#: gm.meta key: {"mode": "rewritten" | "static", "exported_batch", "rewritten": node names
#: (for "static": rewritten, then rejected), "reason": why static}
BATCH_CAPTURE = "batch_capture"
#: samples (each a batch of B) the rewritten graph is proven on, run as one batch
PROOF_SAMPLES = 3
#: fp32 proof tolerance: max|Δ| ≤ PROOF_REL_TOL · max|y| per output (batched kernels may sum
#: in another order than batch-B ones; anything structural is far above this)
PROOF_REL_TOL = 1e-5

#: shape-taking ops whose output keeps the input's leading (batch) dim: shape → [-1, *rest]
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
#: size-taking factories: op → index of the size argument (their leading size → batch)
_FACTORIES = {
    aten.zeros.default: 0, aten.ones.default: 0, aten.full.default: 0,
    aten.empty.memory_format: 0, aten.new_zeros.default: 1, aten.new_ones.default: 1,
    aten.new_full.default: 1, aten.new_empty.default: 1,
}


# ---------------------------------------------------------------- running a graph on data


def static_batch(gm: object) -> int | None:
    """The batch `gm` must run at, or None when it takes any batch (also for non-graphs)."""
    meta = getattr(gm, "meta", None)
    b = meta.get(STATIC_BATCH) if isinstance(meta, dict) else None
    return None if b is None else int(b)


def run_size(gm: object, wanted: int) -> int:
    """Rows per run of `gm`: `wanted`, or the static batch of a static graph."""
    b = static_batch(gm)
    return wanted if b is None else b


def pad_rows(x: Tensor, rows: int) -> Tensor:
    """`x` with its last sample repeated up to `rows` rows (a static graph's last chunk)."""
    n = x.shape[0]
    return x if n >= rows else torch.cat([x, x[-1:].expand(rows - n, *x.shape[1:])])


def chunks(gm: object, x: Tensor, wanted: int) -> list[Tensor]:
    """`x` split into the batches `gm` runs at (`run_size`); a static graph's last chunk is
    padded (`pad_rows`), so callers trim outputs to `x.shape[0]` rows."""
    size = run_size(gm, wanted)
    out = [x[i:i + size] for i in range(0, x.shape[0], size)]
    if static_batch(gm) is not None and out:
        out[-1] = pad_rows(out[-1], size)
    return out


def rebatch(gm: object, batches: Iterable[Sequence[Tensor]]) -> list[tuple[Tensor, ...]]:
    """Input tuples re-split for `gm`: unchanged for a dynamic graph; for a static one, the
    batched inputs (dim 0 = the first input's rows) are concatenated and cut into chunks of
    its batch. Padding repeats the last sample, which calibration statistics then see twice;
    only a static batch > 1 that does not divide the data pads."""
    out = [tuple(b) for b in batches]
    size = static_batch(gm)
    if size is None or not out or all(b[0].shape[0] == size for b in out):
        return out
    rows = out[0][0].shape[0]
    batched = [t.dim() > 0 and t.shape[0] == rows for t in out[0]]
    parts = [chunks(gm, torch.cat([b[i] for b in out]), size) if is_b else None
             for i, is_b in enumerate(batched)]
    n = len(next(p for p in parts if p is not None))
    return [tuple(p[k] if p is not None else out[0][i] for i, p in enumerate(parts))
            for k in range(n)]


# ---------------------------------------------------------------- the rewrite


def _batch_of(inputs: Sequence[Tensor]) -> int | None:
    """The example batch: dim 0 of the first input (None for a scalar or no input)."""
    return int(inputs[0].shape[0]) if inputs and inputs[0].dim() > 0 else None


def _shape(node: Any) -> tuple[int, ...] | None:
    """Static shape from a node's `meta['val']` (None when absent or symbolic)."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, Tensor) or not all(isinstance(d, int) for d in val.shape):
        return None
    return tuple(int(d) for d in val.shape)


def _first_batched_input(gm: fx.GraphModule, batch: int) -> fx.Node | None:
    for n in gm.graph.nodes:
        s = _shape(n) if n.op == "placeholder" else None
        if s and s[0] == batch:
            return n
    return None


def rewrite_batch(gm: fx.GraphModule, batch: int) -> list[str]:
    """Rewrite hard-coded leading sizes equal to `batch` into the runtime batch, in place.

    Returns the rewritten node names (empty: nothing to do). Pure graph surgery, no proof:
    `make_batch_dynamic` proves the result. A view-like is rewritten only when its input
    carries the batch (computed from a batched input or a rewritten factory) and both its
    input and output have `batch` outermost (a reshape that keeps dim 0's size maps sample i
    to sample i); `expand` and factories get the first batched input's `sym_size(·, 0)`, the
    batch at run time.
    """
    first = _first_batched_input(gm, batch)
    if first is None:
        return []
    size_node: fx.Node | None = None

    def runtime_batch() -> fx.Node:
        nonlocal size_node
        if size_node is None:  # after the last placeholder (get_attrs may precede them)
            last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
            with gm.graph.inserting_after(last):
                size_node = gm.graph.call_function(aten.sym_size.int, (first, 0))
        return size_node

    carrying: set[fx.Node] = set()
    done: list[str] = []
    for n in list(gm.graph.nodes):
        if n.op == "placeholder":
            s = _shape(n)
            if s and s[0] == batch:
                carrying.add(n)
            continue
        if n.op != "call_function" or n is size_node:
            continue
        if any(a in carrying for a in n.all_input_nodes):
            carrying.add(n)
        if n.target in _VIEWS and n in carrying:
            x, shape = n.args[0], n.args[1]
            si, so = _shape(x), _shape(n)
            if (si and so and si[0] == batch and so[0] == batch
                    and isinstance(shape, (list, tuple)) and shape and shape[0] == batch):
                n.args = (x, [-1, *so[1:]], *n.args[2:])
                done.append(n.name)
        elif n.target == aten.expand.default:
            x, size = n.args[0], n.args[1]
            si = _shape(x)
            if (si and isinstance(size, (list, tuple)) and len(size) == len(si)
                    and size[0] == batch and si[0] in (1, batch)):
                # a batch-carrying input keeps its rows (-1); a shared one is repeated per row
                keep = x in carrying and si[0] == batch
                n.args = (x, [-1 if keep else runtime_batch(), *size[1:]], *n.args[2:])
                carrying.add(n)
                done.append(n.name)
        elif n.target in _FACTORIES:
            i = _FACTORIES[n.target]
            size = n.args[i] if len(n.args) > i else None
            if isinstance(size, (list, tuple)) and size and size[0] == batch:
                args = list(n.args)
                args[i] = [runtime_batch(), *size[1:]]
                n.args = tuple(args)
                carrying.add(n)
                done.append(n.name)
    if done:
        gm.graph.lint()
        gm.recompile()
    return done


# ---------------------------------------------------------------- the proof


def _proof_inputs(inputs: Sequence[Tensor], batch: int) -> tuple[Tensor, ...]:
    """PROOF_SAMPLES × `batch` rows per batched input: seeded normal noise for float inputs
    (values only need to be distinct), the example repeated for integer ones (token ids etc.
    have ranges that noise would break)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for t in inputs:
        if t.dim() == 0 or t.shape[0] != batch:
            out.append(t)
        elif t.is_floating_point():
            shape = (PROOF_SAMPLES * batch, *t.shape[1:])
            out.append(torch.randn(shape, generator=gen, dtype=torch.float32).to(t.dtype))
        else:
            out.append(t.repeat(PROOF_SAMPLES, *([1] * (t.dim() - 1))))
    return tuple(out)


def _leaves(out: Any) -> list[Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, Tensor)]


def prove_batched(static: fx.GraphModule, dynamic: fx.GraphModule, inputs: Sequence[Tensor],
                  batch: int) -> str | None:
    """None when `dynamic` run on PROOF_SAMPLES batches at once equals `static` run on each
    batch of `batch` rows; else why not. Outputs without the batch outermost (at `batch`)
    are not compared; the first output (the one quantflow evaluates) must have it."""
    big = _proof_inputs(inputs, batch)
    batched = [t.dim() > 0 and t.shape[0] == batch for t in inputs]
    with torch.no_grad():
        got = _leaves(dynamic(*big))
        parts = [_leaves(static(*[t[k * batch:(k + 1) * batch] if b else t
                                  for t, b in zip(big, batched)]))
                 for k in range(PROOF_SAMPLES)]
    if not parts[0] or parts[0][0].dim() == 0 or parts[0][0].shape[0] != batch:
        return "the first output does not have the batch as its first dimension"
    if len(got) != len(parts[0]):
        return f"{len(got)} outputs instead of {len(parts[0])}"
    for i, ref_0 in enumerate(parts[0]):
        if ref_0.dim() == 0 or ref_0.shape[0] != batch:
            continue
        want = torch.cat([p[i] for p in parts])
        if got[i].shape != want.shape:
            return f"output {i} has shape {tuple(got[i].shape)}, expected {tuple(want.shape)}"
        if want.is_floating_point():
            err = float((got[i] - want).abs().max())
            scale = max(float(want.abs().max()), 1e-30)
            if err > PROOF_REL_TOL * scale:
                return (f"output {i} differs by max|Δ| = {err:.3g} > {PROOF_REL_TOL:g}·max|y| "
                        f"(max|y| = {scale:.3g})")
        elif not torch.equal(got[i], want):
            return f"output {i} differs"
    return None


def make_batch_dynamic(gm: fx.GraphModule, inputs: Sequence[Tensor]) -> fx.GraphModule:
    """A statically captured `gm` (batch of `inputs`) as a proven dynamic-batch graph, or `gm`
    itself tagged `meta[STATIC_BATCH]` to run in chunks of its batch (module docstring).

    Never raises for a rewrite or proof that fails: the static graph is always correct at
    its own batch, so any failure here only means chunked runs (logged with the reason).
    """
    batch = _batch_of(inputs)
    info: dict[str, Any] = {"mode": "static", "exported_batch": batch, "rewritten": [],
                            "reason": None}
    try:
        reason, dyn = None, None
        if batch is None:
            reason = "the first input has no batch dimension"
        else:
            rewritten = copy.deepcopy(gm)
            info["rewritten"] = rewrite_batch(rewritten, batch)
            if not info["rewritten"]:
                reason = "no view, reshape, expand or factory leads with the batch size"
            else:  # clones: export may leave dynamic-dim marks on the tensors it traces
                dyn = export_dynamic_batch(rewritten, [t.clone() for t in inputs])
                reason = prove_batched(gm, dyn, inputs, batch)
    except Exception as exc:  # noqa: BLE001 - any failure falls back to the exact static graph
        reason, dyn = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}", None
    if reason is None and dyn is not None:
        info.update(mode="rewritten")
        dyn.meta[BATCH_CAPTURE] = info
        log.info("capture: the graph hard-codes batch %s; made it dynamic by rewriting %s "
                 "(proven on %d samples)", batch, ", ".join(info["rewritten"]), PROOF_SAMPLES)
        return dyn
    info.update(reason=reason)
    gm.meta[BATCH_CAPTURE] = info
    if batch is not None:
        gm.meta[STATIC_BATCH] = batch
        log.warning("capture: the graph only runs at batch %d (%s); calibration and evaluation "
                    "run it in chunks of %d, which is exact but slower", batch, reason, batch)
    return gm


def describe(gm: fx.GraphModule) -> dict[str, Any]:
    """The report's view of how the batch was captured."""
    return dict(gm.meta.get(BATCH_CAPTURE, {"mode": "dynamic"}))
