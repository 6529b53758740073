"""Per-kernel times of a TVM library, named after the fx layers they compute.

`TVMTarget.profile(per_layer=True)` times every kernel call through the Relax VM's call
instrument (`per_kernel_ms`) and renames each kernel after its fx layer where the manifest's
`kernel_layers` (`tvm_tune.kernel_layers`) knows it (`by_layer`).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np


def per_kernel_ms(vm: Any, args: list[Any], *, runs: int) -> dict[str, float]:
    """Median time per compiled kernel (fused TIR function), via the VM call instrument.

    Kernel names are TVM's fused-function names (e.g. `fused_conv2d_add_multiply_relu`);
    VM builtins (allocation, shape checks) are excluded. Each call is timed in Python around
    the synchronous CPU kernel, which adds a few microseconds per kernel.
    """
    samples: dict[str, list[float]] = {}
    current: dict[str, float] = {}
    counts: dict[str, int] = {}

    def instrument(func: Any, symbol: str, before: bool, ret: Any, *rest: Any) -> int:
        if symbol.startswith("vm."):  # VM builtins: allocation, shape checks
            return 0
        if before:
            current[symbol] = time.perf_counter()
        else:
            n = counts.get(symbol, 0)
            counts[symbol] = n + 1
            samples.setdefault(f"{symbol}#{n}" if n else symbol, []).append(
                (time.perf_counter() - current.pop(symbol)) * 1e3)
        return 0

    vm.set_instrument(instrument)
    try:
        for _ in range(runs):
            counts.clear()
            vm["main"](*args)
    finally:
        vm.set_instrument(None)
    return {k: float(np.median(v)) for k, v in samples.items()}


def by_layer(kernel_ms: dict[str, float], kernel_layers: dict[str, str]) -> dict[str, float]:
    """Per-kernel times keyed by fx layer name where the manifest's `kernel_layers` names the
    kernel (`tvm_tune.kernel_layers`), by kernel name otherwise; kernels that map to the same
    name are summed."""
    out: dict[str, float] = {}
    for kernel, ms in kernel_ms.items():
        name = kernel_layers.get(kernel, kernel)
        out[name] = out.get(name, 0.0) + ms
    return out
