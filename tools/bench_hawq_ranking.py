"""Does the HAWQ Hessian ranking pick better layers to drop to 4 bits than a random ranking?

Per zoo model: fold BN (DEFAULT_PIPELINE), calibrate (minmax), start from uniform W8A8
(`GlobalConfig()`: asymmetric activations, per-channel weights, the search's own plans), then
for each ordering of the weighted layers put the first k layers at W4A8 (the rest W8A8) and
measure quality and weight bytes (4-bit weights count half a byte). Orderings:

- hawq:          ascending ΔΩ_l = Ω_l(W4A8) − Ω_l(W8A8), the HAWQ cost of 4-bit weights on l
                 (the activation term is the same under both options and cancels)
- hawq_abs:      ascending Ω_l(W4A8) itself (activation term included)
- hawq_per_byte: ascending ΔΩ_l / bytes saved (the greedy knapsack order)
- trace_only:    ascending Tr(H_l)/n_l, without the ‖Q(W) − W‖² term
- reverse_hawq:  descending ΔΩ_l (most sensitive first: the anti-baseline)
- random_<s>:    uniformly random permutations, seeds 0..R−1

Each curve is sampled at the prefixes that first fit the size budgets 1.00, 0.95, ..., 0.50 ×
the INT8 weight bytes (k_r = the smallest k whose size ≤ r × INT8). acc@r is the quality there,
and AUC is the mean of acc@r over all budgets: the area under the accuracy-vs-budget curve
divided by its width. Quality: accuracy % on Fashion-MNIST test images, or for ImageNet models
top-1 agreement % with FP32 on builtin natural-images (HAWQ then uses KL to FP32). Also: the
Spearman correlation between each layer's ΔΩ and its measured drop when only it is at W4A8.

Usage (the committed results; one eval of 10k images takes 7-10 s on the shared 2-core box, so
the default is 5000; per-tensor weights, where 4 bits costs 7 points on the ResNet, on 2000):
    nice -n 5 .venv/bin/python tools/bench_hawq_ranking.py --out bench_results/hawq_ranking
    nice -n 5 .venv/bin/python tools/bench_hawq_ranking.py --models resnet_fmnist \
        --weight-granularity tensor --eval-n 2000 --out bench_results/hawq_ranking
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
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
from quantflow.search.hawq import hutchinson_traces
from quantflow.search.mixed import build_space
from quantflow.search.options import TraceOptions
from quantflow.search.space import Candidate, GlobalConfig
from quantflow.zoo import MODELS, get_model

BUDGETS = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))  # 1.00 ... 0.50 × INT8 bytes
TABLE_BUDGETS = (0.9, 0.8, 0.7, 0.6)
DETERMINISTIC = ("hawq", "hawq_abs", "hawq_per_byte", "trace_only", "reverse_hawq")


# --------------------------------------------------------------------------- pure helpers


def size_ratios(order: Sequence[int], numel: Sequence[int]) -> np.ndarray:
    """ratio[k] = weight bytes with the first k layers of `order` at 4 bits, over INT8 bytes."""
    n = np.asarray(numel, dtype=np.float64)
    saved = np.concatenate([[0.0], np.cumsum(0.5 * n[list(order)])])
    return (n.sum() - saved) / n.sum()


def budget_ks(ratios: np.ndarray, budgets: Sequence[float] = BUDGETS) -> list[int]:
    """For each budget r, the smallest k with ratios[k] ≤ r (the largest prefix that fits is
    not the point: fewer 4-bit layers is never worse in expectation, so take the first fit)."""
    out = []
    for r in budgets:
        fits = np.flatnonzero(ratios <= r + 1e-9)
        if fits.size == 0:
            raise ValueError(f"budget {r} × INT8 is below the all-4-bit size {ratios[-1]:.3f}")
        out.append(int(fits[0]))
    return out


def budget_curve(order: Sequence[int], numel: Sequence[int], quality: Callable[[int], float],
                 budgets: Sequence[float] = BUDGETS) -> dict[str, Any]:
    """Sample one ordering at its budget prefixes; `quality(k)` evaluates the first-k prefix."""
    ratios = size_ratios(order, numel)
    ks = budget_ks(ratios, budgets)
    acc = {k: quality(k) for k in sorted(set(ks))}
    at = {f"{r:.2f}": acc[k] for r, k in zip(budgets, ks)}
    int8_bytes = float(np.sum(numel))
    return {"order": list(order), "auc": float(np.mean(list(at.values()))), "at_budget": at,
            "points": [{"k": k, "size_ratio": float(ratios[k]),
                        "weight_bytes": float(ratios[k] * int8_bytes), "quality": acc[k]}
                       for k in sorted(acc)]}


def orderings(delta: np.ndarray, omega_w4: np.ndarray, mean_diag: np.ndarray,
              numel: Sequence[int], n_random: int) -> dict[str, list[int]]:
    """The layer orderings compared (stable sorts: ties keep graph order)."""
    saved = 0.5 * np.asarray(numel, dtype=np.float64)
    out = {"hawq": np.argsort(delta, kind="stable"),
           "hawq_abs": np.argsort(omega_w4, kind="stable"),
           "hawq_per_byte": np.argsort(delta / saved, kind="stable"),
           "trace_only": np.argsort(mean_diag, kind="stable"),
           "reverse_hawq": np.argsort(-delta, kind="stable")}
    for s in range(n_random):
        out[f"random_{s}"] = np.random.default_rng(s).permutation(len(delta))
    return {k: [int(i) for i in v] for k, v in out.items()}


def random_summary(curves: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean, std (ddof=1), min and max over the random_* curves of AUC and every acc@r."""
    rnd = [c for k, c in curves.items() if k.startswith("random_")]
    if not rnd:
        return {}

    def stats(v: list[float]) -> dict[str, float]:
        a = np.asarray(v)
        return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
                "min": float(a.min()), "max": float(a.max())}

    return {"n": len(rnd), "auc": stats([c["auc"] for c in rnd]),
            "at_budget": {r: stats([c["at_budget"][r] for c in rnd])
                          for r in rnd[0]["at_budget"]}}


# --------------------------------------------------------------------------- experiment


def quality_fn(name: str, eval_n: int) -> tuple[Any, Any, Any, Callable[..., float]]:
    """(calib x, calib labels or None, eval x, quality(graph, reference graph) -> %)."""
    if MODELS[name].dataset == "imagenet":
        x_cal, _ = builtin_dataset("natural-images-calib")
        x_ev, _ = builtin_dataset("natural-images")
        ref: list[torch.Tensor] = []  # FP32 predictions, computed on first use

        def agreement(g: fx.GraphModule, fp32: fx.GraphModule) -> float:
            if not ref:
                ref.append(predict(fp32, x_ev))
            return 100.0 * float((predict(g, x_ev) == ref[0]).double().mean())
        return x_cal, None, x_ev, agreement
    x_cal, y_cal = builtin_dataset("fashion-mnist-calib")
    x_ev, y_ev = load_fashion_mnist("test", limit=eval_n)

    def accuracy(g: fx.GraphModule, fp32: fx.GraphModule) -> float:
        return 100.0 * float((predict(g, x_ev) == y_ev).double().mean())
    return x_cal, y_cal, x_ev, accuracy


def predict(g: fx.GraphModule, x: torch.Tensor, bs: int = 100) -> torch.Tensor:
    # batches of 100: on this 2-core CPU the fake-quant graph runs 2x faster than at 1000
    with torch.no_grad():
        return torch.cat([g(x[i:i + bs]).argmax(-1) for i in range(0, x.shape[0], bs)])


def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    x_cal, y_cal, x_ev, quality = quality_fn(name, args.eval_n)
    gm = capture(get_model(name), (x_cal[:1],))
    run_pipeline(gm, DEFAULT_PIPELINE)
    batches = batched(x_cal, 64)
    labels = None if y_cal is None else [y_cal[i:i + 64] for i in range(0, x_cal.shape[0], 64)]
    stats = collect_stats(gm, batches)
    fp32 = quality(gm, gm)
    t1 = time.perf_counter()
    traces = hutchinson_traces(gm, batches[:args.hawq_batches],
                               None if labels is None else labels[:args.hawq_batches],
                               options=TraceOptions(rel_tol=args.hawq_tol,
                                                    max_iter=args.hawq_iters), seed=0)
    hawq_s = time.perf_counter() - t1
    g = GlobalConfig(weight_granularity=args.weight_granularity)
    space = build_space(gm, traces, batches[0], ("W8A8", "W4A8"), [g], None)
    layers, sens = space.layers, space.sens[g.scheme_key]
    numel = [traces.weight[n].numel for n in layers]
    delta = sens[:, 1] - sens[:, 0]
    mean_diag = np.asarray([max(traces.weight[n].trace, 0.0) / traces.weight[n].numel
                            for n in layers])
    cache: dict[frozenset[int], float] = {}
    timing: list[float] = []

    def evaluate(four_bit: frozenset[int]) -> float:
        if four_bit not in cache:
            t = time.perf_counter()
            c = Candidate(g, tuple("W4A8" if i in four_bit else "W8A8"
                                   for i in range(len(layers))))
            cache[four_bit] = quality(quantize(gm, space.plan(c), stats), gm)
            timing.append(time.perf_counter() - t)
        return cache[four_bit]

    w8 = evaluate(frozenset())
    print(f"{name}: FP32 {fp32:.2f}  W8A8 {w8:.2f}  ({x_ev.shape[0]} images, one eval "
          f"{timing[0]:.1f} s; HAWQ {hawq_s:.0f} s, {traces.iterations} draws, converged="
          f"{traces.converged}); {len(layers)} layers", flush=True)
    single = [w8 - evaluate(frozenset([i])) for i in range(len(layers))]
    from scipy.stats import spearmanr

    orders = orderings(delta, sens[:, 1], mean_diag, numel, args.random)
    curves: dict[str, dict[str, Any]] = {}
    for key, order in orders.items():
        curves[key] = budget_curve(order, numel,
                                   lambda k, o=order: evaluate(frozenset(o[:k])))  # type: ignore[misc]
        print(f"  {key:14s} AUC {curves[key]['auc']:.2f}  "
              + " ".join(f"{r}:{v:.2f}" for r, v in curves[key]["at_budget"].items()),
              flush=True)
    return {
        "model": name, "weight_granularity": g.weight_granularity, "fp32_quality": fp32, "w8a8_quality": w8,
        "w4a8_quality": evaluate(frozenset(range(len(layers)))),
        "quality_metric": ("top-1 agreement % with FP32 on natural-images"
                           if y_cal is None else "accuracy % on Fashion-MNIST test"),
        "eval_images": int(x_ev.shape[0]), "int8_weight_bytes": float(sum(numel)),
        "budgets": list(BUDGETS),
        "hessian": {"iterations": traces.iterations, "converged": traces.converged,
                    "batches": args.hawq_batches, "rel_tol": args.hawq_tol,
                    "loss": "cross-entropy" if labels is not None else "KL to FP32",
                    "seconds": round(hawq_s, 1)},
        "layers": [{"layer": n, "numel": numel[i], "delta_omega_w4": float(delta[i]),
                    "omega_w4a8": float(sens[i, 1]), "trace_per_param": float(mean_diag[i]),
                    "single_layer_drop": single[i]} for i, n in enumerate(layers)],
        "spearman_delta_omega_vs_single_drop": float(spearmanr(delta, single)[0]),
        "spearman_trace_only_vs_single_drop": float(spearmanr(mean_diag, single)[0]),
        "curves": curves, "random": random_summary(curves),
        "evaluations": len(cache), "mean_eval_s": float(np.mean(timing)),
        "seconds": round(time.perf_counter() - t0, 1),
    }


# --------------------------------------------------------------------------- reports


def markdown(results: list[dict[str, Any]]) -> str:
    cols = [f"{r:.2f}" for r in TABLE_BUDGETS]
    lines = ["# HAWQ layer ranking vs random ranking (W8A8 → W4A8, one layer at a time)", "",
             ("acc@r: quality of the first prefix of the ordering whose weight bytes fit r × "
             "INT8; AUC: mean quality over the budgets 1.00, 0.95, ..., 0.50 (area under the "
             "accuracy-vs-budget curve / width). Random: mean ± std [min, max] over the seeds. "
             "Made by tools/bench_hawq_ranking.py (orderings defined in its docstring)."),
             ""]
    for res in results:
        rnd = res["random"]
        gran = res.get("weight_granularity", "channel")
        lines += [f"## {res['model']}" + ("" if gran == "channel" else f" ({gran} weights)"), "",
                  (f"{res['quality_metric']}, {res['eval_images']} images (one image = "
                   f"{100 / res['eval_images']:.3g} points). FP32 "
                   f"{res['fp32_quality']:.2f}, uniform W8A8 {res['w8a8_quality']:.2f}, uniform "
                   f"W4A8 {res['w4a8_quality']:.2f}; {len(res['layers'])} weighted layers, "
                   f"INT8 weights {res['int8_weight_bytes'] / 1024:.1f} KiB. HAWQ: "
                   f"{res['hessian']['iterations']} Hutchinson draws on "
                   f"{res['hessian']['batches']} batches ({res['hessian']['loss']}, converged="
                   f"{res['hessian']['converged']})."), "",
                  "| ordering | " + " | ".join(f"acc@{c}" for c in cols) + " | AUC |",
                  "|---" * (len(cols) + 2) + "|"]
        for key in DETERMINISTIC:
            c = res["curves"][key]
            lines.append(f"| {key} | " + " | ".join(f"{c['at_budget'][r]:.2f}" for r in cols)
                         + f" | {c['auc']:.2f} |")
        if rnd:
            def cell(s: dict[str, float]) -> str:
                return f"{s['mean']:.2f} ± {s['std']:.2f} [{s['min']:.2f}, {s['max']:.2f}]"
            lines.append(f"| random (n={rnd['n']}) | "
                         + " | ".join(cell(rnd["at_budget"][r]) for r in cols)
                         + f" | {cell(rnd['auc'])} |")
            beaten = sum(res["curves"]["hawq"]["auc"] > res["curves"][k]["auc"]
                         for k in res["curves"] if k.startswith("random_"))
            z = (res["curves"]["hawq"]["auc"] - rnd["auc"]["mean"]) / max(rnd["auc"]["std"], 1e-9)
            lines += ["", (f"HAWQ AUC beats {beaten} of {rnd['n']} random orderings; "
                           f"(HAWQ − random mean) / random std = {z:.1f}.")]
        lines += ["", (f"Spearman(ΔΩ_l, measured drop with only layer l at W4A8) = "
                       f"{res['spearman_delta_omega_vs_single_drop']:.2f}; with Tr(H_l)/n_l alone "
                       f"= {res['spearman_trace_only_vs_single_drop']:.2f} "
                       f"(over {len(res['layers'])} layers)."),
                  "", _largest_drop(res),
                  "", f"Full curves: {res['plot'][:-4]}.json, {res['plot']}.",
                  ""]
    return "\n".join(lines)


def _largest_drop(res: dict[str, Any]) -> str:
    """Where HAWQ ranks the layer whose W4A8 alone costs most (the one an ordering must get
    right when the other single-layer drops are within evaluation noise)."""
    layers = res["layers"]
    worst = max(range(len(layers)), key=lambda i: layers[i]["single_layer_drop"])
    rank = res["curves"]["hawq"]["order"].index(worst) + 1
    rest = max(abs(x["single_layer_drop"]) for i, x in enumerate(layers) if i != worst)
    return (f"Largest single-layer drop: {layers[worst]['layer']} "
            f"({layers[worst]['single_layer_drop']:.2f} points; every other layer's |drop| ≤ "
            f"{rest:.2f}); HAWQ puts it at position {rank} of {len(layers)} "
            f"({len(layers)} = quantized last).")


def svg_plot(res: dict[str, Any]) -> str:
    """Quality vs size ratio; random as a min–max band with its mean (no plotting library)."""
    w, h, m, legend = 820, 420, 50, 180  # the legend sits right of the axes
    pts = [p for c in res["curves"].values() for p in c["points"]]
    lo = min(p["quality"] for p in pts)
    hi = max(p["quality"] for p in pts)
    lo, hi = lo - 0.02 * (hi - lo + 1e-9), hi + 0.02 * (hi - lo + 1e-9)

    def xy(ratio: float, q: float) -> str:
        return (f"{m + (1.0 - ratio) / 0.5 * (w - 2 * m - legend):.1f},"
                f"{h - m - (q - lo) / (hi - lo) * (h - 2 * m):.1f}")

    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           'font-family="sans-serif" font-size="11">'), (f'<rect width="{w}" height="{h}" '
           'fill="white"/>'), (f'<text x="{m}" y="20" font-size="13">{res["model"]}: '
           f'{res["quality_metric"]} vs weight-size budget (× INT8 bytes)</text>')]
    for r in BUDGETS[::2]:
        x = xy(r, lo).split(",")[0]
        out.append(f'<text x="{x}" y="{h - m + 15}" text-anchor="middle">{r:.1f}</text>')
    for i in range(5):
        q = lo + (hi - lo) * i / 4
        y = xy(1.0, q).split(",")[1]
        out.append(f'<text x="{m - 5}" y="{y}" text-anchor="end">{q:.2f}</text>'
                   f'<line x1="{m}" x2="{w - m - legend}" y1="{y}" y2="{y}" stroke="#ddd"/>')
    rnd = res["random"]
    if rnd:
        band = ([xy(float(r), s["max"]) for r, s in rnd["at_budget"].items()]
                + [xy(float(r), s["min"]) for r, s in reversed(rnd["at_budget"].items())])
        out.append(f'<polygon points="{" ".join(band)}" fill="#999" fill-opacity="0.3"/>')
        mean = [xy(float(r), s["mean"]) for r, s in rnd["at_budget"].items()]
        out.append(f'<polyline points="{" ".join(mean)}" fill="none" stroke="#666" '
                   'stroke-dasharray="4 3"/>')
    colors = {"hawq": "#d62728", "hawq_abs": "#ff9896", "hawq_per_byte": "#1f77b4",
              "trace_only": "#2ca02c", "reverse_hawq": "#000000"}
    for i, (key, col) in enumerate(colors.items()):
        at = res["curves"][key]["at_budget"]
        line = [xy(float(r), q) for r, q in at.items()]
        out.append(f'<polyline points="{" ".join(line)}" fill="none" stroke="{col}" '
                   'stroke-width="2"/>')
        out.append(f'<text x="{w - legend}" y="{m + 14 * i}" fill="{col}">{key}</text>')
    y_leg = m + 14 * len(colors)
    out.append(f'<text x="{w - legend}" y="{y_leg}" fill="#666">random: mean (dashed),</text>'
               f'<text x="{w - legend}" y="{y_leg + 14}" fill="#666">min–max band (grey)</text>'
               '</svg>')
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet_fmnist", "mobilenetv2_fmnist"])
    p.add_argument("--out", default="bench_results/hawq_ranking")
    p.add_argument("--eval-n", type=int, default=5000,
                   help="Fashion-MNIST test images (10000 = all; one eval of all takes 7-10 s "
                        "here, so the default is half)")
    p.add_argument("--random", type=int, default=10, help="random orderings (seeds 0..R-1)")
    p.add_argument("--hawq-batches", type=int, default=2)
    p.add_argument("--hawq-tol", type=float, default=0.1)
    p.add_argument("--hawq-iters", type=int, default=30)
    p.add_argument("--weight-granularity", choices=("channel", "tensor"), default="channel",
                   help="weight scales of every option (tensor: 4 bits hurts more, so the "
                        "ranking matters more); results go to <model>_tensor.*")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report-only", action="store_true",
                   help="only rewrite ranking.md and the plots from the JSON files in --out")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in [] if args.report_only else args.models:
        res = bench_model(name, args)
        stem = name + ("" if args.weight_granularity == "channel" else "_tensor")
        res["plot"] = f"{stem}.svg"
        (out / res["plot"]).write_text(svg_plot(res))
        (out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
        print(markdown([res]), flush=True)
    # the combined report covers every model benchmarked into this folder so far
    results = [json.loads(f.read_text()) for f in sorted(out.glob("*.json"))]
    for res in results:
        (out / res["plot"]).write_text(svg_plot(res))
    (out / "ranking.md").write_text(markdown(results))


if __name__ == "__main__":
    main()
