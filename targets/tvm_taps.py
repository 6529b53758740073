"""Per-layer taps of a TVM artifact for the parity debugger (`quantflow debug`, the analyze
stage): the integer codes TVM computes for each quantized tensor.

A compiled TVM library returns only the model's outputs, and its fused kernels keep
intermediate tensors in registers, so the taps are taken from a twin: the same quantized
graph with the tapped quantize nodes added as outputs, imported by the same frontend
(tvm_frontend.to_relax, the same integer lowering and VNNI choice) and compiled for the same
target. Schedules (tuned or not) do not change integer results, so the twin's codes are the
artifact's; the extra outputs only stop some fusions. Host artifacts only: an aarch64 bundle
runs on the board (or under qemu), where this twin cannot be run from the analysis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import fx

from quantflow.targets.base import Artifact


def tapped_graph(qgm: fx.GraphModule, names: Sequence[str]) -> fx.GraphModule:
    """A copy of `qgm` whose output is (its outputs..., the nodes `names`...)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out_args: Any = None
    for n in qgm.graph.nodes:
        if n.op == "output":
            out_args = n.args[0]
            continue
        env[n] = graph.node_copy(n, lambda a: env[a])
    assert out_args is not None
    outs = tuple(out_args) if isinstance(out_args, (tuple, list)) else (out_args,)
    by_name = {n.name: env[n] for n in qgm.graph.nodes if n in env}
    mapped = tuple(fx.map_arg(o, lambda a: env[a]) for o in outs)
    graph.output(mapped + tuple(by_name[k] for k in names))
    return fx.GraphModule(qgm, graph)


def layer_codes(target: Any, artifact: Artifact, qgm: fx.GraphModule, names: Sequence[str],
                feeds: Sequence[Sequence[np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Codes of the quantized tensors `names` per run of `feeds`, computed by TVM (see the
    module docstring); `target` is the TVMTarget that built `artifact`."""
    import tvm
    from tvm import relax

    from quantflow.targets import tvm_records, tvm_tune
    from quantflow.targets.tvm_frontend import to_relax

    if not artifact.meta.get("layer_taps", True):
        raise ValueError(f"tvm taps: {artifact.path} is not a host artifact")
    example = [torch.from_numpy(np.ascontiguousarray(x)) for x in feeds[0]]
    gm = tapped_graph(qgm, names)
    host = target.target()
    dot = target.dot_path(host)
    mod, _ = to_relax(gm, example, dot=dot)
    # the default schedules (no tuning records: the taps change the kernels' workloads)
    mod, _ = tvm_records.apply(tvm_tune.fuse_tir(tvm_tune.fuse(mod, host), host), host, [], dot)
    vm = relax.VirtualMachine(tvm.compile(mod, host), tvm.cpu())
    n_out = len(artifact.output_names)
    results = []
    for xs in feeds:
        outs = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(x)) for x in xs])
        values = [outs[i].numpy() for i in range(len(outs))]
        results.append(dict(zip(names, values[n_out:])))
    return results
