"""Block-wise reconstruction for learned rounding (BRECQ, Li et al. 2021), and the machinery
that learns unit after unit (a block, or one layer) within a time budget, resumably.

Blocks. On the data-flow graph (the nodes that depend on the graph inputs) the fork of a
residual `aten.add.Tensor` A is A's immediate dominator F: every path from the inputs to A
passes through F, the latest such node. The block is every node on a path F → A (F excluded),
plus the ReLU-like activation that is A's only user: the next block reads that, and the part
it clips is no error worth learning (Fashion-MNIST ResNet, W4A8: +0.6 dB held-out over
stopping at the add). ResNet basic blocks (projection shortcut or not) and MobileNetV2
inverted residuals are blocks; a nested residual joins the outer block; a weighted layer in no
block is a unit of its own (learned layer-wise, quantflow.rounding).

Reconstruction. For a block B with layers l = 1..L, BRECQ learns AdaRound's V_l jointly:

    min_V  ‖ B_q(X̃, {W̃_l(V_l)}) − B_fp(X_fp) ‖²  +  λ · Σ_l Σ (1 − |2h(V_l) − 1|^β)

B_q is the block's sub-graph of the QUANTIZED graph (so the rounding compensates the
activation fake-quant inside the block too; a Q→DQ pair runs with a straight-through
gradient), X̃ is QDrop's per-element mix of the quantized model's input to the block with the
float one, the target the float graph's block output on float inputs.

Cache. One `torch.save` file per finished unit, written atomically (tmp file, os.replace),
holding its codes, errors and the run's key; a file with another key is ignored, so a stale
folder never leaks codes into a different model, plan, schedule or data.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.ao.quantization.fx._decomposed  # registers the quantized_decomposed ops
import torch.nn.functional as F
from torch import fx

from quantflow.ir import get_tensor

if TYPE_CHECKING:
    from quantflow.rounding import Layer, RoundingOptions

log = logging.getLogger("quantflow.rounding")
aten, qd = torch.ops.aten, torch.ops.quantized_decomposed
Q_OPS, DQ_OPS = (qd.quantize_per_tensor.default,), (qd.dequantize_per_tensor.default,)
_QDQ = (*Q_OPS, *DQ_OPS, qd.quantize_per_channel.default, qd.dequantize_per_channel.default)
#: elementwise activations a block's output extends through when the add's only user
_ACTS = (aten.relu.default, aten.relu_.default, aten.hardtanh.default, aten.hardtanh_.default,
         aten.relu6.default, aten.clamp.default)
Codes = dict[str, torch.Tensor]
LearnFn = Callable[..., tuple[Codes, float, float]]  # see LearnUnits


@dataclass(frozen=True)
class Block:
    """One unit of reconstruction: a residual block, or one weighted layer on its own."""

    name: str  # the output node: the block's add (or its activation), or the layer
    input: str  # the node whose value enters the unit: the fork, or the layer's input
    nodes: tuple[str, ...]  # evaluated in this (graph) order; input excluded, output last
    layers: tuple[str, ...]  # the weighted layers learned jointly

    @property
    def residual(self) -> bool:
        return self.name not in self.layers


def dominators(graph: fx.Graph) -> dict[fx.Node, fx.Node | None]:
    """Immediate dominator of each node that depends on a graph input (None: only a virtual
    root above all inputs dominates it). Graph order is topological, so one pass suffices
    (Cooper, Harvey, Kennedy 2001): idom(n) is the nearest common dominator of n's inputs."""
    idom: dict[fx.Node, fx.Node | None] = {}
    depth: dict[fx.Node, int] = {}

    def meet(a: fx.Node | None, b: fx.Node | None) -> fx.Node | None:
        while a is not b and a is not None and b is not None:
            a, b = (idom[a], b) if depth[a] >= depth[b] else (a, idom[b])
        return a if a is b else None

    for n in graph.nodes:
        preds = [a for a in n.all_input_nodes if a in idom]
        if n.op != "placeholder" and not preds:
            continue  # a constant
        d: fx.Node | None = preds[0] if preds else None
        for p in preds[1:]:
            d = meet(d, p)
        idom[n], depth[n] = d, depth[d] + 1 if d is not None else 1
    return idom


def _residual(add: fx.Node, idom: Mapping[fx.Node, fx.Node | None], layers: set[str]
              ) -> tuple[fx.Node, list[fx.Node]] | None:
    """(fork, nodes) of the residual block ending at `add`, or None when there is none: no
    single fork, no layer to learn inside, a second exit (an inner value used outside: the
    output alone would not say its error), or a node the block runner cannot evaluate."""
    fork = idom.get(add)
    if fork is None:
        return None
    # backwards from the add, stopping at the fork: since the fork dominates the add, every
    # node reached lies on a path fork → add
    seen, todo = {add}, deque([add])
    while todo:
        for a in todo.popleft().all_input_nodes:
            if a in idom and a is not fork and a not in seen:
                seen.add(a)
                todo.append(a)
    users, out = list(add.users), add
    if len(users) == 1 and users[0].target in _ACTS and users[0].args[0] is add:
        out = users[0]
        seen.add(out)
    if (not any(n.name in layers for n in seen) or any(n.op != "call_function" for n in seen)
            or any(u not in seen for n in seen if n is not out for u in n.users)):
        return None
    return fork, [n for n in add.graph.nodes if n in seen]


def find_blocks(graph: fx.Graph, layers: Iterable[str]) -> list[Block]:
    """The reconstruction units of `graph` over the weighted layers `layers`: a block per
    residual add (both inputs depend on the graph inputs), the outer one when nested, and
    every other layer on its own; in graph order of their outputs."""
    names = set(layers)
    idom = dominators(graph)
    found: list[tuple[fx.Node, list[fx.Node]]] = []
    for n in graph.nodes:
        if n.target != aten.add.Tensor or sum(a in idom for a in n.all_input_nodes) != 2:
            continue  # not an add of two activations (a bias, a constant)
        if (res := _residual(n, idom, names)) is None:
            continue
        members = set(res[1])
        # graph order: an inner block comes before the outer one containing it
        inner = [b for b in found if set(b[1]) <= members]
        if not any(set(b[1]) & members for b in found if b not in inner):
            found = [b for b in found if b not in inner] + [res]
        # else: a partial overlap: the first block stays, the rest is learned layer-wise
    units = [Block(nodes[-1].name, fork.name, tuple(x.name for x in nodes),
                   tuple(x.name for x in nodes if x.name in names)) for fork, nodes in found]
    units += layer_units(graph, names - {k for u in units for k in u.layers})
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    return sorted(units, key=lambda u: order[u.name])


def layer_units(graph: fx.Graph, layers: Iterable[str]) -> list[Block]:
    """One unit per weighted layer (AdaRound's layer-wise reconstruction)."""
    names = set(layers)
    return [Block(n.name, n.args[0].name, (n.name,), (n.name,)) for n in graph.nodes
            if n.name in names and isinstance(n.args[0], fx.Node)]


def float_source(n: fx.Node) -> fx.Node:
    """The node a quantized-graph node stands for in the float graph (through Q/DQ ops)."""
    while n.target in _QDQ and isinstance(n.args[0], fx.Node):
        n = n.args[0]
    return n


def eval_const(gm: fx.GraphModule, node: Any) -> Any:
    """The value of a node computed from constants only (a bias' dequantize, a scale)."""
    env: dict[fx.Node, Any] = {}

    def ev(n: Any) -> Any:
        if not isinstance(n, fx.Node):
            return n
        if n not in env:
            if n.op == "get_attr":
                env[n] = get_tensor(gm, n)
            elif n.op == "call_function":
                env[n] = n.target(*fx.map_arg(n.args, ev),  # type: ignore[operator]
                                  **fx.map_arg(n.kwargs, ev))
            else:
                raise ValueError(f"learned rounding: {n.name} is not a constant")
        return env[n]

    return ev(node)


def fake_quant(x: torch.Tensor, scale: float, zp: int, qmin: int, qmax: int) -> torch.Tensor:
    """dequantize(quantize(x)) as quantized_decomposed computes it; with gradients on, the
    rounding is straight-through (gradient 1), so the block loss reaches the layers before."""
    u = x * (1.0 / scale)
    r = u + (torch.round(u) - u).detach() if torch.is_grad_enabled() else torch.round(u)
    return (torch.clamp(r + zp, qmin, qmax) - zp) * scale


def _out_of_place(target: Any) -> Any:
    """aten.relu_ → aten.relu (and the like): an in-place op inside the differentiated block
    could overwrite a value autograd still needs."""
    name = getattr(getattr(target, "overloadpacket", None), "__name__", "")
    if getattr(target, "namespace", None) != "aten" or not name.endswith("_") or name[0] == "_":
        return target
    op = getattr(getattr(aten, name[:-1], None), target._overloadname, None)
    return target if op is None else op


class BlockRunner:
    """Evaluates a block's nodes of the quantized graph on a given input, with the weights of
    its layers replaced by given tensors (soft or hard rounded)."""

    def __init__(self, gm: fx.GraphModule, block: Block) -> None:
        by_name = {n.name: n for n in gm.graph.nodes}
        self.input, self.nodes = by_name[block.input], [by_name[k] for k in block.nodes]
        inside = {*self.nodes, self.input}
        self.consts = {a: eval_const(gm, a) for n in self.nodes  # weights', biases' chains
                       for a in n.all_input_nodes if a not in inside}
        # q → dq pairs inside the block run as one straight-through fake-quant
        self.ste = {n for n in self.nodes if n.target in Q_OPS and n.users
                    and all(u in inside and u.target in DQ_OPS for u in n.users)}
        self.ops = {n: _out_of_place(n.target) for n in self.nodes}

    def __call__(self, x: torch.Tensor, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        env: dict[fx.Node, Any] = {self.input: x, **self.consts}
        for n in self.nodes:
            q = n.args[0] if n.args else None
            if n in self.ste:  # the float value passes: its dq does the quantization
                env[n] = env[q]  # type: ignore[index]
            elif n.target in DQ_OPS and q in self.ste:
                assert isinstance(q, fx.Node)
                env[n] = fake_quant(env[q], *q.args[1:5])  # type: ignore[arg-type]
            else:
                args = fx.map_arg(n.args, env.__getitem__)
                if n.name in weights:
                    args = (args[0], weights[n.name], *args[2:])
                env[n] = self.ops[n](*args, **fx.map_arg(n.kwargs, env.__getitem__))
        return env[self.nodes[-1]]  # type: ignore[no-any-return]


def beta_at(it: int, iters: int, opts: RoundingOptions) -> float | None:
    """β of the rounding regularizer at step `it`: None during the warm-up (no regularizer),
    then annealed linearly from opts.beta[0] (only h near 0.5 pay) to opts.beta[1]."""
    warm = int(opts.warmup * iters)
    if it < warm:
        return None
    return opts.beta[1] + (opts.beta[0] - opts.beta[1]) * (1 - (it - warm) / max(1, iters - warm))


def fit(layers: Sequence[Layer], forward: Callable[[torch.Tensor, Codes], torch.Tensor],
        x_q: torch.Tensor, x_fp: torch.Tensor, y: torch.Tensor, iters: int,
        opts: RoundingOptions, gen: torch.Generator) -> list[torch.Tensor]:
    """AdaRound's optimization, for one layer or a block: Adam on the V of `layers` against
    ‖forward(X̃, {W̃_l}) − y‖² / batch + λ·Σ_l reg(V_l, β), X̃ = QDrop's mix of x_q and x_fp
    (each element float with probability opts.qdrop); the learned V."""
    vs = [layer.start_v().requires_grad_(True) for layer in layers]
    opt = torch.optim.Adam(vs, lr=opts.lr)
    n = x_q.shape[0]
    for it in range(iters):
        idx = torch.randint(0, n, (min(opts.batch, n),), generator=gen)
        xq, xf = x_q[idx], x_fp[idx]
        if opts.qdrop > 0:
            xq = torch.where(torch.rand(xq.shape, generator=gen) < opts.qdrop, xf, xq)
        out = forward(xq, {layer.name: layer.soft(v) for layer, v in zip(layers, vs)})
        loss = F.mse_loss(out, y[idx], reduction="sum") / len(idx)
        beta = beta_at(it, iters, opts)
        if beta is not None:
            loss = loss + opts.reg * sum(layer.reg(v, beta) for layer, v in zip(layers, vs))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return vs


def learn_block(run: BlockRunner, layers: Sequence[Layer], x_q: torch.Tensor,
                x_fp: torch.Tensor, y: torch.Tensor, iters: int, opts: RoundingOptions,
                gen: torch.Generator) -> tuple[Codes, float, float]:
    """Jointly learned codes of a block's layers; (codes, block output MSE with nearest
    rounding, with them), on the quantized model's input x_q. Codes that lose to nearest
    rounding on that objective give way to nearest for the whole block."""
    vs = fit(layers, run, x_q, x_fp, y, iters, opts, gen)
    with torch.no_grad():
        learned = {layer.name: layer.hard_codes(v) for layer, v in zip(layers, vs)}
        nearest = {layer.name: layer.nearest() for layer in layers}
        scale = {layer.name: layer.scale for layer in layers}
        before, after = (float(F.mse_loss(run(x_q, {k: c * scale[k] for k, c in codes.items()}),
                                          y)) for codes in (nearest, learned))
    return (nearest, before, before) if after > before else (learned, before, after)


class StepBudget:
    """Steps per unit so that learning ends by `deadline`: the time left over the predicted
    seconds per step of all units left (`cost`, from MACs and a probe), corrected by the
    actual/predicted ratio of the units done so far (a small layer costs more per MAC than
    the probed large one). While predictions hold, every unit gets the same steps."""

    def __init__(self, deadline: float, cost: Mapping[str, float], opts: RoundingOptions):
        self.deadline, self.cost, self.opts = deadline, dict(cost), opts
        self.predicted = self.actual = 0.0

    def steps(self) -> int:
        ratio = self.actual / self.predicted if self.predicted > 0 else 1.0
        left = self.deadline - time.perf_counter()
        steps = int(left / max(ratio * sum(self.cost.values()), 1e-9))
        return max(self.opts.min_iters, min(self.opts.max_iters, steps))

    def done(self, unit: str, steps: int, seconds: float) -> None:
        self.predicted += steps * self.cost.pop(unit)
        self.actual += seconds


def unit_gen(opts: RoundingOptions, unit: Block) -> torch.Generator:
    """A generator per unit (not one shared stream): a resumed run learns the units it has
    not finished with the random batches an uninterrupted run would have used."""
    return torch.Generator().manual_seed(zlib.crc32(f"{opts.seed}:{unit.name}".encode()))


class LearnUnits(fx.Interpreter):
    """Runs the quantized graph; at each unit's output node learns the unit's rounding on the
    input the quantized model feeds it (the units before already learned, or loaded from
    `cached`), saves it to `store` and goes on with the learned codes. `learn`(unit, runner
    or None for one layer, layers, x_q, x_fp, y, steps, opts, generator) → (codes per layer,
    unit output MSE with nearest rounding, with the learned codes)."""

    def __init__(self, qgm: fx.GraphModule, units: Sequence[Block], layers: Mapping[str, Layer],
                 data: tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]],
                 cached: Mapping[str, tuple[Codes, tuple[float, float]]], budget: StepBudget,
                 store: UnitCache, learn: LearnFn, bar: Any) -> None:
        super().__init__(qgm)
        self.units = {u.name: u for u in units}
        self.runners = {u.name: BlockRunner(qgm, u) for u in units if u.residual}
        self.layers, (self.x_fp, self.y), self.cached = layers, data, cached
        self.budget, self.store, self.learn, self.bar = budget, store, learn, bar
        # each unit's input is kept until its last unit ran: the interpreter frees a value
        # after its last user, which for a fork can come before the block's output
        self.readers = Counter(u.input for u in units)
        self.stash: dict[str, torch.Tensor] = {}
        self.codes: Codes = {}
        self.errors: dict[str, tuple[float, float]] = {}

    def run_node(self, n: fx.Node) -> Any:
        unit = self.units.get(n.name)
        out = super().run_node(n) if unit is None else self._unit(unit)
        if n.name in self.readers:
            self.stash[n.name] = out.detach().clone()
        return out

    def _unit(self, unit: Block) -> torch.Tensor:
        self.readers[unit.input] -= 1
        x_q = self.stash[unit.input] if self.readers[unit.input] else self.stash.pop(unit.input)
        layers = [self.layers[k] for k in unit.layers]
        run = self.runners.get(unit.name)
        hit = self.cached.get(unit.name)
        if hit is None:
            steps, t0 = self.budget.steps(), time.perf_counter()
            with torch.enable_grad():
                codes, before, after = self.learn(unit, run, layers, x_q, self.x_fp[unit.name],
                                                  self.y[unit.name], steps, self.budget.opts,
                                                  unit_gen(self.budget.opts, unit))
            self.budget.done(unit.name, steps, time.perf_counter() - t0)
            hit = codes, (before, after)
            self.store.save(unit.name, *hit)
            self.bar.update(len(layers))
        for k in unit.layers:
            self.codes[k], self.errors[k] = hit[0][k], hit[1]
        with torch.no_grad():
            weights = {lay.name: hit[0][lay.name] * lay.scale for lay in layers}
            return run(x_q, weights) if run else layers[0].out(x_q, weights[unit.name])


@dataclass(frozen=True)
class UnitCache:
    """Finished units' codes under `folder` (None: no cache), for the run keyed `key`."""

    folder: Path | None
    key: str

    def load(self, unit: str) -> tuple[Codes, tuple[float, float]] | None:
        """The unit's (codes, errors) from an earlier run with the same key, or None."""
        if self.folder is None or not (path := self.folder / f"{unit}.pt").is_file():
            return None
        try:
            data = torch.load(path, weights_only=True)
            if data["key"] != self.key:
                return None
            return dict(data["codes"]), (float(data["errors"][0]), float(data["errors"][1]))
        except Exception as exc:  # noqa: BLE001 - a damaged file only costs a relearn
            log.warning("learned rounding: ignoring unreadable cache file %s (%s)", path, exc)
            return None

    def save(self, unit: str, codes: Codes, errors: tuple[float, float]) -> None:
        """Written atomically: an interrupted write leaves the old file or none, never half."""
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{unit}.pt"
        tmp = path.with_name(f".{unit}.{os.getpid()}.tmp")
        try:
            torch.save({"key": self.key, "codes": {k: v.detach().clone() for k, v in
                                                   codes.items()}, "errors": errors}, tmp)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
