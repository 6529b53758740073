"""Input validation, one function per kind of input, each raising the error the CLI maps to
its exit code with a message that names the flag, file, tensor, sample or node and the fix.

- flags: numbers are finite and in range (argparse only checks they parse: it happily
  returns nan, inf and -1) -> UsageError (2);
- weights: every floating-point parameter, buffer and constant is finite -> InputError (3);
- data: every sample is finite, labels lie in the model's classes -> DataError (3);
- model inputs: one tensor input (calibration data is one array) -> CaptureError (4);
- plans: layers named in a --config plan exist in the graph -> UsageError (2);
- a captured graph fits in memory at the batch it will run -> ResourceError (8).

The loaders (`quantflow.load`, `quantflow.data`, `quantflow.archive`) own file-format errors;
this module owns what the contents mean.
"""

from __future__ import annotations

import inspect
import math
import operator
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor, fx, nn

from quantflow import resources
from quantflow.errors import CaptureError, InputError, UsageError

if TYPE_CHECKING:
    from quantflow.loaded import LoadedModel
    from quantflow.pipeline import Dataset
    from quantflow.spec import QuantPlan

#: how many offenders a message lists
_SHOW = 5


# ---------------------------------------------------------------- flags


def number(flag: str, value: float | None, *, low: float | None = None,
           high: float | None = None, low_open: bool = False) -> None:
    """`value` (None: flag not given) is finite and within [low, high] ((low, high] with
    `low_open`); else a UsageError naming the flag."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{flag} {value!r}: not a finite number; pass a plain number")
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"<= {high:g}"
        within = " and ".join(b for b in (lo, hi) if b)
        raise UsageError(f"{flag} {value:g}: out of range; it must be {within}")


def count(flag: str, value: int | None, *, low: int = 1) -> None:
    """An integer flag (sample counts, runs, threads) is at least `low`."""
    if value is not None and value < low:
        raise UsageError(f"{flag} {value}: must be at least {low}; fix: pass {flag} {low} or "
                         "more")


# ---------------------------------------------------------------- tensors


def _first_bad(t: Tensor) -> tuple[int, int, tuple[int, ...]]:
    """(NaN count, Inf count, index of the first non-finite element)."""
    nan = torch.isnan(t)
    inf = torch.isinf(t)
    first = torch.nonzero(nan | inf)[0].tolist()
    return int(nan.sum()), int(inf.sum()), tuple(first)


def _tensors(module: nn.Module) -> Iterator[tuple[str, str, Tensor]]:
    """(kind, name, tensor) for every parameter, buffer and graph constant of `module`, and
    of a ScriptModule kept out of the module tree (load_torchscript._ScriptModuleCall)."""
    mods = [module]
    hidden = getattr(module, "_script", None)
    if isinstance(hidden, tuple) and hidden and isinstance(hidden[0], nn.Module):
        mods.append(hidden[0])
    seen: set[int] = set()
    for m in mods:
        for kind, items in (("parameter", m.named_parameters()), ("buffer", m.named_buffers())):
            for name, t in items:
                if id(t) not in seen:
                    seen.add(id(t))
                    yield kind, name, t
    if isinstance(module, fx.GraphModule):
        for n in module.graph.nodes:
            if n.op == "get_attr":
                try:
                    t = operator.attrgetter(str(n.target))(module)
                except AttributeError:
                    continue
                if isinstance(t, Tensor) and id(t) not in seen:
                    seen.add(id(t))
                    yield "constant", str(n.target), t


def model_finite(module: nn.Module, where: str) -> None:
    """Every floating-point weight is finite: a NaN weight makes every output NaN, which
    calibration cannot quantize and equivalence checks cannot compare."""
    for kind, name, t in _tensors(module):
        if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
            continue
        with torch.no_grad():
            if bool(torch.isfinite(t).all()):
                continue
            nan, inf, first = _first_bad(t.detach())
        raise InputError(f"{where}: {kind} {name!r} holds {nan} NaN and {inf} infinite values "
                         f"(first at index {first}); the weights are corrupt (a diverged "
                         "training run or a damaged file); fix: export from a checkpoint with "
                         "finite weights")


def samples_finite(x: Tensor, where: str) -> None:
    """Every sample of (N, ...) data is finite; the message names the sample indices."""
    if x.numel() == 0 or bool(torch.isfinite(x).all()):
        return
    bad = (~torch.isfinite(x.reshape(x.shape[0], -1))).any(1).nonzero().flatten().tolist()
    nan, inf, first = _first_bad(x)
    listed = ", ".join(map(str, bad[:_SHOW])) + (" ..." if len(bad) > _SHOW else "")
    raise InputError(f"{where}: {len(bad)} sample(s) hold NaN or Inf values (samples "
                     f"{listed}; {nan} NaN, {inf} Inf; first at x{list(first)}); fix: clean the "
                     "data (NaN usually comes from a failed preprocessing step)")


def output_classes(gm: fx.GraphModule) -> int | None:
    """Size of the last dimension of the graph's first output (the logits' classes), from the
    shapes torch.export recorded; None when unknown."""
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    first = out[0] if isinstance(out, (tuple, list)) and out else out
    val = first.meta.get("val") if isinstance(first, fx.Node) else None
    if isinstance(val, Tensor) and val.dim() >= 2 and isinstance(val.shape[-1], int):
        return int(val.shape[-1])
    return None


def labels_in_range(y: Tensor | None, classes: int | None, where: str) -> None:
    """Labels index the model's outputs: 0 <= y < classes."""
    if y is None or y.numel() == 0:
        return
    out = y < 0
    if classes is not None:
        out |= y >= classes
    bad = out.nonzero().flatten()
    if not bad.numel():
        return
    i = int(bad[0])
    has = (f"the model's {classes} classes (0..{classes - 1})" if classes
           else "the valid range (labels are class indices, counting from 0)")
    raise InputError(f"{where}: {bad.numel()} label(s) outside {has}, e.g. y[{i}] = "
                     f"{int(y[i])}; fix: pass labels of this model's classes (or drop 'y' to "
                     "compare against FP32 instead)")


# ---------------------------------------------------------------- models


def input_names(loaded: LoadedModel) -> list[str] | None:
    """Names of the tensors the model's forward takes (None when it cannot be told)."""
    module = loaded.module
    if isinstance(module, fx.GraphModule):
        return [n.name for n in module.graph.nodes if n.op == "placeholder"]
    hidden = getattr(module, "_script", None)
    if isinstance(hidden, tuple) and hidden:  # TorchScript: its schema, less `self`
        try:
            return [a.name for a in hidden[0].forward.schema.arguments[1:]]
        except (AttributeError, RuntimeError):
            return None
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return None
    return [p.name for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]


def single_input(loaded: LoadedModel) -> None:
    """quantflow calibrates with one array per sample, so the model must take one tensor."""
    names = input_names(loaded)
    n_examples = len(loaded.example_inputs) if loaded.example_inputs is not None else 0
    if (names is not None and len(names) > 1) or n_examples > 1:
        listed = ", ".join(names or []) or f"{n_examples} tensors"
        raise CaptureError(f"{loaded.path}: the model takes {max(len(names or []), n_examples)} "
                           f"inputs ({listed}); quantflow compiles models with one tensor input "
                           "(calibration data is one array per sample); fix: export a wrapper "
                           "whose forward takes one tensor (e.g. stack or concatenate the "
                           "inputs) and derives the others from it or holds them as constants")


def data_matches_input(x: Tensor, example: Tensor, where: str) -> None:
    """Float data for a model that takes floats, token ids for one that takes integers: an
    integer array given to an image model (raw uint8 pixels saved as int64) would otherwise
    fail deep inside capture."""
    if x.dtype.is_floating_point == example.dtype.is_floating_point:
        return
    if example.dtype.is_floating_point:
        raise InputError(f"{where}: the model takes floating-point input but the data are "
                         f"integers ({x.dtype}); expected floating-point data (already "
                         "preprocessed: scaled and normalized), or pass a folder of images "
                         "with --preprocess")
    raise InputError(f"{where}: the model takes integer input ({example.dtype}, token ids) but "
                     f"the data are {x.dtype}; pass the token ids as an int32/int64 array")


def plan_layers(plan: QuantPlan, gm: fx.GraphModule, where: str) -> None:
    """Every layer a plan names is a node of this graph: a plan for another model (or a stale
    one) must not be applied in part and copied into the new plan.json."""
    nodes = {n.name for n in gm.graph.nodes if n.op == "call_function"}
    missing = sorted(set(plan.layers) - nodes)
    if missing:
        listed = ", ".join(missing[:_SHOW]) + (f" and {len(missing) - _SHOW} more"
                                               if len(missing) > _SHOW else "")
        raise UsageError(f"--config {where}: names {len(missing)} layer(s) this model does not "
                         f"have ({listed}); fix: use the plan.json written by compiling this "
                         "model, or remove those entries from 'layers'")


def run_fits(gm: fx.GraphModule, batch: int, calib: Dataset, evaluation: Dataset | None) -> None:
    """Before calibrating: the graph fits in memory at `batch` (or the largest data set, if
    smaller), and labels fit its classes."""
    sizes = [int(d.x.shape[0]) for d in (calib, evaluation) if d is not None]
    batch = max(1, min(batch, max(sizes)))
    shape = list(calib.x.shape[1:])
    resources.check_graph(gm, batch, f"running the model on batches of {batch} samples of "
                          f"shape {shape}", "use a smaller input shape (--input-shape, or "
                          "smaller samples) or a machine with more memory")
    classes = output_classes(gm)
    for data in (calib, evaluation):
        if data is not None:
            labels_in_range(data.y, classes, data.name)
