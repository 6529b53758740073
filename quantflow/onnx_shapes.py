"""ONNX shape arithmetic on NumPy arrays, for `quantflow.onnx_import`.

Exporters compute reshape targets from ``Shape(x)`` with Gather/Concat/Unsqueeze/Mul... on small
integer tensors. `OnnxModule` keeps those values as NumPy arrays whose elements are Python ints,
or torch SymInts while `torch.export` traces with a dynamic batch (object arrays: NumPy applies
``+ - * //`` element by element, which SymInts implement). So the captured graph gets the sizes as
arguments of one ``view``, not a subgraph of tensor ops on shapes.

Each function takes the step and its (all-NumPy) inputs and returns the outputs, ONNX semantics.
An op not listed here runs through `quantflow.onnx_ops` on tensors instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import numpy as np

Arr = np.ndarray
Args = list[Any]


class NotStatic(Exception):
    """The result's size depends on a symbolic size: compute it with torch ops instead."""


def concrete(a: Any) -> list[int]:
    """`a` as Python ints, or NotStatic when an element is a SymInt (sizing an array by one
    would fix the batch to its example value)."""
    vals = ints(a)
    if not all(isinstance(v, int) for v in vals):
        raise NotStatic
    return vals


def ints(a: Any) -> list[Any]:
    """A shape/axes array as a Python list (ints, or SymInts while exporting)."""
    return [v if not isinstance(v, np.integer) else int(v) for v in np.asarray(a).reshape(-1)]


def axes_of(step: Any, args: Args, pos: int) -> list[int] | None:
    """Axes from the attribute (older opsets) or the input at `pos` (newer)."""
    if "axes" in step.attrs:
        return [int(a) for a in step.attrs["axes"]]
    if len(args) > pos and args[pos] is not None:
        return [int(a) for a in ints(args[pos])]
    return None


def _arr(values: list[Any]) -> Arr:
    if all(isinstance(v, (int, np.integer)) for v in values):
        return np.asarray(values, dtype=np.int64)
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def tidy(a: Any) -> Arr:
    """An object array holding only Python ints back to int64 (a slice of a shape that left
    the symbolic batch behind), so later math on it can fold."""
    a = np.asarray(a)
    if a.dtype == object and all(isinstance(v, (int, np.integer)) for v in a.reshape(-1)):
        return a.astype(np.int64)
    return a


def shape_of(dims: tuple[Any, ...], step: Any) -> Arr:
    start, end = step.attrs.get("start", 0), step.attrs.get("end")
    return _arr(list(dims)[start:end])


def _gather(s: Any, a: Args) -> list[Arr]:
    return [np.take(a[0], np.asarray(a[1], dtype=np.int64), axis=s.attrs.get("axis", 0))]


def _unsqueeze(s: Any, a: Args) -> list[Arr]:
    axes = axes_of(s, a, 1) or []
    out = a[0]
    rank = out.ndim + len(axes)
    for ax in sorted(x % rank for x in axes):
        out = np.expand_dims(out, ax)
    return [out]


def _squeeze(s: Any, a: Args) -> list[Arr]:
    axes = axes_of(s, a, 1)
    return [np.squeeze(a[0]) if axes is None else np.squeeze(a[0], axis=tuple(axes))]


def _concat(s: Any, a: Args) -> list[Arr]:
    parts = [np.asarray(x) for x in a if x is not None]
    if any(p.dtype == object for p in parts):
        parts = [p.astype(object) for p in parts]
    return [np.concatenate(parts, axis=s.attrs.get("axis", 0))]


def slices(s: Any, a: Args, rank: int) -> list[slice]:
    """Python slices per axis from Slice's attributes (opset < 10) or inputs."""
    if "starts" in s.attrs:
        starts, ends = s.attrs["starts"], s.attrs["ends"]
        axes, steps = s.attrs.get("axes"), None
    else:
        starts, ends = ints(a[1]), ints(a[2])
        axes = ints(a[3]) if len(a) > 3 and a[3] is not None else None
        steps = ints(a[4]) if len(a) > 4 and a[4] is not None else None
    axes = list(range(len(starts))) if axes is None else [int(x) % rank for x in axes]
    steps = [1] * len(starts) if steps is None else steps
    out = [slice(None)] * rank
    big = 1 << 62  # INT64_MAX / INT64_MIN mean "to the end"
    for ax, b, e, st in zip(axes, starts, ends, steps, strict=True):
        b = None if (st > 0 and b <= -big) else b
        e = None if (e >= big or (st < 0 and e <= -big)) else e
        out[ax] = slice(b, e, st)
    return out


def _slice(s: Any, a: Args) -> list[Arr]:
    return [a[0][tuple(slices(s, a, a[0].ndim))]]


def _cast(s: Any, a: Args) -> list[Arr]:
    import onnx

    if a[0].dtype == object:
        return [a[0]]
    return [a[0].astype(onnx.helper.tensor_dtype_to_np_dtype(s.attrs["to"]))]


def _div(s: Any, a: Args) -> list[Arr]:
    x, y = a
    if x.dtype.kind in "iuO" and y.dtype.kind in "iuO":
        return [x // y]  # sizes are non-negative: floor == ONNX's truncation
    return [x / y]


def fill_value(step: Any) -> np.generic:
    """ConstantOfShape's fill: its one-element `value` attribute, float32 0 by default."""
    import onnx.numpy_helper as nph

    value = nph.to_array(step.attrs["value"]) if "value" in step.attrs else \
        np.zeros(1, np.float32)
    return cast(np.generic, value.reshape(-1)[0])


def const_of_shape(s: Any, a: Args) -> list[Arr]:
    value = fill_value(s)
    return [np.full(tuple(concrete(a[0])), value, value.dtype)]


def _reshape(s: Any, a: Args) -> list[Arr]:
    shape = concrete(a[1])
    shape = [a[0].shape[i] if (v == 0 and not s.attrs.get("allowzero", 0)) else v
             for i, v in enumerate(shape)]
    return [np.reshape(a[0], shape)]


def _expand(s: Any, a: Args) -> list[Arr]:
    shape = np.broadcast_shapes(a[0].shape, tuple(concrete(a[1])))
    return [np.broadcast_to(a[0], shape).copy()]


def _where(s: Any, a: Args) -> list[Arr]:
    cond = np.asarray([bool(c) for c in a[0].reshape(-1)]).reshape(a[0].shape)
    return [cast(Arr, np.where(cond, a[1], a[2]))]


def _numeric(fn: Callable[..., Any]) -> Callable[[Any, Args], list[Arr]]:
    """Elementwise math on constants; on symbolic sizes it is left to torch."""
    def op(s: Any, a: Args) -> list[Arr]:
        if any(x is not None and x.dtype == object for x in a):
            raise NotStatic
        return [np.asarray(fn(*[x for x in a if x is not None]))]
    return op


def _binary(fn: Callable[[Any, Any], Any]) -> Callable[[Any, Args], list[Arr]]:
    return lambda s, a: [np.asarray(fn(a[0], a[1]))]


STATIC_OPS: dict[str, Callable[[Any, Args], list[Arr]]] = {
    "Gather": _gather,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Concat": _concat,
    "Slice": _slice,
    "Cast": _cast,
    "Add": _binary(lambda x, y: x + y),
    "Sub": _binary(lambda x, y: x - y),
    "Mul": _binary(lambda x, y: x * y),
    "Div": _div,
    "Equal": _binary(lambda x, y: x == y),
    "Where": _where,
    "ConstantOfShape": const_of_shape,
    "Reshape": _reshape,
    "Expand": _expand,
    "Identity": lambda s, a: [a[0]],
    "Shape": lambda s, a: [shape_of(a[0].shape, s)],
    "Neg": lambda s, a: [-a[0]],
    "Sqrt": _numeric(np.sqrt), "Reciprocal": _numeric(np.reciprocal),
    "Floor": _numeric(np.floor), "Ceil": _numeric(np.ceil), "Abs": _numeric(np.abs),
    "Not": _numeric(np.logical_not), "Pow": _numeric(np.power),
    "Greater": _binary(lambda x, y: x > y),
    "Less": _binary(lambda x, y: x < y),
    "Max": lambda s, a: [np.maximum.reduce(list(np.broadcast_arrays(*a)))],
    "Min": lambda s, a: [np.minimum.reduce(list(np.broadcast_arrays(*a)))],
    "Range": lambda s, a: [np.arange(concrete(a[0])[0], concrete(a[1])[0], concrete(a[2])[0])],
}
