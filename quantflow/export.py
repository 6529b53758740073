"""The two `torch.export` steps capture is built from: a dynamic-batch export, and unlifting.

Split out of `quantflow.ir` so that `quantflow.batch` (which re-exports a rewritten static
graph with a dynamic batch) and `ir.capture` (which falls back to `quantflow.batch`) both build
on this module instead of on each other.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch
from torch import fx, nn

from quantflow.errors import CaptureError


def export_dynamic_batch(model: nn.Module, inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    """torch.export with dim 0 of every input dynamic, unlifted; raises when export fails or
    when the first output does not keep the batch as its first dimension (a graph that mixes
    samples, e.g. `x.view(1, -1).softmax(-1)`, exports fine but is not batch-parallel)."""
    dynamic = tuple({0: torch.export.Dim.DYNAMIC} if t.dim() > 0 else None for t in inputs)
    # export specializes a size-1 dimension, so trace the dynamic batch with two samples
    traced = tuple(torch.cat([t, t]) if t.dim() > 0 and t.shape[0] == 1 else t for t in inputs)
    with _quiet_fake_tensor():
        gm = unlift(torch.export.export(model, traced, dynamic_shapes=dynamic))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out_args = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    first = out_args[0] if isinstance(out_args, (tuple, list)) and out_args else out_args
    val_in = placeholders[0].meta.get("val") if placeholders else None
    val_out = first.meta.get("val") if isinstance(first, fx.Node) else None
    if (isinstance(val_in, torch.Tensor) and isinstance(val_out, torch.Tensor)
            and val_in.dim() > 0 and val_out.dim() > 0
            and str(val_out.shape[0]) != str(val_in.shape[0])):
        raise CaptureError(f"output {first.name!r} has shape {tuple(val_out.shape)} for inputs "
                           f"of shape {tuple(val_in.shape)}: its first dimension is not the "
                           "batch")
    return gm


@contextlib.contextmanager
def _quiet_fake_tensor() -> Iterator[None]:
    """Mute torch's fake-tensor logger: a shape error while tracing a hard-coded batch is
    logged there as a full traceback at ERROR level, though capture expects and handles it."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    old = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(old)


def unlift(ep: torch.export.ExportedProgram) -> fx.GraphModule:
    """`ep.module()` without the runtime guard call, which is not part of the computation."""
    # no input guards: calibration runs other batch sizes than the example's
    gm = ep.module(check_guards=False)
    assert isinstance(gm, fx.GraphModule)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm
