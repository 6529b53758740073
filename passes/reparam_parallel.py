"""Merge parallel conv branches that are summed: Σ_i conv_i(x) (+ x) → one conv.

A sum of convs reading the same input x with the same stride, groups and channel counts is one
conv (linearity in the weight; `reparam_math` has the geometry):

    Σ_i conv(x, W_i, b_i; s, p_i, d_i, g)  =  conv(x, Σ_i E_i(W_i), Σ_i b_i; s, P, D, g)

exactly, whenever every branch's receptive-field centre has the same offset p_i − (k_i−1)d_i/2
in every spatial dim (1×1, 3×3, 1×K, K×1, a large K with a small one, dilated small kernels
inside a large one, even kernels with matching offsets). Smaller and dilated kernels are
written into the largest one with zeros elsewhere; a shared dilation is kept when all taps sit
on its grid. The bare input x as a summand (RepVGG/MobileOne skip without BN) is the identity
kernel (needs stride 1, C_in = C_out, centre offset 0); a Python number summand (RepVGG's
`+ 0` when there is no identity branch) goes into the bias.

The sum is an `aten.add.Tensor` tree, possibly nested (((a+b)+c)+d) and possibly in-place
(`out += branch` exports as `aten.add_.Tensor`, rewritten out of place when the mutated tensor
has no other reader). Summands are grouped by (input, stride, groups, channels, dtype, centre
offset); every group of ≥ 2 is merged into one conv, the rest stay in the add (partial merge).
The merged conv replaces the add when nothing else is left. (DBB's depth-concatenation
transform is how grouped kernels compose; here groups are handled directly: summands must
have equal groups, and identity branches take their sibling's groups.)

Refused, logged at debug level with the reason: a conv whose output has users outside the sum
(they would lose it), non-constant weights, different inputs/strides/groups/channel counts/
misaligned centres, and merges whose kernel would cost more MACs than the branches it replaces
(e.g. only 1×K + K×1, or two far-apart dilations with no large kernel to absorb them).

This module also holds the small graph helpers the other reparam passes share (constant
evaluation, add-tree flattening, dead-node cleanup).
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from quantflow.ir import CONV_OPS, ConvArgs, add_const, get_tensor
from quantflow.passes.reparam_math import (
    Geometry,
    MergedGeometry,
    identity_kernel,
    merge_geometry,
    merge_parallel,
)

aten = torch.ops.aten
log = logging.getLogger("quantflow.passes")

ADD_OPS = (aten.add.Tensor, aten.add_.Tensor)
_CONV_FOR_ND = {1: aten.conv1d.default, 2: aten.conv2d.default}


# --------------------------------------------------------------------------- shared helpers


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


def is_erased(node: fx.Node) -> bool:
    return bool(getattr(node, "_erased", False))


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


def _is_inner(node: Any) -> bool:
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
            if _is_inner(operand):
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
    while _is_inner(top):
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


# --------------------------------------------------------------------------- the pass


@dataclass
class _Branch:
    node: fx.Node | None          # the conv node, or None for the identity summand
    weight: torch.Tensor
    bias: torch.Tensor | None
    geometry: Geometry


@dataclass
class _Group:
    x: fx.Node
    stride: tuple[int, ...]
    groups: int
    out_channels: int
    centre2: tuple[int, ...]
    branches: list[_Branch] = field(default_factory=list)


def _skip(node: fx.Node, why: str) -> None:
    log.debug("merge_parallel_convs: skip %s: %s", node.name, why)


def _conv_groups(consts: Constants, tree: AddTree) -> dict[tuple[Any, ...], _Group]:
    """Mergeable conv summands of the tree, grouped by everything that must be equal."""
    groups: dict[tuple[Any, ...], _Group] = {}
    tree_nodes = tree.nodes
    for leaf in tree.leaves:
        if not (isinstance(leaf, fx.Node) and leaf.op == "call_function"
                and leaf.target in CONV_OPS):
            continue
        if not set(leaf.users) <= tree_nodes:
            _skip(tree.root, f"{leaf.name} is also used outside the sum")
            continue
        got = conv_constants(consts, leaf)
        if isinstance(got, str):
            _skip(tree.root, got)
            continue
        args, w, b = got
        geo = geometry(args, w)
        key = (args.x, args.stride, args.groups, w.shape[0], w.shape[1], w.dtype,
               geo.centre2(), len(geo.kernel))
        grp = groups.setdefault(key, _Group(args.x, args.stride, args.groups, w.shape[0],
                                            geo.centre2()))
        grp.branches.append(_Branch(leaf, w, b, geo))
    # explain near misses: same input, different key
    by_input: dict[fx.Node, list[tuple[Any, ...]]] = {}
    for key in groups:
        by_input.setdefault(key[0], []).append(key)
    for x, keys in by_input.items():
        if len(keys) > 1:
            _skip(tree.root, f"branches reading {x.name} differ in stride/groups/channels/"
                             f"dtype/centre offset: {[k[1:] for k in keys]}")
    return groups


def _add_identity(tree: AddTree, groups: dict[tuple[Any, ...], _Group], leaf: fx.Node) -> bool:
    """Put the bare summand `leaf` into a conv group reading it, as an identity kernel."""
    for grp in groups.values():
        if grp.x is not leaf:
            continue
        c_in = grp.branches[0].weight.shape[1] * grp.groups
        why = None
        if any(s != 1 for s in grp.stride):
            why = "stride is not 1"
        elif grp.out_channels != c_in:
            why = f"{c_in} input vs {grp.out_channels} output channels"
        elif any(c != 0 for c in grp.centre2):
            why = "the convs' outputs are not centred on the input pixels"
        if why:
            _skip(tree.root, f"identity summand {leaf.name} cannot join its convs: {why}")
            continue
        nd = len(grp.centre2)
        dtype = grp.branches[0].weight.dtype
        w = identity_kernel(c_in, grp.groups, (1,) * nd, 1.0, dtype)
        grp.branches.append(_Branch(None, w, None, Geometry((1,) * nd, (0,) * nd, (1,) * nd)))
        return True
    return False


def _greedy(geos: list[Geometry]) -> list[list[int]]:
    """Index sets to merge, each costing no more taps merged than its members apart.

    All together when that pays; else greedily, largest kernel first (ties: the denser one,
    so a dilated branch does not capture the others).
    """
    if len(geos) < 2:
        return []
    whole = merge_geometry(geos)
    if not isinstance(whole, str) and whole.geometry.taps() <= sum(g.taps() for g in geos):
        return [list(range(len(geos)))]
    rest = sorted(range(len(geos)), key=lambda i: (-geos[i].taps(), max(geos[i].dilation)))
    sets = []
    while len(rest) >= 2:
        chosen = [rest[0]]
        for i in rest[1:]:
            trial = merge_geometry([geos[j] for j in chosen + [i]])
            if not isinstance(trial, str) and \
                    trial.geometry.taps() <= sum(geos[j].taps() for j in chosen + [i]):
                chosen.append(i)
        if len(chosen) >= 2:
            sets.append(chosen)
        rest = [i for i in rest if i not in chosen]
    return sets


def _split_by_cost(branches: list[_Branch]) -> list[tuple[list[_Branch], MergedGeometry]]:
    """Subsets of branches to merge, none costing more MACs merged than apart.

    The greedy choice is not monotone (A+C may not pay while (A+B)+C does), so it is
    repeated on the merged clusters until nothing joins: a re-run of the pass then sees
    exactly the final clusters and merges nothing (fixpoint). Merging clusters gives the
    same geometry as merging their branches at once (max padding/span, gcd of the taps).
    """
    clusters: list[list[_Branch]] = [[br] for br in branches]
    geos = [br.geometry for br in branches]
    while True:
        sets = _greedy(geos)
        if not sets:
            break
        joined = {i for s in sets for i in s}
        new_clusters = [[br for i in s for br in clusters[i]] for s in sets]
        new_geos = []
        for s in sets:
            merged = merge_geometry([geos[i] for i in s])
            assert not isinstance(merged, str)
            new_geos.append(merged.geometry)
        clusters = new_clusters + [c for i, c in enumerate(clusters) if i not in joined]
        geos = new_geos + [g for i, g in enumerate(geos) if i not in joined]
    out = []
    for cluster in clusters:
        if len(cluster) >= 2:
            merged = merge_geometry([br.geometry for br in cluster])
            assert not isinstance(merged, str)
            out.append((cluster, merged))
    return out


def _merge_tree(gm: fx.GraphModule, consts: Constants, tree: AddTree) -> bool:
    groups = _conv_groups(consts, tree)
    if not groups:
        if any(isinstance(leaf, fx.Node) and leaf.target in CONV_OPS for leaf in tree.leaves):
            _skip(tree.root, "no mergeable conv summands")
        return False
    leftovers: list[Any] = []
    scalars = 0.0
    for leaf in tree.leaves:
        if isinstance(leaf, fx.Node) and leaf.target in CONV_OPS and \
                any(leaf is br.node for g in groups.values() for br in g.branches):
            continue
        if isinstance(leaf, (int, float)) and not isinstance(leaf, bool):
            scalars += float(leaf)
            continue
        if isinstance(leaf, fx.Node) and _add_identity(tree, groups, leaf):
            continue
        leftovers.append(leaf)
    merged_nodes: list[fx.Node] = []
    for grp in groups.values():
        subsets = _split_by_cost(grp.branches) if len(grp.branches) >= 2 else []
        n_chosen = sum(len(c) for c, _ in subsets)
        if len(grp.branches) >= 2 and n_chosen < len(grp.branches):
            _skip(tree.root, f"{len(grp.branches) - n_chosen} of the {len(grp.branches)} "
                             f"branches reading {grp.x.name} kept apart: merging them would "
                             "cost more MACs than running them")
        for br in grp.branches:
            if not any(br is c for chosen, _ in subsets for c in chosen):
                leftovers.append(br.node if br.node is not None else grp.x)
        for chosen, merged in subsets:
            bias_extra = scalars if not merged_nodes else 0.0
            w, b = merge_parallel([c.weight for c in chosen], [c.bias for c in chosen],
                                  [c.geometry for c in chosen], merged, extra_bias=bias_extra)
            main = next((c.node for c in chosen if c.node is not None), None)
            conv = make_conv(gm, grp.x, w, b, grp.stride, merged.geometry.padding,
                             merged.geometry.dilation, grp.groups, before=tree.root,
                             hint=f"{(main or grp.x).name}_reparam", like=main)
            merged_nodes.append(conv)
            log.debug("merge_parallel_convs: %s: merged %d branches (%s) into %s %s",
                      tree.root.name, len(chosen),
                      ", ".join(c.node.name if c.node is not None else f"identity {grp.x.name}"
                                for c in chosen), conv.name, merged.geometry)
    if not merged_nodes:
        others = [f"{leaf.name} ({getattr(leaf.target, '__name__', leaf.op)})"
                  for leaf in leftovers if isinstance(leaf, fx.Node)
                  and leaf.target not in CONV_OPS]
        if others and any(len(g.branches) == 1 for g in groups.values()):
            _skip(tree.root, "no two summands merge; not conv branches of the same input: "
                             + ", ".join(others))
        return False
    result = _build_sum(gm, merged_nodes + leftovers, tree.root)
    tree.root.replace_all_uses_with(result)
    erase_dead(gm, [tree.root, *tree.inner])
    return True


def _build_sum(gm: fx.GraphModule, terms: list[Any], root: fx.Node) -> fx.Node:
    """Left-to-right sum of terms (nodes first) inserted before root."""
    nodes = [t for t in terms if isinstance(t, fx.Node)]
    others = [t for t in terms if not isinstance(t, fx.Node)]
    acc = nodes[0]
    for t in nodes[1:] + others:
        with gm.graph.inserting_before(root):
            new = gm.graph.call_function(aten.add.Tensor, (acc, t))
        va, vb = fake_val(acc), fake_val(t) if isinstance(t, fx.Node) else t
        if va is not None and vb is not None:
            new.meta["val"] = aten.add.Tensor(va, vb)
        acc = new
    return acc


def merge_parallel_convs(gm: fx.GraphModule) -> bool:
    """Merge every sum of compatible parallel convs (plus identity/scalar summands)."""
    changed = False
    consts = Constants(gm)
    for node in list(gm.graph.nodes):
        if is_erased(node) or _is_inner(node):
            continue
        tree = add_tree(node)
        if tree is None:
            continue
        changed |= _merge_tree(gm, consts, tree)
    return changed

