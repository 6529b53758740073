"""ONNX op semantics in torch, for `quantflow.onnx_import`: the elementwise and tensor ops here,
the layers (conv, pooling, normalization, resize, fused layers) in `quantflow.onnx_layers`.

Each entry of `OPS` takes the module (for its buffers and parameters), the step and the step's
input values (tensors, or NumPy arrays for constants and shape values) and returns the outputs.
Inputs that ONNX defines as attributes-by-another-name (shapes, axes, pads, scales) must be
constant; a tensor there is an error naming the node. Semantics follow the ONNX operator spec.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from quantflow.errors import InputError
from quantflow.onnx_layers import LAYER_OPS, const_in, tensor_in
from quantflow.onnx_shapes import STATIC_OPS, axes_of, fill_value, ints, shape_of, slices

Value = Tensor | np.ndarray
Args = list[Any]
Op = Callable[[Any, Any, Args], list[Any]]

static_op = STATIC_OPS


def _operand(m: Any, s: Any, a: Args, k: int) -> Any:
    """A binary op's operand: a Python number for a one-element constant that broadcasts
    away (keeps the graph's constants scalar, as PyTorch code writes them), else a tensor."""
    v, other = a[k], a[1 - k]
    rank = other.dim() if isinstance(other, Tensor) else np.ndim(other)
    if isinstance(v, np.ndarray) and v.size == 1 and v.ndim <= rank and v.dtype != object:
        return v.item()
    return tensor_in(m, s, a, k)


def _unary(fn: Callable[[Tensor], Tensor]) -> Op:
    return lambda m, s, a: [fn(tensor_in(m, s, a, 0))]


def _binary(fn: Callable[[Any, Any], Tensor]) -> Op:
    def op(m: Any, s: Any, a: Args) -> list[Any]:
        x, y = _operand(m, s, a, 0), _operand(m, s, a, 1)
        if not isinstance(x, Tensor) and not isinstance(y, Tensor):
            return [np.asarray(fn(x, y))]
        if not isinstance(x, Tensor):
            x = torch.as_tensor(x, dtype=y.dtype)
        return [fn(x, y)]
    return op


def _div(x: Any, y: Any) -> Tensor:
    if isinstance(x, Tensor) and not x.is_floating_point():
        return torch.div(x, y, rounding_mode="trunc")
    return x / y


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> Op:
    def op(m: Any, s: Any, a: Args) -> list[Any]:
        out = tensor_in(m, s, a, 0)
        for k in range(1, len(a)):
            out = fn(out, tensor_in(m, s, a, k))
        return [out]
    return op


def _reduce(kind: str) -> Op:
    def op(m: Any, s: Any, a: Args) -> list[Any]:
        x = tensor_in(m, s, a, 0)
        axes = axes_of(s, a, 1)
        keep = bool(s.attrs.get("keepdims", 1))
        if axes is None:
            if s.attrs.get("noop_with_empty_axes", 0):
                return [x]
            axes = list(range(x.dim()))
        if kind == "mean":
            return [x.mean(axes, keepdim=keep)]
        if kind == "sum":
            return [x.sum(axes, keepdim=keep)]
        if kind == "max":
            return [x.amax(axes, keepdim=keep)]
        if kind == "min":
            return [x.amin(axes, keepdim=keep)]
        return [torch.linalg.vector_norm(x, 2, axes, keepdim=keep)]
    return op


def _softmax(log: bool) -> Op:
    def op(m: Any, s: Any, a: Args) -> list[Any]:
        x = tensor_in(m, s, a, 0)
        default = -1 if m.opset >= 13 else 1
        axis = s.attrs.get("axis", default) % x.dim()
        if m.opset < 13 and axis != x.dim() - 1:  # old semantics: flatten from axis
            flat = x.flatten(axis)
            y = F.log_softmax(flat, -1) if log else F.softmax(flat, -1)
            return [y.reshape(x.shape)]
        return [F.log_softmax(x, axis) if log else F.softmax(x, axis)]
    return op


def _reshape(m: Any, s: Any, a: Args) -> list[Any]:
    x = tensor_in(m, s, a, 0)
    shape = ints(const_in(s, a, 1, "target shape")) if len(a) > 1 else list(s.attrs["shape"])
    if not s.attrs.get("allowzero", 0):
        shape = [x.shape[i] if (isinstance(v, int) and v == 0) else v
                 for i, v in enumerate(shape)]
    return [x.reshape(shape)]


def _flatten(m: Any, s: Any, a: Args) -> list[Any]:
    x = tensor_in(m, s, a, 0)
    axis = s.attrs.get("axis", 1) % max(x.dim(), 1)
    if axis == 0:
        return [x.reshape(1, -1)]
    y = x.flatten(axis) if axis < x.dim() - 1 else x.unsqueeze(-1) if axis == x.dim() else x
    return [y.flatten(0, axis - 1) if axis > 1 else y]


def _gather(m: Any, s: Any, a: Args) -> list[Any]:
    axis = s.attrs.get("axis", 0)
    if isinstance(a[1], np.ndarray):
        x = tensor_in(m, s, a, 0)
        idx = np.asarray(a[1], dtype=np.int64)
        axis %= x.dim()
        if idx.ndim == 0:
            i = int(idx)
            return [x.select(axis, i if i >= 0 else i + x.shape[axis])]
        idx = np.where(idx < 0, idx + int(x.shape[axis]), idx)
        picked = x.index_select(axis, torch.from_numpy(idx.reshape(-1)))
        return [picked.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1:])]
    ids = tensor_in(m, s, a, 1)
    if axis == 0 and isinstance(a[0], np.ndarray) and a[0].ndim == 2:
        # a lookup table: what nn.Embedding exports
        return [F.embedding(ids, tensor_in(m, s, a, 0))]
    x = tensor_in(m, s, a, 0)
    flat = x.index_select(axis, ids.reshape(-1))
    return [flat.reshape(*x.shape[:axis], *ids.shape, *x.shape[axis + 1:])]


def _slice(m: Any, s: Any, a: Args) -> list[Any]:
    x = tensor_in(m, s, a, 0)
    for k in range(1, len(a)):
        const_in(s, a, k, "slice bound")
    sl = slices(s, a, x.dim())
    if any(p.step is not None and p.step < 0 for p in sl):
        raise InputError(f"node {s.name!r} (Slice): negative steps are not supported")
    return [x[tuple(sl)]]


def _split(m: Any, s: Any, a: Args) -> list[Any]:
    x = tensor_in(m, s, a, 0)
    axis = s.attrs.get("axis", 0)
    if "split" in s.attrs:
        sizes = list(s.attrs["split"])
    elif len(a) > 1 and a[1] is not None:
        sizes = [int(v) for v in ints(const_in(s, a, 1, "split sizes"))]
    else:
        k = s.attrs.get("num_outputs", len(s.outputs))
        sizes = [-(-int(x.shape[axis]) // k)] * k
    return list(torch.split(x, sizes, axis))


def _unsqueeze(m: Any, s: Any, a: Args) -> list[Any]:
    x = tensor_in(m, s, a, 0)
    axes = axes_of(s, a, 1) or []
    rank = x.dim() + len(axes)
    for ax in sorted(v % rank for v in axes):
        x = x.unsqueeze(ax)
    return [x]


def _squeeze(m: Any, s: Any, a: Args) -> list[Any]:
    x = tensor_in(m, s, a, 0)
    axes = axes_of(s, a, 1)
    return [x.squeeze() if axes is None else x.squeeze([v % x.dim() for v in axes])]


def _pad(m: Any, s: Any, a: Args) -> list[Any]:
    x = tensor_in(m, s, a, 0)
    pads = list(s.attrs["pads"]) if "pads" in s.attrs else \
        [int(v) for v in ints(const_in(s, a, 1, "pads"))]
    value = float(s.attrs.get("value", 0.0))
    if len(a) > 2 and a[2] is not None:
        value = float(np.asarray(const_in(s, a, 2, "pad value")).reshape(-1)[0])
    mode = s.attrs.get("mode", b"constant")
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}[
        mode.decode() if isinstance(mode, bytes) else mode]
    n = x.dim()
    flat: list[int] = []
    for i in reversed(range(n)):
        flat += [pads[i], pads[n + i]]
    while len(flat) > 2 and flat[-2:] == [0, 0]:  # reflect/replicate want only spatial pads
        flat = flat[:-2]
    return [F.pad(x, flat, mode=mode, value=value if mode == "constant" else None)]


def _cast(m: Any, s: Any, a: Args) -> list[Any]:
    import onnx

    dtype = onnx.helper.tensor_dtype_to_np_dtype(s.attrs["to"])
    return [tensor_in(m, s, a, 0).to(getattr(torch, np.dtype(dtype).name))]


def _clip(m: Any, s: Any, a: Args) -> list[Any]:
    x = tensor_in(m, s, a, 0)
    lo = s.attrs.get("min") if len(a) < 2 or a[1] is None else \
        float(const_in(s, a, 1, "min").reshape(-1)[0])
    hi = s.attrs.get("max") if len(a) < 3 or a[2] is None else \
        float(const_in(s, a, 2, "max").reshape(-1)[0])
    if lo == 0.0 and hi is None:
        return [F.relu(x)]
    if lo == 0.0 and hi == 6.0:
        return [F.relu6(x)]
    return [x.clamp(lo, hi)]


def _gemm(m: Any, s: Any, a: Args) -> list[Any]:
    x, w = tensor_in(m, s, a, 0), tensor_in(m, s, a, 1)
    x = x.t() if s.attrs.get("transA", 0) else x
    w = w.t() if s.attrs.get("transB", 0) else w
    y = float(s.attrs.get("alpha", 1.0)) * (x @ w)
    if len(a) > 2 and a[2] is not None:
        y = y + float(s.attrs.get("beta", 1.0)) * tensor_in(m, s, a, 2)
    return [y]


def _expand(m: Any, s: Any, a: Args) -> list[Any]:
    x = tensor_in(m, s, a, 0)
    shape = ints(const_in(s, a, 1, "shape"))
    rank = max(x.dim(), len(shape))
    full = [1] * (rank - len(shape)) + shape
    xs = [1] * (rank - x.dim()) + list(x.shape)
    target = [xd if (isinstance(sd, int) and sd == 1) else sd for xd, sd in zip(xs, full,
                                                                                 strict=True)]
    return [x.reshape(xs).expand(target)]


def _shape(m: Any, s: Any, a: Args) -> list[Any]:
    return [shape_of(tuple(tensor_in(m, s, a, 0).shape), s)]


def _const_of_shape(m: Any, s: Any, a: Args) -> list[Any]:
    value = fill_value(s)  # a symbolic size (the batch) in the shape: torch sizes it
    return [torch.full(ints(const_in(s, a, 0, "shape")), value.item(),
                       dtype=getattr(torch, value.dtype.name))]


OPS: dict[str, Op] = {
    **LAYER_OPS, "Gemm": _gemm,
    "MatMul": lambda m, s, a: [torch.matmul(tensor_in(m, s, a, 0), tensor_in(m, s, a, 1))],
    "ReduceMean": _reduce("mean"), "ReduceSum": _reduce("sum"), "ReduceMax": _reduce("max"),
    "ReduceMin": _reduce("min"), "ReduceL2": _reduce("l2"),
    "Softmax": _softmax(False), "LogSoftmax": _softmax(True),
    "Relu": _unary(F.relu), "Sigmoid": _unary(torch.sigmoid), "Tanh": _unary(torch.tanh),
    "Erf": _unary(torch.erf), "Sqrt": _unary(torch.sqrt), "Exp": _unary(torch.exp),
    "Log": _unary(torch.log), "Neg": _unary(torch.neg), "Abs": _unary(torch.abs),
    "Reciprocal": _unary(torch.reciprocal), "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil), "Sin": _unary(torch.sin), "Cos": _unary(torch.cos),
    "Not": _unary(torch.logical_not), "Softplus": _unary(F.softplus),
    "HardSwish": _unary(F.hardswish),
    "HardSigmoid": lambda m, s, a: [torch.clamp(
        float(s.attrs.get("alpha", 0.2)) * tensor_in(m, s, a, 0) + float(s.attrs.get("beta", 0.5)),
        0.0, 1.0)],
    "LeakyRelu": lambda m, s, a: [F.leaky_relu(tensor_in(m, s, a, 0),
                                               float(s.attrs.get("alpha", 0.01)))],
    "Elu": lambda m, s, a: [F.elu(tensor_in(m, s, a, 0), float(s.attrs.get("alpha", 1.0)))],
    "Clip": _clip,
    "Identity": lambda m, s, a: [a[0]], "Dropout": lambda m, s, a: [a[0]],
    "Add": _binary(lambda x, y: x + y), "Sub": _binary(lambda x, y: x - y),
    "Mul": _binary(lambda x, y: x * y), "Div": _binary(_div),
    "Pow": _binary(lambda x, y: torch.pow(x, y)),
    "Equal": _binary(torch.eq), "Greater": _binary(torch.gt), "Less": _binary(torch.lt),
    "And": _binary(torch.logical_and), "Or": _binary(torch.logical_or),
    "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum),
    "Sum": _variadic(torch.add),
    "Where": lambda m, s, a: [torch.where(*(tensor_in(m, s, a, k) for k in range(3)))],
    "Reshape": _reshape, "Flatten": _flatten, "Gather": _gather, "Slice": _slice,
    "Split": _split, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Pad": _pad,
    "Transpose": lambda m, s, a: [tensor_in(m, s, a, 0).permute(
        list(s.attrs.get("perm", range(tensor_in(m, s, a, 0).dim() - 1, -1, -1))))],
    "Concat": lambda m, s, a: [torch.cat([tensor_in(m, s, a, k) for k in range(len(a))],
                                         s.attrs.get("axis", 0))],
    "Expand": _expand, "Shape": _shape, "Cast": _cast, "ConstantOfShape": _const_of_shape,
    "ArgMax": lambda m, s, a: [torch.argmax(tensor_in(m, s, a, 0), s.attrs.get("axis", 0),
                                            bool(s.attrs.get("keepdims", 1)))],
    "Range": lambda m, s, a: [torch.arange(*(ints(const_in(s, a, k, "range bound"))[0]
                                              for k in range(3)))],
    "Tile": lambda m, s, a: [tensor_in(m, s, a, 0).repeat(ints(const_in(s, a, 1, "repeats")))],
}
