"""MetaSchedule tuning for the TVM target, with a per-(model, target) tuning database cache.

Untuned TVM CPU kernels are naive loop nests (~100x slower than onnxruntime on ResNet-18), so a
real deployment tunes. Tuning is expensive (minutes to hours), so its result, the JSON database
of best schedules, is stored under `cache_dir/<key>/`, where key = sha256(structural hash of
the fused Relax module + target JSON). A second lowering of the same model for the same target finds the
database and only applies it; a marker file `done.json` records the per-task trial count, and
a request for more trials than were tuned tunes again (MetaSchedule appends to the database).

Scalar constants (quantization scales, zero points) are inlined into the fused TIR kernels,
so MetaSchedule's structural workload match, and this cache, are specific to one calibration:
re-quantizing a model retunes it (measured: a resnet_fmnist database tuned for one set of
scales applied to 0 kernels of the same net with other scales).

Builder-timeout fix: each MetaSchedule builder worker runs `import tvm.s_tir.tensor_intrin`,
whose `__init__` registers the CUDA tensor intrinsics (measured: 101 s on the shared 2-core
machine, vs 6 s for `skip_gpu_intrinsics`), which alone exceeds LocalBuilder's 30 s timeout,
so every build fails. The tuning process itself imports the package too (TuneContext). `skip_gpu_intrinsics`,
run as the worker initializer, installs that package without executing its `__init__` and
imports only the CPU (x86, Arm) intrinsic modules.

VNNI: TVM 0.27's `dot_16x4_vnni` tensor intrinsic does not compile with the LLVM it ships
(operand types), so MetaSchedule silently discarded every VNNI candidate; `register_vnni_dot`
replaces it, in the tuning process, in every builder worker and before a database is applied.

No torch import here: the initializer runs in every popen worker.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from quantflow.cache import cache_dir
from quantflow.progress import bar

log = logging.getLogger("quantflow.targets.tvm")

DEFAULT_CACHE = cache_dir("tvm_tuning")
DONE = "done.json"
#: MetaSchedule's JSON database of measured candidates, one line each (in the work_dir)
RECORDS = "database_tuning_record.json"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def export_aarch64(mod: Any) -> str:
    """MetaSchedule builder export for an aarch64 board: a cross-compiled shared library."""
    import tempfile

    from tvm.support import cc

    from quantflow.targets.tvm_edge import CXX

    path = str(Path(tempfile.mkdtemp()) / "tvm_tmp_mod.so")
    mod.export_library(path, fcompile=cc.cross_compiler(CXX))
    return path


def skip_gpu_intrinsics() -> None:
    """Popen-worker initializer: register only the CPU tensor intrinsics (see module doc),
    with the VNNI dot product fixed for this LLVM (`register_vnni_dot`), and the aarch64
    export (`export_aarch64`: workers know only functions registered in them)."""
    import tvm_ffi

    tvm_ffi.register_global_func("quantflow.export_aarch64", export_aarch64, override=True)
    import importlib

    import tvm.s_tir

    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(Path(tvm.s_tir.__file__).parent / "tensor_intrin")]
        sys.modules[name] = pkg
        for sub in ("x86", "arm_cpu"):
            importlib.import_module(f"{name}.{sub}")
    register_vnni_dot()


_VNNI_FIXED = False


def register_vnni_dot() -> None:
    """Re-register TVM's `dot_16x4_vnni` tensor intrinsic so that it compiles.

    TVM 0.27 calls `llvm.x86.avx512.vpdpbusd.512` with three <16 x i32> operands; the LLVM it
    ships declares the two multiplicands as <64 x i8>, so every tensorized candidate fails
    LLVM verification ("Call parameter type does not match function signature") and tuned
    int8 kernels never use VNNI. Same description (u8[4] . i8[16, 4] -> i32[16]), operands
    reinterpreted as byte vectors. MetaSchedule's x86 VNNI rule (chosen for any target with
    avx512vnni) refers to the intrinsic by this name, so overriding it is enough; tuning
    records replay it by name, so every process that builds tuned kernels calls this.
    """
    global _VNNI_FIXED
    if _VNNI_FIXED:
        return
    from tvm.s_tir import TensorIntrin
    from tvm.s_tir.tensor_intrin.x86 import VNNI_DOT_16x4_INTRIN, dot_product_16x4_u8i8i32_desc
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def vnni_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (16, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (16,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(a_i32, 16), dtype="uint8x64"),
                B.vload([0, 0], dtype="int8x64"),
                dtype="int32x16")

    TensorIntrin.register(VNNI_DOT_16x4_INTRIN, dot_product_16x4_u8i8i32_desc, vnni_impl,
                          override=True)
    _VNNI_FIXED = True


def prepare(mod: Any, target: Any) -> Any:
    """Legalize + fold + fuse into TIR kernels: the module that tuning and compiling share."""
    return fuse_tir(fuse(mod, target), target)


def fuse(mod: Any, target: Any) -> Any:
    """The first half of `prepare`: fused Relax functions, still with their variable names
    (read by `kernel_layers`). Same passes as `relax.get_pipeline("zero")` up to FuseOps."""
    import tvm
    from tvm import relax

    with target:
        return tvm.transform.Sequential([
            relax.transform.DecomposeOpsForInference(),
            relax.transform.CanonicalizeBindings(),
            relax.transform.DeadCodeElimination(),
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
        ])(mod)


def fuse_tir(fused: Any, target: Any) -> Any:
    """The second half of `prepare`: each fused function becomes one TIR kernel of the same
    name (the name the VM reports when it calls the kernel)."""
    from tvm import relax

    with target:
        return relax.transform.FuseTIR()(fused)


def kernel_layers(fused: Any, weights: list[tuple[np.ndarray, str]]) -> dict[str, str]:
    """Kernel call -> fx layer name, from the output of `fuse`.

    Keys are the VM's kernel names as `targets.tvm_profile.per_kernel_ms` reports them: the kernel
    name, then `#n` for its n-th call within one run (FuseOps shares one function between
    identical call sites, e.g. float convs of equal shape). Call sites are main's bindings in
    order, the order the VM executes them. A call is named after the layer whose weight
    (`tvm_frontend.LoweringStats.weights`; by content, since the importer binds parameters as
    new constants and FoldConstant transposes linear weights) it receives as a constant
    argument; a pad kernel whose output goes to exactly one named call is `<layer> (pad)`.
    Other kernels (pools, reshapes, standalone quantizes) are left out.
    """
    from tvm import relax
    from tvm.ir.expr import Constant

    by_content: dict[str, list[str]] = {}
    for w, label in weights:
        for arr in ((w, w.T) if w.ndim == 2 else (w,)):
            by_content.setdefault(_digest(arr), []).append(label)
    seen: dict[str, int] = {}
    out: dict[str, str] = {}
    sites: list[tuple[str, Any, list[Any]]] = []  # (key, output var, call arguments)
    for block in fused["main"].body.blocks:
        for binding in block.bindings:
            call = binding.value
            if not isinstance(call, relax.Call):
                continue
            if isinstance(call.op, relax.GlobalVar):
                gv, args = call.op, list(call.args)
            elif getattr(call.op, "name", "") == "relax.call_tir":
                gv, args = call.args[0], list(call.args[1].fields)
            else:
                continue
            name = str(gv.name_hint)
            n = seen.get(name, 0)
            seen[name] = n + 1
            key = f"{name}#{n}" if n else name
            sites.append((key, binding.var, args))
            for a in args:
                labels = by_content.get(_digest(a.value.numpy())) if isinstance(a, Constant) \
                    else None
                if labels:  # equal weights in two layers: first come, first named
                    out[key] = labels.pop(0)
                    break
    for key, var, _args in sites:
        if key in out or not re.search(r"(^|_)pad\d*(_|#|$)", key):
            continue
        users = [out[k] for k, _v, args in sites if k in out and any(a.same_as(var) for a in args)]
        if len(users) == 1:
            out[key] = f"{users[0]} (pad)"
    return out


def _digest(a: np.ndarray) -> str:
    arr = np.ascontiguousarray(a)
    return f"{arr.dtype}{arr.shape}" + hashlib.sha1(arr.tobytes()).hexdigest()


def cache_key(mod: Any, target: Any) -> str:
    """sha256 over the fused module's structural hash (weights included) and the target.

    Weights are included although tasks depend only on shapes: a changed model retunes,
    which is conservative. The structural hash is stable across processes (content-based).
    """
    import tvm_ffi

    h = hashlib.sha256()
    h.update(str(tvm_ffi.structural_hash(mod)).encode())
    h.update(json.dumps(target.export(), sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def cached_trials(work_dir: Path) -> int:
    """Per-task trials already tuned into `work_dir` (0 if none)."""
    try:
        return int(json.loads((work_dir / DONE).read_text())["trials_per_task"])
    except (OSError, ValueError, KeyError):
        return 0


def tune(mod: Any, target: Any, trials_per_task: int, cache_dir: Path | None, *,
         rpc: Any = None) -> dict[str, Any]:
    """Tune `mod` (output of `prepare`) unless the cache has it; return what happened.

    The database ends up in the returned `work_dir`; apply it with `apply_database`. With
    `rpc` (a `tvm_rpc.RPCDevice`), candidates are measured on that board by MetaSchedule's
    RPC runner, and the database is cached per RPC key (`<key>-rpc-<rpc key>`).
    """
    import tvm.s_tir.meta_schedule as ms

    key = cache_key(mod, target) + (f"-rpc-{_safe(rpc.key)}" if rpc is not None else "")
    work_dir = (cache_dir or DEFAULT_CACHE) / key
    have = cached_trials(work_dir)
    info: dict[str, Any] = {"work_dir": str(work_dir), "trials_per_task": trials_per_task,
                            "runner": "local" if rpc is None else f"rpc:{rpc.key}"}
    if have >= trials_per_task:
        info.update(cache_hit=True, tuning_s=0.0)
        log.info("tvm: tuning cache hit %s (%d trials/task)", work_dir, have)
        return info
    work_dir.mkdir(parents=True, exist_ok=True)
    skip_gpu_intrinsics()  # the tuning process itself imports them too (TuneContext)
    if not log.isEnabledFor(logging.DEBUG):
        # MetaSchedule copies its global level to a stdout handler (one task table per trial
        # batch) and its logging config sets that level to DEBUG after the first tuning, so
        # set it before every one; the full logs go to work_dir/logs either way
        logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    tasks = ms.relax_integration.extract_tasks(mod, target)
    n_tasks = len(tasks)
    t0 = time.perf_counter()
    cores = int(target.attrs.get("num-cores", 1))
    if rpc is not None:
        from quantflow.targets.tvm_rpc import tuning_runner

        runner = tuning_runner(rpc)
    else:
        runner = ms.runner.LocalRunner(timeout_sec=60.0)
    # an aarch64 board loads a shared library cross-compiled here (the default export is a
    # tar the board would have to link, needing a compiler there)
    export = "quantflow.export_aarch64" if "aarch64" in str(target.attrs.get("mtriple", "")) \
        else None
    with TrialWatch(work_dir, trials_per_task * max(n_tasks, 1)), _named_handlers_only():
        ms.relax_integration.tune_relax(
            mod, {}, target, str(work_dir),
            max_trials_global=trials_per_task * max(n_tasks, 1),
            max_trials_per_task=trials_per_task,
            num_trials_per_iter=min(trials_per_task, 64),
            builder=ms.builder.LocalBuilder(max_workers=min(cores, os.cpu_count() or 1),
                                            timeout_sec=120.0, f_export=export,
                                            initializer=skip_gpu_intrinsics),
            runner=runner,
            strategy=search_strategy(trials_per_task),
            seed=0,
        )
    elapsed = time.perf_counter() - t0
    (work_dir / DONE).write_text(json.dumps(
        {"trials_per_task": trials_per_task, "tasks": n_tasks, "tuning_s": elapsed}) + "\n")
    info.update(cache_hit=False, tuning_s=elapsed, tasks=n_tasks)
    return info


@contextlib.contextmanager
def _named_handlers_only() -> Iterator[None]:
    """MetaSchedule builds its logging config from the names of its logger's handlers and
    fails on an unnamed one (`None.format`), e.g. pytest's capture handlers once a previous
    tuning in the process has made the logger its own; detach those while tuning."""
    ms_log = logging.getLogger("tvm.s_tir.meta_schedule")
    unnamed = [h for h in ms_log.handlers if h.get_name() is None]
    for h in unnamed:
        ms_log.removeHandler(h)
    try:
        yield
    finally:
        for h in unnamed:
            ms_log.addHandler(h)


class TrialWatch:
    """A progress bar of MetaSchedule's measured trials against the total (quantflow.progress):
    tune_relax blocks and has no progress hook that keeps its default callbacks, so a thread
    counts the records the JSON database appends, one line per measured candidate."""

    def __init__(self, work_dir: Path, total: int) -> None:
        self.path = work_dir / RECORDS
        self.total = total
        # a retune appends to the database: lines already there are not this run's trials
        self.start = _lines(self.path)
        self.stop = threading.Event()
        self.bar = bar(total, f"tvm: MetaSchedule tuning ({total} trials)", "trial")
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self.stop.wait(1.0):
            done = min(self.total, max(0, _lines(self.path) - self.start))
            self.bar.update(done - self.bar.n)

    def __enter__(self) -> None:
        if not self.bar.disable:
            self.thread.start()

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()
        self.bar.close()


def _lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(1 for _ in f)
    except OSError:  # not created yet
        return 0


def search_strategy(trials_per_task: int) -> Any:
    """Evolutionary search sized to the budget.

    MetaSchedule's defaults (population 512, 50 unmeasured initial samples, 4 genetic
    iterations) cost ~30 s of sampling per task on 2 cores before the first measurement,
    which dominates a small budget; for budgets under 64 trials the population shrinks to
    16 x trials (min 32) and the genetic iterations to 2. Budgets >= 64 use the defaults.
    """
    import tvm.s_tir.meta_schedule as ms

    if trials_per_task >= 64:
        return ms.search_strategy.EvolutionarySearch()
    pop = max(32, 16 * trials_per_task)
    return ms.search_strategy.EvolutionarySearch(
        population_size=pop, init_min_unmeasured=min(50, pop // 2), genetic_num_iters=2)


def apply_database(mod: Any, target: Any, work_dir: str) -> tuple[Any, int]:
    """Replace the kernels that have a tuned schedule in `work_dir`; also return how many
    kernels changed (0 means the database did not match this module: see `cache_key`)."""
    import tvm_ffi
    from tvm import relax

    skip_gpu_intrinsics()  # replaying a trace looks tensor intrinsics up by name
    with target:
        tuned = relax.transform.MetaScheduleApplyDatabase(work_dir)(mod)
    changed = sum(
        1 for gv in mod.get_global_vars()
        if gv.name_hint in [g.name_hint for g in tuned.get_global_vars()]
        and tvm_ffi.structural_hash(mod[gv]) != tvm_ffi.structural_hash(tuned[gv.name_hint]))
    return tuned, changed
