"""Placement: which tensors of a float graph get a Q/DQ pair, per target (policy only;
`quantflow.quantize` applies it).

- "ort": every input and output of a quantized op (conv, linear, matmul, add, cat, pools) — the
  tensor-level scheme onnxruntime's QDQ fusions need (DQ→Conv→Q becomes QLinearConv; a conv
  without Q after it stays float). Two exceptions where the int8 tensor would only add error
  (`_read_quantized`): a linear/matmul output nobody reads quantized stays float (onnxruntime
  runs DQ→MatMul/Gemm as an integer kernel with float output), and an add nobody reads
  quantized (a transformer's residual add before LayerNorm, the attention-mask add before
  softmax) stays float with float inputs. A conv's output is taken after a following
  ReLU/ReLU6/clamp that is its only user, so the activation folds into the quantization range (ORT then drops it).
  Data-movement ops (flatten, reshape, ...) see identical values before and after, so a pair on
  each side gets identical parameters and ORT drops the redundant one.
- "trt": TensorRT's recommendation: inputs of weighted ops and of the attention matmuls
  (Q, K, V and softmax's output, its MHA rule) and both inputs of residual adds that a
  quantized op reads (CNNs; a transformer's residual add before LayerNorm stays float, as for
  ORT); never the outputs of weighted ops (TensorRT fuses the following Q into the kernel).

A tensor read by several quantized consumers gets one pair, with the spec of the consumer that
asks for the most bits. A float layer (LayerPlan with act=None) reading a tensor that a sibling
quantizes sees the quantized values; its own output stays float.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from quantflow.ir import WEIGHTED_OPS, is_const, is_op
from quantflow.spec import ORT_ACT, ORT_WEIGHT, KernelRules, LayerPlan, QSpec, QuantPlan

aten = torch.ops.aten

MATMUL_OPS = (aten.matmul.default, aten.bmm.default, aten.mm.default)
ADD_OPS = (aten.add.Tensor,)
CAT_OPS = (aten.cat.default,)
POOL_OPS = (aten.adaptive_avg_pool2d.default, aten.avg_pool2d.default, aten.mean.dim,
            aten.max_pool2d.default, aten.adaptive_avg_pool3d.default, aten.avg_pool3d.default,
            aten.max_pool3d.default, aten.adaptive_avg_pool1d.default, aten.avg_pool1d.default,
            aten.max_pool1d.default)
#: activations that fold into the output quantization range of the op before them
FUSED_ACTS = (aten.relu.default, aten.relu_.default, aten.hardtanh.default,
              aten.hardtanh_.default, aten.clamp.default, aten.relu6.default)
#: ops whose output values are a subset of their input's: the output re-uses the input's
#: quantization parameters (exact, and onnxruntime then keeps e.g. MaxPool in uint8)
VALUE_PRESERVING = (aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default,
                    aten.flatten.using_ints, aten.view.default, aten.reshape.default,
                    aten.permute.default, aten.transpose.int, aten.squeeze.dim,
                    aten.unsqueeze.default)
#: ORT placement: ops whose output stays float unless a quantized op reads it (_read_quantized)
FLOAT_OUTPUT_OPS = (aten.linear.default, *MATMUL_OPS)
PLACEMENTS = ("ort", "trt")


def _activation_inputs(n: fx.Node, placement: str | KernelRules) -> list[fx.Node]:
    """The tensor inputs of `n` that a quantized `n` reads quantized (empty: not a q-op)."""
    placement = KernelRules.of(placement).placement
    def tensors(args: Any) -> list[fx.Node]:
        return [a for a in args if isinstance(a, fx.Node) and not is_const(a)]

    if is_op(n, WEIGHTED_OPS) and is_const(n.args[1]):
        return tensors(n.args[:1])
    if is_op(n, MATMUL_OPS):
        return tensors(n.args[:2])
    if is_op(n, ADD_OPS) and len(tensors(n.args[:2])) == 2:
        return tensors(n.args[:2])
    if placement == "ort":
        if is_op(n, CAT_OPS):
            return tensors(n.args[0])
        if is_op(n, POOL_OPS):
            return tensors(n.args[:1])
    return []


def reads_quantized(n: fx.Node, placement: str | KernelRules = "ort") -> bool:
    """Whether a quantized plan makes `n` read quantized inputs (a layer, add, pool, ...)."""
    return bool(_activation_inputs(n, placement))


def _output_tensor(n: fx.Node) -> fx.Node:
    """The tensor that represents `n`'s output: after a fused activation that is its only user."""
    users = list(n.users)
    if len(users) == 1 and is_op(users[0], FUSED_ACTS) and users[0].args[0] is n:
        act = users[0]
        if act.target in (aten.hardtanh.default, aten.hardtanh_.default, aten.clamp.default):
            lo = act.args[1] if len(act.args) > 1 else act.kwargs.get("min")
            if not isinstance(lo, (int, float)) or float(lo) != 0.0:
                return n  # a clamp that is not ReLU-like does not fold into uint8 [0, max]
        return act
    return n

def plan_tensors(gm: fx.GraphModule, plan: QuantPlan, placement: str | KernelRules = "ort"
                 ) -> dict[str, QSpec]:
    """Which tensors (producer node names) get a Q/DQ pair, and with which spec."""
    placement = KernelRules.of(placement).placement
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    wanted: dict[str, QSpec] = {}

    def want(t: fx.Node, spec: QSpec) -> None:
        cur = wanted.get(t.name)
        if cur is None or spec.bits > cur.bits:
            wanted[t.name] = spec

    read_q = _read_quantized(gm, placement)
    for n in gm.graph.nodes:
        inputs = _activation_inputs(n, placement)
        if not inputs:
            continue
        lp = plan.for_node(n.name)
        if lp.act is None:
            continue
        if is_op(n, ADD_OPS) and n.name not in read_q and (
                placement == "ort" or _only_float_readers(n)):
            continue  # a float add: its inputs need no quantization either
        for t in inputs:
            want(t, lp.act)
        if placement == "ort":
            out = _output_tensor(n)
            if not is_op(n, FLOAT_OUTPUT_OPS) or out.name in read_q:
                want(out, lp.act)
    return wanted


#: ops with no int8 kernel on any target, whose input a residual add may feed (transformers)
FLOAT_ONLY_OPS = (aten.layer_norm.default, aten.softmax.int, aten._softmax.default)


def _only_float_readers(n: fx.Node) -> bool:
    """Every reader of `n` (through value-preserving ops) is a float-only op (LayerNorm,
    softmax): TensorRT fuses such an add into a float skip-LayerNorm or the softmax; its
    residual-add rule (quantize both inputs so the add fuses into a conv epilogue) is for
    adds that feed int8 layers."""
    users = list(n.users)
    return bool(users) and all(
        _only_float_readers(u) if is_op(u, VALUE_PRESERVING) else is_op(u, FLOAT_ONLY_OPS)
        for u in users)


def _read_quantized(gm: fx.GraphModule, placement: str) -> set[str]:
    """Nodes whose output a quantized op reads, directly or through value-preserving ops and
    fused activations.

    Decides two ORT placements that only pay when someone reads the int8 tensor:
    - a linear/matmul output: onnxruntime runs DQ → MatMul/Gemm with no Q after it as an
      integer kernel with a float output (MatMulIntegerToFloat, QGemm without y_scale), so
      quantizing the output only adds error; a conv has no such kernel (DQ → Conv without Q
      stays a float conv), so conv outputs are always quantized.
    - an add: a residual add feeding LayerNorm (transformers) or the attention mask add
      feeding softmax runs in float; quantizing it would put the residual stream's outlier
      channels, or the mask's -1e4, into one int8 range. (TensorRT: an add stays float only
      when float-only ops read it, `_only_float_readers`; its residual adds before pools
      stay quantized, as its placement recommendation asks.)
    Adds only read quantized inputs when they are themselves read quantized, hence the walk
    from the outputs backwards.
    """
    read: set[str] = set()
    for n in reversed(gm.graph.nodes):
        for u in n.users:
            if is_op(u, VALUE_PRESERVING + FUSED_ACTS) and u.args and u.args[0] is n:
                if u.name in read:
                    read.add(n.name)
            elif n in _activation_inputs(u, placement) and (
                    not is_op(u, ADD_OPS) or u.name in read
                    or (placement != "ort" and not _only_float_readers(u))):
                read.add(n.name)
    return read


def observed_tensors(gm: fx.GraphModule) -> set[str]:
    """The tensors any plan can quantize on any placement (every quantizable op's inputs and,
    for ORT, outputs): calibration needs statistics of these only (about 2/3 of MobileNetV2's
    nodes, and 40 % less calibration time than observing every node)."""
    plan = QuantPlan(default=LayerPlan(ORT_WEIGHT, ORT_ACT))
    return set(plan_tensors(gm, plan, "ort")) | set(plan_tensors(gm, plan, "trt"))
