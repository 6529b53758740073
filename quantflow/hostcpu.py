"""The CPU this process runs on: architecture, model and the ISA features integer kernels use.

Runtimes pick integer kernels by CPU feature at run time (ONNX Runtime's MLAS: AVX2
`vpmaddubsw`, AVX-512 / AVX-VNNI `vpdpbusd`, arm64 `sdot`/`udot`), and those kernels differ in
what they compute exactly (targets/ort_isa.py). Reports record these features next to every
latency and parity figure; `isa_class` condenses them into the classes that matter there.

Features come from CPUID as numpy's runtime dispatch sees it (what this process can execute,
also under an emulator such as `qemu-x86_64 -cpu Haswell`, which passes the *host's*
/proc/cpuinfo through), completed from /proc/cpuinfo with the flags numpy does not detect
(AVX-VNNI, AMX, i8mm) only when the two agree on the basic ones.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

#: /proc/cpuinfo flags worth recording (x86 `flags`, arm64 `Features`)
FEATURES = ("sse4_1", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
            "amx_int8", "asimd", "asimddp", "i8mm", "sve")


@dataclass(frozen=True)
class CpuInfo:
    """What `/proc/cpuinfo` says about this machine (only the features in FEATURES)."""

    machine: str  # platform.machine(): x86_64, aarch64, ...
    model: str
    features: frozenset[str]
    cores: int

    @property
    def isa_class(self) -> str:
        """x86-vnni | x86-avx512 | x86-avx2 | x86-sse | arm64-sve | arm64-i8mm | arm64-dot |
        arm64 | other: the families of int8 kernels ONNX Runtime's MLAS dispatches to."""
        f = self.features
        if self.machine in ("x86_64", "AMD64", "i686"):
            if f & {"avx512_vnni", "avx_vnni", "amx_int8"}:
                return "x86-vnni"
            if "avx512bw" in f:
                return "x86-avx512"
            if "avx2" in f:
                return "x86-avx2"
            return "x86-sse"
        if self.machine in ("aarch64", "arm64"):
            if "i8mm" in f:
                return "arm64-sve" if "sve" in f else "arm64-i8mm"
            return "arm64-dot" if "asimddp" in f else "arm64"
        return "other"

    def to_dict(self) -> dict[str, object]:
        return {"machine": self.machine, "model": self.model, "cores": self.cores,
                "features": sorted(self.features), "isa_class": self.isa_class}


def parse_cpuinfo(text: str, machine: str) -> CpuInfo:
    """CpuInfo from the text of /proc/cpuinfo (pure; the first processor's entry)."""
    model, flags = "", set[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "CPU part") and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return CpuInfo(machine=machine, model=model or platform.processor() or machine,
                   features=frozenset(flags & set(FEATURES)), cores=os.cpu_count() or 1)


#: numpy's runtime CPU feature names -> /proc/cpuinfo flag names
_NUMPY_FLAGS = {"SSE41": "sse4_1", "AVX2": "avx2", "FMA3": "fma", "AVX512F": "avx512f",
                "AVX512BW": "avx512bw", "AVX512VNNI": "avx512_vnni", "ASIMD": "asimd",
                "ASIMDDP": "asimddp", "SVE": "sve"}


def cpuid_features() -> tuple[frozenset[str], frozenset[str]] | None:
    """(features this process can execute, features numpy checks) by CPUID (numpy's runtime
    dispatch), None when numpy does not say."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as found
    except ImportError:  # pragma: no cover - numpy < 2 or another build
        return None
    known = frozenset(flag for name, flag in _NUMPY_FLAGS.items() if name in found)
    return frozenset(flag for name, flag in _NUMPY_FLAGS.items() if found.get(name)), known


def merge_features(cpuinfo: CpuInfo,
                   cpuid: tuple[frozenset[str], frozenset[str]] | None) -> CpuInfo:
    """`cpuinfo` with the features CPUID checks taken from CPUID; the others (AVX-VNNI, AMX,
    i8mm, ...) kept from /proc/cpuinfo only when it agrees with CPUID on the checked ones
    (under an emulator it describes the host, not the emulated CPU). Pure."""
    if cpuid is None:
        return cpuinfo
    have, known = cpuid
    agree = (cpuinfo.features & known) == have
    extras = (cpuinfo.features - known) if agree else frozenset()
    return CpuInfo(cpuinfo.machine, cpuinfo.model, have | extras, cpuinfo.cores)


@functools.cache
def host_cpu() -> CpuInfo:
    """This machine's CpuInfo (cached: the CPU does not change under a running process)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    return merge_features(parse_cpuinfo(text, platform.machine()), cpuid_features())
