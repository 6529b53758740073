"""Graph helpers the re-parameterization passes share: constant evaluation, sum (add-tree)
flattening, conv construction and dead-node cleanup. No pass lives here.
"""


from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from quantflow.ir import CONV_ND, CONV_OPS, ConvArgs, add_const, get_tensor
from quantflow.passes.driver import is_erased
from quantflow.passes.reparam_math import (
    Geometry,
)

aten = torch.ops.aten

ADD_OPS = (aten.add.Tensor, aten.add_.Tensor)
_CONV_FOR_ND = {nd: op for op, nd in CONV_ND.items()}


class Constants:
    """Values of nodes computed from constants only (get_attr and pure, deterministic ops).

    Covers weights built at forward time from parameters, e.g. DBB's `weight + identity`, or
    the pad values a pad-aware BN computes from its statistics. Constness is decided once in
    graph order (nodes added later are decided on demand) and values are memoized, so asking
    about an activation costs a dict lookup, not a walk to the graph inputs.
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self._const: dict[fx.Node, bool] = {}
        self._values: dict[fx.Node, torch.Tensor | None] = {}
        for n in gm.graph.nodes:
            self._const[n] = self._decide(n)

    @staticmethod
    def _pure(node: fx.Node) -> bool:
        t = node.target
        return isinstance(t, torch._ops.OpOverload) and not t._schema.is_mutable and \
            torch.Tag.nondeterministic_seeded not in t.tags

    def _decide(self, n: fx.Node) -> bool:
        if n.op == "get_attr":
            return True
        if n.op != "call_function" or not self._pure(n):
            return False
        return all(self.is_const(m) for m in n.all_input_nodes)

    def is_const(self, node: Any) -> bool:
        if not isinstance(node, fx.Node):
            return False
        if node not in self._const:
            self._const[node] = self._decide(node)
        return self._const[node]

    def value(self, node: Any) -> torch.Tensor | None:
        """The constant tensor behind `node`, or None when it depends on the inputs."""
        if not self.is_const(node):
            return None
        if node in self._values:
            return self._values[node]
        if node.op == "get_attr":
            t = get_tensor(self.gm, node)
            out: Any = None if t is None else t.detach()
        else:
            def ev(a: Any) -> Any:
                return self.value(a) if isinstance(a, fx.Node) else a
            args = fx.node.map_aggregate(node.args, ev)
            kwargs = fx.node.map_aggregate(node.kwargs, ev)
            with torch.no_grad():
                out = node.target(*args, **kwargs)
        value = out.detach() if isinstance(out, torch.Tensor) else None
        self._values[node] = value
        return value


def fake_val(node: Any) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def erase_dead(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    """Erase the given nodes once unused, then whatever pure/constant inputs they leave dead.

    Nodes go in reverse graph order (users before producers). The given nodes may be
    mutating (the `copy_` of a pad-aware BN); others are erased only when pure. Constants
    (get_attr) that lose their last user are erased with their tensor, so merged branches do
    not linger in the state dict.
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    explicit = set(nodes)
    pending = {n for n in nodes if n in order}
    while pending:
        n = max(pending, key=order.__getitem__)
        pending.remove(n)
        if is_erased(n) or n.users or n.op in ("placeholder", "output"):
            continue
        if n.op == "call_function" and n not in explicit:
            schema = getattr(n.target, "_schema", None)
            pure = n.target is operator.getitem if schema is None else not schema.is_mutable
            if not pure:
                continue
        inputs = [m for m in n.all_input_nodes if m in order]
        target = str(n.target) if n.op == "get_attr" else None
        gm.graph.erase_node(n)
        if target is not None and not any(m.op == "get_attr" and m.target == target
                                          for m in gm.graph.nodes):
            owner_name, _, attr = target.rpartition(".")
            owner = gm.get_submodule(owner_name) if owner_name else gm
            for store in (owner._parameters, owner._buffers):
                store.pop(attr, None)
            if attr in vars(owner):
                delattr(owner, attr)
        pending.update(inputs)


def make_conv(gm: fx.GraphModule, x: fx.Node, w: torch.Tensor, b: torch.Tensor | None,
              stride: tuple[int, ...], padding: tuple[int, ...], dilation: tuple[int, ...],
              groups: int, before: fx.Node, hint: str, like: fx.Node | None) -> fx.Node:
    """Insert conv(x, w, b) before `before`; meta (val, module stack) copied from `like`."""
    nd = w.dim() - 2
    w_node = add_const(gm, f"{hint}_weight", w, before=before)
    b_node = None if b is None else add_const(gm, f"{hint}_bias", b, before=before)
    with gm.graph.inserting_before(before):
        conv = gm.graph.call_function(_CONV_FOR_ND[nd], (
            x, w_node, b_node, list(stride), list(padding), list(dilation), groups))
    if like is not None:
        for key in ("val", "tensor_meta", "nn_module_stack", "stack_trace"):
            if key in like.meta:
                conv.meta[key] = like.meta[key]
    return conv


def conv_constants(consts: Constants, conv: fx.Node
                   ) -> tuple[ConvArgs, torch.Tensor, torch.Tensor | None] | str:
    """(args, weight, bias) of a conv with constant weight and bias, or why not."""
    args = ConvArgs.of(conv)
    w = consts.value(args.weight)
    if w is None:
        return f"{conv.name} has a non-constant weight"
    b = None
    if args.bias is not None:
        b = consts.value(args.bias)
        if b is None:
            return f"{conv.name} has a non-constant bias"
    return args, w, b


@dataclass
class AddTree:
    """A maximal sum: the root add, the inner adds folded into it, and the summands."""

    root: fx.Node
    inner: list[fx.Node] = field(default_factory=list)
    leaves: list[Any] = field(default_factory=list)

    @property
    def nodes(self) -> set[fx.Node]:
        return {self.root, *self.inner}


def _add_operands(node: fx.Node) -> tuple[Any, Any] | None:
    """(a, b) of an add that is a plain sum a + b, else None (alpha ≠ 1, observable mutation)."""
    if node.op != "call_function" or node.target not in ADD_OPS:
        return None
    vals = dict(zip(("self", "other"), node.args))
    vals.update(node.kwargs)
    if vals.get("alpha", 1) != 1 or "self" not in vals or "other" not in vals:
        return None
    a, b = vals["self"], vals["other"]
    if node.target == aten.add_.Tensor and not _private(a):
        return None
    return a, b


def _private(a: Any) -> bool:
    """Whether overwriting `a` in place is invisible: a fresh tensor nothing else reads.

    a.add_(b) is a plain sum only then. `a` may itself be an in-place add (`out += u;
    out += v`); its base must be a fresh tensor (conv, BN, ... output: no alias in the
    schema's return), not a view of something else or a graph input.
    """
    while True:
        if not isinstance(a, fx.Node) or a.op != "call_function" or len(a.users) != 1:
            return False
        if a.target != aten.add_.Tensor:
            break
        a = a.args[0]
    schema = getattr(a.target, "_schema", None)
    return schema is not None and bool(schema.returns) and \
        schema.returns[0].alias_info is None


def is_inner_add(node: Any) -> bool:
    """Whether `node` is an add consumed only by one enclosing add (so it flattens into it)."""
    if not isinstance(node, fx.Node) or _add_operands(node) is None or len(node.users) != 1:
        return False
    return _add_operands(next(iter(node.users))) is not None


def add_tree(node: fx.Node) -> AddTree | None:
    """The maximal add tree rooted at `node` (None if `node` is no plain add)."""
    if _add_operands(node) is None:
        return None
    tree = AddTree(node)
    stack: list[Any] = [node]
    while stack:
        n = stack.pop()
        ops = _add_operands(n)
        assert ops is not None
        for operand in ops:
            if is_inner_add(operand):
                tree.inner.append(operand)
                stack.append(operand)
            else:
                tree.leaves.append(operand)
    return tree


def enclosing_add_tree(node: fx.Node) -> AddTree | None:
    """The add tree that has `node` among its summands, if its only user is such a sum."""
    if len(node.users) != 1:
        return None
    top = next(iter(node.users))
    if _add_operands(top) is None:
        return None
    while is_inner_add(top):
        top = next(iter(top.users))
    tree = add_tree(top)
    return tree if tree is not None and node in tree.leaves else None


def through_single_bn(node: Any) -> Any:
    """The conv behind `node` when node is BN(conv) with the conv used only there (pre-fold)."""
    if isinstance(node, fx.Node) and node.target == aten.batch_norm.default and \
            isinstance(node.args[0], fx.Node) and node.args[0].target in CONV_OPS and \
            len(node.args[0].users) == 1:
        return node.args[0]
    return node


def geometry(args: ConvArgs, w: torch.Tensor) -> Geometry:
    return Geometry(tuple(w.shape[2:]), args.padding, args.dilation)


def through_crop(x: fx.Node, nd: int) -> tuple[fx.Node, tuple[int, ...]]:
    """(x', crops) when `x` is x' cropped symmetrically by crops[i] on spatial dim i
    (`x'[..., c:-c, ...]` slices, ACNet's `CropLayer`; whole-dim slices pass through).

    A conv of the crop with padding p is the conv of x' with padding p − c (negative padding
    crops), so parallel branches that differ only by a crop still read one input.
    """
    crops = [0] * nd
    cur = x
    while cur.op == "call_function" and cur.target == aten.slice.Tensor:
        src, dim = cur.args[0], int(cur.args[1]) if len(cur.args) > 1 else 0  # type: ignore
        start = cur.args[2] if len(cur.args) > 2 else 0
        end = cur.args[3] if len(cur.args) > 3 else None
        step = cur.args[4] if len(cur.args) > 4 else 1
        val = fake_val(src)
        if not isinstance(src, fx.Node) or val is None or step != 1 or cur.kwargs:
            break
        dim %= val.dim()
        size = val.shape[dim]
        whole = start in (0, None) and (end is None or (isinstance(end, int) and (
            end >= 2 ** 62 or (isinstance(size, int) and end >= size))))
        if whole:
            cur = src
            continue
        spatial = dim - (val.dim() - nd)
        if spatial < 0 or not isinstance(start, int) or start <= 0 or crops[spatial] or \
                not isinstance(end, int) or not (end == -start or (isinstance(size, int)
                                                                   and end == size - start)):
            break
        crops[spatial] = start
        cur = src
    if not any(crops):
        return x, tuple(crops)
    return cur, tuple(crops)
