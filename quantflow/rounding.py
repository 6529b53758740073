"""Learned rounding (AdaRound, Nagel et al. 2020) as an opt-in calibration stage.

Rounding each weight to the nearest grid point minimizes the weight error, not the layer's
output error. AdaRound learns, per weight, whether to round down or up:

    W̃ = s · clamp(⌊W/s⌋ + h(V), qmin, qmax),   h(V) = clip(σ(V)·(ζ − γ) + γ, 0, 1)

(ζ = 1.1, γ = −0.1: the rectified sigmoid reaches 0 and 1 exactly), minimizing, on the
calibration data,

    ‖ op(X, W̃) − op(X_fp, W) ‖²  +  λ · Σ (1 − |2h(V) − 1|^β)

where the regularizer (β annealed from 20 to 2 after a warm-up) pushes every h to 0 or 1.
The layer's input X is the QUANTIZED model's input to it (layers are learned in graph order,
each on the output of the layers already learned), mixed per element with the float input at
probability `qdrop` (QDrop, Wei et al. 2022: training on both keeps the learned rounding from
over-fitting the quantization noise of one calibration set). The target is the float layer's
output on the float input, so a layer also learns to undo the error its input carries.

The result is plain integer codes on the same grid (same scales) as round-to-nearest:
`quantize(..., rounding=codes)` uses them; artifacts and runtimes do not change. A learned
pair of codes that would break the kernels' int16 pair limit (quantflow.pair_limit) falls back
to the quantizer's own codes for that pair.

Cost: every weighted layer gets a share of `RoundingOptions.seconds` proportional to its
multiply-adds (at least `min_iters` steps); progress and ETA on stderr.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx
from tqdm import tqdm

from quantflow.ir import CONV_OPS, WEIGHTED_OPS, ConvArgs, get_tensor, is_const
from quantflow.pair_limit import pair_index, violations
from quantflow.spec import QSpec

log = logging.getLogger("quantflow.rounding")
qd = torch.ops.quantized_decomposed

#: rectified sigmoid stretch (AdaRound's values)
ZETA, GAMMA = 1.1, -0.1


@dataclass(frozen=True)
class RoundingOptions:
    """How long and how hard to learn (defaults: AdaRound's loss, a CPU-sized schedule)."""

    seconds: float = 300.0  # the whole stage's budget, shared by layers by their MACs
    min_iters: int = 50
    max_iters: int = 2000
    batch: int = 8
    samples: int = 64  # calibration samples learned on (inputs are kept for each layer)
    lr: float = 1e-2
    reg: float = 0.01  # λ
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2  # fraction of steps without the rounding regularizer
    qdrop: float = 0.5  # probability of an input element being the float value
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.seconds) and self.seconds > 0):
            raise ValueError(f"learned rounding: seconds must be > 0, got {self.seconds}")
        if not 0 <= self.qdrop <= 1:
            raise ValueError(f"learned rounding: qdrop must be in [0, 1], got {self.qdrop}")
        if not (1 <= self.min_iters <= self.max_iters and self.batch >= 1 and self.samples >= 1):
            raise ValueError("learned rounding: need 1 <= min_iters <= max_iters, batch >= 1, "
                             "samples >= 1")


def h(v: torch.Tensor) -> torch.Tensor:
    """AdaRound's rectified sigmoid: the learned fraction added to ⌊W/s⌋."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_v(frac: torch.Tensor) -> torch.Tensor:
    """V with h(V) = frac (the un-rounded fractional part): learning starts from the float."""
    p = ((frac - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


def round_reg(v: torch.Tensor, beta: float) -> torch.Tensor:
    """Σ 1 − |2h(V) − 1|^β: zero when every h is exactly 0 or 1."""
    return (1 - (2 * h(v) - 1).abs().pow(beta)).sum()


@dataclass(frozen=True)
class Layer:
    """One weighted layer as the reconstruction sees it: op(x, w) + b."""

    name: str
    w: torch.Tensor  # float weight
    b: torch.Tensor | None
    scale: torch.Tensor  # per output channel (broadcastable to w) or scalar
    qmin: int
    qmax: int
    op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def soft(self, v: torch.Tensor) -> torch.Tensor:
        base = torch.floor(self.w / self.scale)
        return torch.clamp(base + h(v), self.qmin, self.qmax) * self.scale

    def hard_codes(self, v: torch.Tensor) -> torch.Tensor:
        base = torch.floor(self.w / self.scale)
        return torch.clamp(base + (h(v) >= 0.5).to(base.dtype), self.qmin, self.qmax)

    def out(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        y = self.op(x, w)
        if self.b is None:
            return y
        return y + self.b.reshape([1, -1] + [1] * (y.dim() - 2))


def _op_of(n: fx.Node) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if n.target in CONV_OPS:
        a = ConvArgs.of(n)
        conv = F.conv2d if n.target == torch.ops.aten.conv2d.default else F.conv1d
        return lambda x, w: conv(x, w, None, a.stride, a.padding, a.dilation, a.groups)
    return lambda x, w: F.linear(x, w)


def learn_layer(layer: Layer, x_q: torch.Tensor, x_fp: torch.Tensor, y: torch.Tensor,
                iters: int, opts: RoundingOptions, gen: torch.Generator) -> tuple[
                    torch.Tensor, float, float]:
    """Learned codes of one layer; (codes, output MSE with nearest rounding, with learned)."""
    frac = layer.w / layer.scale - torch.floor(layer.w / layer.scale)
    v = init_v(frac).clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=opts.lr)
    n = x_q.shape[0]
    warm = int(opts.warmup * iters)
    for it in range(iters):
        idx = torch.randint(0, n, (min(opts.batch, n),), generator=gen)
        xq, xf = x_q[idx], x_fp[idx]
        if opts.qdrop > 0:
            keep_float = torch.rand(xq.shape, generator=gen) < opts.qdrop
            xq = torch.where(keep_float, xf, xq)
        loss = F.mse_loss(layer.out(xq, layer.soft(v)), y[idx], reduction="sum") / len(idx)
        if it >= warm:
            t = (it - warm) / max(1, iters - warm)
            beta = opts.beta[1] + (opts.beta[0] - opts.beta[1]) * (1 - t)
            loss = loss + opts.reg * round_reg(v, beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        codes = layer.hard_codes(v)
        nearest = torch.clamp(torch.round(layer.w / layer.scale), layer.qmin, layer.qmax)
        before = float(F.mse_loss(layer.out(x_q, nearest * layer.scale), y))
        after = float(F.mse_loss(layer.out(x_q, codes * layer.scale), y))
    return codes, before, after


class _Capture(fx.Interpreter):
    """Runs a graph and keeps the inputs (and float outputs) of the weighted layers."""

    def __init__(self, gm: fx.GraphModule, names: set[str], outputs: bool) -> None:
        super().__init__(gm)
        self.names, self.outputs = names, outputs
        self.inputs: dict[str, torch.Tensor] = {}
        self.results: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.names:
            x = self.env[n.args[0]] if isinstance(n.args[0], fx.Node) else None
            if x is not None:
                self.inputs[n.name] = x.detach().clone()
            if self.outputs:  # clone: in-place activations (relu_) would overwrite it
                self.results[n.name] = out.detach().clone()
        return out


class _Learn(fx.Interpreter):
    """Runs the quantized graph; at each layer to learn, learns its rounding on the input it
    sees (the quantized model's, layers before it already learned) and goes on with it."""

    def __init__(self, qgm: fx.GraphModule, layers: Mapping[str, Layer],
                 fp_in: Mapping[str, torch.Tensor], fp_out: Mapping[str, torch.Tensor],
                 budget: Mapping[str, int], opts: RoundingOptions, bar: Any) -> None:
        super().__init__(qgm)
        self.layers, self.fp_in, self.fp_out, self.budget = layers, fp_in, fp_out, budget
        self.opts, self.bar = opts, bar
        self.codes: dict[str, torch.Tensor] = {}
        self.errors: dict[str, tuple[float, float]] = {}
        self.gen = torch.Generator().manual_seed(opts.seed)

    def run_node(self, n: fx.Node) -> Any:
        if n.name not in self.layers or not isinstance(n.args[0], fx.Node):
            return super().run_node(n)
        layer = self.layers[n.name]
        x_q = self.env[n.args[0]].detach()
        with torch.enable_grad():
            codes, before, after = learn_layer(layer, x_q, self.fp_in[n.name],
                                               self.fp_out[n.name], self.budget[n.name],
                                               self.opts, self.gen)
        if after > before:  # learning lost on its own objective: keep nearest rounding
            codes = torch.clamp(torch.round(layer.w / layer.scale), layer.qmin, layer.qmax)
            after = before
        self.codes[n.name], self.errors[n.name] = codes, (before, after)
        self.bar.update(self.budget[n.name])
        with torch.no_grad():
            return layer.out(x_q, codes * layer.scale)


def _layers(qgm: fx.GraphModule, gm: fx.GraphModule) -> dict[str, Layer]:
    """The weighted layers of `qgm` with their float weight (from `gm`), bias and grid."""
    float_nodes = {n.name: n for n in gm.graph.nodes}
    out: dict[str, Layer] = {}
    for n in qgm.graph.nodes:
        if n.op != "call_function" or n.target not in WEIGHTED_OPS:
            continue
        dq = n.args[1]
        if not (isinstance(dq, fx.Node) and dq.target in (qd.dequantize_per_channel.default,
                                                           qd.dequantize_per_tensor.default)):
            continue  # a float layer: nothing to round
        fn = float_nodes.get(n.name)
        if fn is None or not is_const(fn.args[1]):
            continue
        w = get_tensor(gm, fn.args[1])
        assert w is not None
        b_node = n.args[2] if len(n.args) > 2 else None
        with torch.no_grad():
            b = _eval_const(qgm, b_node) if isinstance(b_node, fx.Node) else None
            if dq.target == qd.dequantize_per_channel.default:
                scale = _eval_const(qgm, dq.args[1]).reshape([-1] + [1] * (w.dim() - 1))
            else:
                scale = torch.tensor(float(dq.args[1]))  # type: ignore[arg-type]
        qmin, qmax = int(dq.args[-3]), int(dq.args[-2])  # type: ignore[arg-type]
        out[n.name] = Layer(n.name, w.detach().float(), b, scale.float(), qmin, qmax, _op_of(n))
    return out


def _eval_const(gm: fx.GraphModule, node: Any) -> torch.Tensor:
    """The value of a node computed from constants only (a bias' dequantize, a scale)."""
    env: dict[fx.Node, Any] = {}

    def ev(n: Any) -> Any:
        if not isinstance(n, fx.Node):
            return n
        if n not in env:
            if n.op == "get_attr":
                env[n] = get_tensor(gm, n)
            else:
                args = [ev(a) for a in n.args]
                env[n] = n.target(*args, **n.kwargs)  # type: ignore[operator]
        return env[n]

    return torch.as_tensor(ev(node)).float()


def use_learned(codes: torch.Tensor, learned: torch.Tensor, w: torch.Tensor,
                 scale: torch.Tensor, spec: QSpec, bound: int | None) -> torch.Tensor:
    """Learned codes where they are a rounding of w on this grid (⌊w/s⌋ or ⌈w/s⌉); with the
    pair limit, a pair the learned codes would break keeps the nearest codes."""
    if learned.shape != codes.shape:
        return codes
    axis = spec.axis if spec.granularity == "channel" else None
    u = w.double() / _along(scale.double(), w.dim(), axis)
    on_grid = (learned.double() >= torch.floor(u) - 1e-6) & (learned.double() <= torch.ceil(u)
                                                             + 1e-6)
    out = torch.where(on_grid, learned.double(), codes.double())
    if bound is not None:
        a, b = pair_index(tuple(w.shape))
        flat, keep = out.reshape(w.shape[0], -1), codes.double().reshape(w.shape[0], -1)
        bad = violations(flat, a, b, bound)
        flat[:, a] = torch.where(bad, keep[:, a], flat[:, a])
        flat[:, b] = torch.where(bad, keep[:, b], flat[:, b])
        out = flat.reshape(w.shape)
    return out


def _along(t: torch.Tensor, dim: int, axis: int | None) -> torch.Tensor:
    if axis is None:
        return t
    shape = [1] * dim
    shape[axis] = -1
    return t.reshape(shape)


@dataclass(frozen=True)
class RoundingResult:
    """Learned codes per layer, and each layer's output MSE with nearest vs learned rounding
    (on the calibration samples it learned from)."""

    codes: dict[str, torch.Tensor]
    errors: dict[str, tuple[float, float]]
    seconds: float

    def summary(self) -> dict[str, Any]:
        gain = {k: round(10 * math.log10(b / a), 3) if a > 0 and b > 0 else None
                for k, (b, a) in self.errors.items()}
        return {"layers": len(self.codes), "seconds": round(self.seconds, 1),
                "output_mse_gain_db": gain}


def learn_rounding(gm: fx.GraphModule, qgm: fx.GraphModule, x: torch.Tensor,
                   opts: RoundingOptions | None = None, progress: bool = True
                   ) -> RoundingResult:
    """Learn the rounding of every quantized weighted layer of `qgm` (the quantization of the
    float graph `gm`) on calibration inputs `x`."""
    opts = opts or RoundingOptions()
    t0 = time.perf_counter()
    layers = _layers(qgm, gm)
    x = x[:opts.samples]
    with torch.no_grad():
        cap = _Capture(gm, set(layers), outputs=True)
        cap.run(x)
    macs = {k: float(cap.results[k].numel()) * float(layers[k].w[0].numel()) for k in layers
            if k in cap.results}
    # every layer gets the same number of steps, as many as the budget allows: a step costs
    # about its layer's multiply-adds, timed on the costliest layer
    seconds_per_mac = _seconds_per_step(layers, cap, macs, opts) / max(macs.values())
    steps = int(opts.seconds / max(seconds_per_mac * sum(macs.values()), 1e-9))
    steps = max(opts.min_iters, min(opts.max_iters, steps))
    budget = dict.fromkeys(macs, steps)
    with tqdm(total=sum(budget.values()), desc="learned rounding", unit="step",
              disable=not progress, leave=False) as bar, torch.no_grad():
        learner = _Learn(qgm, {k: layers[k] for k in budget}, cap.inputs, cap.results, budget,
                         opts, bar)
        learner.run(x)
    return RoundingResult(learner.codes, learner.errors, time.perf_counter() - t0)


def _seconds_per_step(layers: Mapping[str, Layer], cap: _Capture,
                      macs: Mapping[str, float], opts: RoundingOptions) -> float:
    """Measured seconds of one learning step of the costliest layer."""
    name = max(macs, key=lambda k: macs[k])
    xi, y = cap.inputs[name], cap.results[name]
    probe = RoundingOptions(seconds=opts.seconds, min_iters=3, max_iters=3, batch=opts.batch)
    t0 = time.perf_counter()
    with torch.enable_grad():
        learn_layer(layers[name], xi, xi, y, 3, probe, torch.Generator().manual_seed(0))
    return max((time.perf_counter() - t0) / 3, 1e-6)
