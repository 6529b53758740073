"""The int8 dot-product path of each ISA class, and the schedule that uses it without tuning.

An integer conv that fits runs as `tvm_int_math.packed_conv2d_nhwc`: NHWC input, weight packed
in [lanes x 4] blocks, so that one instruction sequence computes `lanes` int32 sums of 4
products (u8 or s8 activations x s8 weights). Per ISA class (`tvm_records.isa_class`):

  x86-vnni   16 lanes, u8 x s8   vpdpbusd (TVM's `dot_16x4_vnni`, fixed: tvm_tune)
  x86-avx2    8 lanes, u8 x s8   vpmaddubsw + vpmaddwd (`quantflow_dot_8x4_avx2`, below).
                                 vpmaddubsw adds the two products of a pair in int16 with
                                 saturation: exact only while 255 * (|w0| + |w1|) <= 32767 for
                                 every same-sign pair of consecutive input channels of an
                                 output channel (`pairs_fit`: quantflow.pair_limit's rule, the
                                 bound ORT's AVX2 kernels have too). A conv whose weights
                                 break it keeps the layout but widens the products to int32
                                 (`WIDE_BLOCK`: exact, vectorized over the 8 lanes).
  arm64-dot   4 lanes, s8 x s8   sdot (TVM's `dot_4x4_i8i8s32_sdot`)
  arm64       4 lanes, s8 x s8   NEON smull + saddlp + addp (TVM's `dot_4x4_i8i8s32_neon`)

Arm has no u8 x s8 dot product before i8mm, so there the uint8 codes are shifted to int8
(x - 128, exact) and the zero-point correction uses zx - 128 (tvm_int_math's algebra with a
shifted zero point: `integer_bias(bq, wq, zx - 128)`).

The schedule a packed conv gets when no tuning record has its workload is
`tvm_schedules.packed_conv`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: the reduction every path does in one instruction sequence: 4 consecutive input channels
DOT_K = 4
AVX2_INTRIN = "quantflow_dot_8x4_avx2"


@dataclass(frozen=True)
class DotPath:
    isa: str
    lanes: int
    act: str  # "uint8" (x86: the codes as they are) or "int8" (Arm: codes shifted by -128)
    intrin: str
    instruction: str  # for the report
    pair_bound: bool = False  # vpmaddubsw: int16 pair sums (`pairs_fit`)


PATHS = {
    "x86-vnni": DotPath("x86-vnni", 16, "uint8", "dot_16x4_vnni", "vpdpbusd"),
    "x86-avx2": DotPath("x86-avx2", 8, "uint8", AVX2_INTRIN, "vpmaddubsw + vpmaddwd",
                        pair_bound=True),
    "arm64-dot": DotPath("arm64-dot", 4, "int8", "dot_4x4_i8i8s32_sdot", "sdot"),
    "arm64": DotPath("arm64", 4, "int8", "dot_4x4_i8i8s32_neon", "smull + saddlp + addp"),
}


def path_for(isa: str) -> DotPath | None:
    return PATHS.get(isa)


def pairs_fit(wq: np.ndarray) -> bool:
    """True if vpmaddubsw cannot saturate on this OIHW int8 weight for any uint8 input: the
    rule and pairing of quantflow.pair_limit (pairs of consecutive input channels at each
    kernel position, the packed layout's K order for in channels % 4 == 0)."""
    import torch

    from quantflow.pair_limit import pair_bound, pair_index, violations

    a, b = pair_index(tuple(wq.shape))
    codes = torch.from_numpy(wq.astype(np.int32)).reshape(wq.shape[0], -1)
    return not bool(violations(codes, a, b, pair_bound(255)).any())


_REGISTERED = False


def register_avx2_dot() -> None:
    """Register `quantflow_dot_8x4_avx2`: C[8] += A[4] . B[8, 4] (u8 x s8 -> s32) with 256-bit
    vpmaddubsw (pairs summed in int16, saturating: see `pairs_fit`) then vpmaddwd by ones
    (the two pair sums of a lane added in int32). Called wherever schedules are built or
    replayed (tvm_intrin.skip_gpu_intrinsics)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (8, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (8,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:8], A[0:4], B[0:8, 0:4])
            T.writes(C[0:8])
            for i in T.serial(0, 8):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (8, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (8,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:8], A[0:4], B[0:8, 0:4])
            T.writes(C[0:8])
            a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            pairs = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                T.reinterpret(T.broadcast(a_i32, 8), dtype="uint8x32"),
                B.vload([0, 0], dtype="int8x32"), dtype="int16x16")
            C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), pairs,
                T.broadcast(T.int16(1), 16), dtype="int32x8")

    TensorIntrin.register(AVX2_INTRIN, desc, impl, override=True)
    _REGISTERED = True


#: the name of the packed conv's TE block (tvm_int_math.vnni_conv2d_nhwc)
PACKED_BLOCK = "conv2d_vnni"
#: the same layout for AVX2 weights past the pair bound: products widened to int32 (exact),
#: vectorized over the output lanes instead of tensorized
WIDE_BLOCK = "conv2d_packed_wide"
