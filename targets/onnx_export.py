"""Export a (quantized or float) fx GraphModule to an ONNX file: shared by the ORT and TRT targets.

The quantized graph is in PT2E form (`quantized_decomposed` Q/DQ nodes around float ops). The
dynamo exporter (`torch.onnx.export(ExportedProgram, dynamo=True)`) maps
`quantize_per_tensor`/`dequantize_per_tensor` to QuantizeLinear/DequantizeLinear and
`dequantize_per_channel` to DequantizeLinear(axis=...), and we name every ONNX node and value
after the fx node it came from. That QDQ graph is the runtime-neutral contract: each runtime
fuses DQ -> op -> Q into its integer kernels.

Choices made here, and why:
- Opset: by default the lowest that can express every Q/DQ type present and that the
  exporter writes natively. Per-channel DequantizeLinear and int32 bias need opset >= 13, but
  the exporter's ONNX functions are written against opset 18 and down-conversion is
  unreliable (a request for 13 silently leaves the model at 18: the onnx C converter lacks
  adapters such as Shape-15 -> 13; 17 works), so 8-bit and float graphs get 18. 16-bit
  (u)int Q/DQ types need opset 21 (QuantizeLinear-21 added them). 4-bit weights are stored as
  int8 with range [-7, 7] (see `quantflow.spec.QSpec`), so they need no int4 type. An explicit
  opset below what the Q/DQ types need is a ValueError; one the exporter cannot convert to
  (the written model has another version) is a CaptureError.
- Names: ONNX node `node_<fx name>` computes value `<fx name>`, with the names of *this* gm.
  Re-exporting renames every node after its op (a quantizer's `conv2d_q` comes back as
  `quantize_per_tensor_7`, a renamed conv shifts the numbering), so each exported node is
  mapped back through its `from_node` provenance and the ONNX names are rewritten. Graph
  inputs keep the fx placeholder names (the forward's argument names, identical for the float
  and quantized graph of one model); outputs are renamed `output` (one output) or `output_0`,
  `output_1`, ... so that fp32 and quantized files are interchangeable. Per-node metadata
  (stack traces with source paths, fx node dumps) is dropped from the file.
- Weights stay integer in the file: the onnxscript optimizer never constant-folds
  QuantizeLinear/DequantizeLinear (they are on its fold blacklist, checked in the tests), so
  an int8 weight initializer stays int8 behind its DequantizeLinear and the file shrinks ~4x.
- Global average pooling: the exporter decomposes adaptive_avg_pool2d(x, 1) into
  mean(dim=[-1, -2], keepdim=True) and writes ReduceMean, which no runtime fuses with Q/DQ
  (onnxruntime keeps DQ -> ReduceMean -> Q in float). We translate adaptive_avg_pool2d with
  output size 1 (kept whole, so the ONNX node keeps the fx name) and a mean over all spatial
  dims with keepdim=True to GlobalAveragePool instead (same value), which onnxruntime turns
  into QLinearGlobalAveragePool and TensorRT quantizes. Other means stay ReduceMean; other
  adaptive pool sizes keep the exporter's decomposition.
- Activation ranges: ONNX QuantizeLinear saturates to the full range of its integer type and
  has no quant_min/quant_max. A torch quantize node with a narrower range (e.g. symmetric int8
  [-127, 127]) therefore differs by one step on values that saturate at the low end; such
  nodes are listed in `ExportInfo.narrow_activation_ranges` (and logged) rather than patched
  with a Clip, which would break the runtime's Q/DQ fusion.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch

# registers the quantized_decomposed ops, so graphs loaded from disk resolve their targets
import torch.ao.quantization.fx._decomposed
from onnxscript import opset18 as op
from torch import fx

from quantflow.errors import CaptureError, UnsupportedOpError

log = logging.getLogger("quantflow.targets")

qd = torch.ops.quantized_decomposed

#: per-channel DequantizeLinear (axis attribute) and int32 inputs
MIN_QDQ_OPSET = 13
#: exporter-native opset (onnxscript torch_lib functions target it): the default floor
BASE_OPSET = 18
#: first opset whose QuantizeLinear/DequantizeLinear accept 16-bit and 4-bit integer types
WIDE_QDQ_OPSET = 21

_QUANT_OPS = (qd.quantize_per_tensor.default, qd.quantize_per_channel.default)
_DEQUANT_OPS = (qd.dequantize_per_tensor.default, qd.dequantize_per_channel.default)
_WIDE_DTYPES = {torch.int16, torch.uint16}
_SUB_BYTE_DTYPES = {d for d in (getattr(torch, "int4", None), getattr(torch, "uint4", None))
                    if isinstance(d, torch.dtype)}


@dataclass(frozen=True)
class ExportInfo:
    """What `export_onnx` wrote: graph I/O names, the opset, and the Q/DQ integer types."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    opset: int
    qdq_dtypes: tuple[str, ...]
    narrow_activation_ranges: tuple[str, ...]


def _qdq_dtype(node: fx.Node) -> torch.dtype | None:
    """The integer dtype argument of a quantized_decomposed Q/DQ node (None otherwise)."""
    if node.op != "call_function" or node.target not in _QUANT_OPS + _DEQUANT_OPS:
        return None
    # (x, scale, zp, qmin, qmax, dtype) per tensor; (x, scales, zps, axis, qmin, qmax, dtype)
    per_channel = node.target in (qd.quantize_per_channel.default,
                                  qd.dequantize_per_channel.default)
    idx = 6 if per_channel else 5
    dtype = node.args[idx] if len(node.args) > idx else node.kwargs.get("dtype")
    return dtype if isinstance(dtype, torch.dtype) else None


def required_opset(gm: fx.GraphModule) -> tuple[int, str | None]:
    """Lowest opset that expresses every Q/DQ type in `gm`, and the node that forces it."""
    need, why = 1, None
    for node in gm.graph.nodes:
        dtype = _qdq_dtype(node)
        if dtype is not None and (dtype in _WIDE_DTYPES or dtype in _SUB_BYTE_DTYPES):
            return WIDE_QDQ_OPSET, node.name
        if dtype is not None and need < MIN_QDQ_OPSET:
            need, why = MIN_QDQ_OPSET, node.name
    return need, why


def narrow_activation_ranges(gm: fx.GraphModule) -> list[str]:
    """quantize_per_tensor nodes whose [qmin, qmax] is narrower than their dtype's range."""
    names = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == qd.quantize_per_tensor.default:
            qmin, qmax, dtype = node.args[3], node.args[4], node.args[5]
            assert isinstance(dtype, torch.dtype)
            info = torch.iinfo(dtype)
            if (qmin, qmax) != (info.min, info.max):
                names.append(node.name)
    return names


def _provenance(gm: fx.GraphModule, ep: torch.export.ExportedProgram) -> dict[str, str]:
    """Re-exported node name -> name of the `gm` node it was traced from (where they differ).

    Export records the source node in `meta["from_node"]` for most ops; nodes without it (the
    quantized_decomposed ops carry none) are matched to the next unmatched `gm` node with the
    same target after the previous match, since re-tracing keeps the graph order.
    """
    graph_id = id(gm.graph)
    order = [n for n in gm.graph.nodes if n.op == "call_function"]
    index = {n.name: i for i, n in enumerate(order)}
    used: set[int] = set()
    cursor = 0
    mapping = {}
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        sources = [src.name for src in node.meta.get("from_node") or []
                   if getattr(src, "graph_id", None) == graph_id and src.name in index]
        if len(sources) == 1:
            match: int | None = index[sources[0]]
        else:
            match = next((i for i in range(cursor, len(order))
                          if i not in used and order[i].target == node.target), None)
        if match is None:
            continue
        used.add(match)
        cursor = match + 1
        if order[match].name != node.name:
            mapping[node.name] = order[match].name
    return mapping


def _safe_moves(mapping: dict[str, str], existing: set[str], movable: set[str]
                ) -> dict[str, str]:
    """The renames of `movable` names that leave every name in the namespace unique."""
    moves = {old: new for old, new in mapping.items() if old in movable}
    while True:
        staying = existing - moves.keys()
        clashes = [old for old, new in moves.items() if new in staying]
        if not clashes:
            return moves
        for old in clashes:
            del moves[old]


def _rename(graph: Any, mapping: dict[str, str]) -> None:
    """Rename values `old` -> `new` and nodes `node_old` -> `node_new` in an onnx_ir graph.

    Graph inputs/outputs keep their value names. Two phases, because the mapping can permute
    names (conv2d_1 -> conv2d, conv2d -> conv2d_1); a rename that would clash with a name
    outside the mapping is skipped (that node keeps its exporter name).
    """
    boundary = {v.name for v in graph.inputs} | {v.name for v in graph.outputs}
    values = {v.name: v for node in graph for v in node.outputs}
    nodes = {node.name: node for node in graph}
    value_moves = _safe_moves(mapping, set(values) | set(graph.initializers) | boundary,
                              set(values) - boundary)
    node_moves = _safe_moves({f"node_{o}": f"node_{n}" for o, n in mapping.items()},
                             set(nodes), set(nodes))
    for objects, moves in ((values, value_moves), (nodes, node_moves)):
        for old in moves:
            objects[old].name = f"__qf_tmp_{old}"
        for old, new in moves.items():
            objects[old].name = new


def _mean_dim(self: Any, dim: Sequence[int] | None, keepdim: bool = False,
              dtype: int = -1) -> Any:
    """aten.mean.dim translation: GlobalAveragePool for a spatial mean, else ReduceMean."""
    rank = len(self.shape)
    dims = None if dim is None else sorted(int(d) % rank for d in dim)
    if rank >= 3 and dims == list(range(2, rank)) and keepdim and dtype in (-1, None):
        return op.GlobalAveragePool(self)
    if dims is None:
        out = op.ReduceMean(self, keepdims=keepdim)
    else:
        axes: Any = op.Constant(value_ints=list(dims))
        out = op.ReduceMean(self, axes, keepdims=keepdim)
    return out if dtype in (-1, None) else op.Cast(out, to=dtype)


def _global_average_pool(self: Any, output_size: Sequence[int]) -> Any:
    """aten.adaptive_avg_pool2d translation, registered only when every output size is 1."""
    return op.GlobalAveragePool(self)


def _translations(gm: fx.GraphModule) -> dict[Any, Any]:
    table: dict[Any, Any] = {torch.ops.aten.mean.dim: _mean_dim}
    pools = [n for n in gm.graph.nodes if n.op == "call_function"
             and n.target == torch.ops.aten.adaptive_avg_pool2d.default]
    if pools and all(list(n.args[1]) in ([1], [1, 1]) for n in pools):
        table[torch.ops.aten.adaptive_avg_pool2d.default] = _global_average_pool
    return table


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[io.StringIO]:
    """Swallow the exporter's progress prints, registry warnings and converter log lines."""
    buf = io.StringIO()
    if verbose:
        yield buf
        return
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        with contextlib.redirect_stdout(buf), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield buf
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


_FAILED_NODE = re.compile(r"Error when translating node %(?P<name>[\w.]+) : .*?"
                          r"target=(?P<target>[^\]]+)\]")
_NO_FUNCTION = re.compile(r"No ONNX function found for (?P<what>[^.\n]*[^\n]*?)\. ")


def _unsupported(exc: BaseException, gm: fx.GraphModule, names: dict[str, str]
                 ) -> UnsupportedOpError | None:
    """Turn the exporter's translation error into an UnsupportedOpError naming the fx node."""
    text = "\n".join(str(e) for e in (exc, exc.__cause__, exc.__context__) if e is not None)
    match = _FAILED_NODE.search(text)
    if match is None:
        return None
    name, target = names.get(match["name"], match["name"]), match["target"]
    # A node the exporter's decompositions created has no gm name: use the op's first caller.
    node = next((n for n in gm.graph.nodes if n.name == name), None)
    if node is None:
        node = next((n for n in gm.graph.nodes if str(n.target) == target), None)
    fx_name = node.name if node is not None else name
    why = _NO_FUNCTION.search(text)
    reason = (f"no ONNX translation is registered for {why['what']}" if why
              else f"the exporter failed on it: {str(exc.__cause__ or exc).splitlines()[0]}")
    return UnsupportedOpError(
        f"onnx export: node {fx_name!r} ({target}) cannot be exported: {reason}.\n"
        "fix: replace the op with standard ATen ops in the model, or register an ONNX "
        "translation for it (torch.onnx.export custom_translation_table)")


def export_onnx(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], path: str | Path,
                *, opset: int | None = None, verbose: bool = False) -> ExportInfo:
    """Write `gm` as an ONNX file at `path` (static shapes of `example_inputs`), checked."""
    need, why = required_opset(gm)
    if opset is None:
        opset = max(need, BASE_OPSET)
    elif opset < need:
        raise ValueError(f"onnx export: opset {opset} cannot express the Q/DQ type of node "
                         f"{why!r}; use opset >= {need} (or leave it unset)")
    narrow = narrow_activation_ranges(gm)
    if narrow:
        log.warning("onnx export: %d quantize nodes use a range narrower than their integer "
                    "type (first: %s); ONNX QuantizeLinear saturates to the full type range, "
                    "so saturated values differ by one step from the torch simulation",
                    len(narrow), narrow[0])
    input_names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _quiet(verbose):
            ep = torch.export.export(gm, tuple(example_inputs))
    except Exception as exc:  # torch raises many types; keep its message, add the fix
        raise CaptureError(f"onnx export: torch.export could not re-export the graph: {exc}\n"
                           "fix: run the graph's passes' checks (graph.lint, check_pass) to "
                           "find the pass that broke it") from exc
    names = _provenance(gm, ep)
    n_out = len(ep.graph_signature.user_outputs)
    output_names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
    try:
        with _quiet(verbose):
            program = torch.onnx.export(
                ep, dynamo=True, optimize=True, opset_version=opset, input_names=input_names,
                output_names=output_names, verbose=verbose,
                custom_translation_table=_translations(gm))
    except Exception as exc:  # the exporter raises several types; classify, keep the cause
        unsupported = _unsupported(exc, gm, names)
        if unsupported is not None:
            raise unsupported from exc
        raise CaptureError(f"onnx export of the graph failed: {str(exc).splitlines()[0]}\n"
                           "fix: run with verbose=True or torch.onnx.export(..., report=True) "
                           "to see the failing step") from exc
    assert program is not None
    _rename(program.model.graph, names)
    for node in program.model.graph.all_nodes():
        # stack traces and fx dumps (user source paths; ~2/3 of a small file): node names
        # already carry the fx names, which is all the targets and reports use
        node.metadata_props.clear()
    program.save(str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise CaptureError(f"onnx export wrote an invalid model {path}: {exc}\n"
                           "fix: this is an exporter bug; report it with the model") from exc
    model = onnx.load(str(path), load_external_data=False)
    written = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if written != opset:
        raise CaptureError(f"onnx export: asked for opset {opset} but the exporter wrote "
                           f"opset {written} (its down-conversion failed); "
                           f"fix: use opset >= {BASE_OPSET} or leave it unset")
    dtypes = sorted({str(d).removeprefix("torch.") for n in gm.graph.nodes
                     if (d := _qdq_dtype(n)) is not None})
    return ExportInfo(input_names=tuple(i.name for i in model.graph.input),
                      output_names=tuple(o.name for o in model.graph.output), opset=written,
                      qdq_dtypes=tuple(dtypes), narrow_activation_ranges=tuple(narrow))
