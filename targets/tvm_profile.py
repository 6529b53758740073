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


def kernel_totals(vm: Any, args: list[Any], *, runs: int) -> dict[str, float]:
    """`per_kernel_ms` summed per kernel function over its calls in one run."""
    out: dict[str, float] = {}
    for key, ms in per_kernel_ms(vm, args, runs=runs).items():
        name = key.split("#")[0]
        out[name] = out.get(name, 0.0) + ms
    return out


def slower_kernels(ex_a: Any, ex_b: Any, inputs: list[np.ndarray], *, runs: int = 20,
                   rounds: int = 3) -> dict[str, tuple[float, float]]:
    """Kernels that took longer in executable `ex_b` than in `ex_a` (the same model, other
    schedules), timed in the model (the caches and the thread pool as the model leaves them,
    which a kernel measured alone, as tuning does, does not see): {name: (ms in a, ms in b)},
    medians over `rounds` alternating rounds."""
    import tvm
    from tvm import relax

    vms = [relax.VirtualMachine(ex, tvm.cpu()) for ex in (ex_a, ex_b)]
    args = [tvm.runtime.tensor(np.ascontiguousarray(x)) for x in inputs]
    samples: list[list[dict[str, float]]] = [[], []]
    for _ in range(rounds):
        for i, vm in enumerate(vms):
            samples[i].append(kernel_totals(vm, args, runs=runs))
    a, b = ({k: float(np.median([s.get(k, np.nan) for s in runs_]))
             for k in runs_[0]} for runs_ in samples)
    return {k: (a[k], b[k]) for k in b if k in a and b[k] > a[k]}


def keep_faster(untuned: Any, tuned: Any, ex_untuned: Any, ex_tuned: Any,
                inputs: list[np.ndarray]) -> tuple[Any, list[str]]:
    """`tuned` with every kernel that ran slower in the tuned model than before tuning put
    back as it was (tuning measures each kernel alone: measured here, records that won there
    ran slower inside MobileNetV2). Returns the module and the names of the kernels put
    back."""
    import tvm_ffi

    slower = slower_kernels(ex_untuned, ex_tuned, inputs)
    out = tuned.clone()
    kept = []
    for gv, func in untuned.functions_items():
        name = str(gv.name_hint)
        if name in slower and not tvm_ffi.structural_equal(func, tuned[gv]):
            out[gv] = func
            kept.append(name)
    return out, kept
