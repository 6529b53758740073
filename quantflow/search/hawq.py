"""HAWQ layer sensitivity: Hessian traces by Hutchinson's estimator, on the fx graph.

Second-order model of the loss around the float weights W (gradient ≈ 0 at a trained model):

    ΔL ≈ ½ Σ_i H_ii ε_i²   for a small perturbation ε of the parameters.

HAWQ-V2/V3 replace the diagonal by its average over a layer, Tr(H_l)/n_l, which gives the
sensitivity of quantizing layer l's weights

    Ω_w(l, spec) = ½ · Tr(H_l)/n_l · ‖Q(W_l) − W_l‖².

Activations are treated the same way: quantizing the input x_l of layer l adds noise of
variance s²/12 per element (uniform rounding error, step s from the calibrated range), so

    Ω_a(l, spec) = ½ · Tr(H_{x_l}) · s²/12,

where H_{x_l} is the Hessian of the loss w.r.t. a perturbation δ_l added to that input (the
trace is summed over all calibration elements). This term is what tells W8A16 from W8A8.

Hutchinson: for Rademacher v (±1 entries), E[vᵀHv] = Tr(H). Drawing one v over ALL variables
(every layer's weight and input perturbation) and reading off the per-block products
v_lᵀ(Hv)_l gives unbiased estimates of every block trace Tr(H_ll) from ONE Hessian-vector
product per draw, but the off-diagonal blocks then add zero-mean noise that dominates on
small layers. So on small graphs each block gets its own product
(H v_l)_l = ∂(∇_l L · v_l)/∂θ_l, all from ONE first-order graph built with create_graph (one
forward + one backward, then one extra backward per block); on deep graphs the 2L extra
backward passes cost more than the variance they save, and the joint product is used
(`per_block`). Iterations stop when every trace's standard error is below
`rel_tol` of its magnitude (or at `max_iter`, reported as not converged).

Loss: cross-entropy with labels (the model's own training loss), or without labels the KL
divergence from the float model's own predictions, KL(p_fp32 ‖ p_θ), whose Hessian at θ = W is
the Fisher/Gauss-Newton matrix of the output distribution.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx

from quantflow.ir import WEIGHTED_OPS, is_op
from quantflow.progress import bar as progress_bar
from quantflow.qmath import fake_quant_weight, qparams_from_range
from quantflow.search.options import TraceOptions
from quantflow.spec import LayerPlan, QSpec

log = logging.getLogger("quantflow.search")


@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson estimate of one Hessian block trace, with its standard error."""

    trace: float
    stderr: float
    numel: int

    @property
    def mean_diag(self) -> float:
        """Tr(H)/n: the average curvature per element (HAWQ's per-layer sensitivity)."""
        return self.trace / max(self.numel, 1)


@dataclass
class HessianTraces:
    """Per-layer traces w.r.t. weights and w.r.t. input activations (keyed by node name)."""

    weight: dict[str, TraceEstimate]
    act: dict[str, TraceEstimate]
    #: observed min/max of each layer's input over the calibration data
    act_range: dict[str, tuple[float, float]]
    iterations: int
    converged: bool
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "iterations": self.iterations, "converged": self.converged,
            "layers": {n: {"weight_trace": self.weight[n].trace,
                           "weight_trace_stderr": self.weight[n].stderr,
                           "weight_numel": self.weight[n].numel,
                           "act_trace": self.act[n].trace,
                           "act_trace_stderr": self.act[n].stderr,
                           "act_range": list(self.act_range[n])} for n in self.weight},
        }


def layer_weights(gm: fx.GraphModule) -> dict[str, str]:
    """conv/linear node name -> get_attr target of its weight, in graph order."""
    out: dict[str, str] = {}
    for n in gm.graph.nodes:
        if is_op(n, WEIGHTED_OPS):
            w = n.args[1]
            if isinstance(w, fx.Node) and w.op == "get_attr":
                out[n.name] = str(w.target)
            else:
                log.debug("hawq: skipping %s, its weight is computed (%s), not a constant",
                          n.name, getattr(w, "op", type(w).__name__))
    return out


class _Perturbed(fx.Interpreter):
    """Runs the graph with substituted weights and with δ added to each layer's input.

    With `record`, also notes each layer input's (min, max, shape) there.
    """

    def __init__(self, gm: fx.GraphModule, weights: dict[str, torch.Tensor],
                 deltas: dict[str, torch.Tensor] | None = None,
                 record: dict[str, tuple[float, float, torch.Size]] | None = None) -> None:
        super().__init__(gm)
        self.weights, self.deltas, self.record = weights, deltas, record

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target in self.weights:
            return self.weights[target]
        return super().get_attr(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        wants_delta = self.deltas is not None and n.name in self.deltas
        if not (wants_delta or (self.record is not None and is_op(n, WEIGHTED_OPS))):
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        x = args[0]
        if self.record is not None:
            self.record[n.name] = (float(x.detach().min()), float(x.detach().max()), x.shape)
        if wants_delta:
            assert self.deltas is not None
            x = x + self.deltas[n.name]
        return n.target(x, *args[1:], **kwargs)  # type: ignore[operator]


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class GraphLoss:
    """L(weights, deltas) on batch b: the model's loss as a function of the HAWQ variables.

    Loss is cross-entropy when `labels` is given, else KL(p_fp32 ‖ p). Batches are weighted by
    their size so the total is the mean over all calibration samples.
    """

    def __init__(self, gm: fx.GraphModule, batches: Sequence[Sequence[torch.Tensor]],
                 labels: Sequence[torch.Tensor] | None = None) -> None:
        self.gm = gm
        self.batches = [tuple(b) for b in batches]
        if not self.batches:
            raise ValueError("hawq: no calibration batches")
        if labels is not None and len(labels) != len(self.batches):
            raise ValueError(f"hawq: {len(labels)} label tensors for {len(self.batches)} batches")
        self.labels = list(labels) if labels is not None else None
        self.layer_weight = layer_weights(gm)
        sizes = [b[0].shape[0] for b in self.batches]
        self.batch_weight = [s / sum(sizes) for s in sizes]
        self.ranges: dict[str, tuple[float, float]] = {}
        self.input_shapes: list[dict[str, torch.Size]] = []
        self.targets: list[torch.Tensor] = []
        with torch.no_grad():  # float reference outputs, input ranges and shapes
            for i, b in enumerate(self.batches):
                rec: dict[str, tuple[float, float, torch.Size]] = {}
                logits = _first(_Perturbed(gm, {}, None, rec).run(*b))
                self.targets.append(self.labels[i] if self.labels is not None
                                    else F.log_softmax(logits, dim=-1))
                for k, (lo, hi, _) in rec.items():
                    old = self.ranges.get(k, (lo, hi))
                    self.ranges[k] = (min(old[0], lo), max(old[1], hi))
                self.input_shapes.append({k: v[2] for k, v in rec.items()})

    def float_weights(self) -> dict[str, torch.Tensor]:
        """Layer name -> a detached copy of its float weight."""
        out = {}
        for layer, target in self.layer_weight.items():
            obj: Any = self.gm
            for part in target.split("."):
                obj = getattr(obj, part)
            out[layer] = obj.detach().clone()
        return out

    def __call__(self, weights: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor] | None,
                 b: int) -> torch.Tensor:
        by_target = {self.layer_weight[k]: v for k, v in weights.items()}
        logits = _first(_Perturbed(self.gm, by_target, deltas).run(*self.batches[b]))
        if self.labels is not None:
            return F.cross_entropy(logits, self.targets[b])
        return F.kl_div(F.log_softmax(logits, dim=-1), self.targets[b], log_target=True,
                        reduction="batchmean")


def draw_seed(seed: int, i: int) -> int:
    """Draw i's own generator seed: draws are independent tasks (search/workers.py), so the
    i-th draw is the same whichever process makes it and whatever came before."""
    return (seed * 1_000_003 + i) % 2**63


def one_draw(loss: GraphLoss, i: int, *, seed: int, activations: bool, per_block: bool
             ) -> dict[tuple[str, str], float]:
    """Hutchinson draw number `i`: v_lᵀ(Hv)_l for every block (("w"|"a", layer) -> value),
    summed over the batches with their weights, in batch order."""
    w0 = loss.float_weights()
    layers = list(w0)
    gen = torch.Generator().manual_seed(draw_seed(seed, i))
    vw = {n: _rademacher(w0[n].shape, w0[n].dtype, gen) for n in layers}
    est = {(k, n): 0.0 for n in layers for k in ("w", "a")}
    for b, bw in enumerate(loss.batch_weight):
        weights = {n: w0[n].clone().requires_grad_(True) for n in layers}
        dtype = w0[layers[0]].dtype
        deltas = ({n: torch.zeros(loss.input_shapes[b][n], dtype=dtype, requires_grad=True)
                   for n in layers} if activations else None)
        va = ({n: _rademacher(loss.input_shapes[b][n], dtype, gen) for n in layers}
              if activations else {})
        variables = [weights[n] for n in layers] + ([deltas[n] for n in layers]
                                                    if deltas is not None else [])
        vectors = [vw[n] for n in layers] + [va[n] for n in layers if activations]
        value = loss(weights, deltas, b)
        grads = torch.autograd.grad(value, variables, create_graph=True)
        names = [("w", n) for n in layers] + [("a", n) for n in layers if activations]
        if per_block:
            # one product per block, (H v_l)_l = ∂(g_l · v_l)/∂θ_l: no cross-block noise
            for (kind, n), g, v, var in zip(names, grads, vectors, variables):
                if not g.requires_grad:  # the loss is linear in this variable: H_ll = 0
                    continue
                (hv,) = torch.autograd.grad((g * v).sum(), var, retain_graph=True,
                                            allow_unused=True)
                est[(kind, n)] += bw * _dot(hv, v)
        else:  # one joint product, read block by block
            gv = torch.stack([(g * v).sum() for g, v in zip(grads, vectors)
                              if g.requires_grad]).sum()
            hvs = torch.autograd.grad(gv, variables, allow_unused=True)
            for key, hv, v in zip(names, hvs, vectors):
                est[key] += bw * _dot(hv, v)
    return est


def uses_per_block(n_layers: int, options: TraceOptions) -> bool:
    """`options.per_block`, by default per block up to 8 layers (`hutchinson_traces`)."""
    return n_layers <= 8 if options.per_block is None else options.per_block


#: draws(indices) -> each draw's `one_draw` result, in the order asked (search/workers.py)
Draws = Callable[[Sequence[int]], Iterable[dict[tuple[str, str], float]]]


def hutchinson_traces(gm: fx.GraphModule, batches: Sequence[Sequence[torch.Tensor]],
                      labels: Sequence[torch.Tensor] | None = None, *,
                      options: TraceOptions | None = None, seed: int = 0,
                      progress: bool = False, draws: Draws | None = None,
                      parallel: int = 1) -> HessianTraces:
    """Per-layer Hessian traces (weights and, if `options.activations`, layer inputs) by
    Hutchinson, with the stopping rule and estimator of `options` (default `TraceOptions()`).

    Stops when every trace has stderr ≤ rel_tol · max(|trace|, abs_floor · largest |trace| of
    its kind) (after `min_iter` draws), or after `max_iter` draws or `max_seconds` (checked
    after `min_iter` draws) with `converged=False` and the achieved error in the log.
    Runs in the graph's dtype (use fp64 to verify).

    per_block: one Hessian-vector product per block (low variance, 2L extra backward passes
    per draw) or one joint product (one backward, cross-block noise). Default: per block up
    to 8 layers; beyond that the joint product's many cheap draws win per unit of time
    (MobileNetV2, 35 layers: ~1 s vs ~30 s per draw on 2 CPU cores).

    draws / parallel: where the draws run (search/workers.py `hessian_draw`), `parallel` of
    them asked at once. Each draw has its own seed and the stopping rule reads them in draw
    order, so the traces do not depend on `parallel` (draws past the stopping point are
    dropped), unless the `max_seconds` wall-clock cap stops them.
    """
    opt = options or TraceOptions()
    rel_tol, max_iter, min_iter = opt.rel_tol, opt.max_iter, opt.min_iter
    abs_floor, activations, max_seconds = opt.abs_floor, opt.activations, opt.max_seconds
    loss = GraphLoss(gm, batches, labels)
    layers = list(loss.layer_weight)
    if not layers:
        raise ValueError("hawq: the graph has no conv/linear layer with a constant weight")
    block = uses_per_block(len(layers), opt)
    if draws is None:
        def draws(idx: Sequence[int]) -> Iterator[dict[tuple[str, str], float]]:
            return (one_draw(loss, i, seed=seed, activations=activations, per_block=block)
                    for i in idx)
    samples: dict[tuple[str, str], list[float]] = {(k, n): [] for n in layers
                                                   for k in ("w", "a")}
    history: list[dict[str, float]] = []
    converged = False
    it = 0
    bar = progress_bar(max_iter, "hawq: Hutchinson draws", "draw", disable=not progress)
    start = time.perf_counter()
    worst = math.inf
    stop = False
    while it < max_iter and not stop:
        for est in draws(range(it, min(max_iter, it + max(1, parallel)))):
            it += 1
            for key, val in est.items():
                samples[key].append(val)
            stats = {key: _mean_stderr(v) for key, v in samples.items()
                     if activations or key[0] == "w"}
            history.append({f"{k}:{n}": m for (k, n), (m, _) in stats.items()})
            # a trace far below the largest of its kind needs no relative precision of its
            # own: its layers' sensitivity is negligible either way (and a trace ≈ 0 never
            # converges)
            floor = {kind: abs_floor * max(abs(m) for (k, _), (m, _) in stats.items()
                                           if k == kind)
                     for kind in {k for k, _ in stats}}
            worst = max(se / max(abs(m), floor[k], 1e-300) for (k, _), (m, se) in stats.items())
            bar.update(1)
            bar.set_postfix(worst_rel_stderr=f"{worst:.3g}", target=rel_tol)
            if it >= min_iter and worst <= rel_tol:
                converged = stop = True
            elif it >= min_iter and max_seconds is not None \
                    and time.perf_counter() - start > max_seconds:
                stop = True
            if stop:
                break
    bar.close()
    if not converged:
        log.warning("hawq: Hessian traces did not converge to rel_tol=%g in %d draws (%.0f s; "
                    "worst relative stderr %.3g); using the current estimates (raise max_iter "
                    "or the time budget for tighter ones)", rel_tol, it,
                    time.perf_counter() - start, worst)

    def _est(kind: str, n: str, numel: int) -> TraceEstimate:
        m, se = _mean_stderr(samples[(kind, n)]) if samples[(kind, n)] else (0.0, 0.0)
        return TraceEstimate(m, se, numel)

    w0 = loss.float_weights()
    act_numel = {n: sum(int(math.prod(s[n])) for s in loss.input_shapes) for n in layers}
    return HessianTraces(
        weight={n: _est("w", n, w0[n].numel()) for n in layers},
        act={n: _est("a", n, act_numel[n]) for n in layers},
        act_range=dict(loss.ranges), iterations=it, converged=converged, history=history)


def _rademacher(shape: torch.Size, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return (torch.randint(0, 2, shape, generator=gen) * 2 - 1).to(dtype)


def _dot(hv: torch.Tensor | None, v: torch.Tensor) -> float:
    return 0.0 if hv is None else float((hv.detach() * v).sum())


def _mean_stderr(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs, dtype=np.float64)
    if a.size < 2:
        return float(a.mean()), float("inf")
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(a.size))


# --------------------------------------------------------------------------- sensitivities


def weight_sensitivity(trace: TraceEstimate, w: torch.Tensor, spec: QSpec | None) -> float:
    """Ω_w = ½ · Tr(H)/n · ‖Q(W) − W‖² (0 when the weight stays float)."""
    if spec is None:
        return 0.0
    err = (fake_quant_weight(w.double(), spec) - w.double()).pow(2).sum()
    return 0.5 * trace.mean_diag * float(err)


def act_sensitivity(trace: TraceEstimate, lo: float, hi: float, spec: QSpec | None) -> float:
    """Ω_a = ½ · Tr(H_x) · s²/12 with s the quantization step of the range [lo, hi]."""
    if spec is None:
        return 0.0
    scale, _ = qparams_from_range(torch.tensor(lo), torch.tensor(hi), spec)
    return 0.5 * trace.trace * float(scale) ** 2 / 12.0


def sensitivity_table(gm: fx.GraphModule, traces: HessianTraces,
                      options: Sequence[LayerPlan]) -> tuple[list[str], np.ndarray]:
    """Ω[l, k] for every traced layer l and option k (the objective of `allocate`).

    Negative trace estimates (noise on nearly flat layers) are clipped to 0: a layer cannot
    gain from quantization noise in the second-order model.
    """
    weights = {n: t for n, t in layer_weights(gm).items() if n in traces.weight}
    layers = list(weights)
    table = np.zeros((len(layers), len(options)))
    for i, n in enumerate(layers):
        obj: Any = gm
        for part in weights[n].split("."):
            obj = getattr(obj, part)
        wt = max(traces.weight[n].trace, 0.0)
        at = max(traces.act[n].trace, 0.0)
        lo, hi = traces.act_range[n]
        for k, opt in enumerate(options):
            table[i, k] = (weight_sensitivity(TraceEstimate(wt, 0.0, traces.weight[n].numel),
                                              obj.detach(), opt.weight)
                           + act_sensitivity(TraceEstimate(at, 0.0, traces.act[n].numel),
                                             lo, hi, opt.act))
    return layers, table
