"""Running passes: an explicit tuple of `(GraphModule) -> bool` functions, to a fixpoint.

No registry: the pipeline is the tuple the caller passes. Each pass mutates the graph in place
and returns whether it changed anything; skips are logged at debug level with their reason
(`logging.getLogger("quantflow.passes")`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import fx

from quantflow.errors import PassError
from quantflow.ir import count_ops

Pass = Callable[[fx.GraphModule], bool]
log = logging.getLogger("quantflow.passes")


@dataclass
class PassReport:
    """What a pipeline run did: op counts before/after, how often each pass fired, wall time."""

    before: dict[str, int]
    after: dict[str, int] = field(default_factory=dict)
    fired: dict[str, int] = field(default_factory=dict)
    iterations: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        b, a = self.before, self.after
        return (f"{b['conv']} convs / {b['batch_norm']} BN before -> "
                f"{a['conv']} convs / {a['batch_norm']} BN after passes "
                f"({self.seconds:.2f} s)")


def run_pipeline(gm: fx.GraphModule, passes: Sequence[Pass], max_iterations: int = 10
                 ) -> PassReport:
    """Run `passes` in order, repeatedly, until none changes the graph."""
    report = PassReport(before=count_ops(gm))
    t0 = time.perf_counter()
    for it in range(max_iterations):
        changed_any = False
        for p in passes:
            changed = p(gm)
            if changed:
                try:
                    gm.graph.lint()
                except Exception as exc:
                    raise PassError(f"pass {p.__name__} left an invalid graph: {exc}") from exc
                gm.recompile()
                report.fired[p.__name__] = report.fired.get(p.__name__, 0) + 1
                log.debug("pass %s changed the graph (iteration %d)", p.__name__, it)
            changed_any |= changed
        report.iterations = it + 1
        if not changed_any:
            break
    else:
        raise PassError(f"passes did not reach a fixpoint in {max_iterations} iterations "
                        f"(fired: {report.fired}); a pass keeps undoing another")
    report.after = count_ops(gm)
    report.seconds = time.perf_counter() - t0
    return report
