"""Which ONNX Runtime integer kernels run on which CPU, and what each computes exactly.

ONNX Runtime's CPU provider fuses DQ -> Conv/Gemm -> Q into QLinearConv / QGemm and hands the
int8 arithmetic to MLAS, which picks a kernel by the CPU it finds at run time. For uint8
activations and int8 weights (U8S8, what quantflow emits for ORT) the kernels are
(onnxruntime/core/mlas/lib: platform.cpp dispatch, convsym.cpp, qgemm_kernel_*.cpp, the
ConvSymKernel*/QgemmU8S8Kernel* assembly; checked against ORT 1.32 by the probes in
tests/test_ort_isa.py, natively and under `qemu-x86_64 -cpu Haswell` and the four
`qemu-aarch64` CPU models of targets/emulate.py; x86 SSE4.1 once by hand with `-cpu Nehalem`;
AVX-512 without VNNI only by reading the source, as QEMU 7.2 does not emulate AVX-512):

| CPU class (isa_class)         | U8S8 conv / gemm inner step                 | exact?          |
|-------------------------------|---------------------------------------------|-----------------|
| x86 SSE4.1 (x86-sse)          | widen to int16, `pmaddwd` into int32         | yes             |
| x86 AVX2 (x86-avx2): Haswell+, AMD Zen 1-3 | `vpmaddubsw`: u8·s8 + u8·s8 in a *saturating int16*, then `vpmaddwd` by 1 | no: saturates |
| x86 AVX-512 without VNNI (x86-avx512): Skylake-SP | `vpmaddubsw` on zmm, same packing | no: saturates |
| x86 AVX512-VNNI / AVX-VNNI / AMX (x86-vnni) | `vpdpbusd`: four products into int32 | yes      |
| arm64 NEON (arm64): Cortex-A72 | widening `smull`/`umull`, `sadalp` into int32 | yes           |
| arm64 dot product (arm64-dot): Neoverse N1, Cortex-A76 | `udot`/`sdot` into int32 | yes     |
| arm64 i8mm (arm64-i8mm, arm64-sve): Apple M2+, Graviton3/4 | `ummla`/`smmla` (NEON, SVE) into int32 | yes |
| depthwise conv, every ISA     | per-channel kernels that widen before adding | yes             |

The bound quantflow relies on for the saturating kernels: for every weight pair (a, b) the
kernel adds and every activation code x ∈ [0, 255] (raw uint8 codes; the zero point is
subtracted after the dot product), |x_a·a + x_b·b| ≤ 32767, i.e. |a| + |b| ≤ 128 when a and b
have the same sign (quantflow.pair_limit). The pairs: MLAS packs conv weights per kernel
position in blocks of four input channels (MlasConvSymPackW, FilterInputChannelPackCount = 4)
on the symmetric-conv path, and reorders OIHW to HWIO and packs K in groups of four for its
GEMM path (QLinearConv::ReorderFilter, MlasGemmU8S8CopyPackBAvx2) — either way the pairs are
elements (2i, 2i+1) of each output channel's weights in (kernel position, input channel)
order, input channel fastest, zero-padded at the end; for Gemm/MatMul, consecutive input
features. Calibrated activation ranges cannot narrow the bound: the quantizer maps each
range onto all 256 codes, and an input past the calibrated range saturates *to* 255.

ONNX Runtime's own remedy, the session option `session.x64quantprecision` (U8U8 kernels for
every layer), is a property of the session, not of the file, so an artifact cannot rely on
its user setting it; quantflow instead changes only the weights that could saturate.

Devices (`--device`): what the artifact is for.
- portable (default): exact on every CPU above; weights respect the pair bound.
- x86-avx2: the same weights (the narrowest kernel is the AVX2 one), recorded as intended
  for AVX2 hosts.
- x86-vnni / arm64: no pair bound (full int8 weights); exact on VNNI x86, arm64 and SSE-only
  x86, NOT on AVX2 or AVX-512-without-VNNI x86, where `quantflow profile` and the report warn.
- host: the class of the CPU compiling it (x86-vnni, x86-avx2 or arm64).
"""

from __future__ import annotations

from quantflow.devices import ISA_CLASSES, ORT_DEVICES
from quantflow.spec import PairLimit

DEVICES = ORT_DEVICES
DEFAULT_DEVICE = DEVICES[0]
__all__ = ["DEFAULT_DEVICE", "DEVICES", "ISA_CLASSES", "PAIR_LIMIT", "exact_on", "host_warning",
           "pair_limit", "resolve_device"]
#: CPU classes whose U8S8 kernels saturate int16 pairs
SATURATING_ISAS = frozenset({"x86-avx2", "x86-avx512"})

PAIR_LIMIT = PairLimit(acc_max=32767, why=(
    "x86 AVX2 / AVX-512 without VNNI: vpmaddubsw adds two u8*s8 products in a saturating "
    "int16"))


def resolve_device(device: str, isa_class: str) -> str:
    """`host` -> the device class of this CPU; any other device is returned as given."""
    if device not in DEVICES:
        raise ValueError(f"ort: device must be one of {DEVICES}, got {device!r}")
    if device != "host":
        return device
    if isa_class in SATURATING_ISAS:
        return "x86-avx2"
    if isa_class.startswith("arm64"):
        return "arm64"
    if isa_class == "x86-vnni":
        return "x86-vnni"
    return "portable"


def pair_limit(device: str) -> PairLimit | None:
    """The pair limit an artifact for `device` (resolved) must respect, None if none."""
    return PAIR_LIMIT if device in ("portable", "x86-avx2") else None


def exact_on(device: str, isa_class: str) -> bool:
    """Whether an artifact made for `device` computes exactly on a CPU of `isa_class`."""
    return pair_limit(device) is not None or isa_class not in SATURATING_ISAS


def host_warning(device: str, isa_class: str) -> str | None:
    """A user-facing warning when this host cannot run a `device` artifact exactly."""
    if exact_on(device, isa_class):
        return None
    return (f"this artifact was compiled for --device {device}; this CPU ({isa_class}) runs "
            "ONNX Runtime's int8 kernels with saturating int16 pair sums, so some outputs "
            "may be wrong here. Recompile with --device portable (the default) to ship it "
            "to such CPUs.")
