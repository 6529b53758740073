"""The graph IR: a `torch.fx.GraphModule` produced by `torch.export`, plus small helpers.

There is no parallel IR. `capture()` runs `torch.export.export` (training IR: ATen ops such as
`aten.conv2d.default`, `aten.batch_norm.default`, `aten.linear.default`) and unlifts it with
`ExportedProgram.module()`, so parameters and buffers are ordinary attributes reached through
`get_attr` nodes. Passes rewrite that graph in place; quantization inserts
`quantized_decomposed` quantize/dequantize ops into it (the PT2E representation), and the same
graph is exported to QDQ ONNX by `torch.onnx.export(dynamo=True)`, which keeps fx node names as
ONNX value names.

Conventions every pass and analysis relies on:
- conv: `aten.conv2d.default(x, w, b=None, stride=1, padding=0, dilation=1, groups=1)`; export
  drops trailing default arguments, so always read them through `ConvArgs.of(node)`.
- batch norm: `aten.batch_norm.default(x, weight, bias, mean, var, training, momentum, eps,
  cudnn)`; weight/bias may be None (affine=False).
- linear: `aten.linear.default(x, w, b=None)`.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from quantflow import resources
from quantflow.batch import make_batch_dynamic
from quantflow.errors import CaptureError
from quantflow.export import export_dynamic_batch, unlift

log = logging.getLogger("quantflow")

aten = torch.ops.aten

#: conv op -> number of spatial dims (the one table of 1-D/2-D/3-D convs)
CONV_ND = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3}
CONV_OPS = tuple(CONV_ND)
LINEAR_OPS = (aten.linear.default,)
BN_OPS = (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default)
#: ops with a weight that quantization treats as a "layer"
WEIGHTED_OPS = CONV_OPS + LINEAR_OPS


def capture(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    """Export `model` (in eval mode) with torch.export and return the unlifted GraphModule.

    The batch dimension is exported as dynamic, so that `x.view(x.size(0), -1)` stays symbolic
    and calibration/evaluation can run large batches through the graph. A model that
    specializes its batch size is captured with static shapes instead, then made dynamic by a
    proven rewrite of its hard-coded batch sizes, or tagged to run in chunks of its batch
    (`quantflow.batch`).
    """
    model = model.eval()
    inputs = tuple(example_inputs)
    try:
        return export_dynamic_batch(model, inputs)
    except Exception as exc:  # noqa: BLE001 - retry static; the static error is reported
        log.debug("capture: dynamic-batch export failed (%s); retrying with static shapes", exc)
    try:  # fresh tensors: the failed attempt may have left dynamic-dim marks on the inputs
        ep = torch.export.export(model, tuple(t.clone() for t in inputs))
    except Exception as exc:  # torch raises many types; keep its message, add the fix
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {exc}\n"
            "fix: make the forward traceable (no data-dependent Python control flow), or "
            "export it yourself with torch.export.export and pass the .pt2 file"
        ) from exc
    gm = unlift(ep)
    # the batch proof runs this static graph on real data: price it first
    resources.check_graph(gm, 1, f"running {type(model).__name__} at its exported shapes "
                          f"{[tuple(t.shape) for t in inputs]}", "use a smaller input shape")
    return make_batch_dynamic(gm, inputs)


def export_program(
    gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]
) -> torch.export.ExportedProgram:
    """Re-export a (rewritten) GraphModule, e.g. to save it as `.pt2` or lower it to ONNX."""
    return torch.export.export(gm, tuple(example_inputs))


def is_op(node: fx.Node, ops: Sequence[Any]) -> bool:
    return node.op == "call_function" and node.target in ops


def get_tensor(gm: fx.GraphModule, node: fx.Node | None) -> torch.Tensor | None:
    """The tensor behind a `get_attr` node (None for None)."""
    if node is None:
        return None
    if node.op != "get_attr":
        raise CaptureError(f"node {node.name!r} is a {node.op}, expected a constant (get_attr)")
    obj: Any = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    assert isinstance(obj, torch.Tensor)
    return obj


def is_const(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


_counter = itertools.count()


def add_const(gm: fx.GraphModule, hint: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
    """Register `value` as a buffer on `gm` and return a get_attr node placed before `before`.

    Buffers (not Parameters) because the deploy graph is inference-only; names are unique so
    that passes can run repeatedly without collisions.
    """
    base = "".join(c if c.isalnum() else "_" for c in hint)
    name = f"_qf_{base}"
    while hasattr(gm, name):
        name = f"_qf_{base}_{next(_counter)}"
    gm.register_buffer(name, value.detach().clone().contiguous())
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(name)


def _pair(v: Any, n: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    t = tuple(int(i) for i in v)
    return t * n if len(t) == 1 else t


@dataclass
class ConvArgs:
    """Normalized arguments of a conv node (export omits trailing defaults)."""

    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    @staticmethod
    def of(node: fx.Node) -> ConvArgs:
        if node.target not in CONV_OPS:
            raise CaptureError(f"node {node.name!r} ({node.target}) is not a conv")
        nd = CONV_ND[node.target]
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        defaults: dict[str, Any] = {"bias": None, "stride": 1, "padding": 0, "dilation": 1,
                                    "groups": 1}
        vals: dict[str, Any] = dict(zip(names, node.args))
        for k, v in node.kwargs.items():
            vals[k] = v
        for k, v in defaults.items():
            vals.setdefault(k, v)
        return ConvArgs(
            x=vals["input"],
            weight=vals["weight"],
            bias=vals["bias"],
            stride=_pair(vals["stride"], nd),
            padding=_pair(vals["padding"], nd),
            dilation=_pair(vals["dilation"], nd),
            groups=int(vals["groups"]),
        )

    def args(self) -> tuple[Any, ...]:
        return (self.x, self.weight, self.bias, list(self.stride), list(self.padding),
                list(self.dilation), self.groups)


def users_in_order(node: fx.Node) -> list[fx.Node]:
    """Users of a node in graph order (fx keeps them in a dict; insertion order is not topo)."""
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(node.users, key=lambda n: order[n])


def count_ops(gm: fx.GraphModule) -> dict[str, int]:
    """Counts used in reports: convs, batch norms, linears, all call_function nodes."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    return {
        "conv": sum(n.target in CONV_OPS for n in nodes),
        "batch_norm": sum(n.target in BN_OPS for n in nodes),
        "linear": sum(n.target in LINEAR_OPS for n in nodes),
        "ops": len(nodes),
    }
