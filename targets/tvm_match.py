"""Which convs and linears of a PT2E graph qualify for integer arithmetic, and their operands.

A layer runs in integers when its input is a per-tensor uint8/int8 dequantize, its weight an
int8 symmetric per-output-channel dequantize of a constant, and the integer bias fits int32
(`match_int_layer`; the algebra is in tvm_int_math.py). The constants are read from the
exported program (`ConstTable`), by node identity, while the fx graph still says which DQ feeds
which layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.ao.quantization.fx._decomposed  # registers the quantized_decomposed ops used below
from torch import fx

from quantflow.targets.tvm_int_math import bias_matches_scale, integer_bias

qd = torch.ops.quantized_decomposed
Q_PT = (qd.quantize_per_tensor.default,)
DQ_PT = (qd.dequantize_per_tensor.default,)
DQ_PC = (qd.dequantize_per_channel.default,)
_INT_ACT = (torch.uint8, torch.int8)


@dataclass
class QuantOperand:
    """A dequantize node's integer input and quantization parameters."""

    q: fx.Node  # the integer tensor node
    scale: np.ndarray  # per-tensor: shape (); per-channel: shape (C,)
    zero_point: np.ndarray
    dtype: torch.dtype
    axis: int | None


class ConstTable:
    """Tensors behind the exported program's parameter/buffer/constant placeholders."""

    def __init__(self, ep: torch.export.ExportedProgram) -> None:
        state = dict(ep.state_dict)
        state.update(ep.constants)
        self.by_node: dict[str, torch.Tensor] = {}
        for spec in ep.graph_signature.input_specs:
            tgt = spec.target
            if tgt is not None and tgt in state:
                value = state[tgt]
                if isinstance(value, torch.Tensor):
                    self.by_node[spec.arg.name] = value.detach()  # type: ignore[union-attr]

    def get(self, node: Any) -> torch.Tensor | None:
        if isinstance(node, fx.Node) and node.op == "placeholder":
            return self.by_node.get(node.name)
        return None


def scalar_or_const(arg: Any, consts: ConstTable) -> np.ndarray | None:
    if isinstance(arg, (int, float)):
        return np.asarray(arg)
    t = consts.get(arg)
    return None if t is None else t.numpy()


def match_dq(node: Any, consts: ConstTable) -> QuantOperand | None:
    """The quantization of `node` if it is a dequantize with constant parameters."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    args: tuple[Any, ...] = tuple(node.args)
    if node.target in DQ_PT:
        q, s, z, _qmin, _qmax, dtype = args[:6]
        axis = None
    elif node.target in DQ_PC:
        q, s, z, axis, _qmin, _qmax, dtype = args[:7]
    else:
        return None
    scale, zp = scalar_or_const(s, consts), scalar_or_const(z, consts)
    if scale is None or zp is None or not isinstance(q, fx.Node):
        return None
    return QuantOperand(q=q, scale=scale.astype(np.float32), zero_point=zp.astype(np.int64),
                        dtype=dtype, axis=axis)


@dataclass
class IntLayer:
    """A conv/linear whose operands all qualify for the integer path."""

    x: QuantOperand
    w: QuantOperand
    wq: np.ndarray  # int8 weight
    sw: np.ndarray  # per-output-channel weight scale, shape (O,)
    bias_node: Any  # fx node of the bias (float path) or None
    bias_int: np.ndarray  # int32 added to the accumulator (includes zero-point correction)
    bias_float: bool  # bias did not match accumulator scale: add it in float


def match_int_layer(node: fx.Node, x_arg: Any, w_arg: Any, b_arg: Any,
                    consts: ConstTable) -> tuple[IntLayer | None, str]:
    """Decide whether a conv/linear can run in integers; the string says why not."""
    x = match_dq(x_arg, consts)
    if x is None or x.axis is not None or x.dtype not in _INT_ACT:
        return None, "input is not a per-tensor uint8/int8 dequantize"
    w = match_dq(w_arg, consts)
    if w is None or w.dtype != torch.int8:
        return None, "weight is not an int8 dequantize"
    wt = consts.get(w.q)
    if wt is None:
        return None, "weight integer tensor is not a constant"
    if w.axis not in (None, 0) or np.any(w.zero_point != 0):
        return None, "weight is not symmetric per-output-channel (axis 0, zero point 0)"
    wq = wt.numpy()
    n_out = wq.shape[0]
    sw = np.broadcast_to(w.scale, (n_out,)).astype(np.float32)
    sx, zx = float(x.scale), int(x.zero_point)
    bias_node, bias_float, bq = None, False, None
    b = match_dq(b_arg, consts) if b_arg is not None else None
    if b is not None and b.dtype == torch.int32 and consts.get(b.q) is not None \
            and np.all(b.zero_point == 0) \
            and bias_matches_scale(np.broadcast_to(b.scale, (n_out,)), sx, sw):
        bq = consts.get(b.q).numpy()  # type: ignore[union-attr]
    elif b_arg is not None:
        bias_node, bias_float = b_arg, True
    try:
        bias_int = integer_bias(bq, wq, zx)
    except OverflowError:
        return None, "zero-point correction overflows int32"
    return IntLayer(x=x, w=w, wq=wq, sw=sw, bias_node=bias_node, bias_int=bias_int,
                    bias_float=bias_float), ""
