"""Shared proof for graph passes, used by every pass test.

`check_pass` asserts the four properties every pass must have: it reports a change when it
makes one, the graph still lints, outputs equal the original within an explicit tolerance, and
a second run changes nothing (fixpoint).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import fx, nn

from quantflow.ir import capture

#: fp32 equivalence: max|Δ| ≤ FP32_REL · max|y| (+ a tiny absolute floor for all-zero outputs)
FP32_REL = 1e-5
FP64_REL = 1e-12


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a-b| / max|b|, the error measure of the pass contract."""
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / max(scale, 1e-30)


def check_pass(
    pass_fn: Callable[[fx.GraphModule], bool],
    model: nn.Module | fx.GraphModule,
    inputs: Sequence[torch.Tensor],
    *,
    expect_change: bool = True,
    rel_tol: float | None = None,
) -> fx.GraphModule:
    """Apply `pass_fn` to the captured `model` and prove it output-equivalent.

    Runs in the dtype of `inputs` (use float64 models/inputs for the tight check).
    Returns the transformed GraphModule for further structural assertions.
    """
    if rel_tol is None:
        rel_tol = FP64_REL if inputs[0].dtype == torch.float64 else FP32_REL
    gm = model if isinstance(model, fx.GraphModule) else capture(model, inputs)
    reference = copy.deepcopy(gm)
    with torch.no_grad():
        want = reference(*inputs)
    changed = pass_fn(gm)
    assert changed == expect_change, f"{pass_fn.__name__} returned changed={changed}"
    gm.graph.lint()
    gm.recompile()
    with torch.no_grad():
        got = gm(*inputs)
    want_t = want[0] if isinstance(want, (tuple, list)) else want
    got_t = got[0] if isinstance(got, (tuple, list)) else got
    err = max_rel_err(got_t, want_t)
    assert err <= rel_tol, f"{pass_fn.__name__}: max|Δ|/max|y| = {err:.3e} > {rel_tol:.0e}"
    assert not pass_fn(gm), f"{pass_fn.__name__} is not idempotent: a second run changed the graph"
    return gm


def output_step(qgm: fx.GraphModule) -> float:
    """One output step of a quantized graph: its output's quantization step, or for a float
    linear output (the ORT/TVM placement leaves an output nobody reads quantized float) what
    one step of the linear's input moves it, s_x·max|w|. The unit "within one step of the
    simulation" is measured in."""
    from quantflow.ir import get_tensor

    out = next(n for n in qgm.graph.nodes if n.op == "output").args[0]
    dq = out[0] if isinstance(out, (tuple, list)) else out
    if dq.target != torch.ops.aten.linear.default:
        return float(dq.args[1])
    x_dq, w_dq = dq.args[0], dq.args[1]
    w_int, w_scale = get_tensor(qgm, w_dq.args[0]), get_tensor(qgm, w_dq.args[1])
    assert w_int is not None and w_scale is not None
    w_max = float((w_int.float().abs() * w_scale[:, None]).max())
    return float(x_dq.args[1]) * w_max


def aten_op_counts(gm: fx.GraphModule) -> dict[str, int]:
    """ATen op -> how many nodes call it, keyed with the overload ("matmul.default")."""
    out: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and hasattr(n.target, "_schema"):
            key = str(n.target).removeprefix("aten.")
            out[key] = out.get(key, 0) + 1
    return out
