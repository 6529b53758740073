"""Recognise the layers an ONNX exporter spelled out in primitive ops, before conversion.

`quantflow.onnx_import` turns each ONNX node into torch calls. Exporters decompose layers that
quantflow's passes and quantizer look for by name; converting node by node would leave them
decomposed, so the quantizer would see a MatMul against a constant (not a per-channel `linear`)
and a LayerNorm as nine float ops. Three rewrites put them back; each works on the
constant-folded node list and replaces a chain whose interior values nobody else reads:

- ``MatMul(x, B) [+ Add(b)]`` with constant 2-D ``B`` (and 1-D ``b``) -> ``Linear`` with weight
  ``Bᵀ``: y = x·B + b = linear(x, Bᵀ, b). ``Gemm(A, B, C)`` likewise: y = α·A·B' + β·C =
  linear(A, α·B'ᵀ, β·C) when A is not transposed.
- LayerNorm as exported by torch < opset 17: ``m = ReduceMean(x, -1); d = x - m;
  v = ReduceMean(d², -1); y = d / sqrt(v + eps) [· γ + β]`` -> ``LayerNorm(x; γ, β, eps)``.
- exact GELU: ``x · 0.5 · (1 + erf(x / √2))`` in its exported orders -> ``Gelu(x)``.

A fused step is an `OnnxStep` whose op is the name above; the converter knows them like any ONNX
op. Anything that does not match exactly is left as it was (it still converts, just unfused).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class OnnxStep:
    """One node to convert: an ONNX op (attributes decoded) or a fused layer."""

    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]
    name: str
    #: constants a fused layer owns (weight, bias, gamma, beta), already in torch layout
    consts: dict[str, np.ndarray] = field(default_factory=dict)


class _Graph:
    """Producer and reader indexes over a step list; rewrites mark steps dead."""

    def __init__(self, steps: list[OnnxStep], consts: dict[str, np.ndarray],
                 outputs: set[str]) -> None:
        self.steps, self.consts, self.outputs = steps, consts, outputs
        self.producer = {o: s for s in steps for o in s.outputs}
        self.readers: dict[str, list[OnnxStep]] = {}
        for s in steps:
            for i in s.inputs:
                self.readers.setdefault(i, []).append(s)
        self.dead: set[int] = set()
        self.last_killed: list[OnnxStep] = []

    def only_reader(self, value: str, op: str) -> OnnxStep | None:
        """The single step reading `value`, if it is an `op` and the value is not an output."""
        rs = self.readers.get(value, [])
        if len(rs) != 1 or value in self.outputs or rs[0].op != op or id(rs[0]) in self.dead:
            return None
        return rs[0]

    def const(self, value: str) -> np.ndarray | None:
        return self.consts.get(value)

    def other(self, step: OnnxStep, value: str) -> str | None:
        """The other input of a binary step that reads `value`."""
        if len(step.inputs) != 2 or value not in step.inputs:
            return None
        a, b = step.inputs
        return b if a == value else a

    def scalar(self, value: str | None) -> float | None:
        c = self.const(value) if value is not None else None
        return float(c.reshape(-1)[0]) if c is not None and c.size == 1 else None

    def kill(self, *steps: OnnxStep) -> None:
        self.dead.update(id(s) for s in steps)
        self.last_killed = list(steps)


def _linear(g: _Graph, s: OnnxStep) -> OnnxStep | None:
    if s.op == "MatMul":
        w = g.const(s.inputs[1])
        if w is None or w.ndim != 2 or w.dtype != np.float32 or s.inputs[0] in g.consts:
            return None
        consts = {"weight": np.ascontiguousarray(w.T)}
        out, absorbed = s.outputs[0], [s]
        add = g.only_reader(out, "Add")
        b = g.const(g.other(add, out) or "") if add is not None else None
        if add is not None and b is not None and b.shape == (w.shape[1],):
            consts["bias"] = b.astype(np.float32)
            out = add.outputs[0]
            absorbed.append(add)
        g.kill(*absorbed)
        return OnnxStep("Linear", [s.inputs[0]], [out], {}, s.name, consts)
    if s.op == "Gemm":
        w = g.const(s.inputs[1])
        if w is None or s.attrs.get("transA", 0) or s.inputs[0] in g.consts:
            return None
        alpha, beta = float(s.attrs.get("alpha", 1.0)), float(s.attrs.get("beta", 1.0))
        wt = w if s.attrs.get("transB", 0) else w.T
        consts = {"weight": np.ascontiguousarray(alpha * wt).astype(np.float32)}
        if len(s.inputs) > 2 and s.inputs[2]:
            c = g.const(s.inputs[2])
            if c is None or c.size not in (1, wt.shape[0]):
                return None
            consts["bias"] = np.broadcast_to(beta * c.reshape(-1), (wt.shape[0],)).astype(
                np.float32).copy()
        g.kill(s)
        return OnnxStep("Linear", [s.inputs[0]], list(s.outputs), {}, s.name, consts)
    return None


def _last_axis(step: OnnxStep, g: _Graph) -> bool:
    axes = step.attrs.get("axes")
    if axes is None and len(step.inputs) > 1:  # opset 18: axes is an input
        c = g.const(step.inputs[1])
        axes = None if c is None else c.tolist()
    return axes is not None and list(axes) == [-1] and step.attrs.get("keepdims", 1) == 1


def _layer_norm(g: _Graph, mean: OnnxStep) -> OnnxStep | None:
    if mean.op != "ReduceMean" or not _last_axis(mean, g):
        return None
    x = mean.inputs[0]
    sub = g.only_reader(mean.outputs[0], "Sub")
    if sub is None or sub.inputs != [x, mean.outputs[0]]:
        return None
    d = sub.outputs[0]
    rd = g.readers.get(d, [])
    if len(rd) != 2 or d in g.outputs:
        return None
    pow_ = next((r for r in rd if r.op == "Pow" and r.inputs[0] == d), None)
    div = next((r for r in rd if r.op == "Div" and r.inputs[0] == d), None)
    if pow_ is None or div is None or g.scalar(pow_.inputs[1]) != 2.0:
        return None
    var = g.only_reader(pow_.outputs[0], "ReduceMean")
    add = g.only_reader(var.outputs[0], "Add") if var is not None and _last_axis(var, g) else None
    eps = g.scalar(g.other(add, var.outputs[0])) if add is not None and var is not None else None
    sqrt = g.only_reader(add.outputs[0], "Sqrt") if add is not None else None
    if var is None or add is None or eps is None or sqrt is None or \
            div.inputs[1] != sqrt.outputs[0] or \
            g.only_reader(sqrt.outputs[0], "Div") is not div:
        return None
    chain: list[OnnxStep] = [mean, sub, pow_, var, add, sqrt, div]
    out, consts = div.outputs[0], {}
    mul = g.only_reader(out, "Mul")
    gamma = g.const(g.other(mul, out) or "") if mul is not None else None
    if mul is not None and gamma is not None and gamma.ndim == 1:
        consts["weight"], out = gamma.astype(np.float32), mul.outputs[0]
        chain.append(mul)
        add_b = g.only_reader(out, "Add")
        beta = g.const(g.other(add_b, out) or "") if add_b is not None else None
        if add_b is not None and beta is not None and beta.shape == gamma.shape:
            consts["bias"], out = beta.astype(np.float32), add_b.outputs[0]
            chain.append(add_b)
    g.kill(*chain)
    return OnnxStep("LayerNorm", [x], [out], {"epsilon": eps}, mean.name, consts)


def _gelu(g: _Graph, div: OnnxStep) -> OnnxStep | None:
    """x/√2 -> Erf -> +1 -> ·x -> ·0.5 (the 0.5 may come first: (x·0.5)·(1+erf))."""
    if div.op == "Div":
        k = g.scalar(div.inputs[1])
        ok = k is not None and abs(k - math.sqrt(2.0)) < 1e-3
    elif div.op == "Mul":
        k = g.scalar(div.inputs[1])
        ok = k is not None and abs(k - math.sqrt(0.5)) < 1e-3
    else:
        return None
    x = div.inputs[0]
    erf = g.only_reader(div.outputs[0], "Erf") if ok else None
    add = g.only_reader(erf.outputs[0], "Add") if erf is not None else None
    if erf is None or add is None or g.scalar(g.other(add, erf.outputs[0])) != 1.0:
        return None
    mul = g.only_reader(add.outputs[0], "Mul")
    if mul is None:
        return None
    other = g.other(mul, add.outputs[0])
    chain: list[OnnxStep]
    if other == x:  # x · (1 + erf) then · 0.5
        half = g.only_reader(mul.outputs[0], "Mul")
        if half is None or g.scalar(g.other(half, mul.outputs[0])) != 0.5:
            return None
        chain = [div, erf, add, mul, half]
    else:  # (x · 0.5) · (1 + erf)
        half = g.producer.get(other or "")
        if half is None or half.op != "Mul" or g.other(half, x) is None or \
                g.scalar(g.other(half, x)) != 0.5 or len(g.readers.get(other or "", [])) != 1:
            return None
        chain = [half, div, erf, add, mul]
    g.kill(*chain)
    return OnnxStep("Gelu", [x], [chain[-1].outputs[0] if other == x else mul.outputs[0]], {},
                    div.name)


def fuse(steps: list[OnnxStep], consts: dict[str, np.ndarray],
         outputs: set[str]) -> tuple[list[OnnxStep], dict[str, int]]:
    """`steps` with the patterns above replaced (order kept: a fused step takes the place of
    its first node, whose inputs are the chain's inputs), and a count per fused op."""
    g = _Graph(steps, consts, outputs)
    pos = {id(s): i for i, s in enumerate(steps)}
    # a fused step goes where the chain's last node was: its inputs are ready there (each
    # was ready for the chain node reading it) and every reader of its output comes later
    at: dict[int, OnnxStep] = {}
    counts: dict[str, int] = {}
    for s in steps:
        if id(s) in g.dead:
            continue
        fused = _layer_norm(g, s) or _gelu(g, s) or _linear(g, s)
        if fused is not None:
            at[max(pos[id(c)] for c in g.last_killed)] = fused
            counts[fused.op] = counts.get(fused.op, 0) + 1
    out = [at.get(i, s) for i, s in enumerate(steps) if i in at or id(s) not in g.dead]
    return out, counts
