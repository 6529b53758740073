"""MetaSchedule tuning for the TVM target, into a tuning cache per target string.

Untuned TVM CPU kernels are naive loop nests (~100x slower than onnxruntime on ResNet-18), so a
real deployment tunes. Tuning is expensive (minutes to hours), so its records are kept in one
JSON database per target string (`cache_dir_for`: `cache_dir/<ISA class>-<target hash>/`),
keyed by workload (`tvm_records`: the kernel's reduction block, not the model, not the
calibration's scale literals): every model and every re-calibration tuned for that target adds
to it and reads from it. `trials.json` there counts the trials measured per workload; a
workload already tuned for the requested trials is not tuned again. A new cache starts from
the database shipped for its ISA class (`tvm_records.seed`, transfer tuning).

Budgets: `trials_per_task`, and/or `seconds` (`--tune-time`): MetaSchedule has no time budget,
so under one tuning runs in short rounds that start only while time is left (`_timed_rounds`).

Tensor intrinsics and the builder workers' initializer: tvm_intrin.

No torch import here: the initializer runs in every popen worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from quantflow.cache import cache_dir
from quantflow.progress import bar
from quantflow.targets.tvm_intrin import skip_gpu_intrinsics

log = logging.getLogger("quantflow.targets.tvm")

DEFAULT_CACHE = cache_dir("tvm_tuning")
#: MetaSchedule's JSON database of measured candidates, one line each (in the work_dir)
RECORDS = "database_tuning_record.json"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


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


#: per-task trial cap when only a time budget is given (`--tune-time` without --tune-trials)
TIME_TRIALS_CAP = 512


def cache_dir_for(target: Any, cache_dir: Path | None, rpc: Any = None) -> Path:
    """The tuning cache of one target string (and RPC board): shared by every model."""
    from quantflow.targets.tvm_records import target_key

    suffix = f"-rpc-{_safe(rpc.key)}" if rpc is not None else ""
    return (cache_dir or DEFAULT_CACHE) / (target_key(target) + suffix)


def tuning_tasks(mod: Any, target: Any) -> list[tuple[Any, str]]:
    """MetaSchedule tasks of `mod` (output of `prepare`) that have a reduction (an anchor),
    each with its `tvm_records.anchor_key`; elementwise kernels are not tuned (tvm_records)."""
    import tvm.s_tir.meta_schedule as ms

    from quantflow.targets.tvm_anchor import anchor_key
    from quantflow.targets.tvm_records import TASKS

    out = []
    for task in ms.relax_integration.extract_tasks(mod, target, module_equality=TASKS):
        (func,) = [f for _gv, f in task.dispatched[0].functions_items()]
        key = anchor_key(func)
        if key is not None:
            out.append((task, key))
    return out


def tune(mod: Any, target: Any, work_dir: Path, *, trials_per_task: int,
         seconds: float | None = None, rpc: Any = None, path: Any = None,
         shipped: bool = True) -> dict[str, Any]:
    """Tune the workloads of `mod` (output of `prepare`) that `work_dir` (`cache_dir_for`) has
    not yet tuned for `trials_per_task` trials (or TIME_TRIALS_CAP with only a time budget);
    stop after `seconds` if given. Records are appended to the JSON database in `work_dir`
    (keyed by workload: tvm_records); apply them with `tvm_records.apply`. With `rpc` (a
    `tvm_rpc.RPCDevice`) candidates are measured on that board. First, each new workload's
    default schedule (tvm_schedules; `path`: the ISA's dot product) is measured into the
    database, so that the tuned result is never slower than no tuning. `shipped`: seed a
    new cache with the records shipped for the target's ISA class (transfer tuning)."""
    import tvm.s_tir.meta_schedule as ms

    from quantflow.targets.tvm_records import EQUALITY, add_trials, read_trials, seed

    per_task = trials_per_task or TIME_TRIALS_CAP
    tasks = tuning_tasks(mod, target)
    done = read_trials(work_dir)
    todo = [(t, k) for t, k in tasks if done.get(k, 0) < per_task]
    info: dict[str, Any] = {"work_dir": str(work_dir), "trials_per_task": trials_per_task,
                            "tune_time_s": seconds, "tasks": len(tasks),
                            "reused_tasks": len(tasks) - len(todo), "tuned_tasks": len(todo),
                            "runner": "local" if rpc is None else f"rpc:{rpc.key}"}
    if not todo:
        info.update(cache_hit=True, tuning_s=0.0, trials=0)
        log.info("tvm: every workload already tuned in %s", work_dir)
        return info
    work_dir.mkdir(parents=True, exist_ok=True)
    skip_gpu_intrinsics()  # the tuning process itself imports them too (TuneContext)
    _check_readable(work_dir)
    # transfer tuning: start from the shipped records
    seeded = seed(work_dir, target) if shipped else None
    info["seeded_from"], info["seeded_records"] = seeded if seeded else (None, 0)
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
    counter = trial_counter()
    builder = ms.builder.LocalBuilder(max_workers=min(cores, os.cpu_count() or 1),
                                      timeout_sec=120.0, f_export=export,
                                      initializer=skip_gpu_intrinsics)
    t0 = time.perf_counter()
    fresh = [(t, k) for t, k in todo if done.get(k, 0) == 0]
    if fresh:
        from quantflow.targets.tvm_schedules import measure_defaults

        db = ms.database.JSONDatabase(work_dir=str(work_dir), module_equality=EQUALITY)
        info["defaults_measured"] = measure_defaults(fresh, target, path, builder, runner, db)
        del db  # tune_tasks opens the same files

    def run(part: list[tuple[Any, str]], trials: int, per_iter: int, seed: int) -> None:
        if not log.isEnabledFor(logging.DEBUG):
            # MetaSchedule copies its global level to a stdout handler (one task table per
            # trial batch) and its logging config sets that level to DEBUG after the first
            # tuning call, so set it before every one; full logs go to work_dir/logs anyway
            logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
        counter.keys = [k for _t, k in part]
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            [t for t, _k in part], str(work_dir), strategy=search_strategy(trials), seed=seed)
        ms.tune.tune_tasks(
            tasks=contexts, task_weights=weights, work_dir=str(work_dir),
            max_trials_global=trials * len(part), max_trials_per_task=trials,
            num_trials_per_iter=per_iter, builder=builder, runner=runner,
            measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"),
                               counter], module_equality=EQUALITY)

    try:
        with TrialWatch(work_dir, per_task * len(todo), seconds), _named_handlers_only():
            if seconds is None:
                run(todo, per_task, min(per_task, 64), 0)
            else:
                def wanted(key: str) -> bool:
                    return done.get(key, 0) + counter.counts.get(key, 0) < per_task

                info["rounds"] = _timed_rounds(run, todo, wanted, seconds, t0)
    finally:  # what was measured is in the database either way (Ctrl-C too): count it
        add_trials(work_dir, counter.counts)
    elapsed = time.perf_counter() - t0
    info.update(cache_hit=False, tuning_s=elapsed, trials=sum(counter.counts.values()),
                stopped_by_time=seconds is not None and elapsed >= seconds)
    return info


#: trials per task and round under a time budget: one MetaSchedule batch
ROUND_TRIALS = 16


def _timed_rounds(run: Any, todo: list[tuple[Any, str]], wanted: Any, seconds: float,
                  t0: float) -> int:
    """Tune under a time budget: MetaSchedule has none, so tuning runs in short calls of
    ROUND_TRIALS trials for a few tasks each, cycling through the tasks (every task gets a
    batch before any gets a second; a later batch starts from the task's best records), and
    a call starts only while time is left. A call takes as many tasks as the time left allows
    at the pace measured so far, so the budget is overrun by at most about one task's batch.
    Tasks whose trials reach the cap (`wanted` false) drop out. Returns the number of calls."""
    calls, done_batches, i = 0, 0, 0
    while True:
        left = seconds - (time.perf_counter() - t0)
        todo = [(t, k) for t, k in todo if wanted(k)]
        if left <= 0 or not todo:
            return calls
        pace = (time.perf_counter() - t0) / done_batches if done_batches else None
        n = 2 if pace is None else max(1, min(8, int(left / pace)))
        part = [todo[(i + j) % len(todo)] for j in range(min(n, len(todo)))]
        run(part, ROUND_TRIALS, ROUND_TRIALS, calls)
        calls, done_batches, i = calls + 1, done_batches + len(part), (i + len(part)) % len(todo)


def trial_counter() -> Any:
    """A MeasureCallback counting measured candidates per workload: `keys` maps the task ids
    of the current MetaSchedule call to `tvm_records.anchor_key`s, `counts` sums over calls."""
    import tvm.s_tir.meta_schedule as ms
    from tvm.ir.utils import derived_object

    @derived_object
    class TrialCounter(ms.measure_callback.PyMeasureCallback):
        def __init__(self) -> None:
            self.keys: list[str] = []
            self.counts: dict[str, int] = {}

        def apply(self, task_scheduler: Any, task_id: int, measure_candidates: Any,
                  builder_results: Any, runner_results: Any) -> None:
            key = self.keys[int(task_id)]
            self.counts[key] = self.counts.get(key, 0) + len(measure_candidates)

    return TrialCounter()


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
    counts the records the JSON database appends, one line per measured candidate. Under a
    time budget (`seconds`) the bar counts seconds instead, the measure that ends tuning."""

    def __init__(self, work_dir: Path, total: int, seconds: float | None = None) -> None:
        self.path = work_dir / RECORDS
        self.seconds = seconds
        self.total = total if seconds is None else int(seconds)
        # a retune appends to the database: lines already there are not this run's trials
        self.start = _lines(self.path)
        self.t0 = time.monotonic()
        self.stop = threading.Event()
        self.bar = bar(self.total, f"tvm: MetaSchedule tuning ({total} trials)", "trial") \
            if seconds is None else \
            bar(self.total, f"tvm: MetaSchedule tuning (time budget {seconds:.0f} s)", "s")
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self.stop.wait(1.0):
            done = _lines(self.path) - self.start if self.seconds is None \
                else int(time.monotonic() - self.t0)
            self.bar.update(min(self.total, max(0, done)) - self.bar.n)

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


def _check_readable(work_dir: Path) -> None:
    """TargetRuntimeError unless TVM can read the tuning database in `work_dir` back: reading
    replays every record's trace, and tuning MiniLM left records whose traces do not replay
    (TVM's "parallel_for_dynamic error"), which would fail every later tuning with a
    traceback."""
    import tvm.s_tir.meta_schedule as ms

    from quantflow.errors import TargetRuntimeError
    from quantflow.targets.tvm_records import EQUALITY

    try:
        ms.database.JSONDatabase(work_dir=str(work_dir), module_equality=EQUALITY)
    except Exception as exc:  # noqa: BLE001 - TVM raises its own error types
        raise TargetRuntimeError(
            f"tvm tuning: the tuning cache {work_dir} cannot be read back by TVM "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); fix: delete "
            "that folder (its records are lost) or tune into another cache folder") from None
