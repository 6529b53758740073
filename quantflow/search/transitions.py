"""Q/DQ transitions: the time a mixed plan pays where int8 and float layers meet.

On ONNX Runtime, W8A8 and W4A8 layers run as QLinearConv / QLinearMatMul: uint8 in, uint8 out,
so a chain of them passes integer tensors with nothing in between. FP32 layers, and W8A16
ones (ORT has no int16 conv: DQ → float conv → Q16), compute in float. Where a tensor goes
from one domain to the other the runtime adds a QuantizeLinear or DequantizeLinear over the
whole tensor. The per-layer latency tables are measured on uniform plans, where no such
crossing exists, so they cannot see it: if crossings cost time, a candidate that alternates
int8 and float layers would be priced too low.

Model: predicted(c) = Σ_l table[l, c_l] + rest + τ · Σ_{edges (i, j): domain(c_i) ≠ domain(c_j)}
numel(i → j) / 1000, where an edge links a layer to the nearest layers feeding its input
(through activations, adds, pools) and numel is the element count of that input. τ (ms per
1000 crossing elements) is measured with the tables: the two alternating plans (int8 on even
layers / float on odd, and the reverse) are profiled like the uniform ones and τ is what their
excess over the table, summed, costs per crossing element (floored at 0). W8A16 ↔ FP32 edges
also pay a Q16/DQ16 pair; the two-domain model ignores that (W8A16 rarely pays on ORT).

Measured on ONNX Runtime (x86, batch 1; `tools/bench_search.py`, docs/benchmarks.md): τ = 0
for resnet_fmnist and mobilenetv2_fmnist (and ImageNet MobileNetV2 in a one-off check). The
alternating plans run FASTER than the uniform-plan tables predict (they come out about as fast
as uniform W8A8): the Q/DQ at a crossing is cheap next to a conv, and float convs inside a mixed
plan cost far less than in the uniform FP32 plan the table measured them in. τ is floored at
0 rather than allowed to reward switches; the end-to-end check (`validate.py`) stays the
arbiter of latency limits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from quantflow.batch import run_size
from quantflow.ir import is_const
from quantflow.quantize import reads_quantized
from quantflow.search.space import int8_mask


@dataclass(frozen=True)
class Edges:
    """Where domains can meet. pairs: [E, 3] int64 rows (i, j, numel): layer i feeds layer
    j's input of numel elements. fixed: [L] elements that cross when layer l computes in
    float, from edges between l and the quantized non-layer ops (adds, pools, concats) that
    run int8 whatever the layers do."""

    pairs: np.ndarray
    fixed: np.ndarray

    def crossing_kelems(self, choice: Sequence[str]) -> float:
        """Thousands of elements that cross between domains under a per-layer `choice`."""
        d = int8_mask(choice)
        total = float(self.fixed[~d].sum())
        if len(self.pairs):
            cross = d[self.pairs[:, 0]] != d[self.pairs[:, 1]]
            total += float(self.pairs[cross, 2].sum())
        return total / 1000.0


def layer_edges(gm: fx.GraphModule, layers: Sequence[str],
                example_inputs: Sequence[torch.Tensor], placement: str = "ort") -> Edges:
    """The domain edges of `gm` (see `Edges`).

    Every layer and every quantized non-layer op walks its activation inputs back through
    unquantized nodes (activations, reshapes) to the nearest quantized producers; graph
    inputs and constants end a walk.
    """
    g = fx.GraphModule(gm, gm.graph)  # ShapeProp writes meta: keep it off the caller's graph
    rows = run_size(gm, 1)  # one sample, or a static-batch graph's batch (counted per sample)
    ShapeProp(g).propagate(*[t[:rows] for t in example_inputs])
    index = {n: i for i, n in enumerate(layers)}
    pairs: list[tuple[int, int, int]] = []
    fixed = np.zeros(len(layers), dtype=np.int64)
    for consumer in g.graph.nodes:
        if consumer.name not in index and not reads_quantized(consumer, placement):
            continue
        for x in consumer.all_input_nodes:
            if is_const(x):
                continue
            meta = x.meta.get("tensor_meta")
            numel = int(np.prod(meta.shape)) // rows if hasattr(meta, "shape") else 0
            seen: set[str] = set()
            stack = [x]
            while stack:
                n = stack.pop()
                if n.name in seen:
                    continue
                seen.add(n.name)
                if n.name in index:  # a layer produces it
                    if consumer.name in index:
                        pairs.append((index[n.name], index[consumer.name], numel))
                    else:
                        fixed[index[n.name]] += numel
                elif reads_quantized(n, placement):  # an always-int8 op produces it
                    if consumer.name in index:
                        fixed[index[consumer.name]] += numel
                elif n.op == "call_function":
                    stack.extend(a for a in n.all_input_nodes if not is_const(a))
    return Edges(np.asarray(pairs, dtype=np.int64).reshape(-1, 3), fixed)


def alternating(layers: Sequence[str], int8: str = "W8A8", flt: str = "FP32"
                ) -> list[dict[str, str]]:
    """The two plans that put a domain switch on every chain edge."""
    return [{n: (int8 if (i + parity) % 2 == 0 else flt) for i, n in enumerate(layers)}
            for parity in (0, 1)]
