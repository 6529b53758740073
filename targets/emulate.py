"""Run an ONNX artifact on another instruction set than the host's, by user-mode emulation.

ONNX Runtime picks its integer kernels by the CPU it finds at run time (MLAS dispatch), so an
artifact checked on the build host can still be wrong on the CPU it ships to
(targets/ort_isa.py). QEMU's user-mode emulators execute the real onnxruntime binaries with another
CPU model's feature bits, and MLAS then takes that CPU's code paths:

- "x86-avx2": `qemu-x86_64 -cpu Haswell` (AVX2 + FMA, no AVX-512, no VNNI) runs the
  project's own venv Python; MLAS selects its AVX2 kernels (`vpmaddubsw` U8S8).
- "arm64", "arm64-dot", "arm64-i8mm", "arm64-sve": `qemu-aarch64` with the CPU models in
  `ARM64_CPUS` runs an aarch64 CPython with numpy and the aarch64 onnxruntime wheel, from a
  sysroot that tools/setup_arm64_python.sh assembles (see `ARM64_ROOT`). The four models land
  on MLAS's four arm64 integer kernel families (plain NEON, dot product, NEON i8mm, SVE i8mm).

Only `targets/ort_runner.py` runs under the emulator (numpy + onnxruntime, no torch), so a
run costs seconds of start-up, not minutes. Timings under emulation mean nothing; outputs are
bit-exact with the emulated CPU's kernels.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantflow.cache import cache_dir
from quantflow.devices import EMULATED_ISAS
from quantflow.errors import TargetRuntimeError, TargetUnavailableError

RUNNER = Path(__file__).with_name("ort_runner.py")

#: qemu-aarch64 CPU model per emulated arm64 ISA. MLAS chooses its integer GEMM / conv kernels
#: from the hwcaps onnxruntime finds, and each model below lands on another kernel family (seen
#: with `qemu-aarch64 -d in_asm` on a QLinearConv, onnxruntime 1.32): `-cpu max` alone does not
#: test the dot-product kernels, since MLAS prefers i8mm and SVE to them wherever they exist.
#: SME is off so that an ISA keeps its kernel family across QEMU versions: newer QEMUs add SME2
#: to `max`, and MLAS has SME2 (KleidiAI) kernels.
ARM64_CPUS: dict[str, str] = {
    # no dot product: NEON widening multiply-accumulate (umull/uadalp); Cortex-A72 (Pi 4)
    "arm64": "cortex-a72",
    # ASIMD dot product (udot/sdot), no i8mm: Neoverse N1 (Graviton2), Cortex-A76 (Pi 5)
    "arm64-dot": "neoverse-n1",
    # i8mm without SVE: NEON ummla/smmla; Apple M2 and later, Qualcomm Oryon
    "arm64-i8mm": "max,sve=off,sme=off",
    # SVE + i8mm: SVE ummla (MLAS prefers it to NEON ummla); Neoverse V2/N2 (Graviton4), whose
    # 128-bit vectors replace QEMU's default 512
    "arm64-sve": "max,sme=off,sve-default-vector-length=16",
}
#: ISAs this module can emulate (see the module docstring; named in quantflow.devices)
assert EMULATED_ISAS == ("x86-avx2", *ARM64_CPUS), "keep quantflow.devices in step"


#: aarch64 sysroot: Debian arm64 CPython + numpy + onnxruntime wheels
#: (tools/setup_arm64_python.sh, which tools/setup.sh runs)
ARM64_ROOT = cache_dir("arm64-python")
ARM64_PYTHON = ARM64_ROOT / "usr" / "bin" / "python3"


@dataclass(frozen=True)
class Emulator:
    """How to start a Python that runs `ort_runner.py` on `isa`."""

    isa: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    cpu: str = ""  # the QEMU CPU model (`-cpu`)


def emulator(isa: str, cpu: str | None = None) -> Emulator:
    """The emulator for `isa`; TargetUnavailableError saying what to install when missing.

    `cpu` replaces the QEMU CPU model that `isa` stands for (an experiment: the results then
    belong to that model, e.g. "cortex-a53", not to `isa`).
    """
    if isa == "x86-avx2":
        qemu = shutil.which("qemu-x86_64")
        if qemu is None:
            raise TargetUnavailableError(
                "emulating x86-avx2 needs qemu-x86_64: apt-get install qemu-user")
        cpu = cpu or "Haswell"
        return Emulator(isa, (qemu, "-cpu", cpu, sys.executable), cpu=cpu)
    if isa in ARM64_CPUS:
        return _arm64_emulator(isa, cpu or ARM64_CPUS[isa])
    raise ValueError(f"no emulator for {isa!r}; choose one of {EMULATED_ISAS}")


def _arm64_emulator(isa: str, cpu: str) -> Emulator:
    qemu = shutil.which("qemu-aarch64")
    if qemu is None or not ARM64_PYTHON.exists():
        raise TargetUnavailableError(
            f"emulating {isa} needs qemu-aarch64 and the aarch64 Python at {ARM64_ROOT}: "
            "run tools/setup.sh (it installs qemu-user and runs tools/setup_arm64_python.sh)")
    view = _cpu_view(qemu, cpu)
    # PYTHONHOME pins the interpreter to the sysroot's stdlib whatever the caller's environment
    # holds; the venv's site-packages would offer x86 extension modules
    env = (("PYTHONHOME", str(ARM64_ROOT / "usr")),
           ("PYTHONPATH", str(ARM64_ROOT / "site-packages")), ("PYTHONNOUSERSITE", "1"))
    return Emulator(isa, (qemu, "-cpu", cpu, "-L", str(view), str(ARM64_PYTHON)), env, cpu)


#: Linux's names for the AT_HWCAP and AT_HWCAP2 bits, bit 0 first, as /proc/cpuinfo prints them
#: (arch/arm64/include/uapi/asm/hwcap.h; later bits stay unnamed, QEMU 7.2 sets none of them)
_HWCAP = (
    "fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32", "atomics", "fphp",
    "asimdhp", "cpuid", "asimdrdm", "jscvt", "fcma", "lrcpc", "dcpop", "sha3", "sm3", "sm4",
    "asimddp", "sha512", "sve", "asimdfhm", "dit", "uscat", "ilrcpc", "flagm", "ssbs", "sb",
    "paca", "pacg",
)
_HWCAP2 = (
    "dcpodp", "sve2", "sveaes", "svepmull", "svebitperm", "svesha3", "svesm4", "flagm2", "frint",
    "svei8mm", "svef32mm", "svef64mm", "svebf16", "i8mm", "bf16", "dgh", "rng", "bti", "mte",
    "ecv", "afp", "rpres", "mte3", "sme", "smei16i64", "smef64f64", "smei8i32", "smef16f32",
    "smeb16f32", "smef32f32", "smefa64", "wfxt", "ebf16", "sveebf16",
)

#: Runs in the emulated Python: the hwcaps QEMU gives the CPU model, and its MIDR_EL1 (EL0 may
#: read ID registers when HWCAP_CPUID is set, as QEMU sets it), via two instructions in an
#: executable page: `mrs x0, midr_el1; ret`
_CPU_PROBE = """
import ctypes, json, mmap, struct
aux = dict(struct.iter_unpack("<QQ", open("/proc/self/auxv", "rb").read()))
page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
page.write(struct.pack("<II", 0xD5380000, 0xD65F03C0))
midr = ctypes.CFUNCTYPE(ctypes.c_uint64)(ctypes.addressof(ctypes.c_char.from_buffer(page)))()
print(json.dumps({"hwcap": aux.get(16, 0), "hwcap2": aux.get(26, 0), "midr": midr}))
"""


def _present_cpus() -> list[int]:
    """The host's present CPU numbers (sysfs list syntax "0-3,8"), which the guest also sees."""
    try:
        spec = Path("/sys/devices/system/cpu/present").read_text().strip()
    except OSError:
        return list(range(os.cpu_count() or 1))
    cpus: list[int] = []
    for part in filter(None, spec.split(",")):
        lo, _, hi = part.partition("-")
        cpus += range(int(lo), int(hi or lo) + 1)
    return cpus


def _cpu_view(qemu: str, cpu: str) -> Path:
    """A `qemu-aarch64 -L` prefix whose /proc/cpuinfo is the one an aarch64 kernel prints for
    `cpu`; everything else in it links to ARM64_ROOT.

    QEMU 7.2 passes the host's x86 /proc/cpuinfo through, and the pytorch/cpuinfo library in
    onnxruntime dereferences NULL when it finds no aarch64 processor entries there: `import
    onnxruntime` segfaults. With `-L`, QEMU opens <prefix>/proc/cpuinfo instead where that
    exists. cpuinfo takes the ISA features from the hwcaps either way (QEMU sets them per model)
    and the MIDR from the file (some MIDRs force dot-product support on), so the file carries the
    model's own MIDR and features, one entry per present host CPU as the kernel would. Written
    once per model and host CPU count; concurrent writers replace it atomically with equal text.
    """
    view = ARM64_ROOT / "cpus" / re.sub(r"[^A-Za-z0-9_.-]", "_", cpu)
    cpuinfo = view / "proc" / "cpuinfo"
    cpus = _present_cpus()
    try:
        text = cpuinfo.read_text()
        listed = [int(n) for n in re.findall(r"^processor\t: (\d+)$", text, re.MULTILINE)]
    except OSError:
        listed = []
    if listed == cpus:
        return view
    cpuinfo.parent.mkdir(parents=True, exist_ok=True)
    for entry in ARM64_ROOT.iterdir():
        if entry.name in ("cpus", "proc") or entry.name.startswith("."):
            continue
        try:
            (view / entry.name).symlink_to(Path("..", "..", entry.name))
        except FileExistsError:
            pass
    proc = subprocess.run([qemu, "-cpu", cpu, "-L", str(ARM64_ROOT), str(ARM64_PYTHON), "-I",
                           "-c", _CPU_PROBE], capture_output=True, text=True, timeout=120,
                          check=False)
    if proc.returncode != 0:
        raise TargetUnavailableError(f"qemu-aarch64 -cpu {cpu} cannot start the aarch64 Python "
                                     f"(exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    regs = json.loads(proc.stdout.strip().splitlines()[-1])
    hwcap, hwcap2, midr = int(regs["hwcap"]), int(regs["hwcap2"]), int(regs["midr"])
    features = [n for i, n in enumerate(_HWCAP) if hwcap >> i & 1]
    features += [n for i, n in enumerate(_HWCAP2) if hwcap2 >> i & 1]
    # BogoMIPS is twice the generic timer's MHz: QEMU's runs at 62.5 MHz
    entry_text = ("processor\t: {}\nBogoMIPS\t: 125.00\nFeatures\t: " + " ".join(features)
                  + f"\nCPU implementer\t: 0x{midr >> 24 & 0xff:02x}\nCPU architecture: 8\n"
                  f"CPU variant\t: 0x{midr >> 20 & 0xf:x}\nCPU part\t: 0x{midr >> 4 & 0xfff:03x}\n"
                  f"CPU revision\t: {midr & 0xf}\n\n")
    tmp = cpuinfo.with_name(f".cpuinfo.{os.getpid()}")
    tmp.write_text("".join(entry_text.format(n) for n in cpus))
    os.replace(tmp, cpuinfo)
    return view


def run_onnx(model: str | Path, inputs: Sequence[Mapping[str, np.ndarray]], isa: str, *,
             outputs: Sequence[str] | None = None, timeout: float = 600.0,
             cpu: str | None = None) -> list[dict[str, np.ndarray]]:
    """Run `model` once per feed in `inputs` under the emulator of `isa`; outputs per feed.

    All feeds go to one emulator process (start-up dominates), stacked on a new leading axis.
    `cpu` overrides the QEMU CPU model (see `emulator`).
    """
    emu = emulator(isa, cpu)
    if not inputs:
        return []
    names = sorted(inputs[0])
    with tempfile.TemporaryDirectory(prefix="quantflow-emu-") as tmp:
        src, dst = Path(tmp) / "inputs.npz", Path(tmp) / "outputs.npz"
        # typed Any: numpy's stubs reject a **dict[str, ndarray] that could name `allow_pickle`
        arrays: dict[str, Any] = {n: np.stack([np.asarray(f[n]) for f in inputs]) for n in names}
        np.savez(src, __runs__=np.asarray(len(inputs)), **arrays)
        argv = [*emu.argv, str(RUNNER), str(model), str(src), str(dst)]
        if outputs:
            argv += ["--outputs", ",".join(outputs)]
        env = {**os.environ, **dict(emu.env)}
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                  env=env, check=False)
        except subprocess.TimeoutExpired as exc:
            raise TargetRuntimeError(f"{isa} emulator: running {model} took over {timeout:.0f} s"
                                     ) from exc
        if proc.returncode != 0:
            tail = "\n".join(line for line in proc.stderr.splitlines()
                             if "TCG doesn't support" not in line)[-2000:]
            raise TargetRuntimeError(f"{isa} emulator failed on {model} "
                                     f"(exit {proc.returncode}):\n{tail}")
        with np.load(dst) as data:
            stacked = {k: data[k] for k in data.files}
    return [{k: v[i] for k, v in stacked.items()} for i in range(len(inputs))]


def runner_info(isa: str, timeout: float = 300.0, cpu: str | None = None) -> dict[str, str]:
    """onnxruntime and numpy versions, machine and QEMU CPU model of the emulated Python (a
    smoke test)."""
    emu = emulator(isa, cpu)
    code = ("import json, platform, numpy, onnxruntime; print(json.dumps({'onnxruntime': "
            "onnxruntime.__version__, 'numpy': numpy.__version__, 'machine': "
            "platform.machine()}))")
    proc = subprocess.run([*emu.argv, "-c", code], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **dict(emu.env)}, check=False)
    if proc.returncode != 0:
        raise TargetRuntimeError(f"{isa} emulator cannot import onnxruntime: "
                                 f"{proc.stderr[-1000:]}")
    info: dict[str, str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**info, "cpu": emu.cpu}
