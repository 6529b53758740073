"""Memory bounds: refuse work that cannot fit before allocating it.

A model file declares its input shape, and so does `--input-shape`; both are untrusted. An
absurd one (1×3×100000×100000 floats is 120 GB) must end in an error that says how much would
be needed, not in a MemoryError deep inside torch or in the kernel's OOM killer. So every large
allocation quantflow makes on the user's behalf is priced first:

- `check_alloc`: one allocation of known size (an example input, a data file's array);
- `graph_peak_bytes` + `check_graph`: the activations a captured graph keeps alive at once,
  read from the shapes torch.export recorded (no data runs), times the batch it will run.

What is available is the smallest of: MemAvailable (/proc/meminfo), the cgroup limit minus
its current usage, RLIMIT_AS minus this process's address space, and $QUANTFLOW_MAX_MEMORY
(bytes, or with a K/M/G/T suffix) for users who want a lower ceiling than the machine's.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import fx

from quantflow.errors import ResourceError

#: environment variable: an upper bound on what quantflow may plan to use
ENV_LIMIT = "QUANTFLOW_MAX_MEMORY"
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_bytes(text: str) -> int:
    """'512M', '2G', '1048576' -> bytes; ValueError for anything else."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in _UNITS and not t[-1:].isdigit() else ""
    number = float(t[: len(t) - len(unit)])
    if not number >= 0 or number == float("inf"):  # also rejects NaN
        raise ValueError(f"not a size: {text!r}")
    return int(number * _UNITS[unit])


def human(n: float) -> str:
    """Bytes for people: 1.5 GiB, 120.0 GB-scale numbers stay readable."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available() -> int | None:
    """cgroup v2 (then v1) limit minus usage: a container's MemAvailable shows the host's."""
    for limit_f, usage_f in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                             ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                              "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit = _read_int(limit_f)
        if limit is not None and limit < 2**60:  # v1 says "no limit" with a huge number
            return max(limit - (_read_int(usage_f) or 0), 0)
    return None


def _rlimit_available() -> int | None:
    """RLIMIT_AS caps this process's virtual address space, which torch already uses a lot of."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return max(soft - int(line.split()[1]) * 1024, 0)
    except (OSError, ValueError, IndexError):
        pass
    return soft


def available_bytes() -> int | None:
    """What this process may still allocate, or None when nothing says (then nothing is
    refused: the checks exist to stop absurd requests, not to second-guess the kernel)."""
    found = [v for v in (_meminfo_available(), _cgroup_available(), _rlimit_available())
             if v is not None]
    env = os.environ.get(ENV_LIMIT)
    if env:
        try:
            found.append(parse_bytes(env))
        except ValueError:
            raise ResourceError(f"${ENV_LIMIT}={env!r} is not a size; write bytes or e.g. "
                                "512M, 4G") from None
    return min(found) if found else None


def check_alloc(nbytes: int, what: str, fix: str) -> None:
    """Raise ResourceError when `nbytes` exceed what is available; `what` names the thing
    (file, flag, shape) and `fix` says what to shrink."""
    avail = available_bytes()
    if avail is not None and nbytes > avail:
        raise ResourceError(f"{what} needs {human(nbytes)} of memory but only {human(avail)} "
                            f"is available; fix: {fix}")


def tensor_bytes(shape: Iterable[int], dtype: torch.dtype = torch.float32) -> int:
    """Bytes of a dense tensor, in Python integers (no overflow for absurd shapes)."""
    n = 1
    for d in shape:
        n *= int(d)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return n * itemsize


def _value_bytes(val: object, batch: int) -> int:
    """Bytes of a node's recorded output with every symbolic size evaluated at `batch` (the
    only dynamic dimension quantflow exports is the batch)."""
    if isinstance(val, (tuple, list)):
        return sum(_value_bytes(v, batch) for v in val)
    if not isinstance(val, torch.Tensor):
        return 0
    dims = []
    for d in val.shape:
        if isinstance(d, torch.SymInt):
            expr = d.node.expr
            d = int(expr.subs({s: batch for s in expr.free_symbols}))
        dims.append(max(int(d), 0))
    return tensor_bytes(dims, val.dtype)


def graph_peak_bytes(gm: fx.GraphModule, batch: int) -> int:
    """Largest total of activations alive at once when `gm` runs a batch of `batch` samples
    in node order, freeing each value after its last use (what fx.Interpreter and the
    generated forward do). Weights (get_attr) are excluded: they are already in memory."""
    nodes = list(gm.graph.nodes)
    last_use: dict[fx.Node, int] = {}
    for i, n in enumerate(nodes):
        for a in n.all_input_nodes:
            last_use[a] = i
    live: dict[fx.Node, int] = {}
    peak = 0
    for i, n in enumerate(nodes):
        if n.op in ("placeholder", "call_function", "call_module", "call_method"):
            live[n] = _value_bytes(n.meta.get("val"), batch)
        peak = max(peak, sum(live.values()))
        for a in n.all_input_nodes:
            if last_use.get(a) == i:
                live.pop(a, None)
    return peak


#: headroom over the live activations: the calibration observer makes a float64 copy of the
#: tensor it records (one at a time) and kernels take workspace; the checks exist to stop
#: requests that are off by orders of magnitude, not to refuse ones that might just fit
OVERHEAD = 2


def check_graph(gm: fx.GraphModule, batch: int, what: str, fix: str) -> int:
    """Price running `gm` on batches of `batch`; raise ResourceError when it cannot fit.
    Returns the estimate (bytes)."""
    need = OVERHEAD * graph_peak_bytes(gm, batch)
    check_alloc(need, what, fix)
    return need
