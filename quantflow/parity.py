"""Per-layer parity of a runtime artifact with the torch simulation, in quantization steps.

The runtime reports the integer codes of every quantized tensor (a target taps them, e.g.
targets/ort_parity.py). `layer_parity` replays the simulation graph with each quantize node's
output *replaced* by the runtime's codes, after comparing the two: so every layer is judged
on the runtime's own inputs, and the difference at a tensor is that layer's local error, not
the accumulation of everything upstream. A correct integer kernel differs from the float
simulation only where the exact value lies within float rounding of a rounding tie: at most
`BOUND_STEPS` step (targets/ort.py). A kernel that saturates (x86 AVX2 `vpmaddubsw`) is tens
of steps off.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import fx

from quantflow.placement import FUSED_ACTS

qd = torch.ops.quantized_decomposed

#: a correct integer kernel is at most one step off the simulation (a rounding tie)
BOUND_STEPS = 1


@dataclass(frozen=True)
class TensorParity:
    """Runtime vs simulation at one quantized tensor, given the runtime's own inputs."""

    tensor: str  # fx name of the quantize node
    layer: str  # the op that computes it (a conv before its fused ReLU), or the graph input
    op: str
    max_steps: int
    off: int  # elements more than BOUND_STEPS off
    elements: int

    @property
    def ok(self) -> bool:
        return self.max_steps <= BOUND_STEPS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quantized_tensors(qgm: fx.GraphModule) -> list[str]:
    """Names of the activation quantize nodes (the tensors a runtime can be tapped at)."""
    return [n.name for n in qgm.graph.nodes if n.target == qd.quantize_per_tensor.default]


def layer_of(q: fx.Node) -> tuple[str, str]:
    """(layer name, op) that computes the tensor quantize node `q` reads."""
    src = q.args[0]
    assert isinstance(src, fx.Node)
    if src.op == "placeholder":
        return src.name, "input"
    if src.op == "call_function" and src.target in FUSED_ACTS and isinstance(src.args[0],
                                                                             fx.Node):
        src = src.args[0]
    if src.target == qd.dequantize_per_tensor.default:  # a requantized tensor
        return src.name, "requantize"
    name = str(src.target)
    return src.name, name.split(".")[-2] if name.count(".") >= 2 else name


class Replay(fx.Interpreter):
    """The simulation, with each tapped quantize node's output replaced by the runtime's."""

    def __init__(self, gm: fx.GraphModule, runtime: Mapping[str, np.ndarray]) -> None:
        super().__init__(gm)
        self.runtime = runtime
        self.diff: dict[str, tuple[int, int, int]] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name not in self.runtime or n.target != qd.quantize_per_tensor.default:
            return out
        rt = torch.from_numpy(np.ascontiguousarray(self.runtime[n.name]))
        if tuple(rt.shape) != tuple(out.shape):
            raise ValueError(f"parity: runtime tensor {n.name} has shape {tuple(rt.shape)}, "
                             f"the simulation {tuple(out.shape)}")
        d = (out.to(torch.int32) - rt.to(torch.int32)).abs()
        self.diff[n.name] = (int(d.max()) if d.numel() else 0, int((d > BOUND_STEPS).sum()),
                             d.numel())
        return rt.to(out.dtype)


def layer_parity(qgm: fx.GraphModule, inputs: Sequence[Sequence[torch.Tensor]],
                 runtime: Sequence[Mapping[str, np.ndarray]]) -> list[TensorParity]:
    """Worst local difference per quantized tensor over the runs (graph order)."""
    if len(inputs) != len(runtime):
        raise ValueError("parity: one runtime result per input run is needed")
    worst: dict[str, list[int]] = {}
    with torch.no_grad():
        for xs, rt in zip(inputs, runtime):
            replay = Replay(qgm, rt)
            replay.run(*xs)
            for name, (mx, off, n) in replay.diff.items():
                w = worst.setdefault(name, [0, 0, 0])
                w[0], w[1], w[2] = max(w[0], mx), w[1] + off, w[2] + n
    nodes = {n.name: n for n in qgm.graph.nodes}
    out = []
    for name in quantized_tensors(qgm):
        if name in worst:
            layer, op = layer_of(nodes[name])
            mx, off, n = worst[name]
            out.append(TensorParity(name, layer, op, mx, off, n))
    return out
