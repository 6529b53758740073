"""quantflow.hostcpu: ISA classes from /proc/cpuinfo and CPUID, including under an emulator."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from quantflow.hostcpu import CpuInfo, host_cpu, merge_features, parse_cpuinfo

EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7763 64-Core Processor
flags\t\t: fpu sse4_1 sse4_2 avx avx2 fma bmi2
"""
GRAVITON2 = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU part\t: 0xd0c
"""


def test_classes_from_cpuinfo() -> None:
    assert parse_cpuinfo(EPYC, "x86_64").isa_class == "x86-avx2"
    vnni = parse_cpuinfo(EPYC.replace("bmi2", "avx512f avx512bw avx512_vnni"), "x86_64")
    assert vnni.isa_class == "x86-vnni"
    skx = parse_cpuinfo(EPYC.replace("bmi2", "avx512f avx512bw"), "x86_64")
    assert skx.isa_class == "x86-avx512"
    adl = parse_cpuinfo(EPYC.replace("bmi2", "avx_vnni"), "x86_64")  # AVX-VNNI without AVX-512
    assert adl.isa_class == "x86-vnni"
    assert parse_cpuinfo(GRAVITON2, "aarch64").isa_class == "arm64-dot"
    assert parse_cpuinfo(GRAVITON2.replace(" asimddp", ""), "aarch64").isa_class == "arm64"
    g3 = parse_cpuinfo(GRAVITON2.replace("asimddp", "asimddp i8mm sve"), "aarch64")
    assert g3.isa_class == "arm64-sve"
    assert parse_cpuinfo(EPYC, "x86_64").model.startswith("AMD EPYC")


def test_cpuid_overrides_an_emulated_hosts_cpuinfo() -> None:
    """qemu-user shows the host's /proc/cpuinfo; CPUID (numpy) is the emulated CPU's."""
    host = parse_cpuinfo(EPYC.replace("bmi2", "avx512f avx512bw avx512_vnni avx_vnni"),
                         "x86_64")
    haswell = (frozenset({"sse4_1", "avx2", "fma"}),
               frozenset({"sse4_1", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"}))
    merged = merge_features(host, haswell)
    assert merged.isa_class == "x86-avx2" and "avx_vnni" not in merged.features
    # when both agree, flags numpy does not check (AVX-VNNI, AMX) come from /proc/cpuinfo
    same = (host.features - {"avx_vnni"}, haswell[1])
    assert "avx_vnni" in merge_features(host, same).features
    assert merge_features(host, None) == host
    assert isinstance(host_cpu(), CpuInfo) and host_cpu().cores >= 1


@pytest.mark.skipif(shutil.which("qemu-x86_64") is None, reason="qemu-user not installed")
def test_emulated_haswell_is_seen_as_avx2() -> None:
    code = "from quantflow.hostcpu import host_cpu; print(host_cpu().isa_class)"
    out = subprocess.run(["qemu-x86_64", "-cpu", "Haswell", sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    assert out.strip().splitlines()[-1] == "x86-avx2"
