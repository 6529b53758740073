"""Mixed-precision search (`--bits mixed`): HAWQ sensitivities, exact allocation, Quantune.

Modules, one concern each:
  hawq       Hessian traces by Hutchinson → per-layer, per-option sensitivity Ω
  allocate   exact budgeted allocation (multiple-choice knapsack: ILP / DP)
  space      the configuration space, candidate → QuantPlan, costs and features
  costmodel  CostModel protocol, XGBCostModel, RandomCostModel
  database   sqlite store of every real evaluation (resume, warm start)
  latency    per-layer latency tables measured on a target (cached) or a BOPs proxy
  quantune   the search loop: ILP seeds → cost-model-guided evaluations → Pareto front
  validate   end-to-end latency check of the best candidates (tables do not transfer exactly)
  zeroq      ZeroQ distilled calibration data (`--calib distilled`)
  options    SearchOptions, HawqOptions, LatencyOptions: what search_mixed can be told
  mixed      `search_mixed`, the entry point (its contract is in that module's docstring)
  compile    the adapter the compile pipeline calls (`mixed_plan`)

Heavy imports (xgboost, scipy) load only when the search runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from quantflow.search.mixed import SearchResult, search_mixed
    from quantflow.search.options import HawqOptions, LatencyOptions, SearchOptions
    from quantflow.search.quantune import Budget

__all__ = ["Budget", "HawqOptions", "LatencyOptions", "SearchOptions", "SearchResult",
           "search_mixed"]
_OPTIONS = ("HawqOptions", "LatencyOptions", "SearchOptions")


def __getattr__(name: str) -> Any:
    if name in ("search_mixed", "SearchResult"):
        from quantflow.search import mixed

        return getattr(mixed, name)
    if name in _OPTIONS:
        from quantflow.search import options

        return getattr(options, name)
    if name == "Budget":
        from quantflow.search.quantune import Budget

        return Budget
    raise AttributeError(f"module 'quantflow.search' has no attribute {name!r}")
