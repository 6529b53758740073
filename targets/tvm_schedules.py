"""Schedules for kernels that no tuning record covers: TVM's default is naive loop nests.

Three shapes, by what the kernel computes (`default_schedule` picks):
- packed int8 conv (`tvm_dot.PACKED_BLOCK`): the output row split so that several
  accumulators share one weight block (or, for a short reduction, each pixel accumulates
  the whole reduction in turn), the lanes x 4 block tensorized with the ISA's dot product,
  rows (or, for a linear, channel blocks) on the thread pool;
- any other reduction (depthwise, grouped or float conv, matmul, pool, mean): the reduction
  loops moved outside the innermost spatial loop, which is then vectorized (each step updates
  a vector of outputs instead of one horizontal sum), the outer spatial loops on the thread
  pool.
  In both, what the reduction reads (a pad, a shift) is materialized by one parallel
  vectorized loop, and the epilogue (bias, requantize, a residual add) is inlined into one
  block computed inside the reduction's parallel loop on the tile just produced, so that
  the int32 tile is read back from cache;
- elementwise (pads, quantize, residual adds): one parallel loop over rows, vectorized over
  each pixel's channels.
Each is tried on a copy; a kernel whose loops do not have the expected shape keeps TVM's
default (`None`). A schedule reorders loops; it does not change what is computed.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from quantflow.targets.tvm_dot import PACKED_BLOCK, WIDE_BLOCK, DotPath

log = logging.getLogger("quantflow.targets.tvm")

#: vector width (elements) for the innermost spatial loop of a reduction or elementwise kernel
VECTOR = 16
#: parallel chunks wanted at least (the thread pool has a few cores)
MIN_PARALLEL = 8
#: an innermost loop this short is unrolled rather than vectorized (elementwise kernels)
NARROW = 4


def default_schedule(func: Any, path: DotPath | None) -> tuple[Any, str]:
    """(scheduled PrimFunc, kind) with kind "packed" | "reduction" | "elementwise", or
    (None, "none") when no rule applies."""
    sch, kind = _default(func, path)
    if sch is None:
        return None, kind
    return sch.mod["main"].with_attr("tirx.is_scheduled", True), kind


def _default(func: Any, path: DotPath | None) -> tuple[Any, str]:
    """(the schedule, with its trace, kind) of the first rule that fits, or (None, "none")."""
    import tvm

    for kind, rule in (("packed", _packed), ("reduction", _reduction),
                       ("elementwise", _elementwise)):
        sch = tvm.s_tir.Schedule(tvm.IRModule({"main": func}))
        try:
            done = rule(sch, path)
        except Exception as exc:  # noqa: BLE001 - TVM raises many error types: next rule
            log.debug("tvm: %s schedule does not fit %s: %s", kind, func.attrs.get(
                "global_symbol", "a kernel"), str(exc).splitlines()[0] if str(exc) else exc)
            continue
        if done:
            return sch, kind
    return None, "none"


def is_default_record(record: Any, path: DotPath | None) -> bool:
    """True if `record` is its kernel's default schedule (`measure_defaults`): tuning found
    nothing faster, so any kernel of that workload keeps its own default schedule."""
    (func,) = [f for _gv, f in record.workload.mod.functions_items()]
    sch, _kind = _default(func, path)
    return sch is not None and str(sch.trace) == str(record.trace)


def _blocks(sch: Any) -> list[Any]:
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def _is_reduction(sch: Any, block: Any) -> bool:
    return sch.get(block).init is not None


def _reduction_names(sch: Any) -> list[str]:
    """Names of the blocks with an init, read from the IR (not through the schedule, whose
    trace would record the lookup)."""
    from quantflow.targets.tvm_anchor import reduction_blocks

    return [str(b.name_hint) for b in reduction_blocks(sch.mod["main"])]


#: output-row tiles tried in order (the first that divides the row): a tile's int32
#: accumulators stay in cache until the fused epilogue turns them into the output codes
#: (measured on MobileNetV2's 16->96 1x1 conv at 112x112: 14 ~ 16 < 8 < 7)
ROW_TILES = (14, 16, 8, 7, 4, 2, 1)
#: reductions of at most this many 4-channel steps run pixel by pixel
SHORT_REDUCTION = 8


def _packed(sch: Any, path: DotPath | None) -> bool:
    if path is None:
        return False
    names = _reduction_names(sch)
    name = PACKED_BLOCK if PACKED_BLOCK in names else WIDE_BLOCK if WIDE_BLOCK in names else None
    if name is None:
        return False
    if path.intrin.startswith("quantflow_"):
        from quantflow.targets.tvm_dot import register_avx2_dot

        register_avx2_dot()
    block = sch.get_sblock(name)
    before, rest = _split_around(sch, name)
    b, h, w, oc, kh, kw, c0, c1 = sch.get_loops(block)
    ow = int(sch.get(w).extent)
    wo, wi = sch.split(w, [None, next(f for f in ROW_TILES if ow % f == 0)])
    oco, oci = sch.split(oc, [None, path.lanes])
    lanes = (oci, c1) if name == PACKED_BLOCK else (c1, oci)
    steps = int(sch.get(kh).extent) * int(sch.get(kw).extent) * int(sch.get(c0).extent)
    if steps <= SHORT_REDUCTION:  # one pixel's lanes accumulate over the whole reduction
        sch.reorder(b, h, wo, oco, wi, kh, kw, c0, *lanes)
    else:  # each weight block serves the row tile's pixels in turn
        sch.reorder(b, h, wo, oco, kh, kw, c0, wi, *lanes)
    rows = int(sch.get(b).extent) * int(sch.get(h).extent) * int(sch.get(wo).extent)
    # a linear (one pixel) or a small map: channel blocks in parallel too
    outer = sch.fuse(b, h, wo, oco) if rows < MIN_PARALLEL else sch.fuse(b, h, wo)
    sch.parallel(outer)
    _fuse_epilogue(sch, rest, outer)  # before the decomposition: it needs the whole block
    if name == WIDE_BLOCK:  # int32 products, one vector per lane group, 4 inputs unrolled
        sch.vectorize(oci)  # before the decomposition, as in _reduction
        sch.unroll(c1)
    init = sch.decompose_reduction(block, kh)
    if name == PACKED_BLOCK:
        sch.vectorize(sch.get_loops(init)[-1])
        sch.tensorize(oci, path.intrin)
    _epilogue(sch, before)
    return True


def _split_around(sch: Any, name: str) -> tuple[list[Any], list[Any]]:
    """(the reduction `name`'s producers, transitively: a pad, a shift; every other block
    but the reduction: bias, requantize, a residual add with its dequantize), in program
    order."""
    seen: set[str] = set()
    todo = [sch.get_sblock(name)]
    while todo:
        for p in sch.get_producers(todo.pop()):
            key = str(sch.get(p).name_hint)
            if key not in seen:
                seen.add(key)
                todo.append(p)
    before: list[Any] = []
    rest: list[Any] = []
    for b in _blocks(sch):
        key = str(sch.get(b).name_hint)
        if key != name:
            (before if key in seen else rest).append(b)
    return before, rest


def _fuse_epilogue(sch: Any, rest: list[Any], at: Any) -> None:
    """The blocks after a reduction (`_split_around`) inlined into the kernel's last block,
    computed under the reduction's parallel loop `at` on the tile just produced and
    vectorized over channels: the int32 tile is read back from cache, not memory
    (MobileNetV2's 16->96 1x1 conv at 112x112: 0.60 -> 0.35 ms)."""
    if not rest:
        return
    for b in rest[:-1]:
        sch.compute_inline(b)
    last = rest[-1]
    sch.reverse_compute_at(last, at)
    inner = sch.get_loops(last)[-1]
    # a one-element tile has no loop of its own: its innermost loop is `at` (parallel)
    if not sch.get(inner).same_as(sch.get(at)) and int(sch.get(inner).extent) > 1:
        sch.vectorize(inner)


def _reduction(sch: Any, path: DotPath | None) -> bool:
    names = _reduction_names(sch)
    if len(names) != 1:
        return False
    block = sch.get_sblock(names[0])
    loops = sch.get_loops(block)
    ivs = sch.get(block).iter_vars
    if len(loops) != len(ivs):
        return False
    spatial = [lp for lp, iv in zip(loops, ivs, strict=True) if int(iv.iter_type) == 0]
    reduce = [lp for lp, iv in zip(loops, ivs, strict=True) if int(iv.iter_type) == 2]
    if not spatial or not reduce or len(spatial) + len(reduce) != len(loops):
        return False
    inner = spatial[-1]
    extent = int(sch.get(inner).extent)
    outer = spatial[:-1]
    if extent > 4 * VECTOR and extent % VECTOR == 0:
        split_o, inner = sch.split(inner, [None, VECTOR])
        outer = [*outer, split_o]
    sch.reorder(*outer, *reduce, inner)
    name = names[0]
    before, rest = _split_around(sch, name)
    par = _parallel_prefix(sch, outer)
    if par is not None:
        _fuse_epilogue(sch, rest, par)
    else:
        _epilogue(sch, rest)
    if int(sch.get(inner).extent) > 1:  # before the decomposition: the init copies the loop
        sch.vectorize(inner)
    sch.decompose_reduction(block, reduce[0])
    _epilogue(sch, before)
    return True


def _elementwise(sch: Any, path: DotPath | None) -> bool:
    blocks = _blocks(sch)
    if not blocks or any(_is_reduction(sch, b) for b in blocks):
        return False
    _epilogue(sch, blocks)
    return True


def _epilogue(sch: Any, blocks: list[Any]) -> None:
    """Inline all but the last block into it. A 3-d or deeper nest (an NHWC image): rows in
    parallel, each pixel's channels vectorized, or with at most `NARROW` channels (an RGB
    input being transposed) unrolled in scalar code; flat indices over the whole image
    (div/mod per lane) measured 3x-20x slower on MobileNetV2's pads.
    Otherwise one fused loop, parallel outside, vectorized inside when the extent divides."""
    if not blocks:
        return
    for b in blocks[:-1]:
        sch.compute_inline(b)
    loops = sch.get_loops(blocks[-1])
    if not loops:
        return
    extents = [int(sch.get(lp).extent) for lp in loops]
    last = extents[-1]
    if (len(loops) >= 3 and math.prod(extents[:-2]) >= 2
            and (last % VECTOR == 0 or last <= NARROW)):
        sch.parallel(sch.fuse(*loops[:-2]) if len(loops) > 3 else loops[0])
        # one pixel's channels per vector (a vector spanning two pixels through a reshape
        # got wrong codes from TVM 0.27 on MiniLM's attention heads)
        if last % VECTOR == 0:
            sch.vectorize(sch.split(loops[-1], [None, VECTOR])[1])
        else:
            sch.unroll(loops[-1])
        return
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    extent = int(sch.get(fused).extent)
    if extent >= MIN_PARALLEL * VECTOR and extent % VECTOR == 0:
        outer, inner = sch.split(fused, [None, VECTOR])
        sch.parallel(outer)
        sch.vectorize(inner)
    elif extent >= 2:
        sch.parallel(fused)



def _parallel_prefix(sch: Any, loops: list[Any]) -> Any:
    """Parallelize the fewest leading loops whose product reaches MIN_PARALLEL (all of them
    if it never does); returns the parallel loop (None: nothing to parallelize)."""
    take, product = 0, 1
    for lp in loops:
        take += 1
        product *= int(sch.get(lp).extent)
        if product >= MIN_PARALLEL:
            break
    if not take or product <= 1:
        return None
    par = sch.fuse(*loops[:take]) if take > 1 else loops[0]
    sch.parallel(par)
    return par


def measure_defaults(tasks: list[tuple[Any, str]], target: Any, path: DotPath | None,
                     builder: Any, runner: Any, db: Any) -> int:
    """Measure each task's default schedule (epilogue included) and commit it to `db` as a
    tuning record, so that it competes with tuned candidates: tuning then never ends slower
    than no tuning, and the evolutionary search can start from it. `tasks`: (ExtractedTask,
    anchor key) pairs. Returns how many were committed (a default that fails to build or run
    is skipped)."""
    import tvm.s_tir.meta_schedule as ms

    measured = []
    for task, _key in tasks:
        mod = task.dispatched[0]
        (func,) = [f for _gv, f in mod.functions_items()]
        sch, kind = _default(func, path)
        if sch is None or kind == "elementwise":
            continue
        args = ms.arg_info.ArgInfo.from_prim_func(func)
        (built,) = builder.build([ms.builder.BuilderInput(sch.mod, target)])
        if built.error_msg:
            continue
        (future,) = runner.run([ms.runner.RunnerInput(built.artifact_path, "cpu", args)])
        result = future.result()
        if result.error_msg or not result.run_secs:
            continue
        measured.append(ms.database.TuningRecord(sch.trace, db.commit_workload(mod),
                                                 result.run_secs, target, args))
    for record in measured:
        db.commit_tuning_record(record)
    return len(measured)


def has_naive_epilogue(sch: Any) -> bool:
    """True if a block other than the reduction's still runs in plain serial loops (a trace
    replayed as is that scheduled only the anchor: default-schedule records of caches
    written before the default schedule covered the epilogue)."""
    import tvm

    for b in _blocks(sch):
        if _is_reduction(sch, b) or str(sch.get(b).name_hint).endswith(("_init", "_update")):
            continue
        loops = sch.get_loops(b)
        if loops and all(sch.get(lp).kind == tvm.tirx.ForKind.SERIAL for lp in loops):
            return True
    return False
