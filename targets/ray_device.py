"""Latency on a Ray device node (`--measure-on NAME`): the artifact travels with a Ray task that
only a node started with the custom resource `device:NAME` may run, and that node times it with
its own runtime.

Why Ray and not ssh/scp: the board is then one more node of the cluster the search already
uses, scheduling is Ray's (one measurement per device at a time: the task takes the device's
single unit and one CPU, so timings do not overlap), a lost board is retried or reported like
any lost node, and nothing besides `ray start` runs on the board (docs/cluster.md). The board
needs the same Python packages as the build host's measurement path (quantflow and
onnxruntime); Ray ships the artifact bytes, not the runtime.

The latency comes back with the board's own CPU description (that is what `Latency.device`
and the search's latency-table cache key on), tagged with the device name and Ray node id so
a report says where it was measured.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from quantflow.ray_cluster import RETRIES, ClusterError, connect, device_resource, require_device
from quantflow.targets.base import Artifact, Latency, device_description

#: a measurement that has not finished after this long has lost its board (seconds)
TIMEOUT_S = 1800.0


def _profile_there(make: tuple[str, dict[str, Any]], artifact: Artifact,
                   files: dict[str, tuple[str, bytes]], inputs: Sequence[np.ndarray],
                   kw: dict[str, Any]) -> tuple[Latency, str]:
    """On the device node: unpack the artifact, time it with the local runtime."""
    import ray

    from quantflow.targets import get_target

    target = get_target(make[0], **make[1])
    with tempfile.TemporaryDirectory(prefix="quantflow_measure_") as tmp:
        paths = {}
        for role, (name, data) in files.items():
            (Path(tmp) / role).mkdir()
            path = Path(tmp) / role / name
            path.write_bytes(data)
            paths[role] = str(path)
        local = replace(artifact, files={**artifact.files, **paths})
        lat = target.profile(local, inputs, **kw)
    return lat, ray.get_runtime_context().get_node_id()


def _describe_there() -> str:
    return device_description()


class RayDevice:
    """A device node of the Ray cluster at `address`, serving the resource `device:name`."""

    def __init__(self, name: str, address: str) -> None:
        self.name = name
        self.address = address
        self._description: str | None = None

    def _ray(self) -> Any:
        ray = connect(self.address)
        require_device(ray, self.name)
        return ray

    def _options(self) -> dict[str, Any]:
        return {"num_cpus": 1, "resources": {device_resource(self.name): 1},
                "max_retries": RETRIES}

    def _get(self, ray: Any, ref: Any, what: str) -> Any:
        try:
            return ray.get(ref, timeout=TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref, force=True)
            raise ClusterError(f"--measure-on {self.name}: {what} did not finish within "
                               f"{TIMEOUT_S:.0f} s; fix: check the board (`ray status`)"
                               ) from None
        except ray.exceptions.RayError as exc:
            first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise ClusterError(f"--measure-on {self.name}: {what} failed on the device node "
                               f"({first}); fix: check that quantflow and its runtime are "
                               "installed there (docs/cluster.md)") from None

    def description(self) -> str:
        """The board's CPU, as `device_description()` names it there, plus the device name."""
        if self._description is None:
            ray = self._ray()
            task = ray.remote(**self._options())(_describe_there)
            cpu = self._get(ray, task.remote(), "asking the board's CPU")
            self._description = f"{cpu} [device:{self.name}]"
        return self._description

    def profile(self, make: tuple[str, dict[str, Any]], artifact: Artifact,
                inputs: Sequence[np.ndarray], **kw: Any) -> Latency:
        """`get_target(*make).profile(artifact, inputs, **kw)` on the board."""
        ray = self._ray()
        files = {role: (Path(p).name, Path(p).read_bytes())
                 for role, p in artifact.files.items() if Path(p).is_file()}
        task = ray.remote(**self._options())(_profile_there)
        lat, node = self._get(ray, task.remote(make, artifact, files, list(inputs), kw),
                              "the latency measurement")
        return replace(lat, device=f"{lat.device} [device:{self.name}, Ray node {node[:12]}]")
