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

Objective (higher is better) of a trial, by `Budget.mode`:
- "quality" (a size/latency budget, or none at all): the measured quality; the cost budget is
  a hard filter, and a trial over `max_drop` still ranks by quality but does not satisfy it;
- "size" / "latency" (`minimize=`, or only `max_drop` given): the cheapest trial within the
  drop wins, any size/latency limits still apply as hard filters (e.g. "smallest, but never
  slower than uniform INT8": `Budget(max_drop=1, minimize="size", max_latency_ratio=1)`);
  trials over the drop rank below every trial within it.
The cost model learns −drop (quality relative to FP32), which transfers across models.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from quantflow.progress import bar as progress_bar
from quantflow.search.allocate import InfeasibleBudgetError, solve_milp
from quantflow.search.costmodel import CostModel
from quantflow.search.options import LoopOptions
from quantflow.search.space import Candidate, GlobalConfig, SearchSpace

log = logging.getLogger("quantflow.search")


OBJECTIVES = ("quality", "size", "latency")


@dataclass(frozen=True)
class Budget:
    """What the user allows, and what to optimize within it.

    `minimize`: None picks automatically (see `mode`); "size" / "latency" means the cheapest
    candidate whose drop is within `max_drop` (which is then required); "quality" means the
    best quality within the size/latency limits. `max_latency_ratio` is relative to the
    measured table latency of uniform W8A8 (it needs a measured table; with the BOPs proxy it
    is ignored, as is `max_latency_ms`).
    """

    max_drop: float | None = None  # accuracy (or agreement) points
    max_size_bytes: float | None = None
    max_size_ratio: float | None = None  # × the weight bytes of uniform W8
    max_latency_ms: float | None = None
    max_latency_ratio: float | None = None  # × the table latency of uniform W8A8
    minimize: str | None = None

    def __post_init__(self) -> None:
        if self.minimize is not None and self.minimize not in OBJECTIVES:
            raise ValueError(f"Budget.minimize must be one of {OBJECTIVES}, got "
                             f"{self.minimize!r}")
        if self.minimize in ("size", "latency") and self.max_drop is None:
            raise ValueError(f"Budget(minimize={self.minimize!r}) needs max_drop: the cheapest "
                             "candidate with no quality bound is simply the smallest option")

    def size_limit(self, space: SearchSpace) -> float | None:
        limits = [v for v in (self.max_size_bytes,
                              None if self.max_size_ratio is None
                              else self.max_size_ratio * space.int8_size()) if v is not None]
        return min(limits) if limits else None

    def latency_limit(self, space: SearchSpace) -> float | None:
        """End-to-end table latency limit (ms), or None without a measured table."""
        if space.latency is None:
            return None
        w8 = space.latency_ms(uniform(space, "W8A8")) if "W8A8" in space.options else None
        limits = [v for v in (self.max_latency_ms,
                              None if self.max_latency_ratio is None or w8 is None
                              else self.max_latency_ratio * w8) if v is not None]
        return min(limits) if limits else None

    def constraints(self, space: SearchSpace) -> tuple[list[np.ndarray], list[float]]:
        """[L, K] cost tables and the limits on their sums (latency without its rest)."""
        tables, limits = [], []
        size = self.size_limit(space)
        if size is not None:
            tables.append(space.size)
            limits.append(size)
        lat = self.latency_limit(space)
        if lat is not None and space.latency is not None:
            tables.append(space.latency)
            limits.append(lat - space.latency_rest)
        return tables, limits

    @property
    def has_cost_budget(self) -> bool:
        return any(v is not None for v in (self.max_size_bytes, self.max_size_ratio,
                                            self.max_latency_ms, self.max_latency_ratio))

    def mode(self, space: SearchSpace) -> str:
        """What is optimized: explicit `minimize`, else quality when a size/latency budget (or
        no drop budget) is given, else the cheapest within the drop (latency when measured)."""
        if self.minimize is not None:
            return "latency" if self.minimize == "latency" and space.latency is not None \
                else ("size" if self.minimize == "latency" else self.minimize)
        if self.has_cost_budget or self.max_drop is None:
            return "quality"
        return "latency" if space.latency is not None else "size"

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
    """Higher is better (see module docstring and `Budget.mode`)."""
    mode = budget.mode(space)
    if mode == "quality":
        return t.quality
    assert budget.max_drop is not None  # Budget.__post_init__ / mode guarantee it
    if t.drop > budget.max_drop:
        return -1e6 - t.drop
    if mode == "latency" and t.latency_ms is not None:
        cost, ref = t.latency_ms, space.latency_ms(uniform(space, "W8A8"))
    else:
        cost, ref = t.size_bytes, space.int8_size()
    # among equally cheap candidates the better one wins (the quality term is < 1e-3)
    return -float(cost) / max(float(ref or 1.0), 1e-12) + 1e-6 * t.quality


def satisfies(t: Trial, budget: Budget, space: SearchSpace) -> bool:
    ok = space.feasible(t.candidate, budget.size_limit(space), budget.latency_limit(space))
    return ok and (budget.max_drop is None or t.drop <= budget.max_drop + 1e-9)


# --------------------------------------------------------------------------- candidates


def seeds(space: SearchSpace, budget: Budget, sweep: int = 6) -> list[Candidate]:
    """Exact ILP allocations per global configuration (see module docstring)."""
    n_layers = len(space.layers)
    tables, limits = budget.constraints(space)
    mode = budget.mode(space)
    by_scheme: dict[tuple[bool, str], list[tuple[str, ...]]] = {}
    for key, sens in space.sens.items():
        choices: list[tuple[str, ...]] = []
        if mode == "quality":
            budgets = [(tables, limits)]
        else:  # cheapest within a drop: sweep the cost axis from cheapest to most expensive
            axis = space.latency if mode == "latency" and space.latency is not None \
                else space.size
            lo, hi = axis.min(axis=1).sum(), axis.max(axis=1).sum()
            budgets = [(tables + [axis], limits + [b]) for b in np.linspace(lo, hi, sweep)]
        for c, b in budgets:
            try:  # no constraint at all: every layer takes its least sensitive option
                a = solve_milp(sens, np.asarray(c), np.asarray(b)) if c else None
            except InfeasibleBudgetError:
                continue
            idx = a.choice if a is not None else list(np.argmin(sens, axis=1))
            opts = space.pin(tuple(space.options[k] for k in idx))
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
    return Candidate(c.glob, space.pin(tuple(opts)))


def random_feasible(space: SearchSpace, budget: Budget, rng: np.random.Generator,
                    max_tries: int = 100) -> Candidate:
    """A random candidate within the size/latency budget, by sequential sampling.

    Layers are visited in a random order; each draws uniformly among the options that keep
    the budget reachable (what is spent so far + this option + the cheapest option of every
    layer still to visit). Rejection sampling of uniform candidates would almost never hit a
    tight budget (at 0.6 × INT8 size a single FP32 layer can exceed it), so this is the
    baseline "random search over the feasible space" and the pool's random part. With one
    cost table every draw is feasible; with two (size and latency) their cheapest options can
    differ, so a draw is checked and redrawn (`max_tries`).
    """
    tables, limits = budget.constraints(space)
    n_layers, n_opts = len(space.layers), len(space.options)
    lim = np.asarray(limits) * (1 + 1e-9)
    cheapest = np.asarray([t.min(axis=1) for t in tables]).reshape(len(tables), n_layers)
    if (cheapest.sum(axis=1) > lim).any():
        raise InfeasibleBudgetError(f"no candidate fits the budget {budget}: even the cheapest "
                                    "option of every layer exceeds it; fix: raise the budget")
    cost = np.stack(tables) if tables else np.zeros((0, n_layers, n_opts))
    for _ in range(max_tries):
        g = space.globs[int(rng.integers(len(space.globs)))]
        choice = np.zeros(n_layers, dtype=int)
        spent = np.zeros(len(tables))
        remaining = cheapest.sum(axis=1)
        for i in rng.permutation(n_layers):
            remaining = remaining - cheapest[:, i]
            ok = np.flatnonzero((spent[:, None] + cost[:, i, :] + remaining[:, None]
                                 <= lim[:, None]).all(axis=0))
            # none reachable in every table at once: take the cheapest in the tightest table
            k = int(rng.choice(ok)) if ok.size else int(np.argmin(cost[int(np.argmax(
                (spent + remaining) / lim)), i]))
            choice[i] = k
            spent = spent + cost[:, i, k]
        c = Candidate(g, space.pin(tuple(space.options[k] for k in choice)))
        # the same test the pool and `satisfies` apply (limits with the latency rest, their
        # own tolerance), so a draw never disagrees with them at the edge of the budget
        if (spent <= lim).all() and space.feasible(c, budget.size_limit(space),
                                                   budget.latency_limit(space)):
            return c
    raise InfeasibleBudgetError(f"no random candidate met the budget {budget} in {max_tries} "
                                "draws (size and latency limits pull apart); fix: loosen one")


def candidate_pool(space: SearchSpace, budget: Budget, start: Sequence[Candidate], n: int,
                   rng: np.random.Generator, max_tries: int = 50) -> list[Candidate]:
    """`start` plus up to n feasible, distinct mutations / random candidates."""
    size, lat = budget.size_limit(space), budget.latency_limit(space)
    pool: dict[str, Candidate] = {c.key(): c for c in start}
    target = len(pool) + n
    for _ in range(n * max_tries):
        if len(pool) >= target:
            break
        if start and rng.random() < 0.7:
            base = start[int(rng.integers(len(start)))]
            c = mutate(space, base, rng, int(rng.integers(1, 4)))
        else:
            c = random_feasible(space, budget, rng)
        if c.key() not in pool and space.feasible(c, size, lat):
            pool[c.key()] = c
    return list(pool.values())


# --------------------------------------------------------------------------- the loop


def run_search(space: SearchSpace, pool: Sequence[Candidate],
               evaluate: Callable[[Candidate], Trial], budget: Budget,
               loop: LoopOptions | None = None, *, cost_model: CostModel | None = None,
               first: Sequence[Candidate] = (), prior: Callable[[Candidate], float] | None = None,
               progress: bool = True, on_trial: Callable[[Trial], None] | None = None,
               evaluate_round: Callable[[list[Candidate]], list[Trial]] | None = None
               ) -> list[Trial]:
    """Evaluate up to `loop.max_evals` candidates chosen by `loop.strategy` ("xgb", "random",
    "grid"; `LoopOptions` has the rest of how the loop runs).

    `first` are evaluated before anything else (the ILP seed). With strategy "xgb",
    `cost_model` must be given (it may already hold warm-start rows); while it holds fewer
    than `loop.min_rows` rows, `prior` (higher is better, e.g. −Σ Ω) ranks the candidates.
    `evaluate_round` (optional): evaluates a round of `loop.round_size` picks at once, in
    order (search/workers.py runs them in parallel); without it `evaluate` runs each.
    """
    opt = loop or LoopOptions()
    if opt.strategy == "xgb" and cost_model is None:
        raise ValueError("strategy 'xgb' needs a cost_model")
    rng = np.random.default_rng(opt.seed)
    cands = list(pool)
    keys = {c.key() for c in cands}
    for c in first:
        if c.key() not in keys:
            cands.append(c)
            keys.add(c.key())
    feats = [space.features(c) for c in cands]
    order = list(range(len(cands)))
    if opt.strategy == "random":
        rng.shuffle(order)
    done: set[str] = set()
    trials: list[Trial] = []
    queue = [c.key() for c in first]
    by_key = {c.key(): i for i, c in enumerate(cands)}
    bar = progress_bar(min(opt.max_evals, len(cands)), f"search ({opt.strategy})", "trial",
                       disable=not progress)
    run_round = evaluate_round or (lambda cs: [evaluate(c) for c in cs])
    while len(trials) < opt.max_evals:
        # a round of picks made with the same model, evaluated together (in parallel when
        # the caller has workers) and learned from in pick order: its size never depends
        # on the worker count, so every worker count gives the same search
        picks: list[int] = []
        for _ in range(min(opt.round_size, opt.max_evals - len(trials))):
            pick = _pick(opt, cands, feats, order, done, picks, queue, by_key, trials,
                         cost_model, prior, rng, space, budget)
            if pick is None:
                break
            picks.append(pick)
        if not picks:
            break
        for pick, t in zip(picks, run_round([cands[i] for i in picks])):
            done.add(cands[pick].key())
            trials.append(t)
            bar.update(1)
            bar.set_postfix(best=f"{max(objective(x, budget, space) for x in trials):.3g}")
            if on_trial is not None:
                on_trial(t)
            if cost_model is not None:
                cost_model.update(feats[pick][None], np.asarray([-t.drop]))
            if opt.grow_pool and opt.strategy == "xgb":
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


def _pick(opt: LoopOptions, cands: list[Candidate], feats: list, order: list[int],
          done: set[str], picks: list[int], queue: list[str], by_key: dict[str, int],
          trials: list[Trial], cost_model: CostModel | None,
          prior: Callable[[Candidate], float] | None, rng: np.random.Generator,
          space: SearchSpace, budget: Budget) -> int | None:
    """The next candidate of a round (not evaluated, not already picked), or None."""
    taken = done | {cands[i].key() for i in picks}
    remaining = [i for i in order if cands[i].key() not in taken]
    if not remaining:
        return None
    while queue:
        k = queue.pop(0)
        if k not in taken:
            return by_key[k]
    n_rows = int(getattr(cost_model, "n_rows", len(trials)))
    if opt.strategy != "xgb":
        return remaining[0]
    if rng.random() < opt.explore or not trials:
        return int(rng.choice(remaining))
    if n_rows < opt.min_rows and prior is not None:
        # too little data to fit trees: trust the analytic (HAWQ) ranking meanwhile
        return remaining[int(np.argmax([prior(cands[i]) for i in remaining]))]
    assert cost_model is not None
    pred_drop = -cost_model.predict(np.asarray([feats[i] for i in remaining]))
    ref = trials[0].reference_quality
    scores = [objective(Trial(cands[i], ref - d, ref, space.size_bytes(cands[i]),
                              space.latency_ms(cands[i])), budget, space)
              for i, d in zip(remaining, pred_drop)]
    return remaining[int(np.argmax(scores))]


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
    return Candidate(glob or space.globs[0], space.pin((option,) * len(space.layers)))
