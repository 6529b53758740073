"""Remove ops that are the identity at inference, and dead code with its constants.

`remove_identity` rewires the users of an identity node to its input and erases it:
  - dropout (and feature/alpha variants, in-place too) with train=False;
  - alias, detach, detach_ (metadata only), contiguous, clone, lift_fresh_copy;
  - `to` / `_to_copy` whose result has the input's dtype and device (per `meta["val"]`);
  - x * 1, x / 1, x + 0, x − 0 with a Python scalar, when `meta["val"]` shows the dtype and
    shape unchanged (x·1 on an int tensor with 1.0 promotes to float: not an identity);
    x + 0 turns −0.0 into +0.0, which no consumer can tell apart numerically;
  - view / reshape / _unsafe_view / flatten / squeeze whose output shape equals the input's
    (per `meta["val"]`; a symbolic dim such as the dynamic batch must be the same expression);
  - `aten._assert_*` runtime checks (no users, no value): the deploy graph has no asserts.

Skipped, with the reason logged at debug level: nodes without `meta["val"]` where the decision
needs a dtype/shape, dropout with train=True, and copies whose removal would be observable
through mutation. The training IR keeps in-place ops (`relu_`, `add_`, `hardtanh_`), so a copy
(clone, dropout, x*1, ...) may protect a tensor: `y = x.clone(); y.add_(1)` must keep the clone.
A copy n of x is removed only if nothing mutates n's alias class and nothing mutates x's alias
class after n (`_Aliases`: union-find over schema alias annotations; unknown ops are assumed to
alias and mutate their arguments, which only makes the check more conservative).

`dead_code` runs fx's dead-code elimination (impure nodes such as in-place ops stay) and then
deletes parameters, buffers and tensor attributes no `get_attr` reaches, plus unused submodules,
so a saved model shrinks after folding.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from quantflow.passes.driver import for_each, skip

aten = torch.ops.aten

_DROPOUT = (aten.dropout.default, aten.dropout_.default, aten.feature_dropout.default,
            aten.feature_dropout_.default, aten.alpha_dropout.default,
            aten.alpha_dropout_.default, aten.feature_alpha_dropout.default,
            aten.feature_alpha_dropout_.default)
_PLAIN = (aten.alias.default, aten.detach.default, aten.detach_.default,
          aten.contiguous.default, aten.clone.default, aten.lift_fresh_copy.default)
_TO = (aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other,
       aten._to_copy.default)
_RESHAPE = (aten.view.default, aten.reshape.default, aten._unsafe_view.default,
            aten.flatten.using_ints, aten.squeeze.default, aten.squeeze.dim,
            aten.squeeze.dims)
#: (op, neutral scalar) for x ∘ c == x
_NEUTRAL = {aten.mul.Tensor: 1, aten.mul.Scalar: 1, aten.div.Tensor: 1, aten.div.Scalar: 1,
            aten.add.Tensor: 0, aten.add.Scalar: 0, aten.sub.Tensor: 0, aten.sub.Scalar: 0}
#: in-place ops that change metadata (requires_grad) only, never values
_METADATA_ONLY = (aten.detach_.default,)


def _val(node: Any) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _same_dim(a: Any, b: Any) -> bool | None:
    """Dims equal: ints by value, symbolic dims (dynamic batch) by identical expression."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        return True if a.node.expr == b.node.expr else None
    return None


def _same_meta(node: fx.Node, x: fx.Node, shape: bool) -> bool | None:
    """Whether node's output has x's dtype/device (and shape); None if unknown."""
    a, b = _val(node), _val(x)
    if a is None or b is None:
        return None
    if a.dtype != b.dtype or a.device != b.device:
        return False
    if shape:
        if a.dim() != b.dim():
            return False
        same = [_same_dim(da, db) for da, db in zip(a.shape, b.shape)]
        return False if False in same else None if None in same else True
    return True


def _identity_input(node: fx.Node) -> tuple[fx.Node | None, str]:
    """(x, "") if `node` computes exactly its input x at inference, else (None, why)."""
    t, args = node.target, node.args
    x = args[0] if args else node.kwargs.get("input", node.kwargs.get("self"))
    if not isinstance(x, fx.Node):
        return None, "first argument is not a tensor node"
    if t in _DROPOUT:
        train = args[2] if len(args) > 2 else node.kwargs.get("train", True)
        return (None, "dropout with train=True") if train else (x, "")
    if t in _PLAIN:
        return x, ""
    if t in _TO or t in _RESHAPE or t in _NEUTRAL:
        if t in _NEUTRAL:
            other = args[1] if len(args) > 1 else node.kwargs.get("other")
            if isinstance(other, bool) or not isinstance(other, (int, float)) \
                    or other != _NEUTRAL[t]:
                return None, ""
            if t in (aten.div.Tensor, aten.div.Scalar) and node.kwargs.get("rounding_mode"):
                return None, "div with rounding_mode rounds"
        same = _same_meta(node, x, shape=t not in _TO)
        if same is None:
            return None, "no static meta['val'] to prove dtype/shape unchanged"
        return (x, "") if same else (None, "")
    return None, ""


def _named_args(node: fx.Node, schema: Any) -> dict[str, Any]:
    """Positional and keyword arguments by schema name."""
    vals = {a.name: v for a, v in zip(schema.arguments, node.args)}
    vals.update(node.kwargs)
    return vals


def _is_copy(node: fx.Node) -> bool:
    """Whether the node returns a fresh tensor (removing it would create an alias)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.returns or schema.returns[0].alias_info is None:
        return True
    return bool(_named_args(node, schema).get("copy", False))  # aten.to(..., copy=True)


class _Aliases:
    """Over-approximate alias classes and where each class is mutated (graph positions)."""

    def __init__(self, graph: fx.Graph) -> None:
        self.parent: dict[fx.Node, fx.Node] = {}
        self.pos = {n: i for i, n in enumerate(graph.nodes)}
        writes: list[tuple[fx.Node, int]] = []
        for n in graph.nodes:
            if n.op != "call_function":
                continue
            schema = getattr(n.target, "_schema", None)
            node_args = [a for a in n.args if isinstance(a, fx.Node)] + \
                [a for a in n.kwargs.values() if isinstance(a, fx.Node)]
            if schema is None:  # getitem & python functions: alias (and, unknown: mutate)
                for a in node_args:
                    self.union(n, a)
                    if n.target is not operator.getitem:
                        writes.append((a, self.pos[n]))
                continue
            ret_sets = set().union(*(r.alias_info.before_set for r in schema.returns
                                     if r.alias_info is not None))
            values = _named_args(n, schema)
            for sarg in schema.arguments:
                v = values.get(sarg.name)
                if sarg.alias_info is None or v is None:
                    continue
                for a in (v if isinstance(v, (list, tuple)) else [v]):  # Tensor(a!)[] too
                    if not isinstance(a, fx.Node):
                        continue
                    if sarg.alias_info.before_set & ret_sets:
                        self.union(n, a)
                    if sarg.alias_info.is_write and n.target not in _METADATA_ONLY:
                        writes.append((a, self.pos[n]))
        self.writes = writes

    def find(self, n: fx.Node) -> fx.Node:
        while self.parent.get(n, n) is not n:
            n = self.parent[n]
        return n

    def union(self, a: fx.Node, b: fx.Node) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is not rb:
            self.parent[ra] = rb

    def copy_removable(self, copy: fx.Node, x: fx.Node) -> bool:
        rc, rx, at = self.find(copy), self.find(x), self.pos[copy]
        for w, where in self.writes:
            r = self.find(w)
            if r is rc or (r is rx and where > at):
                return False
        return True


def remove_identity(gm: fx.GraphModule) -> bool:
    """Erase inference-time identity ops, rewiring their users to the input."""
    aliases = _Aliases(gm.graph)

    def rewrite(node: fx.Node) -> bool:
        schema = getattr(node.target, "_schema", None)
        if schema is not None and schema.name.startswith("aten::_assert") and not node.users:
            gm.graph.erase_node(node)
            return True
        x, why = _identity_input(node)
        if x is None:
            # `why` is empty for ops that are not identity-like at all: not worth a log line
            return skip("remove_identity", node, why) if why else False
        if _is_copy(node) and not aliases.copy_removable(node, x):
            return skip("remove_identity", node, f"it copies {x.name} and one of the two is "
                        "mutated in place later")
        aliases.union(node, x)  # after the rewrite the users see x's storage
        node.replace_all_uses_with(x)
        gm.graph.erase_node(node)
        return True

    return for_each(gm, lambda node: node.op == "call_function", rewrite)


def _delete_tensor(gm: fx.GraphModule, qualname: str) -> None:
    owner_name, _, attr = qualname.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    if attr in owner._parameters:
        del owner._parameters[attr]
    elif attr in owner._buffers:
        del owner._buffers[attr]
    else:
        delattr(owner, attr)


def dead_code(gm: fx.GraphModule) -> bool:
    """Eliminate unused nodes, then unused parameters/buffers/tensor attributes/submodules."""
    changed = gm.graph.eliminate_dead_code()
    used = {str(n.target) for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}

    def is_used(qualname: str) -> bool:
        parts = qualname.split(".")
        return any(".".join(parts[:i]) in used for i in range(1, len(parts) + 1))

    tensors: list[str] = []
    for mod_name, mod in gm.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        names = [k for k, v in mod._parameters.items() if v is not None] + \
            [k for k, v in mod._buffers.items() if v is not None] + \
            [k for k, v in vars(mod).items() if isinstance(v, torch.Tensor)]
        tensors += [prefix + k for k in names]
    for qualname in dict.fromkeys(tensors):  # dedupe, keep order
        if not is_used(qualname):
            _delete_tensor(gm, qualname)
            changed = True
    n_modules = len(list(gm.named_modules()))
    gm.delete_all_unused_submodules()
    changed |= len(list(gm.named_modules())) != n_modules
    return changed
