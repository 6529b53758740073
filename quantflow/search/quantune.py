"""The Quantune search loop: exact ILP start → cost-model-guided proposals → real evaluations.

1. Seeds: for every global configuration, the exact HAWQ-V3 allocation (`allocate.solve_milp`)
   of per-layer options under the size/latency budget: the best candidates the second-order
   model can name. With only an accuracy budget, seeds sweep the cost axis instead.
2. Pool: seeds, their mutations (a few layers or one global choice changed) and random
   candidates, all within the size/latency budget (those are exact sums, no evaluation
   needed).
3. Loop (`run_search`): the cost model ranks the unevaluated pool by predicted objective, the
   best goes to a real evaluation (with probability `explore` a random one, so a wrong model
   cannot starve a region), the result updates the model, and mutations of the best trials so
   far join the pool (local search around what works, as in TVM's evolutionary search).
   "random" and "grid" strategies visit the same pool in random or enumeration order: the
   baselines of the benchmark.

Objective (higher is better) of a trial:
- some size/latency budget: the measured quality (the cost budget is a hard filter), and a
  trial over `max_drop` still ranks by quality but does not satisfy the budget;
- only `max_drop`: the cheapest (latency if measured, else size) trial within the drop wins;
  trials over the drop rank below every trial within it.
The cost model learns −drop (quality relative to FP32), which transfers across models.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from tqdm import tqdm

from quantflow.search.allocate import InfeasibleBudgetError, solve_milp
from quantflow.search.costmodel import CostModel
from quantflow.search.space import Candidate, GlobalConfig, SearchSpace

log = logging.getLogger("quantflow.search")


@dataclass(frozen=True)
class Budget:
    """What the user allows. Defaults: nothing beyond the size of uniform INT8."""

    max_drop: float | None = None  # accuracy (or agreement) points
    max_size_bytes: float | None = None
    max_size_ratio: float | None = None  # × the weight bytes of uniform W8
    max_latency_ms: float | None = None

    def size_limit(self, space: SearchSpace) -> float | None:
        limits = [v for v in (self.max_size_bytes,
                              None if self.max_size_ratio is None
                              else self.max_size_ratio * space.int8_size()) if v is not None]
        return min(limits) if limits else None

    @property
    def has_cost_budget(self) -> bool:
        return any(v is not None for v in (self.max_size_bytes, self.max_size_ratio,
                                            self.max_latency_ms))

    def effective(self) -> Budget:
        """No budget at all means: the best quality at the size of uniform INT8."""
        if self.has_cost_budget or self.max_drop is not None:
            return self
        return replace(self, max_size_ratio=1.0)


@dataclass(frozen=True)
class Trial:
    """One (real or database-reused) evaluation of a candidate."""

    candidate: Candidate
    quality: float
    reference_quality: float
    size_bytes: float
    latency_ms: float | None
    reused: bool = False

    @property
    def drop(self) -> float:
        return self.reference_quality - self.quality


def objective(t: Trial, budget: Budget, space: SearchSpace) -> float:
    """Higher is better (see module docstring)."""
    if budget.has_cost_budget or budget.max_drop is None:
        return t.quality
    if t.drop > budget.max_drop:
        return -1e6 - t.drop
    cost = t.latency_ms if t.latency_ms is not None else t.size_bytes
    ref = space.latency_ms(Candidate(space.globs[0], ("W8A8",) * len(space.layers))) \
        if t.latency_ms is not None and "W8A8" in space.options else space.int8_size()
    return -float(cost) / max(float(ref or 1.0), 1e-12)


def satisfies(t: Trial, budget: Budget, space: SearchSpace) -> bool:
    ok = space.feasible(t.candidate, budget.size_limit(space), budget.max_latency_ms)
    return ok and (budget.max_drop is None or t.drop <= budget.max_drop + 1e-9)


# --------------------------------------------------------------------------- candidates


def seeds(space: SearchSpace, budget: Budget, sweep: int = 6) -> list[Candidate]:
    """Exact ILP allocations per global configuration (see module docstring)."""
    n_layers = len(space.layers)
    costs, limits = [], []
    size_limit = budget.size_limit(space)
    if size_limit is not None:
        costs.append(space.size)
        limits.append(size_limit)
    if budget.max_latency_ms is not None and space.latency is not None:
        costs.append(space.latency)
        limits.append(budget.max_latency_ms - space.latency_rest)
    by_scheme: dict[tuple[bool, str], list[tuple[str, ...]]] = {}
    for key, sens in space.sens.items():
        choices: list[tuple[str, ...]] = []
        if costs:
            budgets = [(np.asarray(costs), np.asarray(limits))]
        else:  # accuracy budget only: sweep the cost axis from cheapest to most expensive
            axis = space.latency if space.latency is not None else space.size
            lo, hi = axis.min(axis=1).sum(), axis.max(axis=1).sum()
            budgets = [(axis[None], np.asarray([b])) for b in np.linspace(lo, hi, sweep)]
        for c, b in budgets:
            try:
                a = solve_milp(sens, c, b)
            except InfeasibleBudgetError:
                continue
            opts = tuple(space.options[k] for k in a.choice)
            if opts not in choices:
                choices.append(opts)
        by_scheme[key] = choices
    out = [Candidate(g, o) for g in space.globs for o in by_scheme[g.scheme_key]]
    if not out:
        raise InfeasibleBudgetError(
            f"mixed-precision search: no per-layer allocation of {space.options} fits the budget "
            f"{budget} ({n_layers} layers); fix: raise --max-size / --max-latency")
    return out


def mutate(space: SearchSpace, c: Candidate, rng: np.random.Generator, n_changes: int = 1
           ) -> Candidate:
    """Change `n_changes` random layers' options, or (one time in four) one global choice."""
    if rng.random() < 0.25 and len(space.globs) > 1:
        return Candidate(space.globs[int(rng.integers(len(space.globs)))], c.options)
    opts = list(c.options)
    for i in rng.choice(len(opts), size=min(n_changes, len(opts)), replace=False):
        opts[int(i)] = space.options[int(rng.integers(len(space.options)))]
    return Candidate(c.glob, tuple(opts))


def random_candidate(space: SearchSpace, rng: np.random.Generator) -> Candidate:
    g = space.globs[int(rng.integers(len(space.globs)))]
    return Candidate(g, tuple(space.options[int(rng.integers(len(space.options)))]
                              for _ in space.layers))


def candidate_pool(space: SearchSpace, budget: Budget, start: Sequence[Candidate], n: int,
                   rng: np.random.Generator, max_tries: int = 50) -> list[Candidate]:
    """`start` plus up to n feasible, distinct mutations / random candidates."""
    size, lat = budget.size_limit(space), budget.max_latency_ms
    pool: dict[str, Candidate] = {c.key(): c for c in start}
    target = len(pool) + n
    for _ in range(n * max_tries):
        if len(pool) >= target:
            break
        if start and rng.random() < 0.7:
            base = start[int(rng.integers(len(start)))]
            c = mutate(space, base, rng, int(rng.integers(1, 4)))
        else:
            c = random_candidate(space, rng)
        if c.key() not in pool and space.feasible(c, size, lat):
            pool[c.key()] = c
    return list(pool.values())


# --------------------------------------------------------------------------- the loop


def run_search(space: SearchSpace, pool: Sequence[Candidate],
               evaluate: Callable[[Candidate], Trial], budget: Budget, *, strategy: str = "xgb",
               max_evals: int = 24, cost_model: CostModel | None = None,
               first: Sequence[Candidate] = (), explore: float = 0.1, grow_pool: bool = True,
               seed: int = 0, progress: bool = True,
               prior: Callable[[Candidate], float] | None = None, min_rows: int = 4,
               on_trial: Callable[[Trial], None] | None = None) -> list[Trial]:
    """Evaluate up to `max_evals` candidates chosen by `strategy` ("xgb", "random", "grid").

    `first` are evaluated before anything else (the ILP seed). With strategy "xgb",
    `cost_model` must be given (it may already hold warm-start rows); while it holds fewer
    than `min_rows` rows, `prior` (higher is better, e.g. −Σ Ω) ranks the candidates.
    """
    if strategy not in ("xgb", "random", "grid"):
        raise ValueError(f"strategy must be xgb, random or grid, got {strategy!r}")
    if strategy == "xgb" and cost_model is None:
        raise ValueError("strategy 'xgb' needs a cost_model")
    rng = np.random.default_rng(seed)
    cands = list(pool)
    keys = {c.key() for c in cands}
    for c in first:
        if c.key() not in keys:
            cands.append(c)
            keys.add(c.key())
    feats = [space.features(c) for c in cands]
    order = list(range(len(cands)))
    if strategy == "random":
        rng.shuffle(order)
    done: set[str] = set()
    trials: list[Trial] = []
    queue = [c.key() for c in first]
    by_key = {c.key(): i for i, c in enumerate(cands)}
    bar = tqdm(total=min(max_evals, len(cands)), desc=f"search ({strategy})",
               disable=not progress, leave=False)
    while len(trials) < max_evals:
        remaining = [i for i in order if cands[i].key() not in done]
        if not remaining:
            break
        pick: int | None = None
        while queue and pick is None:
            k = queue.pop(0)
            if k not in done:
                pick = by_key[k]
        if pick is None:
            n_rows = int(getattr(cost_model, "n_rows", len(trials)))
            if strategy != "xgb":
                pick = remaining[0]
            elif rng.random() < explore or not trials:
                pick = int(rng.choice(remaining))
            elif n_rows < min_rows and prior is not None:
                # too little data to fit trees: trust the analytic (HAWQ) ranking meanwhile
                pick = remaining[int(np.argmax([prior(cands[i]) for i in remaining]))]
            else:
                assert cost_model is not None
                pred_drop = -cost_model.predict(np.asarray([feats[i] for i in remaining]))
                ref = trials[0].reference_quality
                scores = [objective(Trial(cands[i], ref - d, ref, space.size_bytes(cands[i]),
                                          space.latency_ms(cands[i])), budget, space)
                          for i, d in zip(remaining, pred_drop)]
                pick = remaining[int(np.argmax(scores))]
        c = cands[pick]
        t = evaluate(c)
        done.add(c.key())
        trials.append(t)
        bar.update(1)
        bar.set_postfix(best=f"{max(objective(x, budget, space) for x in trials):.3g}")
        if on_trial is not None:
            on_trial(t)
        if cost_model is not None:
            cost_model.update(feats[pick][None], np.asarray([-t.drop]))
        if grow_pool and strategy == "xgb":
            best = sorted(trials, key=lambda x: -objective(x, budget, space))[:3]
            for new in candidate_pool(space, budget, [b.candidate for b in best], 8, rng):
                if new.key() not in keys:
                    keys.add(new.key())
                    by_key[new.key()] = len(cands)
                    cands.append(new)
                    feats.append(space.features(new))
                    order.append(len(cands) - 1)
    bar.close()
    return trials


def pareto_front(trials: Sequence[Trial]) -> list[Trial]:
    """Trials not dominated in (quality ↑, latency ↓ (when known), size ↓)."""
    def vec(t: Trial) -> tuple[float, float, float]:
        return (-t.quality, t.latency_ms if t.latency_ms is not None else 0.0, t.size_bytes)

    front: list[Trial] = []
    for t in trials:
        v = vec(t)
        dominated = any(all(a <= b for a, b in zip(vec(o), v)) and vec(o) != v for o in trials)
        if not dominated and all(vec(f) != v for f in front):
            front.append(t)
    return sorted(front, key=lambda t: (t.size_bytes, -t.quality))


def hawq_prior(space: SearchSpace, budget: Budget) -> Callable[[Candidate], float] | None:
    """−Σ Ω: the second-order model's ranking, for maximizing quality under a cost budget."""
    if budget.has_cost_budget or budget.max_drop is None:
        return lambda c: -space.sensitivity(c)
    return None


def uniform(space: SearchSpace, option: str, glob: GlobalConfig | None = None) -> Candidate:
    return Candidate(glob or space.globs[0], (option,) * len(space.layers))
