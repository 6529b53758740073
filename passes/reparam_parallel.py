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

Graph helpers shared with the other reparam passes are in `reparam_graph`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from quantflow.ir import CONV_OPS
from quantflow.passes.driver import for_each, skip
from quantflow.passes.reparam_graph import (
    AddTree,
    Constants,
    add_tree,
    conv_constants,
    erase_dead,
    fake_val,
    geometry,
    is_inner_add,
    make_conv,
    through_crop,
)
from quantflow.passes.reparam_math import (
    Geometry,
    MergedGeometry,
    identity_kernel,
    merge_geometry,
    merge_parallel,
)

aten = torch.ops.aten
log = logging.getLogger("quantflow.passes")



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


def _conv_groups(consts: Constants, tree: AddTree) -> dict[tuple[Any, ...], _Group]:
    """Mergeable conv summands of the tree, grouped by everything that must be equal."""
    groups: dict[tuple[Any, ...], _Group] = {}
    tree_nodes = tree.nodes
    for leaf in tree.leaves:
        if not (isinstance(leaf, fx.Node) and leaf.op == "call_function"
                and leaf.target in CONV_OPS):
            continue
        if not set(leaf.users) <= tree_nodes:
            skip("merge_parallel_convs", tree.root,
                 f"{leaf.name} is also used outside the sum")
            continue
        got = conv_constants(consts, leaf)
        if isinstance(got, str):
            skip("merge_parallel_convs", tree.root, got)
            continue
        args, w, b = got
        geo = geometry(args, w)
        x, crops = through_crop(args.x, len(geo.kernel))
        if any(crops):  # conv of a crop = conv of the uncropped input with less padding
            geo = Geometry(geo.kernel, tuple(p - c for p, c in zip(geo.padding, crops)),
                           geo.dilation)
            args.x = x
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
            skip("merge_parallel_convs", tree.root,
                 f"branches reading {x.name} differ in stride/groups/channels/"
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
            skip("merge_parallel_convs", tree.root,
                 f"identity summand {leaf.name} cannot join its convs: {why}")
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
            skip("merge_parallel_convs", tree.root, "no mergeable conv summands")
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
            skip("merge_parallel_convs", tree.root,
                 f"{len(grp.branches) - n_chosen} of the {len(grp.branches)} "
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
            skip("merge_parallel_convs", tree.root,
                 "no two summands merge; not conv branches of the same input: "
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
    consts = Constants(gm)

    def rewrite(node: fx.Node) -> bool:
        tree = add_tree(node)  # None: not the root of a sum
        return tree is not None and _merge_tree(gm, consts, tree)

    return for_each(gm, lambda node: not is_inner_add(node), rewrite)

