"""ONNX model -> `nn.Module` that `torch.export` captures into the graph the passes understand.

Many models exist only as ONNX. quantflow's IR is the torch.export fx graph, so an ONNX file is
turned into a module whose forward replays the graph with torch ops; `quantflow.ir.capture` then
exports it like any other model. Three things make the result look like a PyTorch model rather
than an ONNX transcript:

1. Constant folding at load: every node whose inputs are all constants (initializers, Constant
   nodes) is evaluated once with ONNX's reference implementation, so weights an exporter built
   from ``ConstantOfShape``/``Unsqueeze``/``Transpose`` arrive as plain arrays.
2. Shape arithmetic stays Python: ``Shape`` of a tensor yields its sizes as a NumPy array (of ints,
   or of torch SymInts while exporting with a dynamic batch), and the Gather/Concat/Unsqueeze/Mul...
   chains torch's exporter emits to compute reshape targets run on those arrays, so the captured
   graph holds ``view(x, [s0, 197, 6, 64])``, not a dozen tensor ops on shapes.
3. Layers spelled out in primitive ops (MatMul+Add, decomposed LayerNorm, erf-GELU) are fused back
   (`quantflow.onnx_fuse`) into ``linear``/``layer_norm``/``gelu`` with parameters, which the
   quantizer treats per channel and the placements know.

Weights become parameters/buffers of the module (named after their ONNX initializers), so the
exported program lifts them and BatchNorm folding, CLE and the quantizer see them as weights.
The op semantics live in `quantflow.onnx_ops` and `quantflow.onnx_layers`; an op they do not
know is an `InputError` naming the node, found at load time, not in the middle of capture.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from quantflow.errors import InputError
from quantflow.onnx_fuse import OnnxStep, fuse
from quantflow.onnx_ops import OPS, Value, static_op
from quantflow.onnx_shapes import NotStatic, tidy

#: ops never folded at load even when their inputs are constant (their result depends on the run)
_NO_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"}
#: a broadcast of a constant larger than this many elements stays a graph op
_FOLD_LIMIT = 1 << 26
_GROWING = {"Expand", "Tile"}


def _attrs(node: Any) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _fold(node: Any, consts: dict[str, np.ndarray], opset: int) -> list[np.ndarray] | None:
    """Evaluate `node` on constant inputs with ONNX's reference evaluator."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    feeds = {i: consts[i] for i in node.input if i}
    ins = [onnx.helper.make_tensor_value_info(i, onnx.helper.np_dtype_to_tensor_dtype(v.dtype),
                                              v.shape) for i, v in feeds.items()]
    outs = [onnx.helper.make_empty_tensor_value_info(o) for o in node.output]
    graph = onnx.helper.make_graph([node], "fold", ins, outs)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    try:
        got = ReferenceEvaluator(model).run(None, feeds)
    except Exception:  # noqa: BLE001 - not foldable here: the node stays a graph op
        return None
    return [np.asarray(v) for v in got]


def single_input(graph: Any, where: str) -> Any:
    """The graph's one input (its ValueInfo); initializers listed as inputs (old IR) do not
    count. quantflow calibrates with one array per sample."""
    init = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in init]
    if len(inputs) != 1:
        raise InputError(f"{where}: the model has {len(inputs)} inputs "
                         f"({', '.join(i.name for i in inputs)}); quantflow compiles "
                         "single-input models (fold the others into constants before export)")
    return inputs[0]


def _safe(name: str, taken: set[str]) -> str:
    base = re.sub(r"\W", "_", name).strip("_") or "c"
    base = "c_" + base if base[0].isdigit() else base
    out, k = base, 1
    while out in taken:
        out, k = f"{base}_{k}", k + 1
    taken.add(out)
    return out


class OnnxModule(nn.Module):
    """Replays a (folded, fused) ONNX graph with torch ops; see the module docstring."""

    def __init__(self, proto: Any, where: str) -> None:
        super().__init__()
        import onnx.numpy_helper as nph

        graph = proto.graph
        self.where = where
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
                          13)
        consts: dict[str, np.ndarray] = {t.name: nph.to_array(t) for t in graph.initializer}
        self.input_name = single_input(graph, where).name
        self.output_names = [o.name for o in graph.output]
        steps: list[OnnxStep] = []
        for node in graph.node:
            if node.domain not in ("", "ai.onnx"):
                raise InputError(
                    f"{where}: node {node.name or node.output[0]!r} is {node.domain}::"
                    f"{node.op_type}, a runtime-specific op quantflow cannot convert; fix: export "
                    "the model with standard ONNX ops only (no optimizer/fusion passes) or pass "
                    "the PyTorch model"
                )
            attrs = _attrs(node)
            if node.op_type == "Constant":
                consts[node.output[0]] = nph.to_array(attrs["value"]) if "value" in attrs else \
                    np.asarray(next(iter(attrs.values())))
                continue
            if node.op_type not in _NO_FOLD and all(i in consts for i in node.input if i):
                got = _fold(node, consts, self.opset)
                # weights may be built by ops (ConstantOfShape); only a huge broadcast stays
                if got is not None and (node.op_type not in _GROWING or
                                        all(v.size <= _FOLD_LIMIT for v in got)):
                    consts.update(zip(node.output, got, strict=True))
                    continue
            if node.op_type not in OPS:
                raise InputError(
                    f"{where}: node {node.name or node.output[0]!r} (op {node.op_type}, opset "
                    f"{self.opset}) has no converter in quantflow; supported ops: "
                    f"{', '.join(sorted(OPS))}; fix: pass the PyTorch model (.pt2, TorchScript "
                    "or state dict + --arch) or re-export without that op"
                )
            steps.append(OnnxStep(node.op_type, list(node.input), list(node.output), attrs,
                                  node.name or node.output[0]))
        self.steps, self.fused = fuse(steps, consts, set(self.output_names))
        # constants the remaining steps read: float arrays with more than one element become
        # buffers (lifted by export, named after the initializer); the rest stay NumPy (shapes,
        # axes, scalars), read as attributes by the ops
        taken: set[str] = set()
        self.const_np: dict[str, np.ndarray] = {}
        self.const_attr: dict[str, str] = {}
        for s in self.steps:
            for key, arr in s.consts.items():
                attr = _safe(f"{s.name}_{key}", taken)
                self.register_parameter(attr, nn.Parameter(torch.from_numpy(arr.copy()),
                                                           requires_grad=False))
                s.attrs[f"@{key}"] = attr
            for i in s.inputs:
                if i in consts and i not in self.const_np:
                    arr = consts[i]
                    self.const_np[i] = arr
                    if arr.dtype.kind == "f" and arr.size > 1:
                        attr = _safe(i, taken)
                        self.register_buffer(attr, torch.from_numpy(arr.copy()))
                        self.const_attr[i] = attr
        for o in self.output_names:
            if o in consts:
                self.const_np[o] = consts[o]
        missing = [o for o in self.output_names
                   if o not in consts and not any(o in s.outputs for s in self.steps)]
        if missing:
            raise InputError(f"{where}: graph outputs {missing} are produced by no node")

    def tensor(self, name: str, value: Value) -> Tensor:
        """`value` as a tensor: the registered buffer for a big constant, else a new tensor."""
        if name in self.const_attr:
            t = getattr(self, self.const_attr[name])
            assert isinstance(t, Tensor)
            return t
        if isinstance(value, Tensor):
            return value
        return torch.as_tensor(np.asarray(value).tolist() if value.dtype == object else value)

    def param(self, step: OnnxStep, key: str) -> Tensor | None:
        attr = step.attrs.get(f"@{key}")
        return None if attr is None else getattr(self, attr)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        # one named input: torch.export maps a dynamic batch onto a plain positional argument
        env: dict[str, Value] = dict(self.const_np)
        env[self.input_name] = x
        for s in self.steps:
            args = [env[i] if i else None for i in s.inputs]
            try:
                outs = None
                if all(a is None or isinstance(a, np.ndarray) for a in args) and \
                        s.op in static_op:
                    try:
                        outs = [tidy(v) for v in static_op[s.op](s, args)]
                    except NotStatic:
                        outs = None
                if outs is None:
                    outs = OPS[s.op](self, s, args)
            except InputError:
                raise
            except Exception as exc:
                raise InputError(
                    f"{self.where}: converting node {s.name!r} (op {s.op}, inputs "
                    f"{[_desc(a) for a in args]}) failed: {type(exc).__name__}: {exc}"
                ) from exc
            env.update(zip(s.outputs, outs, strict=False))
        outs_t = tuple(self.tensor(o, env[o]) for o in self.output_names)
        return outs_t[0] if len(outs_t) == 1 else outs_t


def _desc(a: Value | None) -> str:
    if a is None:
        return "-"
    if isinstance(a, Tensor):
        return f"tensor{tuple(a.shape)}"
    return f"const{tuple(a.shape)}"
