"""`search_mixed`: the mixed-precision search on a graph, end to end.

Contract (what the compile pipeline relies on):

    search_mixed(gm, calib_batches, eval_fn, budget, target=None, ...) -> SearchResult

- `gm`: the float deploy graph (after passes; it is never modified). `calib_batches`: a list
  of input tuples (as for `collect_stats`); `labels`: one label tensor per batch, or None
  (then HAWQ uses KL to the FP32 outputs).
- `eval_fn(graph) -> float`: quality in points, higher is better (accuracy % on labelled
  evaluation data, or top-1 agreement % with FP32). It is called once on `gm` itself (the
  reference) and once per real evaluation of a quantized graph.
- `budget`: `Budget(max_drop, max_size_bytes, max_size_ratio, max_latency_ms, ...)`.
- `baseline_calibrator`: uniform W8A8 with this calibrator is evaluated first (the compile
  pipeline passes the one uniform INT8 would use).
- `target`: a `quantflow.targets` Target; with `LatencyOptions(mode="measured")` (the
  default) the per-layer latency table is measured on it (cached per device) and
  `max_latency_ms` applies; without one, latency is the BOPs proxy and only reported.
- How to search is grouped by concern (`options.py`; every default is the search's default):
  `SearchOptions` (the space and the loop), `HawqOptions` (the Hessian traces'
  samples and stopping rule), `LatencyOptions` (measured tables or proxy, and their timing).
- Result: `SearchResult.plan` (a serializable QuantPlan; `--config` re-uses it), the best
  trial and whether it satisfies the budget, every trial, the Pareto front (quality,
  latency, size), the per-layer table (sensitivity, option, bits, latency gain), the
  Hessian traces. `stats` (the activation statistics it calibrated) are returned too so the
  caller can quantize the chosen plan without calibrating again.
- Latency limits are validated end to end (`validate`): the best candidates are lowered and
  timed on the target, the first within the limit wins, else uniform W8A8.
- Progress bars: calibration, Hessian draws (with the worst relative error), search.
- Resumable: every real evaluation is in the database (`db`) the moment it finishes; a rerun
  with the same graph and data (hashes) reuses them instead of evaluating again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx

from quantflow.batch import run_size
from quantflow.calibrate import TensorStats, collect_stats
from quantflow.errors import TargetRuntimeError
from quantflow.quantize import quantize
from quantflow.search import quantune as qt
from quantflow.search.costmodel import CostModel, RandomCostModel, XGBCostModel
from quantflow.search.database import EvalDB, Record, model_hash, tensor_hash
from quantflow.search.hawq import HessianTraces, hutchinson_traces, layer_weights, sensitivity_table
from quantflow.search.latency import LatencyTable, bops_table, layer_macs, measure_table
from quantflow.search.learned import LearnedW4
from quantflow.search.options import HawqOptions, LatencyOptions, SearchOptions
from quantflow.search.result import SearchResult
from quantflow.search.space import (
    OPTION_BITS,
    OPTIONS,
    SPACE_VERSION,
    Candidate,
    SearchSpace,
    global_configs,
    layer_plan,
    size_table,
)
from quantflow.search.validate import LatencyCheck, end_to_end_ms, first_within
from quantflow.search.workers import (
    EvalContext,
    Workers,
    evaluate_plan,
    hessian_draw,
    make_workers,
)
from quantflow.spec import KernelRules, QuantPlan

log = logging.getLogger("quantflow.search")
FP32_KEY = "__fp32__"


def build_space(gm: fx.GraphModule, traces: HessianTraces, example_inputs: Sequence[torch.Tensor],
                options: Sequence[str], globs: list, latency: LatencyTable | None
                ) -> SearchSpace:
    """The space with its HAWQ sensitivity tables (one per scheme) and cost tables."""
    layers = [n for n in layer_weights(gm) if n in traces.weight]
    sens = {}
    for g in globs:
        if g.scheme_key not in sens:
            _, sens[g.scheme_key] = sensitivity_table(gm, traces, [layer_plan(o, g)
                                                                  for o in options])
    size = size_table([traces.weight[n].numel for n in layers], options)
    lat = latency.ms if latency is not None else None
    rest = latency.rest_for("W8A8") if latency is not None else 0.0
    return SearchSpace(layers, tuple(options), globs, sens, size, lat, rest)


def search_mixed(
    gm: fx.GraphModule,
    calib_batches: Sequence[Sequence[torch.Tensor]],
    eval_fn: Callable[[fx.GraphModule], float],
    budget: qt.Budget | None = None,
    target: Any = None,
    *,
    labels: Sequence[torch.Tensor] | None = None,
    stats: dict[str, TensorStats] | None = None,
    search: SearchOptions | None = None,
    hawq: HawqOptions | None = None,
    latency: LatencyOptions | None = None,
    db: EvalDB | str | Path | None = None,
    data_key: str = "",
    placement: str | KernelRules = "ort",
    baseline_calibrator: str | None = None,
    learned: LearnedW4 | None = None,
    progress: bool = True,
    fixed: dict[str, str] | None = None,
    workers: int | Workers = 1,
    ray_address: str | None = None,
) -> SearchResult:
    """Choose per-layer precisions under `budget` (contract: module docstring). `learned`:
    learned 4-bit rounding (search/learned.py) to price and evaluate 4-bit layers with.
    `fixed`: node -> option the search must keep (--keep-float, --bits-for); its option
    may lie outside `search.options`, which then bind the other layers only. `workers` /
    `ray_address`: where candidates are evaluated (search/workers.py; the same result for
    any count, `eval_fn` must then be picklable)."""
    t0 = time.perf_counter()
    budget = (budget or qt.Budget()).effective()
    opts = search or SearchOptions()
    hq = hawq or HawqOptions()
    lat_opts = latency or LatencyOptions()
    fixed = dict(fixed or {})
    free = opts.options
    options = free + tuple(o for o in OPTIONS if o in fixed.values() and o not in free)
    batches = [tuple(b) for b in calib_batches]
    example = batches[0]
    # latency is measured at batch 1 (what the report and deployments time); the tables and
    # end-to-end checks were once taken at the calibration batch (32) by mistake
    one = tuple(t[:run_size(gm, 1)] for t in example)  # a static-batch graph: its batch
    if stats is None:
        stats = collect_stats(gm, batches, progress=progress)
    per_sample = max(1, sum(int(t[0].numel()) for t in example))
    h_samples = max(1, min(hq.max_samples, hq.max_elements // per_sample))
    step = run_size(gm, 1)  # whole chunks for a static-batch graph
    h_batches, h_labels = _first_samples(batches, labels, hq.batches,
                                         max(step, h_samples // step * step))
    # the traces' work cap in forward MACs over the Hessian samples (HawqOptions.max_gmacs)
    one_macs = sum(layer_macs(gm, [t[:step] for t in h_batches[0]]).values()) / step
    tro = hq.trace_options(one_macs * sum(len(b[0]) for b in h_batches) / 1e9)
    # the workers get the Hessian batches too: the draws are tasks like the evaluations
    pool = workers if isinstance(workers, Workers) else make_workers(
        EvalContext(gm, stats, placement, learned, eval_fn,
                    hessian=(h_batches, h_labels, tro, opts.seed)), workers, ray_address)
    database: EvalDB | None = None
    try:
        traces = hutchinson_traces(gm, h_batches, h_labels, options=tro, seed=opts.seed,
                                   progress=progress, parallel=pool.parallel,
                                   draws=None if pool.ctx.hessian is None
                                   else lambda idx: pool.run(hessian_draw, idx))
        m_hash = model_hash(gm)
        d_hash = tensor_hash([t for b in batches for t in b],
                             f"{data_key}|{KernelRules.of(placement).key()}|space={SPACE_VERSION}"
                             + (f"|{learned.key()}" if learned else "")
                             + (f"|fixed={sorted(fixed.items())}" if fixed else ""))
        globs = global_configs(opts.calibrators, opts.schemes, opts.granularities)
        layers = [n for n in layer_weights(gm) if n in traces.weight]

        def quantize_with(assign: dict[str, str], glob: Any = globs[0]) -> fx.GraphModule:
            plan = QuantPlan(default=layer_plan("W8A8", glob),
                             layers={n: layer_plan(assign.get(n, "FP32"), glob) for n in layers})
            return quantize(gm, plan, stats, placement)

        table: LatencyTable | None = None
        if target is not None and lat_opts.mode == "measured":
            try:
                table = measure_table(gm, one, layers, options, quantize_with, target,
                                      model_hash=m_hash, latency=lat_opts, progress=progress)
            except TargetRuntimeError as exc:
                if budget.max_latency_ms is not None:
                    raise  # a latency budget has no meaning without measurements
                log.warning("search: %s; pricing candidates with the BOPs proxy instead", exc)
                target = None  # nothing left to validate end to end on it either
        if table is None:
            table = bops_table(gm, example, layers, options)
        if budget.max_latency_ms is not None and table.method == "bops_proxy":
            raise ValueError("a latency budget needs a target to measure per-layer latency on "
                             "(target=..., LatencyOptions(mode='measured')); the BOPs proxy has "
                             "no unit of time")
        # the proxy table is only reported (per-layer table); measured ones price candidates
        space = build_space(gm, traces, example, options, globs,
                            None if table.method == "bops_proxy" else table)
        if learned is not None:
            learned.reprice(space)
        if fixed or options != free:
            space.fix(fixed, free)

        database = db if isinstance(db, EvalDB) else EvalDB(db)
        reused = 0

        ref_rec = database.get(m_hash, d_hash, FP32_KEY)
        if ref_rec is None:
            ref_q = float(eval_fn(gm))
            database.put(Record(m_hash, d_hash, FP32_KEY, (), ref_q, ref_q, None, None, 0.0))
        else:
            ref_q = ref_rec.quality

        def evaluate_round(cs: list[Candidate]) -> list[qt.Trial]:
            """The database answers what it holds; the workers evaluate the rest, and their rows
            are written here, by the driver only, once per candidate, in pick order, each as
            soon as it is known."""
            nonlocal reused
            recs = [database.get(m_hash, d_hash, c.key()) for c in cs]
            todo = [c for c, r in zip(cs, recs) if r is None]
            got = pool.run(evaluate_plan, [space.plan(c) for c in todo])
            out = []
            for c, rec in zip(cs, recs):
                size, lat = space.size_bytes(c), space.latency_ms(c)
                reused += rec is not None
                q, secs = (rec.quality, 0.0) if rec is not None else next(got)
                if rec is None:
                    database.put(Record(m_hash, d_hash, c.key(), tuple(space.features(c)), q, ref_q,
                                        size, lat, secs))
                out.append(qt.Trial(c, q, ref_q, size, lat, reused=rec is not None))
            return out

        def evaluate(c: Candidate) -> qt.Trial:
            return evaluate_round([c])[0]

        rng = np.random.default_rng(opts.seed)
        start = qt.seeds(space, budget)
        cands = qt.candidate_pool(space, budget, start, opts.pool_size, rng)
        cm: CostModel
        if opts.strategy == "xgb":
            xgb_model = XGBCostModel(seed=opts.seed, bootstrap=True)
            n_feat = len(space.features(start[0]))
            if opts.warm_start:
                wx, wy = database.warm_start_rows(m_hash, n_feat)
                xgb_model.warm_start(wx, wy)
            # this model's own earlier rows (an interrupted run) are NOT pre-loaded: with the same
            # seed the rerun replays the same picks, answered from the database, and carries on
            cm = xgb_model
        else:
            cm = RandomCostModel(opts.seed)
        # uniform W8A8 with the caller's calibrator (what --bits 8 ships) is evaluated first:
        # the search can then only return something at least as good on its own data
        base = [qt.uniform(space, "W8A8", g) for g in globs
                if g.calibrator == baseline_calibrator and "W8A8" in options][:1]
        mode = budget.mode(space)
        cheapest: list[Candidate] = []
        if mode != "quality":  # minimizing a cost: the baseline scheme's cheapest seed first
            same = [c for c in start if not base or c.glob == base[0].glob]
            cost = space.size_bytes if mode == "size" else (lambda c: space.latency_ms(c) or 0.0)
            cheapest = [min(same, key=cost)] if same else start[:1]
        trials = qt.run_search(space, cands, evaluate, budget, opts.loop(), cost_model=cm,
                               first=base + cheapest + start[:1], progress=progress,
                               prior=qt.hawq_prior(space, budget), evaluate_round=evaluate_round)
        ok = [t for t in trials if qt.satisfies(t, budget, space)]
        best = max(ok or trials, key=lambda t: qt.objective(t, budget, space))
        if not ok:
            log.warning("mixed-precision search: no evaluated configuration meets the budget "
                        "%s; returning the best found (drop %.2f points)", budget, best.drop)
        checks: list[LatencyCheck] = []
        if ok and space.latency is not None and target is not None \
                and (budget.max_latency_ms is not None or budget.max_latency_ratio is not None):
            # may evaluate the uniform W8A8 fallback: the database must still be open
            best, checks = _validate_latency(gm, stats, placement, one, target, space,
                                             budget, ok, evaluate, opts.validate_top,
                                             lat_opts, base[0] if base else None)
            trials = trials + [t for t in [best] if t not in trials]
    finally:
        if not isinstance(workers, Workers):
            pool.close()
        if database is not None and not isinstance(db, EvalDB):
            database.close()
    return SearchResult(
        plan=space.plan(best.candidate), best=best, satisfied=bool(ok),
        reference_quality=ref_q, trials=trials, pareto=qt.pareto_front(trials),
        layers=_layer_rows(space, traces, table, best.candidate), traces=traces,
        latency=table, budget=budget, real_evaluations=sum(not t.reused for t in trials),
        reused_evaluations=reused, seconds=time.perf_counter() - t0, stats=stats,
        latency_checks=checks)


def _validate_latency(gm: fx.GraphModule, stats: dict[str, TensorStats],
                      placement: str | KernelRules,
                      example: Sequence[torch.Tensor], target: Any, space: SearchSpace,
                      budget: qt.Budget, ok: list[qt.Trial],
                      evaluate: Callable[[Candidate], qt.Trial], top: int,
                      timing: LatencyOptions, baseline: Candidate | None = None
                      ) -> tuple[qt.Trial, list[LatencyCheck]]:
    """The best trial whose END-TO-END latency is within the limit (see `validate`)."""
    ranked = sorted(ok, key=lambda t: -qt.objective(t, budget, space))
    w8 = baseline or qt.uniform(space, "W8A8", ranked[0].candidate.glob)

    def measure(c: Candidate) -> float:
        return end_to_end_ms(quantize(gm, space.plan(c), stats, placement), example, target,
                             runs=timing.runs, warmup=timing.warmup)

    limits = [budget.max_latency_ms] if budget.max_latency_ms is not None else []
    if budget.max_latency_ratio is not None:
        limits.append(budget.max_latency_ratio * measure(w8))
    chosen, checks = first_within(ranked, lambda t: measure(t.candidate), min(limits),
                                  lambda t: t.latency_ms, lambda t: t.candidate.label(), top)
    if chosen is not None:
        return chosen, checks
    fallback = evaluate(w8)
    log.warning("mixed-precision search: none of the %d best candidates is within %.3f ms when "
                "measured end to end (%s); falling back to uniform W8A8 (drop %.2f points)",
                len(checks), min(limits),
                ", ".join(f"{c.measured_ms:.3f} ms" for c in checks), fallback.drop)
    return fallback, checks


def _first_samples(batches: list[tuple[torch.Tensor, ...]],
                   labels: Sequence[torch.Tensor] | None, max_batches: int, max_samples: int
                   ) -> tuple[list[tuple[torch.Tensor, ...]], list[torch.Tensor] | None]:
    """At most `max_batches` batches and `max_samples` samples for the Hessian traces.

    A Hutchinson draw costs a double backward pass over every sample, ~20× a forward pass
    through depthwise convs: on 224² inputs (ImageNet MobileNetV2) ~0.9 s per sample and draw
    on one core, so search_mixed caps the samples by input elements (8 ImageNet images, all
    128 Fashion-MNIST ones) and the draws by time (`HawqOptions`).
    """
    out_b: list[tuple[torch.Tensor, ...]] = []
    out_l: list[torch.Tensor] = []
    left = max_samples
    for i, b in enumerate(batches[:max_batches]):
        if left <= 0:
            break
        n = min(left, b[0].shape[0])
        out_b.append(tuple(t[:n] for t in b))
        if labels is not None:
            out_l.append(labels[i][:n])
        left -= n
    return out_b, (out_l if labels is not None else None)


def _layer_rows(space: SearchSpace, traces: HessianTraces, table: LatencyTable,
                c: Candidate) -> list[dict[str, Any]]:
    rows = []
    sens = space.sens[c.glob.scheme_key]
    fp = space.options.index("FP32") if "FP32" in space.options else None
    for i, (n, o) in enumerate(zip(space.layers, c.options)):
        k = space.options.index(o)
        wb, ab = OPTION_BITS[o]
        gain = float(table.ms[i, fp] - table.ms[i, k]) if fp is not None else 0.0
        rows.append({"layer": n, "option": o, "weight_bits": wb, "act_bits": ab,
                     "trace_per_param": traces.weight[n].mean_diag,
                     "weight_trace": traces.weight[n].trace, "act_trace": traces.act[n].trace,
                     "sensitivity": float(sens[i, k]), "latency_gain_ms": gain,
                     "latency_unit": "GBOPs" if table.method == "bops_proxy" else "ms"})
    return rows
