"""Where the search's independent work runs: in-process, local worker processes, or Ray.

One interface, `Workers.run(fn, items) -> iterator of fn(context, item)` in the order given,
for two kinds of tasks: candidate evaluations (`evaluate_plan`: the search loop,
quantune.run_search, picks a round of candidates, the driver answers what the evaluation
database already holds, and the rest run here) and Hutchinson draws of the Hessian traces
(`hessian_draw`, search/hawq.py). Only the driver writes the database, so resume-after-kill
and "every candidate once" do not depend on the workers; results come back in the order
asked, so the search learns from them in the same order for any worker count.

The context (fx graph, calibration stats, kernel placement, learned rounding, the picklable
quality function, the Hessian batches) crosses the process boundary ONCE: a process
initializer for local workers, the Ray object store for Ray; each task carries only its item
(a QuantPlan of a few KB, a draw index). Rebuilding the graph in every task from (plan, stats)
is what the worker does anyway (`quantize`), so shipping the float graph once is the cheaper
of the two designs.

Lost work is retried, never lost or counted twice: Ray re-runs a task whose worker or node
died (`max_retries`); a local pool whose process died (BrokenProcessPool) is rebuilt and the
unanswered items resubmitted. A retried task is deterministic (same plan or draw index, same
data), and the driver writes each candidate's row once, keyed by the candidate.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Self

from quantflow.ray_cluster import RETRIES, ClusterError, connect, ray_module

log = logging.getLogger("quantflow.search")

#: the same error for local workers that keep dying as for Ray tasks
WorkersError = ClusterError


@dataclass
class EvalContext:
    """What every task needs besides its item (sent to each worker once)."""

    gm: Any  # torch.fx.GraphModule (float, after equalization)
    stats: dict[str, Any]
    placement: Any
    learned: Any
    eval_fn: Callable[[Any], float]  # must be picklable for workers > 1 (a module-level class)
    #: Hutchinson draws: (batches, labels, TraceOptions, seed), as `hutchinson_traces` takes
    hessian: tuple[Any, ...] | None = None
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)  # per process, not sent

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "gm": pack_graph(self.gm), "_cache": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, gm=unpack_graph(state["gm"]))


def pack_graph(gm: Any) -> tuple[Any, ...]:
    """A picklable form of an fx graph module. torch.export's graph modules do not pickle
    (state-dict hooks that are lambdas) and fx's own __reduce__ re-traces the code, which
    renames nodes (plans are keyed by node name) and drops node meta: so nodes are kept as
    they are, with every picklable meta entry, and the modules and tensors they use."""
    import torch
    from torch import fx

    def refs(a: Any) -> Any:
        return fx.node.map_arg(a, lambda n: ("__node__", n.name))

    def picklable(v: Any) -> bool:
        try:
            pickle.dumps(v)
            return True
        except Exception:  # noqa: BLE001 - anything that does not pickle stays behind
            return False

    def target(t: Any) -> Any:  # aten operators do not pickle: their qualified name does
        if isinstance(t, torch._ops.OpOverload):
            return ("__op__", t.namespace, t._opname, t._overloadname)
        return t

    nodes = [(n.op, n.name, target(n.target), refs(n.args), refs(n.kwargs),
              {k: v for k, v in n.meta.items() if picklable(v)}) for n in gm.graph.nodes]
    root = torch.nn.Module()
    for name, child in gm.named_children():
        root.add_module(name, child)
    for n in gm.graph.nodes:
        atom = str(n.target).split(".")[0]
        if n.op == "get_attr" and not hasattr(root, atom):
            setattr(root, atom, getattr(gm, atom))
    # the codegen holds the pytree in/out specs: without it the graph returns a flat tuple
    codegen = gm.graph._codegen if picklable(gm.graph._codegen) else None
    return nodes, root, {k: v for k, v in gm.meta.items() if picklable(v)}, codegen


def unpack_graph(packed: tuple[Any, ...]) -> Any:
    from torch import fx

    nodes, root, meta, codegen = packed
    graph = fx.Graph()
    if codegen is not None:
        graph._codegen = codegen
    env: dict[str, fx.Node] = {}

    def resolve(a: Any) -> Any:
        if isinstance(a, tuple) and len(a) == 2 and a[0] == "__node__":
            return env[a[1]]
        if isinstance(a, (list, tuple)):
            return type(a)(resolve(x) for x in a)
        if isinstance(a, dict):
            return {k: resolve(v) for k, v in a.items()}
        return a

    import torch

    for op, name, target, args, kwargs, node_meta in nodes:
        if isinstance(target, tuple) and target[0] == "__op__":
            target = getattr(getattr(getattr(torch.ops, target[1]), target[2]), target[3])
        n = graph.create_node(op, target, resolve(args), resolve(kwargs), name=name)
        n.meta.update(node_meta)
        env[name] = n
    gm = fx.GraphModule(root, graph)
    gm.meta.update(meta)
    return gm


def evaluate_plan(ctx: EvalContext, plan: Any) -> tuple[float, float]:
    """Quantize with `plan` and measure its quality: (quality, seconds)."""
    from quantflow.quantize import quantize

    t0 = time.perf_counter()
    q = quantize(ctx.gm, plan, ctx.stats, ctx.placement,
                 rounding=ctx.learned.for_plan(plan) if ctx.learned else None)
    return float(ctx.eval_fn(q)), time.perf_counter() - t0


def hessian_draw(ctx: EvalContext, i: int) -> dict[tuple[str, str], float]:
    """Hutchinson draw number `i` (its own seed, search/hawq.py `one_draw`); the loss graph is
    built once per process."""
    import torch

    from quantflow.search.hawq import GraphLoss, one_draw, uses_per_block

    assert ctx.hessian is not None, "the workers were made without Hessian batches"
    batches, labels, options, seed = ctx.hessian
    # one thread in every mode, in-process too: a double backward's float sums depend on the
    # thread count (measured: 1.7 % on a MobileNetV2 draw's smallest blocks between 1 and 2
    # threads), and the traces must not depend on where a draw ran (~1.3x slower in-process)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if "loss" not in ctx._cache:
            ctx._cache["loss"] = GraphLoss(ctx.gm, batches, labels)
        loss = ctx._cache["loss"]
        return one_draw(loss, i, seed=seed, activations=options.activations,
                        per_block=uses_per_block(len(loss.layer_weight), options))
    finally:
        torch.set_num_threads(threads)


class Workers:
    """In-process (`--workers 1`, the default)."""

    kind = "in-process"
    parallel = 1  # tasks worth having in flight at once

    def __init__(self, ctx: EvalContext) -> None:
        self.ctx = ctx

    def run(self, fn: Callable[[EvalContext, Any], Any], items: Sequence[Any]) -> Iterator[Any]:
        """fn(context, item) per item, in the order given, each as soon as it is known (the
        driver writes an evaluation's row before the next: an interrupt loses nothing
        finished; a caller that stops early computes no more here)."""
        return (fn(self.ctx, item) for item in items)

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- local processes

_CTX: EvalContext | None = None  # the worker process's context, set by its initializer


def _init_worker(blob: bytes) -> None:
    global _CTX
    import torch

    torch.set_num_threads(1)  # N workers on N cores: one thread each, no oversubscription
    # as the CLI does for the driver: torch 2.13's pytree specs warn about themselves on every
    # copy of a graph (each quantize), which is not the user's business
    warnings.filterwarnings("ignore", category=FutureWarning)
    _CTX = pickle.loads(blob)


def _run_one(fn: Callable[[EvalContext, Any], Any], item: Any) -> tuple[Any, int]:
    assert _CTX is not None, "worker initializer did not run"
    return fn(_CTX, item), os.getpid()


class ProcessWorkers(Workers):
    """N local processes (spawn: torch is unsafe to fork once its threads exist)."""

    kind = "processes"

    def __init__(self, ctx: EvalContext, n: int) -> None:
        super().__init__(ctx)
        self.n = self.parallel = n
        self.blob = pickle.dumps(ctx)
        self.pool = self._new_pool()
        self.pids: set[int] = set()  # the processes that answered (tests kill one of them)
        self.retried = 0

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.n, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(self.blob,))

    def run(self, fn: Callable[[EvalContext, Any], Any], items: Sequence[Any]) -> Iterator[Any]:
        futures = [self.pool.submit(_run_one, fn, x) for x in items]
        for i in range(len(items)):
            for attempt in range(RETRIES + 1):
                try:
                    out, pid = futures[i].result()
                    break
                except BrokenProcessPool:  # a worker died: its pool's unanswered items rerun
                    if attempt == RETRIES:
                        raise WorkersError(f"search workers died {RETRIES + 1} times in a row; "
                                           "fix: check memory (dmesg) or run with --workers 1"
                                           ) from None
                    lost = [j for j in range(i, len(items)) if not futures[j].done()
                            or futures[j].exception() is not None]
                    log.warning("search: a worker process died; resubmitting %d task(s)",
                                len(lost))
                    self.retried += len(lost)
                    self.pool.shutdown(wait=False, cancel_futures=True)
                    self.pool = self._new_pool()
                    for j in lost:
                        futures[j] = self.pool.submit(_run_one, fn, items[j])
            self.pids.add(pid)
            yield out

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- Ray


def _ray_call(ctx: EvalContext, fn: Callable[[EvalContext, Any], Any], item: Any
              ) -> tuple[Any, str]:
    import torch

    torch.set_num_threads(1)
    return fn(ctx, item), ray_module().get_runtime_context().get_node_id()


class RayWorkers(Workers):
    """Tasks on a Ray cluster: one CPU each, retried on a lost worker or node."""

    kind = "ray"

    def __init__(self, ctx: EvalContext, address: str) -> None:
        super().__init__(ctx)
        self.ray = connect(address)
        self.parallel = max(1, int(self.ray.cluster_resources().get("CPU", 1)))
        self.ref = self.ray.put(ctx)
        self.remote = self.ray.remote(num_cpus=1, max_retries=RETRIES,
                                      retry_exceptions=False)(_ray_call)
        self.nodes: set[str] = set()

    def run(self, fn: Callable[[EvalContext, Any], Any], items: Sequence[Any]) -> Iterator[Any]:
        refs = [self.remote.remote(self.ref, fn, x) for x in items]
        for ref in refs:
            try:
                out, node = self.ray.get(ref)
            except self.ray.exceptions.RayError as exc:
                # a lost worker or node was already retried (max_retries); an exception the
                # task raised itself is not (it would raise again): either way, one line
                lines = [ln for ln in str(exc).splitlines() if ln.strip()]
                raise WorkersError(f"a search task failed on the Ray cluster "
                                   f"({type(exc).__name__}: {lines[-1] if lines else ''}); "
                                   "fix: check the cluster (`ray status`) and that every node "
                                   "has the driver's package versions, or run with --workers "
                                   "N") from None
            self.nodes.add(node)
            yield out

    def close(self) -> None:
        self.ray.shutdown()


def make_workers(ctx: EvalContext, workers: int = 1, ray_address: str | None = None
                 ) -> Workers:
    """`--ray ADDRESS` > `--workers N` (> 1: local processes) > in-process."""
    if ray_address:
        return RayWorkers(ctx, ray_address)
    if workers > 1:
        return ProcessWorkers(ctx, workers)
    return Workers(ctx)
