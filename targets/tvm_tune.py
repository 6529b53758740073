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

No torch import here: the initializer runs in every popen worker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
import types
from pathlib import Path
from typing import Any

log = logging.getLogger("quantflow.targets.tvm")

DEFAULT_CACHE = Path.home() / ".cache" / "quantflow" / "tvm_tuning"
DONE = "done.json"


def skip_gpu_intrinsics() -> None:
    """Popen-worker initializer: register only the CPU tensor intrinsics (see module doc)."""
    import importlib

    import tvm.s_tir

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    pkg = types.ModuleType(name)
    pkg.__path__ = [str(Path(tvm.s_tir.__file__).parent / "tensor_intrin")]
    sys.modules[name] = pkg
    for sub in ("x86", "arm_cpu"):
        importlib.import_module(f"{name}.{sub}")


def prepare(mod: Any, target: Any) -> Any:
    """Legalize + fold + fuse into TIR kernels: the module that tuning and compiling share."""
    import tvm
    from tvm import relax

    with target:
        return tvm.transform.Sequential([
            relax.transform.DecomposeOpsForInference(),
            relax.transform.CanonicalizeBindings(),
            relax.transform.DeadCodeElimination(),
            relax.get_pipeline("zero"),
        ])(mod)


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


def tune(mod: Any, target: Any, trials_per_task: int, cache_dir: Path | None) -> dict[str, Any]:
    """Tune `mod` (output of `prepare`) unless the cache has it; return what happened.

    The database ends up in the returned `work_dir`; apply it with `apply_database`.
    """
    import tvm.s_tir.meta_schedule as ms

    work_dir = (cache_dir or DEFAULT_CACHE) / cache_key(mod, target)
    have = cached_trials(work_dir)
    info: dict[str, Any] = {"work_dir": str(work_dir), "trials_per_task": trials_per_task}
    if have >= trials_per_task:
        info.update(cache_hit=True, tuning_s=0.0)
        log.info("tvm: tuning cache hit %s (%d trials/task)", work_dir, have)
        return info
    work_dir.mkdir(parents=True, exist_ok=True)
    skip_gpu_intrinsics()  # the tuning process itself imports them too (TuneContext)
    ms_log = logging.getLogger("tvm.s_tir.meta_schedule")
    if ms_log.level == logging.NOTSET:
        # MetaSchedule copies its global level to a stdout handler (one task table per
        # trial batch); keep the console quiet, the full logs go to work_dir/logs
        ms_log.setLevel(logging.WARNING)
    tasks = ms.relax_integration.extract_tasks(mod, target)
    n_tasks = len(tasks)
    t0 = time.perf_counter()
    cores = int(target.attrs.get("num-cores", 1))
    ms.relax_integration.tune_relax(
        mod, {}, target, str(work_dir),
        max_trials_global=trials_per_task * max(n_tasks, 1),
        max_trials_per_task=trials_per_task,
        num_trials_per_iter=min(trials_per_task, 64),
        builder=ms.builder.LocalBuilder(max_workers=cores, timeout_sec=120.0,
                                        initializer=skip_gpu_intrinsics),
        runner=ms.runner.LocalRunner(timeout_sec=60.0),
        strategy=search_strategy(trials_per_task),
        seed=0,
    )
    elapsed = time.perf_counter() - t0
    (work_dir / DONE).write_text(json.dumps(
        {"trials_per_task": trials_per_task, "tasks": n_tasks, "tuning_s": elapsed}) + "\n")
    info.update(cache_hit=False, tuning_s=elapsed, tasks=n_tasks)
    return info


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

    with target:
        tuned = relax.transform.MetaScheduleApplyDatabase(work_dir)(mod)
    changed = sum(
        1 for gv in mod.get_global_vars()
        if gv.name_hint in [g.name_hint for g in tuned.get_global_vars()]
        and tvm_ffi.structural_hash(mod[gv]) != tvm_ffi.structural_hash(tuned[gv.name_hint]))
    return tuned, changed
