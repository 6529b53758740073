"""ONNX layer ops in torch (convolutions, pooling, normalization, resizing, the fused layers),
for `quantflow.onnx_import`; `quantflow.onnx_ops` holds the elementwise and tensor ops and the
table of both. Where torch differs from ONNX (average pooling counts padding by default,
asymmetric pads, Resize's coordinate modes) each function says how it maps or refuses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from quantflow.errors import InputError
from quantflow.onnx_shapes import ints

Args = list[Any]
Op = Callable[[Any, Any, Args], list[Any]]


def tensor_in(m: Any, s: Any, a: Args, k: int) -> Tensor:
    t = m.tensor(s.inputs[k], a[k])
    assert isinstance(t, Tensor)
    return t


def const_in(s: Any, a: Args, k: int, what: str) -> np.ndarray:
    v = a[k]
    if not isinstance(v, np.ndarray):
        raise InputError(f"node {s.name!r} ({s.op}): its {what} (input {k}) is computed at run "
                         "time; quantflow needs it constant")
    return v


def _pads(s: Any, x: Tensor, kernel: list[int], strides: list[int],
          dilations: list[int]) -> list[int]:
    """ONNX pads [b1.., e1..] resolved from auto_pad against the input's spatial sizes."""
    n = len(kernel)
    auto = s.attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i in range(n):
            size = int(x.shape[2 + i])
            out = -(-size // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
            lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
            begin.append(lo)
            end.append(total - lo)
        return begin + end
    if auto == "VALID":
        return [0] * 2 * n
    return list(s.attrs.get("pads", [0] * 2 * n))


def _pad_args(pads: list[int], x: Tensor, value: float = 0.0) -> tuple[Tensor, list[int]]:
    """Symmetric pads go to the op; asymmetric ones are applied first with F.pad."""
    n = len(pads) // 2
    begin, end = pads[:n], pads[n:]
    if begin == end:
        return x, begin
    flat: list[int] = []
    for i in reversed(range(n)):
        flat += [begin[i], end[i]]
    return F.pad(x, flat, value=value), [0] * n


def _conv(m: Any, s: Any, a: Args) -> list[Any]:
    x, w = tensor_in(m, s, a, 0), tensor_in(m, s, a, 1)
    b = tensor_in(m, s, a, 2) if len(a) > 2 and a[2] is not None else None
    n = w.dim() - 2
    kernel = list(s.attrs.get("kernel_shape", w.shape[2:]))
    strides = list(s.attrs.get("strides", [1] * n))
    dil = list(s.attrs.get("dilations", [1] * n))
    x, pad = _pad_args(_pads(s, x, kernel, strides, dil), x)
    fn = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    return [fn(x, w, b, strides, pad, dil, s.attrs.get("group", 1))]


def _conv_transpose(m: Any, s: Any, a: Args) -> list[Any]:
    x, w = tensor_in(m, s, a, 0), tensor_in(m, s, a, 1)
    b = tensor_in(m, s, a, 2) if len(a) > 2 and a[2] is not None else None
    n = w.dim() - 2
    strides = list(s.attrs.get("strides", [1] * n))
    dil = list(s.attrs.get("dilations", [1] * n))
    pads = list(s.attrs.get("pads", [0] * 2 * n))
    if pads[:n] != pads[n:] or "output_shape" in s.attrs:
        raise InputError(f"node {s.name!r} (ConvTranspose): asymmetric pads / output_shape are "
                         "not supported; re-export with symmetric padding")
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]
    return [fn(x, w, b, strides, pads[:n], list(s.attrs.get("output_padding", [0] * n)),
               s.attrs.get("group", 1), dil)]


def _ceil_equivalent(x: Tensor, kernel: list[int], strides: list[int], pads: list[int],
                     ceil: bool) -> list[int] | None:
    """Begin pads for a torch ceil-mode pool equal to ONNX's extra, uncounted end padding.

    Caffe-era exporters write a ceil-mode average pool as floor mode plus one more end pad.
    Uncounted padding adds nothing to a window's sum or divisor, and torch's ceil mode keeps
    the last partial window with the in-bounds divisor: the same numbers whenever both give
    the same output size. None when they differ."""
    n = len(kernel)
    for i in range(n):
        size, b, e, k, st = int(x.shape[2 + i]), pads[i], pads[n + i], kernel[i], strides[i]
        span = size + b + e - k
        onnx_out = (-(-span // st) if ceil else span // st) + 1
        torch_out = -(-(size + 2 * b - k) // st) + 1
        if (torch_out - 1) * st >= size + b:
            torch_out -= 1
        if e < b or onnx_out != torch_out or 2 * b > k:
            return None
    return pads[:n]


def _pool(kind: str) -> Op:
    def op(m: Any, s: Any, a: Args) -> list[Any]:
        x = tensor_in(m, s, a, 0)
        kernel = list(s.attrs["kernel_shape"])
        n = len(kernel)
        strides = list(s.attrs.get("strides", [1] * n))
        dil = list(s.attrs.get("dilations", [1] * n))
        pads = _pads(s, x, kernel, strides, dil)
        ceil = bool(s.attrs.get("ceil_mode", 0))
        if kind == "max":
            x, pad = _pad_args(pads, x, float("-inf"))
            mfn: Any = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
            return [mfn(x, kernel, strides, pad, dil, ceil)]
        include = bool(s.attrs.get("count_include_pad", 0))
        fn: Any = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
        if pads[:n] != pads[n:] and not include:
            begin = _ceil_equivalent(x, kernel, strides, pads, ceil)
            if begin is not None:
                return [fn(x, kernel, strides, begin, True, False)]
            # exact in general: window sums over window counts of real elements
            ones = torch.ones_like(x[:1, :1])
            xp, _ = _pad_args(pads, x)
            op, _ = _pad_args(pads, ones)
            return [fn(xp, kernel, strides, 0, ceil, True) / fn(op, kernel, strides, 0, ceil, True)]
        x, pad = _pad_args(pads, x)
        return [fn(x, kernel, strides, pad, ceil, include)]
    return op


def _global(kind: str) -> Op:
    def op(m: Any, s: Any, a: Args) -> list[Any]:
        x = tensor_in(m, s, a, 0)
        dims = list(range(2, x.dim()))
        return [x.mean(dims, keepdim=True) if kind == "avg" else x.amax(dims, keepdim=True)]
    return op


def _resize(m: Any, s: Any, a: Args) -> list[Any]:
    x = tensor_in(m, s, a, 0)
    attr = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in s.attrs.items()}
    mode = attr.get("mode", "nearest")
    coord = attr.get("coordinate_transformation_mode", "asymmetric" if s.op == "Upsample"
                     else "half_pixel")
    sizes = scales = None
    if s.op == "Upsample":
        scales = [float(v) for v in const_in(s, a, 1, "scales")]
    else:
        if len(a) > 3 and a[3] is not None and np.asarray(a[3]).size:
            sizes = ints(const_in(s, a, 3, "sizes"))[2:]  # not int(): the batch may be symbolic
        elif len(a) > 2 and a[2] is not None:
            scales = [float(v) for v in const_in(s, a, 2, "scales")]
    kw: dict[str, Any] = {"size": sizes} if sizes else {"scale_factor": (scales or [])[2:]}
    if mode == "nearest" and coord == "asymmetric" and \
            attr.get("nearest_mode", "floor" if s.op == "Upsample" else "round_prefer_floor") \
            == "floor":
        return [F.interpolate(x, mode="nearest", **kw)]
    if mode == "linear" and coord in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        lin = {3: "linear", 4: "bilinear", 5: "trilinear"}[x.dim()]
        return [F.interpolate(x, mode=lin, align_corners=coord == "align_corners", **kw)]
    if mode == "cubic" and coord in ("half_pixel", "pytorch_half_pixel", "align_corners") and \
            float(attr.get("cubic_coeff_a", -0.75)) == -0.75 and not attr.get("exclude_outside"):
        # torch's bicubic uses the same a = -0.75 kernel, sampling outside clamped like ONNX
        return [F.interpolate(x, mode="bicubic", align_corners=coord == "align_corners", **kw)]
    raise InputError(f"node {s.name!r} ({s.op}): mode {mode!r} with coordinate transform "
                     f"{coord!r} has no torch equivalent quantflow maps")


def _batch_norm(m: Any, s: Any, a: Args) -> list[Any]:
    x, w, b, mean, var = (tensor_in(m, s, a, k) for k in range(5))
    return [F.batch_norm(x, mean, var, w, b, False, 0.0, float(s.attrs.get("epsilon", 1e-5)))]


def _layer_norm_op(m: Any, s: Any, a: Args) -> list[Any]:
    x = tensor_in(m, s, a, 0)
    axis = s.attrs.get("axis", -1) % x.dim()
    w = tensor_in(m, s, a, 1)
    b = tensor_in(m, s, a, 2) if len(a) > 2 and a[2] is not None else None
    return [F.layer_norm(x, list(x.shape[axis:]), w, b, float(s.attrs.get("epsilon", 1e-5)))]


def _linear(m: Any, s: Any, a: Args) -> list[Any]:
    return [F.linear(tensor_in(m, s, a, 0), m.param(s, "weight"), m.param(s, "bias"))]


def _layer_norm(m: Any, s: Any, a: Args) -> list[Any]:
    x, w = tensor_in(m, s, a, 0), m.param(s, "weight")
    c = int(w.shape[0]) if w is not None else int(x.shape[-1])
    return [F.layer_norm(x, [c], w, m.param(s, "bias"), float(s.attrs["epsilon"]))]


def _lrn(m: Any, s: Any, a: Args) -> list[Any]:
    return [F.local_response_norm(tensor_in(m, s, a, 0), int(s.attrs["size"]),
                                  float(s.attrs.get("alpha", 1e-4)),
                                  float(s.attrs.get("beta", 0.75)),
                                  float(s.attrs.get("bias", 1.0)))]


LAYER_OPS: dict[str, Op] = {
    "Linear": _linear, "LayerNorm": _layer_norm,
    "Gelu": lambda m, s, a: [F.gelu(tensor_in(m, s, a, 0), approximate=(
        s.attrs.get("approximate", b"none").decode()
        if isinstance(s.attrs.get("approximate"), bytes) else "none"))],
    "Conv": _conv, "ConvTranspose": _conv_transpose,
    "BatchNormalization": _batch_norm, "LayerNormalization": _layer_norm_op, "LRN": _lrn,
    "MaxPool": _pool("max"), "AveragePool": _pool("avg"),
    "GlobalAveragePool": _global("avg"), "GlobalMaxPool": _global("max"),
    "Resize": _resize, "Upsample": _resize,
}
