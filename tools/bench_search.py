"""Benchmark the mixed-precision search: evaluations to near-best, XGBoost vs random vs grid.

For each zoo model (Fashion-MNIST): fold BN, calibrate, HAWQ traces, build the search space
under a size budget (default 0.7 × the weight bytes of uniform INT8), generate a candidate
pool (ILP seeds + mutations + random, all within the budget) and evaluate EVERY candidate for
real (accuracy on `--eval-n` test images; stored in the search database, so a rerun of the
benchmark re-uses them). Then replay the three strategies on that pool from the stored scores:

- xgb: the Quantune loop (ILP seed first, HAWQ ranking until 4 rows, then XGBoost with
  Poisson-bootstrap Thompson sampling, 10% exploration), cold, and warm-started from the
  OTHER models' evaluations already in the database (xgb_warm);
- random: uniformly random order; grid: deterministic enumeration order of the space
  (global configuration, then per-layer options lexicographically).

Metric: real evaluations until a candidate within `--within` points of the pool's best is
evaluated (median and mean over `--repeats` seeds; grid is deterministic). Also reported:
the ILP seed's own quality (zero search), and ZeroQ: INT8 accuracy calibrated on distilled
vs real data.

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
from quantflow.search.space import Candidate, global_configs
from quantflow.search.zeroq import distill
from quantflow.spec import int8_plan
from quantflow.zoo import get_model


def accuracy(g: fx.GraphModule, x: torch.Tensor, y: torch.Tensor, bs: int = 500) -> float:
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


def bench_model(name: str, args: argparse.Namespace, db: EvalDB,
                model: torch.nn.Module | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
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
    fp32 = accuracy(gm, x_test, y_test)
    traces = hutchinson_traces(gm, batches[:args.hawq_batches], labels[:args.hawq_batches],
                               rel_tol=0.1, max_iter=args.hawq_iters)
    globs = global_configs(args.calibrators, (False, True), ("channel", "tensor"))
    space = build_space(gm, traces, batches[0], ("W8A8", "W8A16", "W4A8", "FP32"), globs, None)
    budget = qt.Budget(max_size_ratio=args.size_ratio)
    rng = np.random.default_rng(0)
    seeds = qt.seeds(space, budget)
    pool = qt.candidate_pool(space, budget, seeds, args.pool, rng)
    m_hash = model_hash(gm)
    d_hash = tensor_hash([x_cal, x_test], f"bench|{args.eval_n}")
    n_real = 0
    from tqdm import tqdm

    scores: dict[str, float] = {}
    for c in tqdm(pool, desc=f"{name}: exhaustive pool evaluation", leave=False):
        rec = db.get(m_hash, d_hash, c.key())
        if rec is None:
            t1 = time.perf_counter()
            q = accuracy(quantize(gm, space.plan(c), stats), x_test, y_test)
            rec = Record(m_hash, d_hash, c.key(), tuple(space.features(c)), q, fp32,
                         space.size_bytes(c), None, time.perf_counter() - t1)
            db.put(rec)
            n_real += 1
        scores[c.key()] = rec.quality
    best = max(scores.values())
    thresholds = sorted({args.within, 0.5, 1.0})
    checkpoints = [n for n in (1, 5, 10, 20, 40) if n <= len(pool)]

    def lookup(c: Candidate) -> qt.Trial:
        return qt.Trial(c, scores[c.key()], fp32, space.size_bytes(c), None)

    grid_pool = sorted(pool, key=lambda c: (globs.index(c.glob), c.options))
    n_feat = len(space.features(pool[0]))
    wx, wy = db.warm_start_rows(m_hash, n_feat)  # other models' evaluations, if any
    strategies = ["xgb", "random", "grid"] + (["xgb_warm"] if len(wy) else [])
    results: dict[str, dict[float, list[int | None]]] = {s: {w: [] for w in thresholds}
                                                         for s in strategies}
    # regret: pool best − best found after n evaluations
    regret: dict[str, dict[int, list[float]]] = {s: {n: [] for n in checkpoints}
                                                 for s in strategies}
    for r in range(args.repeats):
        for strat, runs in results.items():
            if strat == "grid" and r > 0:
                continue
            if strat.startswith("xgb"):
                cm: Any = XGBCostModel(seed=r, bootstrap=args.bootstrap)
                if strat == "xgb_warm":
                    cm.warm_start(wx, wy)
                trials = qt.run_search(space, pool, lookup, budget, strategy="xgb",
                                       max_evals=len(pool), cost_model=cm, first=seeds[:1],
                                       grow_pool=False, seed=r, progress=False,
                                       prior=qt.hawq_prior(space, budget))
            else:
                trials = qt.run_search(space, grid_pool if strat == "grid" else pool, lookup,
                                       budget, strategy=strat, max_evals=len(pool),
                                       cost_model=RandomCostModel(r), seed=r, progress=False)
            for w, hits in runs.items():
                hits.append(evals_to_target(trials, best - w))
            so_far = np.maximum.accumulate([tr.quality for tr in trials])
            for n in checkpoints:
                regret[strat][n].append(float(best - so_far[min(n, len(so_far)) - 1]))

    def summary(v: list[int | None]) -> dict[str, Any]:
        n = [x if x is not None else len(pool) + 1 for x in v]
        return {"median": float(np.median(n)), "mean": float(np.mean(n)), "runs": n}

    seed_q = scores[seeds[0].key()]
    # ZeroQ: uniform INT8 calibrated on distilled vs real data
    zq: dict[str, Any] = {}
    if args.zeroq_steps > 0:
        dist = distill(captured, tuple(x_cal.shape[1:]), n=args.zeroq_n, steps=args.zeroq_steps,
                       batch=64)
        stats_d = collect_stats(gm, batched(dist.inputs, 64))
        stats_r = collect_stats(gm, batched(x_cal[:args.zeroq_n], 64))
        noise = torch.randn(args.zeroq_n, *x_cal.shape[1:], generator=torch.Generator()
                            .manual_seed(0))
        stats_n = collect_stats(gm, batched(noise, 64))
        for cal in ("minmax", "percentile"):
            plan = int8_plan(cal)
            zq[cal] = {src: accuracy(quantize(gm, plan, st), x_test, y_test)
                       for src, st in (("real", stats_r), ("distilled", stats_d),
                                       ("gaussian_noise", stats_n))}
        zq["bn_loss"] = {"start": dist.loss_start, "end": dist.loss_end,
                         "steps": dist.steps, "samples": args.zeroq_n}
    lat = latency_vs_proxy(gm, stats, space, m_hash, x_cal[:1], x_test, y_test, args) \
        if args.latency else {}
    return {
        "latency_vs_proxy": lat,
        "model": name, "fp32_accuracy": fp32, "eval_images": args.eval_n,
        "layers": len(space.layers), "pool": len(pool), "real_evaluations_now": n_real,
        "size_budget_ratio_to_int8": args.size_ratio,
        "pool_best": best, "pool_worst": min(scores.values()),
        "pool_median": float(np.median(list(scores.values()))), "within": args.within,
        "ilp_seed": {"config": seeds[0].label(), "accuracy": seed_q},
        "hessian_converged": traces.converged, "hessian_iterations": traces.iterations,
        "evals_to_within": {k: summary(v[args.within]) for k, v in results.items()},
        "evals_to_within_by_threshold": {k: {str(w): summary(h) for w, h in v.items()}
                                         for k, v in results.items()},
        "mean_regret_after_n": {k: {str(n): float(np.mean(r)) for n, r in v.items()}
                                for k, v in regret.items()},
        "hawq_spearman_vs_accuracy": _spearman([-space.sensitivity(c) for c in pool],
                                               [scores[c.key()] for c in pool]),
        "zeroq": zq, "model_hash": m_hash, "seconds": round(time.perf_counter() - t0, 1),
    }


def latency_vs_proxy(gm: fx.GraphModule, stats: dict[str, Any], space: Any, m_hash: str,
                     example: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                     args: argparse.Namespace) -> dict[str, Any]:
    """ILP under a BOPs budget vs ILP under the measured-latency budget it implies, on ORT.

    Proxy: minimize Σ Ω s.t. BOPs ≤ `--bops-ratio` × BOPs(uniform W8A8). Latency-aware:
    minimize Σ Ω s.t. table latency ≤ the table latency of the proxy's choice. Both are then
    lowered and timed end to end, and evaluated.
    """
    from quantflow.search.allocate import solve_milp
    from quantflow.search.latency import bops_table, measure_table
    from quantflow.search.space import layer_plan
    from quantflow.spec import QuantPlan
    from quantflow.targets import get_target

    target = get_target("ort", threads=1)
    g0 = space.globs[0]

    def quantize_with(assign: dict[str, str]) -> fx.GraphModule:
        return quantize(gm, QuantPlan(default=layer_plan("W8A8", g0), layers={
            n: layer_plan(assign.get(n, "FP32"), g0) for n in space.layers}), stats)

    table = measure_table(gm, (example,), space.layers, space.options, quantize_with, target,
                          model_hash=m_hash, cache_dir=Path(args.out) / "latency_cache",
                          runs=args.latency_runs, threads=1)
    bops = bops_table(gm, (example,), space.layers, space.options)
    sens = space.sens[g0.scheme_key]
    w8 = space.options.index("W8A8")
    proxy = solve_milp(sens, bops.ms, args.bops_ratio * bops.ms[:, w8].sum())
    lat_budget = float(table.ms[np.arange(len(space.layers)), list(proxy.choice)].sum())
    aware = solve_milp(sens, table.ms, lat_budget)
    out: dict[str, Any] = {"table_method": table.method, "device": table.device,
                           "bops_ratio": args.bops_ratio}
    import tempfile

    for label, alloc in (("bops_proxy", proxy), ("latency_aware", aware)):
        assign = {n: space.options[k] for n, k in zip(space.layers, alloc.choice)}
        g = quantize_with(assign)
        with tempfile.TemporaryDirectory() as tmp:
            art = target.lower(g, (example,), Path(tmp), precision="mixed")
            ms = target.profile(art, [example.numpy()], warmup=10, runs=args.latency_runs,
                                threads=1).median_ms
        out[label] = {"sensitivity": alloc.sensitivity, "measured_ms": ms,
                      "table_ms": float(table.ms[np.arange(len(space.layers)),
                                                 list(alloc.choice)].sum() + table.rest_for()),
                      "accuracy": accuracy(g, x_test, y_test),
                      "options": {o: list(alloc.choice).count(space.options.index(o))
                                  for o in space.options}}
    return out


def markdown(res: list[dict[str, Any]]) -> str:
    lines = ["# Mixed-precision search benchmark", ""]
    for r in res:
        lines += [f"## {r['model']}", "",
                  (f"FP32 accuracy {r['fp32_accuracy']:.2f}% on {r['eval_images']} test images; "
                  f"{r['layers']} layers; size budget {r['size_budget_ratio_to_int8']} × INT8; "
                  f"pool of {r['pool']} candidates evaluated exhaustively: best "
                  f"{r['pool_best']:.2f}%, median {r['pool_median']:.2f}%, worst "
                  f"{r['pool_worst']:.2f}%. ILP seed alone: {r['ilp_seed']['accuracy']:.2f}% "
                  f"({r['ilp_seed']['config']})."), "",
                  (f"Real evaluations to reach within {r['within']} points of the pool best "
                   f"(a miss counts as pool+1):"), "",
                  "| strategy | median | mean | runs |", "|---|---|---|---|"]
        for k, v in r["evals_to_within"].items():
            lines.append(f"| {k} | {v['median']:.1f} | {v['mean']:.1f} | {v['runs']} |")
        lines += ["", "Evaluations to reach within w points of the pool best (median over runs):",
                  "", "| strategy | " + " | ".join(
                      f"w={w}" for w in next(iter(r["evals_to_within_by_threshold"].values())))
                  + " |", "|---" * (1 + len(next(iter(
                      r["evals_to_within_by_threshold"].values())))) + "|"]
        for k, v in r["evals_to_within_by_threshold"].items():
            lines.append(f"| {k} | " + " | ".join(f"{s['median']:.1f}" for s in v.values())
                         + " |")
        cps = list(next(iter(r["mean_regret_after_n"].values())))
        lines += ["", "Mean regret (pool best − best found, points) after n evaluations:", "",
                  "| strategy | " + " | ".join(f"n={n}" for n in cps) + " |",
                  "|---" * (1 + len(cps)) + "|"]
        for k, v in r["mean_regret_after_n"].items():
            lines.append(f"| {k} | " + " | ".join(f"{x:.2f}" for x in v.values()) + " |")
        lines.append(f"\nSpearman(−Σ Ω HAWQ, measured accuracy) over the pool: "
                     f"{r['hawq_spearman_vs_accuracy']:.2f}")
        lp = r.get("latency_vs_proxy")
        if lp:
            lines += ["", (f"Latency-aware vs BOPs-proxy allocation (ORT, {lp['device']}, "
                           f"table: {lp['table_method']}; proxy budget {lp['bops_ratio']} × "
                           "W8A8 BOPs):"),
                      "", "| allocation | Σ Ω | table ms | measured ms | accuracy | options |",
                      "|---|---|---|---|---|---|"]
            for k in ("bops_proxy", "latency_aware"):
                v = lp[k]
                lines.append(f"| {k} | {v['sensitivity']:.3g} | {v['table_ms']:.3f} | "
                             f"{v['measured_ms']:.3f} | {v['accuracy']:.2f} | {v['options']} |")
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet_fmnist", "mobilenetv2_fmnist"])
    p.add_argument("--out", default="bench_results/search")
    p.add_argument("--db", default=None, help="search database (default: <out>/bench.sqlite)")
    p.add_argument("--eval-n", type=int, default=1000)
    p.add_argument("--pool", type=int, default=150)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--within", type=float, default=0.1)
    p.add_argument("--size-ratio", type=float, default=0.7)
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
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    db = EvalDB(args.db or out / "bench.sqlite")
    for name in args.models:
        r = bench_model(name, args, db)
        (out / f"{name}.json").write_text(json.dumps(r, indent=1) + "\n")
        # the combined report covers every model benchmarked into this folder so far
        results = [json.loads(f.read_text()) for f in sorted(out.glob("*.json"))]
        (out / "search.md").write_text(markdown(results))
        print(markdown([r]))
    db.close()


if __name__ == "__main__":
    main()
