"""Calibration: collect activation statistics over data with an fx Interpreter.

Two passes over the calibration batches, because a histogram needs a fixed range before the
first value arrives: pass 1 records each tensor's min/max, pass 2 histograms each tensor over
exactly that range. Range-from-statistics choices (min-max, percentile, entropy, MSE) live in
`quantflow.calibrators`; this module only observes.

Statistics are keyed by the fx node name of the tensor's producer (placeholders included), the
same key the quantizer uses for the Q/DQ pair it puts on that tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from quantflow.batch import rebatch
from quantflow.errors import InputError
from quantflow.progress import bar

aten = torch.ops.aten

HIST_BINS = 2048


@dataclass
class TensorStats:
    """Statistics of one activation tensor over the calibration set."""

    min: float
    max: float
    count: int = 0
    #: counts over [min, max] in HIST_BINS equal bins (float64), None if not collected
    hist: torch.Tensor | None = None
    #: per-channel sum over all other dims, float64; for bias correction. The channel is
    #: dim 1 (conv layout, (N, C)), or the last dim of a rank ≥ 3 tensor a linear reads
    #: (transformer activations (N, L, C)): the dim the consuming layer's weight contracts
    channel_sum: torch.Tensor | None = None
    #: per-channel sum of squares, float64; weighs weight errors by input power
    channel_sqsum: torch.Tensor | None = None
    #: per-channel max |x|, float64; how much range each channel needs (SmoothQuant)
    channel_absmax: torch.Tensor | None = None

    @property
    def channel_mean(self) -> torch.Tensor | None:
        """E[x] per channel (dim 1), or None for tensors of rank < 2."""
        if self.channel_sum is None:
            return None
        return self.channel_sum / (self.count / self.channel_sum.numel())

    @property
    def channel_sq_mean(self) -> torch.Tensor | None:
        """E[x²] per channel (dim 1), or None for tensors of rank < 2."""
        if self.channel_sqsum is None:
            return None
        return self.channel_sqsum / (self.count / self.channel_sqsum.numel())

    @property
    def bin_edges(self) -> torch.Tensor:
        assert self.hist is not None
        return torch.linspace(self.min, self.max, self.hist.numel() + 1, dtype=torch.float64)

    def to_dict(self) -> dict[str, Any]:
        return {"min": self.min, "max": self.max, "count": self.count}


def _is_float_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and v.is_floating_point()


class _NonFinite(InputError):
    """Raised inside fx.Interpreter, which appends the node's trace to an exception's args;
    the message is kept apart so the user sees one line."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _Observer(fx.Interpreter):
    """Runs the graph and records min/max (pass 1) or histograms (pass 2) of node outputs."""

    def __init__(self, gm: fx.GraphModule, watch: set[str], stats: dict[str, TensorStats],
                 histograms: bool) -> None:
        super().__init__(gm)
        self.watch = watch
        self.stats = stats
        self.histograms = histograms
        self.batch = ""  # which batch runs, for error messages

    def _check_range(self, n: fx.Node, lo: float, hi: float) -> None:
        """A NaN or Inf activation has no quantization range (histogram binning of it ends
        in index errors); name the node and batch instead. float32 cannot even hold the width
        of a range beyond ±1.7e38."""
        if math.isfinite(lo) and math.isfinite(hi) and hi - lo < 3.4e38:
            return
        what = "NaN or Inf values" if not (math.isfinite(lo) and math.isfinite(hi)) else \
            f"values from {lo:.3g} to {hi:.3g}, too wide a range for float32"
        raise _NonFinite(f"calibration: node {n.name!r} ({n.target}) produced {what} on "
                         f"{self.batch}; every input sample is finite, so the model computes "
                         "them (log or division of 0, overflow, corrupt weights); fix: check "
                         "the model and the data's preprocessing")


    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.watch and _is_float_tensor(out):
            t = out.detach()
            if not self.histograms:
                mn, mx = torch.aminmax(t)  # one pass over memory instead of two
                lo, hi = float(mn), float(mx)
                self._check_range(n, lo, hi)
                csum = sqsum = cmax = None
                if t.dim() >= 2:  # reduce in float64 without a float64 copy of the tensor
                    axis = _channel_axis(n, t.dim())
                    dims = [d for d in range(t.dim()) if d != axis]
                    csum = t.sum(dim=dims, dtype=torch.float64)
                    sqsum = t.square().sum(dim=dims, dtype=torch.float64)
                    cmax = t.abs().amax(dim=dims).double()
                s = self.stats.get(n.name)
                if s is None:
                    self.stats[n.name] = TensorStats(lo, hi, t.numel(), channel_sum=csum,
                                                     channel_sqsum=sqsum, channel_absmax=cmax)
                else:
                    s.min, s.max, s.count = min(s.min, lo), max(s.max, hi), s.count + t.numel()
                    if s.channel_sum is not None and csum is not None:
                        s.channel_sum = s.channel_sum + csum
                    if s.channel_sqsum is not None and sqsum is not None:
                        s.channel_sqsum = s.channel_sqsum + sqsum
                    if s.channel_absmax is not None and cmax is not None:
                        s.channel_absmax = torch.maximum(s.channel_absmax, cmax)
            else:
                s = self.stats[n.name]
                if s.max > s.min:
                    # float32 histc: counts are exact integers; only bin edges round
                    h = torch.histc(t.flatten(), HIST_BINS, s.min, s.max).double()
                else:  # constant tensor: everything in one bin
                    h = torch.zeros(HIST_BINS, dtype=torch.float64)
                    h[0] = t.numel()
                s.hist = h if s.hist is None else s.hist + h
        return out


def _channel_axis(n: fx.Node, rank: int) -> int:
    """The channel dim of `n`'s output: the one its consuming layer's weight contracts."""
    if rank >= 3 and any(u.op == "call_function" and u.target == aten.linear.default
                         and u.args[0] is n for u in n.users):
        return rank - 1
    return 1


def observable_nodes(gm: fx.GraphModule) -> set[str]:
    """Names of nodes whose outputs may be quantized: graph inputs and computed tensors."""
    return {n.name for n in gm.graph.nodes if n.op in ("placeholder", "call_function")}


def collect_stats(
    gm: fx.GraphModule,
    batches: Iterable[Sequence[torch.Tensor]] | Sequence[Sequence[torch.Tensor]],
    *,
    nodes: set[str] | None = None,
    histograms: bool = True,
    progress: bool = False,
) -> dict[str, TensorStats]:
    """Statistics for the outputs of `nodes` (default: every observable node).

    `batches` must be re-iterable (a list of input tuples) when `histograms` is True, since
    histogramming is a second pass over the same data. A graph with a static batch runs them
    re-split into chunks of that batch (`quantflow.batch.rebatch`).
    """
    batch_list = rebatch(gm, batches)
    if not batch_list:
        raise ValueError("collect_stats: no calibration batches (pass --calib DATA)")
    watch = observable_nodes(gm) if nodes is None else nodes
    stats: dict[str, TensorStats] = {}
    passes = [False, True] if histograms else [False]
    with torch.no_grad():
        for hist in passes:
            obs = _Observer(gm, watch, stats, histograms=hist)
            desc = "calibrate: histograms" if hist else "calibrate: ranges"
            start = 0
            for i, b in enumerate(bar(batch_list, desc, "batch", disable=not progress)):
                size = int(b[0].shape[0]) if b and b[0].dim() else 1
                obs.batch = f"calibration batch {i} (samples {start}..{start + size - 1})"
                start += size
                try:
                    obs.run(*b)
                except _NonFinite as exc:
                    raise InputError(exc.message) from None
    return stats


def batched(x: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor]]:
    """Split an (N, ...) tensor into single-input batches for `collect_stats`."""
    return [(x[i:i + batch_size],) for i in range(0, x.shape[0], batch_size)]
