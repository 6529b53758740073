"""--bits mixed on workers: local processes and a real local Ray cluster give the same plan
and the same database rows as the in-process search, and a worker killed mid-search loses
nothing (its evaluation is retried, every candidate is written once)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from nets import template_task
from torch import fx

from quantflow.calibrate import batched
from quantflow.ir import capture
from quantflow.passes.cleanup import dead_code
from quantflow.passes.fold_bn import fold_bn
from quantflow.passes.pipeline import run_pipeline
from quantflow.search import Budget, search_mixed
from quantflow.search.database import EvalDB
from quantflow.search.options import HawqOptions, LatencyOptions, SearchOptions
from quantflow.search.workers import WorkersError, connect

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclasses.dataclass(frozen=True)
class Accuracy:
    """Picklable quality function; with `kill_marker`, the first WORKER process to evaluate
    dies (os._exit, as on an OOM kill) after creating the marker, once per test."""

    x: torch.Tensor
    y: torch.Tensor
    kill_marker: str | None = None
    driver: int = dataclasses.field(default_factory=os.getpid)  # set where it is built

    def __call__(self, g: fx.GraphModule) -> float:
        if self.kill_marker and os.getpid() != self.driver and not os.path.exists(self.kill_marker):
            Path(self.kill_marker).write_text(str(os.getpid()))
            os._exit(1)
        with torch.no_grad():
            return 100.0 * float((g(self.x).argmax(-1) == self.y).double().mean())


@pytest.fixture(scope="module")
def setup() -> tuple[fx.GraphModule, list, list, torch.Tensor, torch.Tensor]:
    torch.set_num_threads(1)
    model, data = template_task(0)
    x_cal, y_cal = data(64)
    x_test, y_test = data(200)
    gm = capture(model.eval(), (x_cal[:2],))
    run_pipeline(gm, (fold_bn, dead_code))
    return gm, batched(x_cal, 32), [y_cal[i:i + 32] for i in range(0, 64, 32)], x_test, y_test


def search(setup: tuple, db: Path, **kw: object) -> tuple[dict, list[tuple]]:
    """A small search (8 evaluations = 2 rounds): its plan and its database rows without
    the timing column."""
    gm, batches, labels, x, y = setup
    kill = kw.pop("kill_marker", None)
    res = search_mixed(gm, batches, Accuracy(x, y, kill), Budget(max_size_ratio=0.75),  # type: ignore[arg-type]
                       labels=labels, db=db, progress=False,
                       search=SearchOptions(calibrators=("minmax", "percentile"),
                                            schemes=(False,), granularities=("channel",),
                                            pool_size=40, max_evals=8, seed=3),
                       hawq=HawqOptions(batches=2, max_iter=15),
                       latency=LatencyOptions(mode="proxy"), **kw)  # type: ignore[arg-type]
    with EvalDB(db) as d:
        rows = sorted((tuple(v for k, v in dataclasses.asdict(r).items() if k != "seconds")
                       for r in d.records()), key=lambda row: str(row[2]))
    assert res.real_evaluations == 8 and len(rows) == 9  # FP32 + 8, each once
    return res.plan.to_dict(), rows


def test_local_processes_same_result_and_survive_a_killed_worker(
        setup: tuple, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ref = search(setup, tmp_path / "one.sqlite")
    marker = tmp_path / "killed"
    got = search(setup, tmp_path / "two.sqlite", workers=2, kill_marker=str(marker))
    assert marker.is_file()  # a worker really died mid-search ...
    assert "worker process died" in caplog.text  # ... and its evaluations were resubmitted
    assert got == ref  # same plan, same rows (quality, features, sizes), nothing lost


def test_ray_without_cluster_is_one_line_error() -> None:
    pytest.importorskip("ray")
    with pytest.raises(WorkersError, match="cannot reach the Ray cluster.*fix"):
        connect("127.0.0.1:1")


def _ray(*args: str, env: dict[str, str]) -> None:
    subprocess.run([str(Path(sys.executable).parent / "ray"), *args], env=env, check=True,
                   timeout=120, capture_output=True)


@pytest.fixture
def ray_cluster() -> Iterator[str]:
    """A head (1 CPU) and one worker node with the custom resource device:loop, on 127.0.0.1,
    both stopped (ray stop --force) whatever happens."""
    pytest.importorskip("ray")
    if shutil.which("ray", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("no ray executable next to python")
    root = Path(__file__).resolve().parents[1]
    # the cluster's workers import quantflow and this module (Accuracy) like the driver
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{root / 'tests'}",
               RAY_USAGE_STATS_ENABLED="0")
    port = "6391"
    try:
        _ray("start", "--head", "--node-ip-address", "127.0.0.1", "--port", port,
             "--num-cpus", "1", "--include-dashboard=false", "--object-store-memory",
             str(200 * 2**20), "--disable-usage-stats", env=env)
        _ray("start", "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1",
             "--num-cpus", "1", "--resources", '{"device:loop": 1}',
             "--object-store-memory", str(200 * 2**20), env=env)
        yield f"127.0.0.1:{port}"
    finally:
        import ray

        ray.shutdown()
        subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"],
                       check=False, env=env, timeout=120, capture_output=True)


def test_ray_cluster_same_result_and_survives_a_killed_worker(
        setup: tuple, tmp_path: Path, ray_cluster: str) -> None:
    t0 = time.perf_counter()
    ref = search(setup, tmp_path / "one.sqlite")
    marker = tmp_path / "killed"
    got = search(setup, tmp_path / "ray.sqlite", ray_address=ray_cluster,
                 kill_marker=str(marker))
    assert marker.is_file()  # a Ray worker process died mid-search; Ray retried its task
    assert got == ref
    print(f"ray search test: {time.perf_counter() - t0:.1f} s")
