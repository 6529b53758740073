"""--bits mixed on workers: local processes and a real local Ray cluster give the same plan
and the same database rows as the in-process search, and a worker killed mid-search loses
nothing (its evaluation is retried, every candidate is written once). On the same cluster,
--measure-on times every latency on the node with the device resource (issue 17).

Every Ray test is in this one file: they share one cluster (module fixture), and
`ray stop --force` would stop a second file's cluster running in parallel."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from nets import template_search_task, template_task
from ray_testing import device_node_id, local_cluster
from torch import fx

from quantflow.search import Budget, search_mixed
from quantflow.search.database import EvalDB
from quantflow.search.options import HawqOptions, LatencyOptions, SearchOptions
from quantflow.search.workers import WorkersError, connect
from quantflow.targets.base import device_description

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
def setup() -> tuple[fx.GraphModule, list, list, torch.Tensor, torch.Tensor, torch.nn.Module]:
    return template_search_task(200)


def search(setup: tuple, db: Path, **kw: object) -> tuple[dict, list[tuple], dict]:
    """A small search (8 evaluations = 2 rounds): its plan, its database rows without the
    timing column and its Hessian traces (their draws are worker tasks too)."""
    gm, batches, labels, x, y, _model = setup
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
    assert res.traces.iterations == 15  # max_iter: the stopping point is not wall-clock
    return res.plan.to_dict(), rows, res.traces.to_dict()


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


def test_without_ray_installed_the_cli_names_the_extra(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    """Ray is optional: asked for without it, one line naming `quantflow[ray]`, exit 2."""
    from quantflow.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    code = main(["compile", "zoo:resnet_fmnist", "--bits", "mixed", "--ray", "127.0.0.1:1",
                 "-q", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "pip install 'quantflow[ray]'" in err


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    with local_cluster() as address:
        yield address


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


# --------------------------------------------------------------- latency on a Ray device node


@pytest.fixture(scope="module")
def model_files(setup: tuple, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The template model as a .pt2 with calibration and labelled evaluation files."""
    d = tmp_path_factory.mktemp("device")
    model, data = template_task(0)
    x, y = data(96)
    torch.export.save(torch.export.export(model.eval(), (x[:1],)), d / "m.pt2")
    np.save(d / "calib.npy", x[:64].numpy())
    np.savez(d / "eval.npz", x=x[64:].numpy(), y=y[64:].numpy())
    return {"model": d / "m.pt2", "calib": d / "calib.npy", "eval": d / "eval.npz"}


def _compile(files: dict[str, Path], out: Path, *extra: str) -> int:
    from quantflow.cli import main

    return main(["compile", str(files["model"]), "--target", "ort", "--bits", "8",
                 "--calib", str(files["calib"]), "--eval", str(files["eval"]), "-q",
                 "--profile-runs", "5", "-o", str(out), *extra])


def test_measure_on_runs_every_profile_on_the_device_node(
        model_files: dict[str, Path], tmp_path: Path, ray_cluster: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """--measure-on loop: both latencies of the report were timed by a task on the node that
    has the resource device:loop (its Ray node id is in the recorded device), per layer too."""
    assert _compile(model_files, tmp_path / "out", "--measure-on", "loop",
                    "--ray", ray_cluster) == 0
    r = json.loads((tmp_path / "out" / "report.json").read_text())
    node = device_node_id("loop")
    import ray

    assert node != ray.get_runtime_context().get_node_id()  # not the driver's (head) node
    for key in ("fp32", "quantized"):
        lat = r["latency"][key]
        assert lat["device"].endswith(f"[device:loop, Ray node {node[:12]}]"), lat["device"]
        assert 0 < lat["median_ms"] <= lat["p90_ms"]
    assert r["latency"]["quantized"]["per_layer_ms"]  # ORT's profiler ran there as well
    # the gate compares these latencies with the same board's, not with this host's
    from quantflow.regress import metrics_of

    assert metrics_of(r, "report.json").isa_class == "device:loop"
    capsys.readouterr()

    # `quantflow profile` of the artifact on the same board
    from quantflow.cli import main

    assert main(["profile", str(tmp_path / "out" / "model.onnx"), "--runs", "5",
                 "--measure-on", "loop", "--ray", ray_cluster]) == 0
    assert f"[device:loop, Ray node {node[:12]}]" in capsys.readouterr().out

    # a device nobody serves: one line naming the devices the cluster has, usage exit code
    code = _compile(model_files, tmp_path / "bad", "--measure-on", "rpi5", "--ray", ray_cluster)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err, err
    assert "device:rpi5" in err and "devices there: loop" in err and "fix:" in err


def test_latency_tables_are_cached_per_device(setup: tuple, tmp_path: Path,
                                              ray_cluster: str) -> None:
    """The search's measured latency table on the device node is its own cache entry, named
    after the board, next to this host's table of the same model."""
    from quantflow.calibrate import collect_stats
    from quantflow.quantize import quantize
    from quantflow.search.latency import measure_table
    from quantflow.search.space import GlobalConfig, layer_plan
    from quantflow.spec import QuantPlan
    from quantflow.targets import get_target

    gm, batches = setup[0], setup[1]
    x = (batches[0][0][:1],)
    layers = [n.name for n in gm.graph.nodes if n.op == "call_function"
              and ("conv" in str(n.target) or "linear" in str(n.target))]
    assert len(layers) >= 3
    stats = collect_stats(gm, [x])
    g0 = GlobalConfig()

    def quantize_with(assign: dict[str, str]) -> fx.GraphModule:
        return quantize(gm, QuantPlan(default=layer_plan("W8A8", g0), layers={
            n: layer_plan(assign.get(n, "FP32"), g0) for n in layers}), stats)

    timing = LatencyOptions(cache_dir=tmp_path, runs=5, warmup=1)
    tables = {}
    for where, opts in (("here", {}), ("loop", {"measure_on": "loop",
                                                "ray_address": ray_cluster})):
        target = get_target("ort", threads=1, **opts)  # type: ignore[arg-type]
        tables[where] = measure_table(gm, x, layers, ["W8A8", "FP32"], quantize_with, target,
                                      model_hash="m", latency=timing)
    assert tables["loop"].device.endswith("[device:loop]")
    assert tables["here"].device == device_description()
    assert len(list(tmp_path.glob("*.json"))) == 2  # two devices, two cached tables
    assert tables["loop"].method == "per_layer_profile" and tables["loop"].ms.sum() > 0


@pytest.mark.parametrize(("flags", "says"), [
    (["--workers", "2"], "--workers runs the --bits mixed search"),
    (["--ray", "127.0.0.1:1"], "drop --ray"),
    (["--measure-on", "rpi5"], "needs the Ray cluster"),
    (["--target", "tvm", "--measure-on", "rpi5", "--ray", "127.0.0.1:1"], "--rpc-tracker"),
])
def test_cluster_flags_without_their_use_are_usage_errors(
        flags: list[str], says: str, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from quantflow.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["compile", "zoo:resnet_fmnist", "-q", "-o", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1, err


def _fails(ctx: object, item: int) -> None:
    raise ValueError(f"bad item {item}")


def test_a_task_that_raises_on_the_cluster_is_one_line(setup: tuple, ray_cluster: str) -> None:
    """Not a lost worker (Ray does not retry the task's own exception): one line naming it."""
    from quantflow.search.workers import EvalContext, RayWorkers

    pool = RayWorkers(EvalContext(setup[0], {}, None, None, None), ray_cluster)
    try:
        with pytest.raises(WorkersError, match=r"^a search task failed.*bad item 1.*fix") as e:
            list(pool.run(_fails, [1]))
        assert "\n" not in str(e.value)
    finally:
        pool.close()
