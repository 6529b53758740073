"""This machine for the TVM target: importing TVM with a full thread pool, the host's LLVM
target string, resizing the thread pool."""

from __future__ import annotations

import os
from typing import Any

from quantflow.errors import TargetUnavailableError


def _import_tvm() -> Any:
    # TVM sizes its thread pool, and caps every later resize, at TVM_NUM_THREADS or else half
    # the logical cores on x86 (it assumes hyper-threading: 1 of 2 cores here); default to all
    # logical cores, like the ort target, so that profile(threads=N) can use them
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
    try:
        import tvm
    except ImportError as exc:
        raise TargetUnavailableError(
            f"tvm target: apache-tvm is not importable ({exc})\n"
            "fix: pip install 'quantflow[tvm]' (apache-tvm==0.27.0.post1, "
            "apache-tvm-ffi==0.1.14.post0, psutil, cloudpickle)") from exc
    return tvm


def host_target(num_cores: int | None = None, mcpu: str | None = None) -> Any:
    """LLVM target for this CPU (mcpu detected by LLVM, e.g. znver4 / icelake-server), or for
    an older x86 CPU that this one can run (`mcpu`, e.g. haswell: AVX2 code, measured here)."""
    tvm = _import_tvm()
    from tvm.target import codegen

    spec: dict[str, Any] = {"kind": "llvm", "mcpu": mcpu or str(codegen.llvm_get_system_cpu()),
                            "num-cores": int(num_cores or os.cpu_count() or 1)}
    if codegen.target_has_features("avx512f", tvm.target.Target(spec)):
        # LLVM splits vectors to 256 bits on most AVX-512 CPUs (a clock-speed hedge of
        # Skylake-X); TVM's kernels are long vector loops where full width pays: MobileNetV2's
        # 1x1 convs with their requantize epilogue ran 1.4x faster (tools/bench_targets.py)
        spec["mattr"] = ["-prefer-256-bit"]
    return tvm.target.Target(spec)


def set_threads(threads: int) -> int:
    """Resize TVM's CPU thread pool (mode 1 = all 'big' cores, i.e. every core on x86);
    returns the previous size. TVM silently caps the size at the pool's maximum, fixed when
    the runtime starts (`_import_tvm`); asking for more raises."""
    import tvm_ffi

    num_threads = tvm_ffi.get_global_func("runtime.NumThreads")
    before = int(num_threads())
    tvm_ffi.get_global_func("runtime.config_threadpool")(1, int(threads))
    if int(num_threads()) != threads:
        got = int(num_threads())
        tvm_ffi.get_global_func("runtime.config_threadpool")(1, before)
        raise TargetUnavailableError(
            f"tvm target: the TVM thread pool cannot grow to {threads} threads (it stays at "
            f"{got}); fix: start the process with TVM_NUM_THREADS={threads}")
    return before
