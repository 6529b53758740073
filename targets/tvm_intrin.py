"""Tensor intrinsics for the TVM target, registered wherever schedules are built or replayed.

Builder-timeout fix: each MetaSchedule builder worker runs `import tvm.s_tir.tensor_intrin`,
whose `__init__` registers the CUDA tensor intrinsics (measured: 101 s on the shared 2-core
machine, vs 6 s for `skip_gpu_intrinsics`), which alone exceeds LocalBuilder's 30 s timeout,
so every build fails. The tuning process itself imports the package too (TuneContext). `skip_gpu_intrinsics`,
run as the worker initializer, installs that package without executing its `__init__` and
imports only the CPU (x86, Arm) intrinsic modules.

VNNI: TVM 0.27's `dot_16x4_vnni` tensor intrinsic does not compile with the LLVM it ships
(operand types), so MetaSchedule silently discarded every VNNI candidate; `register_vnni_dot`
replaces it, in the tuning process, in every builder worker and before a database is applied.

No torch import here: the initializer runs in every popen worker.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any


def export_aarch64(mod: Any) -> str:
    """MetaSchedule builder export for an aarch64 board: a cross-compiled shared library."""
    import tempfile

    from tvm.support import cc

    from quantflow.targets.tvm_edge import CXX

    path = str(Path(tempfile.mkdtemp()) / "tvm_tmp_mod.so")
    mod.export_library(path, fcompile=cc.cross_compiler(CXX))
    return path


def skip_gpu_intrinsics() -> None:
    """Popen-worker initializer: register only the CPU tensor intrinsics (see module doc),
    with the VNNI dot product fixed for this LLVM (`register_vnni_dot`), and the aarch64
    export (`export_aarch64`: workers know only functions registered in them)."""
    import tvm_ffi

    tvm_ffi.register_global_func("quantflow.export_aarch64", export_aarch64, override=True)
    import importlib

    import tvm.s_tir

    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(Path(tvm.s_tir.__file__).parent / "tensor_intrin")]
        sys.modules[name] = pkg
        for sub in ("x86", "arm_cpu"):
            importlib.import_module(f"{name}.{sub}")
    register_vnni_dot()
    from quantflow.targets.tvm_dot import register_avx2_dot

    register_avx2_dot()


_VNNI_FIXED = False


def register_vnni_dot() -> None:
    """Re-register TVM's `dot_16x4_vnni` tensor intrinsic so that it compiles.

    TVM 0.27 calls `llvm.x86.avx512.vpdpbusd.512` with three <16 x i32> operands; the LLVM it
    ships declares the two multiplicands as <64 x i8>, so every tensorized candidate fails
    LLVM verification ("Call parameter type does not match function signature") and tuned
    int8 kernels never use VNNI. Same description (u8[4] . i8[16, 4] -> i32[16]), operands
    reinterpreted as byte vectors. MetaSchedule's x86 VNNI rule (chosen for any target with
    avx512vnni) refers to the intrinsic by this name, so overriding it is enough; tuning
    records replay it by name, so every process that builds tuned kernels calls this.
    """
    global _VNNI_FIXED
    if _VNNI_FIXED:
        return
    from tvm.s_tir import TensorIntrin
    from tvm.s_tir.tensor_intrin.x86 import VNNI_DOT_16x4_INTRIN, dot_product_16x4_u8i8i32_desc
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def vnni_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (16, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (16,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(a_i32, 16), dtype="uint8x64"),
                B.vload([0, 0], dtype="int8x64"),
                dtype="int32x16")

    TensorIntrin.register(VNNI_DOT_16x4_INTRIN, dot_product_16x4_u8i8i32_desc, vnni_impl,
                          override=True)
    _VNNI_FIXED = True
