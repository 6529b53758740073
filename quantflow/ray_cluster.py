"""Connecting to a Ray cluster (`--ray ADDRESS`, `RAY_ADDRESS`), shared by the search workers
(quantflow/search/workers.py) and latency on Ray device nodes (targets/ray_device.py).

Ray is an optional extra (`pip install 'quantflow[ray]'`); everything here imports it lazily so
a machine without it runs every other path, and a request for it fails in one line naming the
fix. quantflow never starts a cluster itself: a cluster belongs to whoever runs it
(docs/cluster.md), and `ray.init` on an unreachable address would silently start a local one.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from quantflow.errors import QuantflowError

#: per task: a node lost three times over is not a transient failure
RETRIES = 3


class ClusterError(QuantflowError):
    """Ray missing or unreachable, a device nobody serves, or tasks that keep dying."""

    exit_code = 2


def ray_module() -> Any:
    """Ray, or a one-line usage error naming the fix."""
    try:
        import ray
    except ImportError:
        raise ClusterError("--ray / --measure-on need Ray, which is not installed; fix: pip "
                           "install 'quantflow[ray]' (or run without them: --workers N uses "
                           "local processes)") from None
    return ray


def connect(where: str) -> Any:
    """ray.init on an existing cluster at `where` (never starts one), or a one-line error."""
    ray = ray_module()
    if ray.is_initialized():
        return ray
    fix = "fix: start it (`ray start --head`, docs/cluster.md) or correct --ray / RAY_ADDRESS"
    host, _, port = where.removeprefix("ray://").rpartition(":")
    if host and port.isdigit():  # ray.init retries an unreachable head for minutes
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as exc:
            raise ClusterError(f"cannot reach the Ray cluster at {where!r} ({exc}); {fix}"
                               ) from None
    try:
        ray.init(address=where, log_to_driver=False, logging_level=logging.WARNING,
                 include_dashboard=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {where!r} ({exc}); {fix}") from None
    return ray


def device_resource(name: str) -> str:
    """The custom resource a device node is started with (`--resources '{"device:rpi5": 1}'`)."""
    return f"device:{name}"


def require_device(ray: Any, name: str) -> None:
    """A one-line error when no node of the cluster serves `--measure-on name`."""
    resources = ray.cluster_resources()
    if device_resource(name) not in resources:
        have = sorted(k.removeprefix("device:") for k in resources if k.startswith("device:"))
        raise ClusterError(
            f"--measure-on {name}: no node of the Ray cluster has the resource "
            f"{device_resource(name)!r} (devices there: {', '.join(have) or 'none'}); fix: on "
            f"the board run `ray start --address HEAD:PORT --resources "
            f"'{{\"{device_resource(name)}\": 1}}'` (docs/cluster.md) or pick one of those")
