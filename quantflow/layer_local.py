"""Per-layer error of the torch simulation against FP32, measured so that one bad layer cannot
hide behind (or be blamed for) the error of the layers before it.

For every quantized weighted layer L (conv, linear) of the quantized graph:
  sqnr_sim    SQNR of L's output in the simulation vs FP32: the error accumulated up to L.
  local       SQNR of L alone: L's quantized weights applied to the *FP32* input of L, passed
              through L's own input quantizer, vs FP32's L output. What L adds by itself.
  weight_only L's quantized weights on the unquantized FP32 input (the weights' share).
  act_only    FP32 weights on the quantized FP32 input (the input quantizer's share).
  clipped     fraction of L's FP32 input outside its quantizer's range (range too narrow).
  codes_used  how many quantization steps the FP32 input actually spans (range too wide:
              a healthy 8-bit tensor spans most of its 256 codes, an absurd scale a handful).

Both graphs run on the same samples; the quantized graph keeps the float graph's node names
(quantize.py inserts `X_q`/`X_dq` and swaps weights, it never renames a layer), which is how a
layer of one is found in the other. Two small fx Interpreters, as torch.fx's ShapeProp.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx

from quantflow import progress
from quantflow.ir import WEIGHTED_OPS, is_op
from quantflow.quantize import float_source

qd = torch.ops.quantized_decomposed
#: the SQNR reported when two tensors agree exactly (a finite number keeps JSON and plots sane)
EXACT_DB = 120.0
HIST_BINS = 40


def sqnr_db(signal: float, noise: float) -> float:
    """10·log10(signal energy / noise energy), EXACT_DB when the noise is zero."""
    if noise <= 0.0:
        return EXACT_DB
    if signal <= 0.0:
        return -EXACT_DB
    return round(min(EXACT_DB, 10.0 * math.log10(signal / noise)), 2)


@dataclass
class Energy:
    """Signal and noise energy summed over batches (SQNR of the whole sample set)."""

    signal: float = 0.0
    noise: float = 0.0

    def add(self, ref: torch.Tensor, x: torch.Tensor) -> None:
        ref64, x64 = ref.double(), x.double()
        self.signal += float((ref64 * ref64).sum())
        self.noise += float(((ref64 - x64) ** 2).sum())

    @property
    def db(self) -> float:
        return sqnr_db(self.signal, self.noise)


@dataclass
class LayerStats:
    """What one layer accumulated over the samples."""

    name: str
    op: str
    bits: str
    sim: Energy = field(default_factory=Energy)
    local: Energy = field(default_factory=Energy)
    weight_only: Energy = field(default_factory=Energy)
    act_only: Energy = field(default_factory=Energy)
    clipped: int = 0
    elements: int = 0
    span_steps: float = 0.0  # (max - min) of the FP32 input / input scale
    act_range: tuple[float, float] | None = None  # the input quantizer's real range
    weight_hist: tuple[list[float], list[int]] | None = None
    act_hist: tuple[list[float], list[int]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "op": self.op, "bits": self.bits,
                "sqnr_sim_db": self.sim.db, "local_sqnr_db": self.local.db,
                "weight_only_db": self.weight_only.db, "act_only_db": self.act_only.db,
                "clipped": round(self.clipped / max(self.elements, 1), 6),
                "codes_used": round(self.span_steps, 1) if self.act_range else None}


def _hist(t: torch.Tensor) -> tuple[list[float], list[int]]:
    v = t.detach().double().flatten().numpy()
    counts, edges = np.histogram(v, bins=HIST_BINS)
    return [round(float(e), 6) for e in edges], [int(c) for c in counts]


class _Float(fx.Interpreter):
    """FP32 graph: keeps every node's value of the current batch (layers read them). Values
    are copied: an in-place op after a layer (`relu_`) would otherwise change what was kept."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n.name] = out.clone() if isinstance(out, torch.Tensor) else out
        return out


def _qdq(x: torch.Tensor, dq: fx.Node) -> torch.Tensor:
    """`x` through the quantizer whose dequantize node is `dq` (its args hold the params)."""
    _, scale, zp, qmin, qmax, dtype = dq.args[:6]
    q = qd.quantize_per_tensor.default(x, scale, zp, qmin, qmax, dtype)
    return qd.dequantize_per_tensor.default(q, scale, zp, qmin, qmax, dtype)


class _Quantized(fx.Interpreter):
    """The simulation; at each tracked layer also runs the layer on FP32's own input."""

    def __init__(self, gm: fx.GraphModule, fp: _Float, fp_nodes: dict[str, fx.Node],
                 layers: dict[str, LayerStats], keep_hist: bool) -> None:
        super().__init__(gm)
        self.fp, self.fp_nodes, self.layers, self.keep_hist = fp, fp_nodes, layers, keep_hist

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        st = self.layers.get(n.name)
        ref = self.fp.values.get(n.name)
        if st is None or not isinstance(ref, torch.Tensor):
            return out
        st.sim.add(ref, out)
        x_node = n.args[0]
        fpn = self.fp_nodes.get(n.name)
        if not isinstance(x_node, fx.Node) or fpn is None:
            return out
        x_fp = self.fp.values.get(float_source(x_node).name)
        if not isinstance(x_fp, torch.Tensor):
            return out
        quantized_input = x_node.target == qd.dequantize_per_tensor.default
        x_q = _qdq(x_fp, x_node) if quantized_input else x_fp
        rest_q = [self.env[a] if isinstance(a, fx.Node) else a for a in n.args[1:]]
        rest_f = [self.fp.values[a.name] if isinstance(a, fx.Node) else a for a in fpn.args[1:]]
        call = n.target
        assert callable(call)
        st.local.add(ref, call(x_q, *rest_q, **n.kwargs))
        st.weight_only.add(ref, call(x_fp, *rest_q, **n.kwargs))
        st.act_only.add(ref, call(x_q, *rest_f, **fpn.kwargs))
        if quantized_input:
            scale, zp, qmin, qmax = (float(v) for v in x_node.args[1:5])  # type: ignore[arg-type]
            lo, hi = (qmin - zp) * scale, (qmax - zp) * scale
            st.act_range = (lo, hi)
            st.clipped += int(((x_fp < lo - 0.5 * scale) | (x_fp > hi + 0.5 * scale)).sum())
            st.span_steps = max(st.span_steps, float(x_fp.max() - x_fp.min()) / scale)
        st.elements += x_fp.numel()
        if self.keep_hist and st.act_hist is None:
            st.act_hist = _hist(x_fp)
            w = rest_f[0]
            if isinstance(w, torch.Tensor):
                st.weight_hist = _hist(w)
        return out


def layer_stats(fp_gm: fx.GraphModule, qgm: fx.GraphModule,
                batches: Sequence[Sequence[torch.Tensor]]) -> list[LayerStats]:
    """Per-layer error statistics over `batches`, in graph order (quantized layers only)."""
    info = qgm.meta.get("quantflow")
    plans = info.layers if info is not None else {}
    fp_nodes = {n.name: n for n in fp_gm.graph.nodes}
    layers: dict[str, LayerStats] = {}
    for n in qgm.graph.nodes:
        lp = plans.get(n.name)
        if is_op(n, WEIGHTED_OPS) and n.name in fp_nodes and lp is not None \
                and lp.label() != "FP32":
            op = str(n.target).split(".")[-2] if str(n.target).count(".") >= 2 else str(n.target)
            layers[n.name] = LayerStats(n.name, op, lp.label())
    with torch.no_grad():
        for i, xs in enumerate(progress.bar(batches, "analyze: per-layer FP32 vs simulation",
                                            unit="batch")):
            fp = _Float(fp_gm)
            fp.run(*xs)
            _Quantized(qgm, fp, fp_nodes, layers, keep_hist=i == 0).run(*xs)
    return list(layers.values())
