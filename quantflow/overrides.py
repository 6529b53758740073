"""`--keep-float` and `--bits-for`: per-layer precisions the user fixes, chosen by glob.

A pattern (fnmatch, case-sensitive) is matched against a node's fx name (`conv2d_5`) and
against every module path in its `nn_module_stack` (`layer2`, `layer2.0`, `layer2.0.conv1`),
so `layer2` or `layer2.*` selects a whole block and `fc` one layer.

- `--keep-float PATTERN`: every quantizable op it matches (conv, linear, matmul, add, pool,
  ...) stays FP32. quantflow/quantize.py then feeds such a layer the float tensor rather
  than its dequantized copy: onnxruntime quantizes a float Conv/Gemm that reads a
  DequantizeLinear itself, which would run it as an integer kernel nobody simulated.
- `--bits-for PATTERN=OPTION`: the weighted layers it matches get OPTION
  (quantflow/search/space.py OPTIONS).

`resolve` turns the patterns into {node: option} after capture (a pattern matching nothing,
or a layer two patterns disagree on, is a usage error); `--bits 8` applies them to the chosen
plan (`apply`), `--bits mixed` fixes them in the search space (`SearchSpace.fix`), so the
search never changes them and its size and latency budgets count them.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from quantflow.errors import UsageError
from quantflow.search.space import OPTIONS, GlobalConfig, layer_plan

if TYPE_CHECKING:
    from torch import fx

    from quantflow.spec import QuantPlan

#: layer names listed in an error message about a pattern that matched nothing
SHOWN_NAMES = 12


def split_bits_for(text: str) -> tuple[str, str]:
    """`PATTERN=OPTION` -> (pattern, option); ValueError naming the fix."""
    pattern, sep, opt = text.rpartition("=")
    if not sep or not pattern.strip():
        raise ValueError(f"--bits-for {text!r}: write PATTERN=OPTION, e.g. 'layer1.*=W4A8' "
                         f"(OPTION one of {', '.join(OPTIONS)})")
    if opt.strip().upper() not in OPTIONS:
        raise ValueError(f"--bits-for {text!r}: unknown option {opt!r}; fix: use one of "
                         f"{', '.join(OPTIONS)}")
    return pattern.strip(), opt.strip().upper()


def check_patterns(keep_float: Iterable[str], bits_for: Iterable[str]) -> None:
    """Syntax only (CompileConfig validation); which layers they match is `resolve`'s."""
    for p in keep_float:
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"--keep-float needs a non-empty glob pattern, got {p!r}")
    for text in bits_for:
        if not isinstance(text, str):
            raise ValueError(f"--bits-for must be PATTERN=OPTION text, got {text!r}")  # noqa: TRY004 - a usage error (exit 2)
        split_bits_for(text)


@dataclass(frozen=True)
class Overrides:
    """node name -> fixed option, and the flag that fixed it (for plan.json)."""

    options: Mapping[str, str] = field(default_factory=dict)
    why: Mapping[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.options)

    def to_dict(self) -> dict[str, dict[str, str]]:
        """plan.json's `compiled.overrides`: {node: {option, by}}."""
        return {n: {"option": o, "by": self.why[n]} for n, o in sorted(self.options.items())}


def _paths(n: fx.Node) -> list[str]:
    stack = n.meta.get("nn_module_stack") or {}
    return [str(v[0]) for v in stack.values()
            if isinstance(v, (tuple, list)) and v and str(v[0])]


def _matches(pattern: str, n: fx.Node) -> bool:
    return any(fnmatch.fnmatchcase(s, pattern) for s in [n.name, *_paths(n)])


def _no_match(flag: str, pattern: str, candidates: list[fx.Node], what: str) -> UsageError:
    names = [n.name for n in candidates]
    paths = sorted({p for n in candidates for p in _paths(n)})
    shown = ", ".join(names[:SHOWN_NAMES]) + (", ..." if len(names) > SHOWN_NAMES else "")
    mods = ", ".join(paths[:SHOWN_NAMES]) + (", ..." if len(paths) > SHOWN_NAMES else "")
    return UsageError(f"{flag} {pattern!r} matches no {what}; fix: use a glob over the layer "
                      f"names ({shown}) or module paths ({mods or 'none recorded'})")


def resolve(gm: fx.GraphModule, keep_float: Iterable[str], bits_for: Iterable[str],
            placement: str = "ort") -> Overrides:
    """{node: option} for the patterns on this graph (see the module docstring)."""
    from quantflow.ir import WEIGHTED_OPS, is_const, is_op
    from quantflow.placement import reads_quantized

    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    quantizable = [n for n in nodes if reads_quantized(n, placement)]
    weighted = [n for n in nodes if is_op(n, WEIGHTED_OPS) and is_const(n.args[1])]
    options: dict[str, str] = {}
    why: dict[str, str] = {}
    for pattern in keep_float:
        hit = [n for n in quantizable if _matches(pattern, n)]
        if not hit:
            raise _no_match("--keep-float", pattern, quantizable, "quantizable layer")
        for n in hit:
            options[n.name], why[n.name] = "FP32", f"--keep-float {pattern}"
    for text in bits_for:
        pattern, opt = split_bits_for(text)
        hit = [n for n in weighted if _matches(pattern, n)]
        if not hit:
            raise _no_match("--bits-for", pattern, weighted, "weighted layer (conv, linear)")
        for n in hit:
            if n.name in options and (options[n.name] != opt or why[n.name].startswith(
                    "--keep-float")):
                raise UsageError(f"layer {n.name} is chosen by both {why[n.name]} and "
                                 f"--bits-for {text}; fix: narrow one of the patterns so that "
                                 "each layer gets one precision")
            options[n.name], why[n.name] = opt, f"--bits-for {text}"
    return Overrides(options, why)


def glob_of(plan: QuantPlan) -> GlobalConfig:
    """The search space's global configuration that a uniform plan was chosen with."""
    act, weight = plan.default.act, plan.default.weight
    return GlobalConfig(act.calibrator if act else "minmax",
                        bool(act.symmetric) if act else False,
                        weight.granularity if weight else "channel")


def apply(plan: QuantPlan, overrides: Overrides) -> QuantPlan:
    """`plan` with the overridden layers at their option (under the plan's own scheme)."""
    if not overrides:
        return plan
    g = glob_of(plan)
    layers: dict[str, Any] = dict(plan.layers)
    for name, opt in overrides.options.items():
        layers[name] = layer_plan(opt, g)
    return replace(plan, layers=layers)
