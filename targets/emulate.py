"""Run an ONNX artifact on another instruction set than the host's, by user-mode emulation.

ONNX Runtime picks its integer kernels by the CPU it finds at run time (MLAS dispatch), so an
artifact checked on the build host can still be wrong on the CPU it ships to (targets/ort.py,
`ORT_ISAS`). QEMU's user-mode emulators execute the real onnxruntime binaries with another
CPU model's feature bits, and MLAS then takes that CPU's code paths:

- "x86-avx2": `qemu-x86_64 -cpu Haswell` (AVX2 + FMA, no AVX-512, no VNNI) runs the
  project's own venv Python; MLAS selects its AVX2 kernels (`vpmaddubsw` U8S8).
- "arm64": `qemu-aarch64` runs an aarch64 CPython with numpy and the aarch64 onnxruntime
  wheel, from a sysroot that tools/setup.sh assembles (see `ARM64_ROOT`).

Only `targets/ort_runner.py` runs under the emulator (numpy + onnxruntime, no torch), so a
run costs seconds of start-up, not minutes. Timings under emulation mean nothing; outputs are
bit-exact with the emulated CPU's kernels.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantflow.errors import TargetRuntimeError, TargetUnavailableError

RUNNER = Path(__file__).with_name("ort_runner.py")
#: ISAs this module can emulate (see the module docstring)
EMULATED_ISAS = ("x86-avx2", "arm64")


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "quantflow"


#: aarch64 sysroot: Debian arm64 CPython + numpy + onnxruntime wheels (tools/setup.sh)
ARM64_ROOT = _cache_root() / "arm64-python"


@dataclass(frozen=True)
class Emulator:
    """How to start a Python that runs `ort_runner.py` on `isa`."""

    isa: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()


def emulator(isa: str) -> Emulator:
    """The emulator for `isa`; TargetUnavailableError saying what to install when missing."""
    if isa == "x86-avx2":
        qemu = shutil.which("qemu-x86_64")
        if qemu is None:
            raise TargetUnavailableError(
                "emulating x86-avx2 needs qemu-x86_64: apt-get install qemu-user")
        return Emulator(isa, (qemu, "-cpu", "Haswell", sys.executable))
    if isa == "arm64":
        return _arm64_emulator()
    raise ValueError(f"no emulator for {isa!r}; choose one of {EMULATED_ISAS}")


def _arm64_emulator() -> Emulator:
    qemu = shutil.which("qemu-aarch64")
    python = ARM64_ROOT / "usr" / "bin" / "python3"
    if qemu is None or not python.exists():
        raise TargetUnavailableError(
            f"emulating arm64 needs qemu-aarch64 and the aarch64 Python at {ARM64_ROOT}: "
            "run tools/setup.sh (it installs qemu-user and assembles that sysroot)")
    site = ARM64_ROOT / "site-packages"
    return Emulator("arm64", (qemu, "-L", str(ARM64_ROOT), str(python)),
                    (("PYTHONPATH", str(site)), ("PYTHONNOUSERSITE", "1")))


def run_onnx(model: str | Path, inputs: Sequence[Mapping[str, np.ndarray]], isa: str, *,
             outputs: Sequence[str] | None = None, timeout: float = 600.0
             ) -> list[dict[str, np.ndarray]]:
    """Run `model` once per feed in `inputs` under the emulator of `isa`; outputs per feed.

    All feeds go to one emulator process (start-up dominates), stacked on a new leading axis.
    """
    emu = emulator(isa)
    if not inputs:
        return []
    names = sorted(inputs[0])
    with tempfile.TemporaryDirectory(prefix="quantflow-emu-") as tmp:
        src, dst = Path(tmp) / "inputs.npz", Path(tmp) / "outputs.npz"
        np.savez(src, __runs__=np.asarray(len(inputs)),
                 **{n: np.stack([np.asarray(f[n]) for f in inputs]) for n in names})
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


def runner_info(isa: str, timeout: float = 300.0) -> dict[str, str]:
    """onnxruntime version and machine the emulated Python reports (a smoke test)."""
    emu = emulator(isa)
    code = ("import json, platform, numpy, onnxruntime; print(json.dumps({'onnxruntime': "
            "onnxruntime.__version__, 'numpy': numpy.__version__, 'machine': "
            "platform.machine()}))")
    proc = subprocess.run([*emu.argv, "-c", code], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **dict(emu.env)}, check=False)
    if proc.returncode != 0:
        raise TargetRuntimeError(f"{isa} emulator cannot import onnxruntime: "
                                 f"{proc.stderr[-1000:]}")
    info: dict[str, str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return info
