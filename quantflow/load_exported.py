"""Loading a `torch.export.save` archive (.pt2) as a plain eval-mode GraphModule.

The archive is inspected first (`quantflow.archive`: pickled weights/constants/sample inputs,
AOTInductor libraries and symbolic sizes that sympy would `eval` are refused without
``trust_pickle``), then loaded and unlifted like `ir.unlift` (guards dropped, parameters as
attributes). A graph captured in training mode is refused. Example inputs come from the
placeholders' fake tensors, dynamic dimensions set to 1 (batch) or their example hint.
`plain_graph_module` is shared with the TorchScript converter, which also yields an
ExportedProgram.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, fx

from quantflow import archive
from quantflow.errors import InputError
from quantflow.ir import unlift
from quantflow.loaded import LoadedModel, brief, check_shape, example_input

aten = torch.ops.aten


def _placeholder_inputs(ep: torch.export.ExportedProgram, where: str
                       ) -> tuple[Tensor, ...] | None:
    """Example user inputs rebuilt from the placeholders' fake tensors (None if not tensors)."""
    from torch.export.graph_signature import InputKind, TensorArgument

    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    out: list[Tensor] = []
    for spec in ep.graph_signature.input_specs:
        if spec.kind != InputKind.USER_INPUT:
            continue
        if not isinstance(spec.arg, TensorArgument):
            return None  # a non-tensor input (int, None, ...) cannot be synthesised from shape
        val = nodes[spec.arg.name].meta.get("val")
        if not isinstance(val, Tensor):
            return None
        shape = tuple(_concrete_dim(ep, d, i) for i, d in enumerate(val.shape))
        out.append(example_input(shape, val.dtype, f"{where} (as it declares)"))
    return tuple(out) if out else None


def _concrete_dim(ep: torch.export.ExportedProgram, dim: int | torch.SymInt, index: int) -> int:
    """Static dims as they are; a dynamic dim becomes 1 (batch) or its example hint, clamped
    into the range the program was exported for."""
    if isinstance(dim, int):
        return dim
    hint = dim.node.hint
    value = 1 if index == 0 or hint is None else int(hint)
    rng = ep.range_constraints.get(dim.node.expr)
    if rng is not None:
        # bounds are sympy numbers; an unbounded one is torch's int_oo, not an Integer
        if getattr(rng.lower, "is_Integer", False):
            value = max(value, int(rng.lower))
        if getattr(rng.upper, "is_Integer", False):
            value = min(value, int(rng.upper))
    return value

def plain_graph_module(ep: torch.export.ExportedProgram, path: str) -> fx.GraphModule:
    """`ir.unlift(ep)` re-wrapped as a plain GraphModule: `ep.module()` overrides `.eval()` to
    raise NotImplementedError, and `ir.capture` calls `.eval()`."""
    unlifted = unlift(ep)
    gm = fx.GraphModule(unlifted, unlifted.graph, class_name="LoadedGraphModule")
    _reject_training_graph(gm, path)
    return gm.eval()


def _reject_training_graph(gm: fx.GraphModule, path: str) -> None:
    """A graph captured in train mode computes batch statistics and random dropout; the mode is
    baked into the ops, so `.eval()` cannot fix it and quantizing it would be wrong."""
    for node in gm.graph.nodes:
        training = None
        if node.target == aten.batch_norm.default and len(node.args) > 5:
            training = node.args[5]
        elif node.target == aten.dropout.default and len(node.args) > 2:
            training = node.args[2]
        if training is True:
            raise InputError(
                f"{path}: node {node.name!r} ({node.target}) was captured in training mode; "
                "call model.eval() before torch.export/torch.jit.trace and save it again"
            )

@contextlib.contextmanager
def _quiet_torch_export() -> Iterator[None]:
    """torch.export.load logs a full traceback at WARNING level before retrying a damaged
    archive in its pre-2.8 layout (and, with --trust-pickle, a warning whose format string
    is broken); the failure is reported here, once, without them."""
    loggers = [logging.getLogger(name) for name in ("torch.export", "torch._export")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def load_exported(path: Path, input_shape: tuple[int, ...] | None,
                   trust_pickle: bool = False) -> LoadedModel:
    # before torch sees the file: torch.export.load runs pickles and `eval`s expressions
    archive.check_archive(path, trust_pickle)
    try:
        with _quiet_torch_export():
            ep = torch.export.load(str(path))
    except Exception as exc:  # torch raises many types for a damaged archive
        raise InputError(
            f"{path}: cannot read the ExportedProgram ({brief(exc)}); the file "
            "is corrupt or truncated, or was saved by an incompatible torch; save it again "
            "with torch.export.save"
        ) from exc
    try:
        gm = plain_graph_module(ep, str(path))
    except InputError:
        raise
    except Exception as exc:  # a graph torch read but cannot rebuild as a module
        raise InputError(
            f"{path}: the ExportedProgram's graph cannot be rebuilt ({brief(exc)}); save it "
            "again with torch.export.save"
        ) from exc
    if input_shape:
        inputs: tuple[Tensor, ...] | None = (
            example_input(check_shape(input_shape, str(path)), where=str(path)),)
    else:
        inputs = _placeholder_inputs(ep, str(path))
    return LoadedModel(gm, inputs, "exported-program", str(path), path.stem)
