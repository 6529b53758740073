"""A real local Ray cluster for tests: a head (1 CPU) and one worker node that also carries the
custom resource device:loop (a stand-in edge board), both on 127.0.0.1, both stopped with
`ray stop --force` whatever happens. Start-up is bounded (120 s per command)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"


def _env() -> dict[str, str]:
    # the cluster's workers import quantflow and the tests' helper modules like the driver
    return dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
                RAY_USAGE_STATS_ENABLED="0")


def _ray(*args: str, check: bool = True) -> None:
    subprocess.run([str(RAY), *args], env=_env(), check=check, timeout=120,
                   capture_output=True)


@contextmanager
def local_cluster(port: int = 6391) -> Iterator[str]:
    """Yields the head's address HOST:PORT."""
    pytest.importorskip("ray")
    if shutil.which("ray", path=str(RAY.parent)) is None:
        pytest.skip("no ray executable next to python")
    mem = str(200 * 2**20)
    try:
        _ray("start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
             "--num-cpus", "1", "--include-dashboard=false", "--object-store-memory", mem,
             "--disable-usage-stats")
        _ray("start", "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1",
             "--num-cpus", "1", "--resources", '{"device:loop": 1}',
             "--object-store-memory", mem)
        yield f"127.0.0.1:{port}"
    finally:
        import ray

        ray.shutdown()
        _ray("stop", "--force", check=False)


def device_node_id(name: str) -> str:
    """The Ray node id of the (alive) node started with the resource device:NAME."""
    import ray

    (node,) = [n for n in ray.nodes() if n["Alive"] and f"device:{name}" in n["Resources"]]
    return str(node["NodeID"])
