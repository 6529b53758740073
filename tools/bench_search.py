"""Benchmark the mixed-precision search: real evaluations to near-best, Quantune vs baselines.

Per zoo model (Fashion-MNIST): fold BN, calibrate, HAWQ traces, and build the Quantune space
(calibrator × activation scheme × weight granularity × per-layer {W8A8, W8A16, W4A8, FP32})
under a weight-size budget (default 0.6 × uniform INT8: most weight bytes must go to 4 bits,
so WHICH layers do matters). Quality = accuracy on `--eval-n` Fashion-MNIST test images,
every evaluation a real quantize + run, stored in the search database at once (a rerun of
the benchmark re-uses them).

1. Reference: a large random search, `--random-pool` distinct candidates drawn by
   `quantune.random_feasible` (uniform options in a random layer order within the budget),
   ALL evaluated.
2. quantune: the product's loop for real (`run_search` as `search_mixed` runs it): the
   HAWQ-V3 ILP seed first, HAWQ ranking until 4 rows, then XGBoost (Poisson-bootstrap
   Thompson sampling, 10 % exploration) on its own pool of seeds + mutations + random
   candidates that grows around the best trials; `--max-evals` evaluations per run.
3. Replayed on the reference pool (scores known, no new evaluations): xgb_on_pool (XGBoost
   alone: no seed, no HAWQ prior: the Quantune paper's setting), xgb_on_pool_warm (warm-
   started from the other models' rows in the database), random (random order = random
   search) and grid (enumeration order).

Metric: real evaluations until a candidate within `--within` points of the BEST FOUND BY ANY
STRATEGY is evaluated (median and mean over `--repeats` seeds; a run that never gets there
counts as its cap + 1). Random search also in closed form: (N+1)/(k+1) with k near-best
candidates among N. Also reported: the ILP seed's own quality (zero search), Spearman of
−Σ Ω vs accuracy, ZeroQ (INT8 calibrated on distilled vs real data) and latency-aware vs
BOPs-proxy allocation on ORT, with the per-layer tables checked end to end and the Q/DQ
switch cost measured (`bench_search_latency.py`; `--latency-only` re-measures just that).

Usage: .venv/bin/python tools/bench_search.py --out bench_results/search [--models ...]
"""


from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from torch import fx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_search_latency

from bench_search_latency import latency_markdown, latency_vs_proxy

from quantflow.calibrate import batched, collect_stats
from quantflow.data import builtin_dataset, load_fashion_mnist
from quantflow.ir import capture
from quantflow.passes import DEFAULT_PIPELINE, run_pipeline
from quantflow.quantize import quantize
from quantflow.search import quantune as qt
from quantflow.search.costmodel import RandomCostModel, XGBCostModel
from quantflow.search.database import EvalDB, Record, model_hash, tensor_hash
from quantflow.search.hawq import hutchinson_traces
from quantflow.search.mixed import build_space
from quantflow.search.options import LoopOptions, TraceOptions
from quantflow.search.space import SPACE_VERSION, Candidate, global_configs
from quantflow.search.zeroq import distill
from quantflow.spec import int8_plan
from quantflow.zoo import get_model


def accuracy(g: fx.GraphModule, x: torch.Tensor, y: torch.Tensor, bs: int = 100) -> float:
    with torch.no_grad():
        pred = torch.cat([g(x[i:i + bs]).argmax(-1) for i in range(0, x.shape[0], bs)])
    return 100.0 * float((pred == y).double().mean())


def _spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b)[0])


def evals_to_target(trials: list[qt.Trial], target: float) -> int | None:
    for i, t in enumerate(trials):
        if t.quality >= target - 1e-9:
            return i + 1
    return None


def _fp32_and_space(name: str, args: argparse.Namespace, model: torch.nn.Module | None
                    ) -> dict[str, Any]:
    """Everything the strategies share: graph, statistics, HAWQ traces, space, budget."""
    model = get_model(name) if model is None else model.eval()
    x_cal, y_cal = builtin_dataset("fashion-mnist-calib")
    assert y_cal is not None
    x_test, y_test = load_fashion_mnist("test", limit=args.eval_n)
    captured = capture(model, (x_cal[:1],))
    gm = copy.deepcopy(captured)
    run_pipeline(gm, DEFAULT_PIPELINE)
    batches = batched(x_cal, 64)
    labels = [y_cal[i:i + 64] for i in range(0, x_cal.shape[0], 64)]
    stats = collect_stats(gm, batches)
    traces = hutchinson_traces(gm, batches[:args.hawq_batches], labels[:args.hawq_batches],
                               options=TraceOptions(rel_tol=0.1, max_iter=args.hawq_iters))
    globs = global_configs(args.calibrators, (False, True), ("channel", "tensor"))
    space = build_space(gm, traces, batches[0], ("W8A8", "W8A16", "W4A8", "FP32"), globs, None)
    return {"captured": captured, "gm": gm, "stats": stats, "traces": traces, "space": space,
            "x_cal": x_cal, "x_test": x_test, "y_test": y_test,
            "fp32": accuracy(gm, x_test, y_test), "m_hash": model_hash(gm),
            "d_hash": tensor_hash([x_cal, x_test],
                                  f"bench|{args.eval_n}|space={SPACE_VERSION}")}


def bench_model(name: str, args: argparse.Namespace, db: EvalDB,
                model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Search efficiency on one model (module docstring), plus ZeroQ and latency sections."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    ctx = _fp32_and_space(name, args, model)
    gm, stats, space, traces = ctx["gm"], ctx["stats"], ctx["space"], ctx["traces"]
    x_test, y_test, fp32 = ctx["x_test"], ctx["y_test"], ctx["fp32"]
    m_hash, d_hash = ctx["m_hash"], ctx["d_hash"]
    budget = qt.Budget(max_size_ratio=args.size_ratio)
    n_real = 0

    def evaluate(c: Candidate) -> qt.Trial:
        """A real evaluation, stored at once (a rerun of the benchmark re-uses it)."""
        nonlocal n_real
        rec = db.get(m_hash, d_hash, c.key())
        if rec is None:
            t1 = time.perf_counter()
            q = accuracy(quantize(gm, space.plan(c), stats), x_test, y_test)
            rec = Record(m_hash, d_hash, c.key(), tuple(space.features(c)), q, fp32,
                         space.size_bytes(c), None, time.perf_counter() - t1)
            db.put(rec)
            n_real += 1
        return qt.Trial(c, rec.quality, fp32, space.size_bytes(c), None)

    # 1. the reference: a large random search over the feasible space, evaluated in full
    rng = np.random.default_rng(12345)
    ref_pool: dict[str, Candidate] = {}
    for _ in range(args.random_pool * 20):
        if len(ref_pool) >= args.random_pool:
            break
        c = qt.random_feasible(space, budget, rng)
        ref_pool.setdefault(c.key(), c)
    pool = list(ref_pool.values())
    scores = {c.key(): evaluate(c).quality
              for c in tqdm(pool, desc=f"{name}: random reference search", leave=False)}

    # 2. the product's loop, for real: ILP seed → HAWQ prior → XGBoost, growing its own pool
    seeds = qt.seeds(space, budget)
    prior = qt.hawq_prior(space, budget)
    runs: dict[str, list[list[qt.Trial]]] = {"quantune": []}
    for r in tqdm(range(args.repeats), desc=f"{name}: quantune runs", leave=False):
        q_pool = qt.candidate_pool(space, budget, seeds, args.pool, np.random.default_rng(r))
        runs["quantune"].append(qt.run_search(
            space, q_pool, evaluate, budget, LoopOptions(max_evals=args.max_evals, seed=r),
            cost_model=XGBCostModel(seed=r, bootstrap=args.bootstrap), first=seeds[:1],
            progress=False, prior=prior))
    best = max([max(scores.values())] + [t.quality for ts in runs["quantune"] for t in ts])

    # 3. strategies replayed on the reference pool (its scores are known: no new evaluations)
    def lookup(c: Candidate) -> qt.Trial:
        return qt.Trial(c, scores[c.key()], fp32, space.size_bytes(c), None)

    n_feat = len(space.features(pool[0]))
    wx, wy = db.warm_start_rows(m_hash, n_feat)  # other models' evaluations, if any
    runs.update({"xgb_on_pool": [], "random": [], "grid": []})
    if len(wy):
        runs["xgb_on_pool_warm"] = []
    globs = space.globs
    grid_pool = sorted(pool, key=lambda c: (globs.index(c.glob), c.options))
    for r in range(args.repeats):
        for strat in [s for s in runs if s != "quantune"]:
            if strat == "grid" and r > 0:
                continue
            if strat.startswith("xgb"):
                cm: Any = XGBCostModel(seed=r, bootstrap=args.bootstrap)
                if strat == "xgb_on_pool_warm":
                    cm.warm_start(wx, wy)
                ts = qt.run_search(space, pool, lookup, budget,
                                   LoopOptions(max_evals=len(pool), grow_pool=False, seed=r),
                                   cost_model=cm, progress=False)
            else:
                ts = qt.run_search(space, grid_pool if strat == "grid" else pool, lookup,
                                   budget, LoopOptions(strat, max_evals=len(pool), seed=r),
                                   cost_model=RandomCostModel(r), progress=False)
            runs[strat].append(ts)

    def summary(strat: str, w: float) -> dict[str, Any]:
        limit = args.max_evals if strat == "quantune" else len(pool)
        hits = [evals_to_target(ts, best - w) for ts in runs[strat]]
        n = [h if h is not None else limit + 1 for h in hits]
        return {"median": float(np.median(n)), "mean": float(np.mean(n)), "runs": n,
                "misses": sum(h is None for h in hits), "limit": limit}

    thresholds = sorted({args.within, 0.25, 0.5})
    evals = {s: {str(w): summary(s, w) for w in thresholds} for s in runs}
    # random search in closed form: the first of k near-best among N in a random order
    k_near = {str(w): sum(v >= best - w - 1e-9 for v in scores.values()) for w in thresholds}
    expected_random = {w: (len(pool) + 1) / (k + 1) if k else None for w, k in k_near.items()}
    checkpoints = [n for n in (1, 2, 5, 10, 20, 40, 100, 200) if n <= len(pool)]
    best_after = {s: {str(n): float(np.mean([
        np.maximum.accumulate([t.quality for t in ts])[min(n, len(ts)) - 1] for ts in tss]))
        for n in checkpoints} for s, tss in runs.items()}
    seed_q = evaluate(seeds[0]).quality
    out = {
        "model": name, "fp32_accuracy": fp32, "eval_images": args.eval_n,
        "layers": len(space.layers), "global_configs": len(globs),
        "space_size": f"{len(globs)} x {len(space.options)}^{len(space.layers)}",
        "size_budget_ratio_to_int8": args.size_ratio, "random_pool": len(pool),
        "random_pool_best": max(scores.values()),
        "random_pool_median": float(np.median(list(scores.values()))),
        "random_pool_worst": min(scores.values()), "best_overall": best,
        "quantune_best": max(t.quality for ts in runs["quantune"] for t in ts),
        "within": args.within, "max_evals": args.max_evals, "repeats": args.repeats,
        "ilp_seed": {"config": seeds[0].label(), "accuracy": seed_q},
        "hessian_converged": traces.converged, "hessian_iterations": traces.iterations,
        "evals_to_within": evals, "near_best_in_random_pool": k_near,
        "random_expected_evals": expected_random, "mean_best_after_n": best_after,
        "hawq_spearman_vs_accuracy": _spearman([-space.sensitivity(c) for c in pool],
                                               [scores[c.key()] for c in pool]),
        "real_evaluations_now": n_real, "model_hash": m_hash,
    }
    out["zeroq"] = zeroq_section(ctx, args) if args.zeroq_steps > 0 else {}
    out["latency_vs_proxy"] = latency_vs_proxy(
        gm, stats, space, m_hash, ctx["x_cal"][:1], lambda g: accuracy(g, x_test, y_test),
        args) if args.latency else {}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def zeroq_section(ctx: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Uniform INT8 calibrated on ZeroQ-distilled vs real data vs Gaussian noise."""
    gm, x_cal, x_test, y_test = ctx["gm"], ctx["x_cal"], ctx["x_test"], ctx["y_test"]
    dist = distill(ctx["captured"], tuple(x_cal.shape[1:]), n=args.zeroq_n,
                   steps=args.zeroq_steps, batch=64)
    stats_d = collect_stats(gm, batched(dist.inputs, 64))
    stats_r = collect_stats(gm, batched(x_cal[:args.zeroq_n], 64))
    noise = torch.randn(args.zeroq_n, *x_cal.shape[1:], generator=torch.Generator()
                        .manual_seed(0))
    stats_n = collect_stats(gm, batched(noise, 64))
    zq: dict[str, Any] = {}
    for cal in ("minmax", "percentile"):
        plan = int8_plan(cal)
        zq[cal] = {src: accuracy(quantize(gm, plan, st), x_test, y_test)
                   for src, st in (("real", stats_r), ("distilled", stats_d),
                                   ("gaussian_noise", stats_n))}
    zq["bn_loss"] = {"start": dist.loss_start, "end": dist.loss_end, "steps": dist.steps,
                     "samples": args.zeroq_n}
    return zq


STRATEGY_NOTES = {
    "quantune": "the product: HAWQ ILP seed, HAWQ ranking, then XGBoost on its own growing pool",
    "xgb_on_pool": "XGBoost alone (no seed, no HAWQ prior) ranking the random pool",
    "xgb_on_pool_warm": "the same, warm-started from the other models' database rows",
    "random": "the random pool in random order (random search)",
    "grid": "the random pool in enumeration order (grid search)",
}


def _fmt(v: dict[str, Any]) -> str:
    miss = f" ({v['misses']} of {len(v['runs'])} runs missed: counted as {v['limit'] + 1})" \
        if v["misses"] else ""
    return f"{v['median']:.1f} | {v['mean']:.1f}{miss}"


def markdown(res: list[dict[str, Any]]) -> str:
    lines = ["# Mixed-precision search benchmark", "",
             "Generated by `tools/bench_search.py`; see its docstring for the method.", ""]
    for r in res:
        w = str(r["within"])
        lines += [f"## {r['model']}", "",
                  (f"FP32 accuracy {r['fp32_accuracy']:.2f}% on {r['eval_images']} test images; "
                   f"space {r['space_size']} candidates; weight-size budget "
                   f"{r['size_budget_ratio_to_int8']} × uniform INT8. Random reference search: "
                   f"{r['random_pool']} feasible candidates, best {r['random_pool_best']:.2f}%, "
                   f"median {r['random_pool_median']:.2f}%, worst {r['random_pool_worst']:.2f}%. "
                   f"Best found by any strategy: {r['best_overall']:.2f}% (quantune's best "
                   f"{r['quantune_best']:.2f}%). ILP seed alone (1 evaluation): "
                   f"{r['ilp_seed']['accuracy']:.2f}% ({r['ilp_seed']['config']})."), "",
                  (f"Real evaluations until a config within {w} points of the best is found "
                   f"({r['repeats']} runs each; quantune capped at {r['max_evals']} evaluations "
                   "per run):"), "",
                  "| strategy | median | mean | what it is |", "|---|---|---|---|"]
        for k, v in r["evals_to_within"].items():
            lines.append(f"| {k} | {_fmt(v[w])} | {STRATEGY_NOTES.get(k, '')} |")
        e = r["random_expected_evals"][w]
        lines += ["", (f"Random search in closed form: {r['near_best_in_random_pool'][w]} of "
                       f"{r['random_pool']} reference candidates are within {w} points, so it "
                       "needs (N+1)/(k+1) = "
                       + (f"{e:.1f}" if e else f"more than {r['random_pool']}")
                       + " evaluations on average."), ""]
        ths = list(next(iter(r["evals_to_within"].values())))
        lines += ["Mean evaluations by threshold:", "",
                  "| strategy | " + " | ".join(f"within {t}" for t in ths) + " |",
                  "|---" * (1 + len(ths)) + "|"]
        for k, v in r["evals_to_within"].items():
            lines.append(f"| {k} | " + " | ".join(f"{v[t]['mean']:.1f}" for t in ths) + " |")
        cps = list(next(iter(r["mean_best_after_n"].values())))
        lines += ["", "Mean best accuracy found after n evaluations:", "",
                  "| strategy | " + " | ".join(f"n={n}" for n in cps) + " |",
                  "|---" * (1 + len(cps)) + "|"]
        for k, v in r["mean_best_after_n"].items():
            lines.append(f"| {k} | " + " | ".join(f"{x:.2f}" for x in v.values()) + " |")
        lines.append(f"\nSpearman(−Σ Ω HAWQ, measured accuracy) over the random pool: "
                     f"{r['hawq_spearman_vs_accuracy']:.2f}")
        lp = r.get("latency_vs_proxy")
        if lp:
            lines += latency_markdown(lp)
        if r["zeroq"]:
            lines += ["", "ZeroQ (uniform INT8 accuracy by calibration source):", "",
                      "| calibrator | real | distilled | gaussian noise |", "|---|---|---|---|"]
            for cal in ("minmax", "percentile"):
                z = r["zeroq"][cal]
                lines.append(f"| {cal} | {z['real']:.2f} | {z['distilled']:.2f} | "
                             f"{z['gaussian_noise']:.2f} |")
            b = r["zeroq"]["bn_loss"]
            lines.append(f"\nBN-statistics loss {b['start']:.3g} → {b['end']:.3g} "
                         f"({b['steps']} Adam steps, {b['samples']} samples).")
        lines.append("")
    return "\n".join(lines)


def _write_markdown(out: Path) -> None:
    """search.md over every model benchmarked into `out` so far."""
    results = [json.loads(f.read_text()) for f in sorted(out.glob("*.json"))]
    (out / "search.md").write_text(markdown(results))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet_fmnist", "mobilenetv2_fmnist"])
    p.add_argument("--out", default="bench_results/search")
    p.add_argument("--db", default=None, help="search database (default: <out>/bench.sqlite)")
    p.add_argument("--eval-n", type=int, default=2000, help="test images per evaluation")
    p.add_argument("--random-pool", type=int, default=200,
                   help="size of the random reference search (all evaluated)")
    p.add_argument("--pool", type=int, default=300, help="quantune's starting candidate pool")
    p.add_argument("--max-evals", type=int, default=40, help="quantune evaluations per run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--within", type=float, default=0.1)
    p.add_argument("--size-ratio", type=float, default=0.6)
    p.add_argument("--calibrators", nargs="+", default=["minmax", "percentile"])
    p.add_argument("--hawq-batches", type=int, default=1)
    p.add_argument("--hawq-iters", type=int, default=40)
    p.add_argument("--zeroq-steps", type=int, default=300)
    p.add_argument("--zeroq-n", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--latency", action=argparse.BooleanOptionalAction, default=True,
                   help="also compare latency-aware vs BOPs-proxy allocation on ORT")
    p.add_argument("--latency-runs", type=int, default=50)
    p.add_argument("--bops-ratio", type=float, default=0.5)
    p.add_argument("--bootstrap", action=argparse.BooleanOptionalAction, default=True,
                   help="Thompson sampling by Poisson-bootstrapped XGBoost refits")
    p.add_argument("--latency-only", action="store_true",
                   help="re-measure only the latency-vs-proxy section into the existing "
                        "<out>/<model>.json (needs a quiet machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.latency_only:
        for name in args.models:
            r = json.loads((out / f"{name}.json").read_text())
            ctx = _fp32_and_space(name, args, None)
            x_test, y_test = ctx["x_test"], ctx["y_test"]
            r["latency_vs_proxy"] = latency_vs_proxy(
                ctx["gm"], ctx["stats"], ctx["space"], ctx["m_hash"], ctx["x_cal"][:1],
                lambda g, x=x_test, y=y_test: accuracy(g, x, y), args)
            (out / f"{name}.json").write_text(json.dumps(r, indent=1) + "\n")
        _write_markdown(out)
        return
    db = EvalDB(args.db or out / "bench.sqlite")
    for name in args.models:
        r = bench_model(name, args, db)
        prev = out / f"{name}.json"
        if not r["latency_vs_proxy"] and prev.exists():
            # --no-latency: keep the earlier measurement of the same graph (timing needs a quiet
            # machine; the search part does not)
            old = json.loads(prev.read_text())
            if old.get("model_hash") == r["model_hash"] and old.get("latency_vs_proxy"):
                r["latency_vs_proxy"] = {**old["latency_vs_proxy"], "from_earlier_run": True}
        (out / f"{name}.json").write_text(json.dumps(r, indent=1) + "\n")
        _write_markdown(out)
        print(markdown([r]))
    db.close()


if __name__ == "__main__":
    main()
