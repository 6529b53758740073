"""Tuning records keyed by workload, shared across models, calibrations and runs (issue 18).

What a record is keyed on: MetaSchedule's "anchor-block" module equality. A kernel's workload
is its reduction block (the conv, matmul, pool or mean: op, shapes, dtypes, layout), not the
elementwise epilogue fused after it, whose scale and zero-point literals change with every
calibration. A schedule tuned for conv + requantize(s=0.02) replays on conv +
requantize(s=0.026): `schedule_using_anchor_trace` applies the anchor's trace and inlines the
rest. Numerics are untouched: a schedule reorders loops, it does not change what is computed
(the re-calibration test compares outputs with the simulation).

Kernels without a reduction (pads, a standalone quantize, residual adds) are never tuning
tasks: their workload would include the literals, so every calibration would bring new tasks
that re-tune. They get `default_schedule` instead.

Where a kernel looks for a record, first hit wins:
1. the tuning cache of this target (`tvm_tune.cache_dir_for`): every model tuned for the
   same target string adds to it;
2. the database shipped with quantflow for the target's ISA class (`SHIPPED/<class>/`, made
   by tools/build_tvm_records.py, the best record per workload); a shipped record replays
   only on the kernel it was measured on (the same model and calibration), other kernels of
   its workload keep the default schedule.
A record that is the kernel's measured default schedule (`tvm_schedules.measure_defaults`:
tuning found nothing faster) means "keep the default schedule" for every kernel of its
workload.

No torch import here (see tvm_tune).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from quantflow.targets.tvm_anchor import anchor_key, reduction_blocks

log = logging.getLogger("quantflow.targets.tvm")

#: task extraction groups kernels by anchor block (one tuning task per conv shape, whatever
#: its epilogue); databases store each record with the exact kernel it was measured on
#: ("ignore-tensor": anchor-equal kernels sharing one workload entry would replay a trace on
#: another kernel when the database is read back, which fails), and `load` indexes them by
#: `anchor_key` for `apply`
TASKS = "anchor-block"
EQUALITY = "ignore-tensor"
SHIPPED = Path(__file__).resolve().parent / "tvm_records"
#: per-workload trials measured into a cache directory (anchor key -> trials)
TRIALS = "trials.json"
WORKLOADS, RECORDS = "database_workload.json", "database_tuning_record.json"


def isa_class(target: Any) -> str:
    """The target's CPU class by its int8 instructions (quantflow.devices.ISA_CLASSES names):
    what a shipped database is made for and which dot-product path (tvm_dot) kernels use."""
    from tvm.target import codegen

    def has(feature: str) -> bool:
        return bool(codegen.target_has_features(feature, target))

    if "aarch64" in str(target.attrs.get("mtriple", "")):
        return "arm64-dot" if has("dotprod") else "arm64"
    if has("avx512vnni"):
        return "x86-vnni"
    return "x86-avx2" if has("avx2") else "x86-sse"


def target_key(target: Any) -> str:
    """Directory name of a target's tuning cache: ISA class + hash of the target string."""
    text = json.dumps(target.export(), sort_keys=True, default=str)
    return f"{isa_class(target)}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


#: run time MetaSchedule records for a candidate that failed to build or run (1e10 s)
FAILED_S = 1e9


def load(path: Path) -> dict[str, Any] | None:
    """The best valid record per anchor (`anchor_key`) of the JSON database in `path`, or None
    if there is none or it cannot be read (a warning: the compile goes on without it)."""
    import tvm.s_tir.meta_schedule as ms

    if not (path / RECORDS).is_file() or not (path / WORKLOADS).is_file():
        return None
    from quantflow.targets.tvm_intrin import skip_gpu_intrinsics

    skip_gpu_intrinsics()  # parsing a trace looks its tensor intrinsics up by name
    try:
        disk = ms.database.JSONDatabase(str(path / WORKLOADS), str(path / RECORDS),
                                        allow_missing=False, module_equality=EQUALITY)
        records = disk.get_all_tuning_records()
    except Exception as exc:  # noqa: BLE001 - TVM raises RuntimeError/TVMError/ValueError
        log.warning("tvm: tuning records in %s cannot be read (%s); compiling without them "
                    "(fix: delete that folder)", path, str(exc).splitlines()[0])
        return None
    best: dict[str, tuple[float, Any]] = {}
    for rec in records:
        secs = [float(x) for x in (rec.run_secs or [])]
        if not secs or max(secs) >= FAILED_S:
            continue
        (func,) = [f for _gv, f in rec.workload.mod.functions_items()]
        key = anchor_key(func)
        mean = sum(secs) / len(secs)
        if key is not None and (key not in best or mean < best[key][0]):
            best[key] = (mean, rec)
    return {k: rec for k, (_mean, rec) in best.items()} or None


_SHIPPED: dict[str, Any] = {}


def shipped(target: Any) -> tuple[str, Any] | None:
    """(class, records) shipped for the target's ISA class, or None. The database ships
    gzipped (the JSON of 80 kernels is ~10 MB); it is unpacked once per content into the
    user cache (`unpacked`)."""
    cls = isa_class(target)
    if cls not in _SHIPPED:
        where = unpacked(SHIPPED / cls)
        _SHIPPED[cls] = load(where) if where is not None else None
    return (cls, _SHIPPED[cls]) if _SHIPPED[cls] is not None else None


def unpacked(folder: Path) -> Path | None:
    """`folder`'s gzipped JSON database as plain files in the user cache (the package folder
    may be read-only); unpacked next to the target, then renamed: never half-written."""
    import gzip
    import shutil

    from quantflow.cache import cache_dir

    packed = [folder / f"{name}.gz" for name in (WORKLOADS, RECORDS)]
    if not all(p.is_file() for p in packed):
        return None
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in packed)).hexdigest()[:16]
    out = cache_dir("tvm_shipped", f"{folder.name}-{digest}")
    if not (out / RECORDS).is_file():
        tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        for p in packed:
            with gzip.open(p, "rb") as src, (tmp / p.name[:-3]).open("wb") as dst:
                shutil.copyfileobj(src, dst)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    return out


def read_trials(path: Path) -> dict[str, int]:
    try:
        return {str(k): int(v) for k, v in json.loads((path / TRIALS).read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def add_trials(path: Path, counts: dict[str, int]) -> None:
    """Add measured trials per workload; written whole and renamed (never half-written)."""
    merged = read_trials(path)
    for k, n in counts.items():
        merged[k] = merged.get(k, 0) + int(n)
    tmp = path / f".{TRIALS}.{os.getpid()}"
    tmp.write_text(json.dumps(merged, sort_keys=True, indent=0) + "\n")
    os.replace(tmp, path / TRIALS)


def apply(mod: Any, target: Any, sources: list[tuple[str, Any]], path: Any = None
          ) -> tuple[Any, dict[str, Any]]:
    """Schedule every kernel of `mod` (output of `tvm_tune.prepare`): a kernel with a reduction
    from the first source in `sources` ((name, `load` result) pairs) that has its anchor;
    the others with `tvm_schedules.default_schedule` (`path`: the ISA's int8 dot product,
    tvm_dot). Returns the module and how many kernels got what: {"records": {source: n},
    "packed": n, "reduction": n, "elementwise": n, "none": n, "no_record": [names]}."""
    import tvm

    from quantflow.targets.tvm_intrin import skip_gpu_intrinsics
    from quantflow.targets.tvm_schedules import default_schedule, is_default_record

    skip_gpu_intrinsics()  # replaying a trace looks tensor intrinsics up by name
    out = mod.clone()
    counts: dict[str, Any] = {"records": {name: 0 for name, _db in sources}, "packed": 0,
                              "reduction": 0, "elementwise": 0, "none": 0}
    missing: list[str] = []
    default_records: dict[int, bool] = {}  # per record: kernels of one workload share it

    def is_default(record: Any) -> bool:
        if id(record) not in default_records:
            default_records[id(record)] = is_default_record(record, path)
        return default_records[id(record)]

    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tvm.tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled"):
            continue
        key = anchor_key(func)
        source, replayed = (None, None) if key is None else _from_records(
            func, str(gv.name_hint), key, sources, target, is_default)
        if replayed is not None:
            out[gv] = replayed.with_attr("tirx.is_scheduled", True)
            counts["records"][source] += 1
            continue
        if source is None and reduction_blocks(func):
            missing.append(str(gv.name_hint))
        scheduled, kind = default_schedule(func, path)
        if source is not None:  # its record is the measured default
            counts["records"][source] += 1
        else:
            counts[kind] += 1
        if scheduled is not None:
            out[gv] = scheduled
    counts["no_record"] = missing
    return out, counts


def _from_records(func: Any, name: str, key: str, sources: list[tuple[str, Any]],
                  target: Any, is_default: Any) -> tuple[str | None, Any]:
    """(the first source with a record for anchor `key` that decides the kernel `func`'s
    schedule, the record replayed on it), or (that source, None) when the record is the
    measured default schedule (tuning kept the default: the kernel keeps its own), or
    (None, None)."""
    import tvm

    for source, records in sources:
        record = records.get(key)
        if record is None:
            continue
        if is_default(record):
            return source, None
        # another calibration's kernel replays only the user's own records: anchor replay
        # schedules the epilogue MetaSchedule's way, measured up to 3x slower than the
        # default schedule, which shipped records were only kept for beating as measured
        sch = _replay(tvm.IRModule({"main": func}), record, target,
                      anchor=not source.startswith("shipped"))
        if sch is None:
            continue
        if isinstance(sch, Exception):  # a record that does not replay: next source
            log.warning("tvm: record from %s does not apply to %s (%s)", source, name,
                        str(sch).splitlines()[0] if str(sch) else sch)
            continue
        return source, sch
    return None, None


def _replay(one: Any, record: Any, target: Any, anchor: bool = True) -> Any:
    """The record's trace replayed as measured when `one` is the kernel it was measured on
    (MetaSchedule's replay on the anchor schedules the rest its own way, measured up to 3x
    slower on resnet_fmnist's convs); else, if `anchor`, on the anchor block of `one`, the
    epilogue scheduled around it (another calibration's kernel: other literals), else None.
    MetaSchedule's replay leaves at most one spatial block to itself, so a trace that does
    not inline the kernel's pad is replayed again after inlining it. Returns the scheduled
    function, the error, or None."""
    import tvm
    import tvm_ffi
    from tvm.s_tir.meta_schedule.trace_apply import schedule_using_anchor_trace

    from quantflow.targets.tvm_schedules import has_naive_epilogue

    (measured,) = [f for _gv, f in record.workload.mod.functions_items()]
    # the database's copy carries a global_symbol the kernel in the module does not
    if tvm_ffi.structural_equal(measured.without_attr("global_symbol"), one["main"]):
        sch = tvm.s_tir.Schedule(record.workload.mod)  # its own full trace, as measured
        try:
            with target:
                record.trace.apply_to_schedule(sch, remove_postproc=False)
            if not has_naive_epilogue(sch):
                (func,) = [f for _gv, f in sch.mod.functions_items()]
                return func.without_attr("global_symbol")
        except Exception as exc:  # noqa: BLE001 - fall back to the anchor replay below
            log.debug("tvm: exact replay failed (%s); replaying on the anchor", exc)
    if not anchor:
        return None
    error: Exception = RuntimeError("no attempt")
    for inline_producers in (False, True):
        sch = tvm.s_tir.Schedule(one)
        try:
            with target:
                if inline_producers:
                    anchor_name = str(reduction_blocks(one["main"])[0].name_hint)
                    for name in _blocks_before(one["main"], anchor_name):
                        sch.compute_inline(sch.get_sblock(name))
                schedule_using_anchor_trace(sch, record.trace, target)
            return sch.mod["main"]
        except Exception as exc:  # noqa: BLE001 - TVM raises many error types
            error = exc
    return error


def _blocks_before(func: Any, anchor: str) -> list[str]:
    import tvm_ffi
    from tvm.s_tir import SBlock

    names: list[str] = []

    def visit(node: Any) -> None:
        names.append(str(node.name_hint))

    tvm_ffi.structural_walk(func.body, [(SBlock, visit)], order="pre")
    names = [n for n in names if n != "root"]
    return names[:names.index(anchor)] if anchor in names else []


def seed(work_dir: Path, target: Any) -> tuple[str, int] | None:
    """Transfer tuning: a new tuning cache starts with the shipped records of its ISA class,
    so that the evolutionary search starts from them (MetaSchedule samples its first
    population from the database's best records). A shipped record keeps the time measured on
    the machine that made it: a local candidate replaces it only by measuring faster (on a
    much slower machine, a shipped record can stay the best). Returns (class, records copied)
    or None."""
    import tvm.s_tir.meta_schedule as ms

    if (work_dir / RECORDS).is_file():
        return None
    found = shipped(target)
    if found is None:
        return None
    cls, index = found
    db = ms.database.JSONDatabase(work_dir=str(work_dir), module_equality=EQUALITY)
    records = list(index.values())
    for rec in records:
        db.commit_tuning_record(ms.database.TuningRecord(
            rec.trace, db.commit_workload(rec.workload.mod), rec.run_secs, rec.target,
            rec.args_info))
    return cls, len(records)


def sources(work_dir: Path, target: Any, *, use_shipped: bool = True
            ) -> list[tuple[str, Any]]:
    """The databases a kernel's schedule comes from, first hit wins: the target's tuning cache
    (`work_dir`), then the records shipped for its ISA class (unless `use_shipped` is False)."""
    out = []
    cache = load(work_dir)
    if cache is not None:
        out.append(("cache", cache))
    found = shipped(target) if use_shipped else None
    if found is not None:
        out.append((f"shipped:{found[0]}", found[1]))
    return out


def int8_path(target: Any, dot_convs: int, pair_bound_convs: int = 0) -> str:
    """How this artifact's int8 dot products run, for the report."""
    from quantflow.targets.tvm_dot import path_for

    cls = isa_class(target)
    path = path_for(cls)
    widen = "int8 operands widened to int32 by LLVM"
    if not dot_convs or path is None:
        return f"{cls}: {widen} (no conv in the dot-product layout)"
    out = f"{cls}: {path.instruction} in {dot_convs} packed convs ({path.lanes} x 4 blocks)"
    if pair_bound_convs:
        out += (f"; {pair_bound_convs} convs whose weights exceed the int16 pair bound: "
                f"{widen}")
    return out + "; other integer layers: " + widen
