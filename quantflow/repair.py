"""Worst-tensor repair: find the activations that cost the most output fidelity, fix the worst.

Ranking is measured, not guessed. For every quantized activation tensor t (a group: t and the
value-preserving ops that share its scale, e.g. a max-pool after it),

    contribution(t) = SQNR(model with every tensor but t quantized) − SQNR(fully quantized)

in dB, on the calibration samples `evaluate.scoring_subset` picks: how much better the model
would be if t were exact. Tensors are repaired from the largest contribution down, each with
the cheapest tool that works on the target:

1. consumer-aware scale search: the tensor's scale times f for f in `CLIP_FACTORS`, then
   around the best (`REFINE`); the zero point is kept, so 0 stays exact. Clipping the rare
   large values buys finer steps for the common small ones. Each candidate is scored by the error at the MODEL OUTPUT (the consumer and
   everything after it), not by the tensor's own MSE, which ranks clipping wrongly when a
   consumer amplifies a few channels. A candidate is kept only when it gains at least
   `min_gain_db`.
2. a 16-bit activation, where the target runs W8A16 as an integer kernel
   (`TargetCaps.integer_options`). No target here does (ONNX Runtime has no int16 conv, a
   16-bit input makes TensorRT pick a float kernel), so the report lists it under
   `skipped_tools` with that reason instead of trying it.

Per-channel migration into the next layer (SmoothQuant-style) is the equalization pass
(passes/equalize.py), which the plan stage already tries for the whole model.

The result is a scale (and zero point) per repaired tensor: `quantize(..., act_qparams=...)`
applies it; artifacts and runtimes do not change.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from quantflow import evaluate as ev
from quantflow.progress import bar
from quantflow.quantize import QuantInfo, float_source

log = logging.getLogger("quantflow.repair")
qd = torch.ops.quantized_decomposed
Q_OPS = (qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default)

#: scale multipliers tried by the scale search (1.0 = the calibrated range)
CLIP_FACTORS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: then the best factor times these (a finer look between grid points)
REFINE = (0.85, 1.15)

#: a tensor whose QParams override is None runs in float (used to measure contributions)
Override = tuple[float, int] | None


class _Overridden(fx.Interpreter):
    """Runs a quantized graph with some tensors' Q/DQ pairs changed: a (scale, zero point)
    replaces the calibrated one, None skips the pair (the tensor stays float)."""

    def __init__(self, qgm: fx.GraphModule, overrides: Mapping[str, Override],
                 root: Mapping[str, str], garbage_collect: bool = True) -> None:
        super().__init__(qgm, garbage_collect_values=garbage_collect)
        self.overrides, self.root = overrides, root

    def run_node(self, n: fx.Node) -> Any:
        if n.op != "call_function" or n.target not in Q_OPS:
            return super().run_node(n)
        src = n.args[0]
        assert isinstance(src, fx.Node)
        q = src if n.target == Q_OPS[1] else n  # a dequantize reads its quantize
        tensor = q.args[0]
        assert isinstance(tensor, fx.Node)
        key = self.root.get(tensor.name, tensor.name)
        if key not in self.overrides:
            return super().run_node(n)
        new = self.overrides[key]
        x = self.env[src]
        if new is None:
            return x  # both q and dq pass the float value through
        args = (x, new[0], new[1], *n.args[3:])
        return n.target(*args)  # type: ignore[operator]


def tensor_groups(info: QuantInfo, qgm: fx.GraphModule) -> dict[str, str]:
    """tensor -> the tensor whose scale it shares (itself for a root). quantize() copies a
    value-preserving op's qparams from its input when both have the same spec; in the
    quantized graph that input is read through its dequantize."""
    nodes = {n.name: n for n in qgm.graph.nodes}
    root: dict[str, str] = {}
    for name in info.tensors:
        cur = name
        while True:
            arg = nodes[cur].args[0] if nodes[cur].args else None
            src = float_source(arg) if isinstance(arg, fx.Node) else None
            if (src is not None and src.name in info.tensors
                    and info.tensors[src.name] == info.tensors[cur] and src.name != cur):
                cur = src.name
                continue
            break
        root[name] = cur
    return root


@dataclass(frozen=True)
class Repair:
    """One repaired tensor: its contribution before, the tool, what it bought."""

    tensor: str
    contribution_db: float
    tool: str
    scale: tuple[float, float]  # before, after
    gain_db: float

    def to_dict(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "contribution_db": round(self.contribution_db, 3),
                "tool": self.tool, "scale_before": self.scale[0], "scale_after": self.scale[1],
                "gain_db": round(self.gain_db, 3)}


@dataclass(frozen=True)
class RepairResult:
    """New (scale, zero point) per repaired tensor, and what the ranking and repairs measured."""

    qparams: dict[str, tuple[float, int]]
    repairs: list[Repair]
    ranking: list[tuple[str, float]]  # tensor, contribution in dB, largest first
    sqnr_db: tuple[float, float]  # scoring subset, before and after all repairs
    seconds: float
    skipped: dict[str, str] = field(default_factory=dict)  # tool -> why it was not tried

    def summary(self) -> dict[str, Any]:
        return {"sqnr_db_before": round(self.sqnr_db[0], 3),
                "sqnr_db_after": round(self.sqnr_db[1], 3),
                "seconds": round(self.seconds, 1),
                "repaired": [r.to_dict() for r in self.repairs],
                "worst": [{"tensor": t, "contribution_db": round(c, 3)}
                          for t, c in self.ranking[:10]],
                "skipped_tools": self.skipped}


class _Scorer:
    """Output SQNR of the simulation under overrides, recomputing only what they change.

    A full run (with the accepted overrides) keeps every node's value; a candidate override
    re-runs just the nodes downstream of the Q/DQ pairs it touches (fx.Interpreter skips nodes
    already in its environment). A tensor near the output re-runs a few nodes, one near the
    input most of the graph: about half the cost of full runs on average.
    """

    def __init__(self, qgm: fx.GraphModule, x: torch.Tensor, ref: torch.Tensor,
                 root: Mapping[str, str]) -> None:
        self.qgm, self.x, self.ref, self.root = qgm, x, ref, root
        self.pairs: dict[str, list[fx.Node]] = {}  # tensor group -> its Q and DQ nodes
        for n in qgm.graph.nodes:
            if n.op == "call_function" and n.target == Q_OPS[0]:
                key = root.get(n.args[0].name, n.args[0].name)
                self.pairs.setdefault(key, []).append(n)
        self.accept({})

    def accept(self, overrides: Mapping[str, Override]) -> float:
        """Make `overrides` the state candidates are scored against; its SQNR."""
        self.overrides = dict(overrides)
        interp = _Overridden(self.qgm, self.overrides, self.root, garbage_collect=False)
        with torch.no_grad():
            out = interp.run(self.x)
        self.env = interp.env
        self.base = ev.sqnr_db(self.ref, out)
        return self.base

    def sqnr(self, tensor: str, new: Override) -> float:
        """The SQNR with `tensor`'s pair changed to `new` (on top of the accepted state)."""
        dirty: set[fx.Node] = set()
        stack = list(self.pairs.get(tensor, []))
        while stack:
            n = stack.pop()
            if n not in dirty:
                dirty.add(n)
                stack.extend(n.users)
        env = {n: v for n, v in self.env.items() if n not in dirty}
        interp = _Overridden(self.qgm, {**self.overrides, tensor: new}, self.root)
        with torch.no_grad():
            out = interp.run(self.x, initial_env=env)
        return ev.sqnr_db(self.ref, out)


def rank(scorer: _Scorer, progress: bool = True) -> list[tuple[str, float]]:
    """Every tensor group's measured contribution (dB gained if it were exact), largest first."""
    out = []
    for g in bar(sorted(scorer.pairs), "repair: ranking tensors", "tensor",
                 disable=not progress):
        out.append((g, scorer.sqnr(g, None) - scorer.base))
    return sorted(out, key=lambda t: -t[1])


def repair(gm: fx.GraphModule, qgm: fx.GraphModule, x: torch.Tensor, *,
           skipped: Mapping[str, str] | None = None, max_tensors: int = 8, seconds: float = 60.0,
           min_gain_db: float = 0.05, progress: bool = True) -> RepairResult:
    """Rank the quantized tensors of `qgm` (the quantization of `gm`) by their contribution to
    the output error on `x` and repair the worst `max_tensors` within `seconds`. `skipped`:
    the tools the target cannot use, with the reason (reported as they are)."""
    t0 = time.perf_counter()
    info: QuantInfo = qgm.meta["quantflow"]
    root = tensor_groups(info, qgm)
    x = ev.scoring_subset(x)
    with torch.no_grad():
        ref = ev.predict(gm, x)
    scorer = _Scorer(qgm, x, ref, root)
    base = scorer.base
    ranking = rank(scorer, progress)
    chosen: dict[str, Override] = {}
    repairs: list[Repair] = []
    for tensor, contribution in ranking[:max_tensors]:
        if contribution < min_gain_db:
            break  # the rest cost less than a repair could buy
        if time.perf_counter() - t0 > seconds:
            log.info("repair: time budget spent after %d tensor(s)", len(repairs))
            break
        _, scale, zp = info.tensors[tensor]
        best, best_db = None, scorer.base + min_gain_db
        for f in CLIP_FACTORS:
            db = scorer.sqnr(tensor, (scale * f, zp))
            if db > best_db:
                best, best_db = (scale * f, zp), db
        if best is None:
            continue
        for r in REFINE:
            cand = (best[0] * r, zp)
            if cand[0] < scale and (db := scorer.sqnr(tensor, cand)) > best_db:
                best, best_db = cand, db
        gain = best_db - scorer.base
        chosen[tensor] = best
        scorer.accept(chosen)
        repairs.append(Repair(tensor, contribution, "scale_search", (scale, best[0]), gain))
    current = scorer.base
    qparams = {t: v for t, v in chosen.items() if v is not None}
    return RepairResult(qparams, repairs, ranking, (base, current),
                        time.perf_counter() - t0, dict(skipped or {}))

