"""The per-node driver every rewrite pass runs on, and the one way a pass says why it skipped.

A pass is a match predicate plus a per-node rewrite (onnxscript rewrite-rule style): the
rewrite either changes the graph and returns True, or returns `skip(pass, node, why)`, which
logs the reason at debug level (`-vv`) and returns False. Keeping the walk here means every
pass walks the same way: over a snapshot of the nodes taken before the first rewrite (nodes a
rewrite inserts are not visited; the next fixpoint iteration of `run_pipeline` sees them),
skipping nodes an earlier rewrite erased, and calling the rewrite for every match (no
short-circuit: one rewrite firing must not stop the others).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch import fx

log = logging.getLogger("quantflow.passes")


def is_erased(node: fx.Node) -> bool:
    """Whether an earlier rewrite of this walk erased `node` (fx marks erased nodes)."""
    return bool(getattr(node, "_erased", False))


def for_each(gm: fx.GraphModule, match: Callable[[fx.Node], bool],
             rewrite: Callable[[fx.Node], bool]) -> bool:
    """Call `rewrite(node)` for every live node `match`es, in graph order; whether any changed.

    `match` is asked when the walk reaches the node, so it sees the graph as the rewrites
    before it left it.
    """
    changed = False
    for node in list(gm.graph.nodes):
        if is_erased(node) or not match(node):
            continue
        changed |= rewrite(node)
    return changed


def skip(pass_name: str, node: fx.Node, why: str) -> bool:
    """Log why `pass_name` leaves `node` alone (debug level); False, for `return skip(...)`."""
    log.debug("%s: skip %s: %s", pass_name, node.name, why)
    return False
