"""aarch64 (Arm64 Linux) deployment bundle for the TVM target, built by cross-compilation.

Bundle layout (`out_dir/`):
    model.so          the compiled Relax VM executable + kernels, for aarch64-linux-gnu
                      (model_fp32.so for the fp32 baseline; both may share one bundle)
    lib/              libtvm_runtime.so, libtvm_ffi.so from the aarch64 PyPI wheels
    runner            C++ host (targets/tvm_host/runner.cc), rpath $ORIGIN/lib
    manifest.json     inputs/outputs (name, shape, dtype) and sha256 of every file
                      (manifest_fp32.json for model_fp32.so)
    README.md         how to run it on a board and under qemu

Toolchain (Debian/Ubuntu): `apt-get install -y g++-aarch64-linux-gnu qemu-user`. The aarch64
runtime libraries come from the aarch64 wheels of the same apache-tvm / apache-tvm-ffi
versions as the compiler (a mismatch breaks the module ABI); `fetch_runtime` downloads them
once into ~/.cache/quantflow/tvm-aarch64 (run `python -m quantflow.targets.tvm_edge
fetch-runtime` in setup; nothing downloads at compile or test time).

Header files for the host build come from the installed x86 tvm-ffi wheel: headers are
architecture-independent, only the linked libraries must be aarch64.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from quantflow.cache import cache_dir
from quantflow.errors import TargetUnavailableError

TVM_VERSION = "0.27.0.post1"
TVM_FFI_VERSION = "0.1.14.post0"
TRIPLE = "aarch64-linux-gnu"
CXX = f"{TRIPLE}-g++"
QEMU = "qemu-aarch64"
SYSROOT = Path(f"/usr/{TRIPLE}")
RUNTIME_CACHE = cache_dir("tvm-aarch64")
RUNTIME_LIBS = ("libtvm_runtime.so", "libtvm_ffi.so")
RUNNER_SRC = Path(__file__).resolve().parent / "tvm_host" / "runner.cc"
APT_PACKAGES = ("g++-aarch64-linux-gnu", "qemu-user")


def aarch64_target(num_cores: int | None = None, *, dot: bool = False) -> Any:
    """LLVM target for 64-bit Arm Linux with NEON (any Cortex-A53 or newer); `dot`: with the
    dot-product extension (sdot/udot: Cortex-A55/A75 and newer, Neoverse, Apple M)."""
    import tvm

    return tvm.target.Target({"kind": "llvm", "mtriple": TRIPLE,
                              "mattr": ["+neon", "+dotprod"] if dot else ["+neon"],
                              "num-cores": int(num_cores or 4)})


def runtime_dir(cache: Path | None = None) -> Path:
    return (cache or RUNTIME_CACHE) / f"tvm-{TVM_VERSION}_ffi-{TVM_FFI_VERSION}"


def missing_toolchain(cache: Path | None = None, *, need_qemu: bool = False) -> str | None:
    """Why a bundle cannot be built (or run under qemu) here, or None if it can."""
    tools = [CXX] + ([QEMU] if need_qemu else [])
    absent = [t for t in tools if shutil.which(t) is None]
    if absent:
        return (f"{', '.join(absent)} not found; fix: apt-get install -y "
                f"{' '.join(APT_PACKAGES)}")
    rt = runtime_dir(cache)
    if not all((rt / lib).exists() for lib in RUNTIME_LIBS):
        return (f"aarch64 TVM runtime not cached in {rt}; fix: python -m "
                "quantflow.targets.tvm_edge fetch-runtime (downloads two PyPI wheels)")
    return None


def fetch_runtime(cache: Path | None = None, wheel_dir: Path | None = None) -> Path:
    """Download the aarch64 wheels with pip (or take them from `wheel_dir`) and extract the
    two runtime libraries. The wheels are tagged manylinux_2_24/2_27 + 2_28, so both the
    2014 and the 2_28 platform tags are passed."""
    dest = runtime_dir(cache)
    if all((dest / lib).exists() for lib in RUNTIME_LIBS):
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if wheel_dir is None:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                 "--platform", "manylinux2014_aarch64", "--platform", "manylinux_2_28_aarch64",
                 "--python-version", "3.11", "-d", tmp,
                 f"apache-tvm=={TVM_VERSION}", f"apache-tvm-ffi=={TVM_FFI_VERSION}"],
                check=True)
        for wheel in Path(wheel_dir or tmp).glob("*aarch64*.whl"):
            with zipfile.ZipFile(wheel) as zf:
                for name in zf.namelist():
                    if Path(name).name in RUNTIME_LIBS and "/lib/" in f"/{name}":
                        (dest / Path(name).name).write_bytes(zf.read(name))
    missing = [lib for lib in RUNTIME_LIBS if not (dest / lib).exists()]
    if missing:
        raise TargetUnavailableError(f"tvm_edge: {missing} not found in the aarch64 wheels")
    return dest


def _include_dirs() -> list[str]:
    """tvm-ffi headers (with dlpack); the runner needs no tvm/runtime headers."""
    import tvm_ffi

    return [str(Path(tvm_ffi.__file__).parent / "include")]


def build_runner(bundle: Path, lib_dir: Path) -> Path:
    """Cross-compile the C++ host against the aarch64 runtime libraries in `lib_dir`."""
    out = bundle / "runner"
    cmd = [CXX, "-std=c++17", "-O2", str(RUNNER_SRC), "-o", str(out),
           *[f"-I{d}" for d in _include_dirs()], f"-L{lib_dir}",
           "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi", "-Wl,--as-needed",
           "-Wl,-rpath,$ORIGIN/lib", "-ldl", "-lpthread"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise TargetUnavailableError(f"tvm_edge: building the runner failed: {' '.join(cmd)}\n"
                                     f"{proc.stderr[-2000:]}")
    return out


README = """# quantflow TVM bundle (aarch64-linux-gnu)

Files: `{model}` (Relax VM executable), `lib/` (TVM runtime {tvm} / tvm-ffi {ffi}, aarch64),
`runner` (C++ host), `manifest.json` (inputs, outputs, sha256 of every file; the fp32
baseline, if present, is `model_fp32.so` with `manifest_fp32.json`).

Inputs and outputs are `.npy` files (C order, dtypes/shapes in manifest.json).

On an Arm64 Linux board (glibc >= 2.28), from this directory:

    ./runner ./{model} OUT_DIR input_0.npy [input_1.npy ...] [--repeat 50]

writes `OUT_DIR/output_<i>.npy`; `--repeat N` also prints the median latency of N runs.
Threads: `TVM_NUM_THREADS=4 ./runner ...`.

On an x86 host with qemu (`apt-get install -y qemu-user g++-aarch64-linux-gnu`):

    qemu-aarch64 -L /usr/aarch64-linux-gnu ./runner ./{model} OUT_DIR input_0.npy

(qemu timings are meaningless; use it to check outputs only.)
"""


def write_bundle(ex: Any, out_dir: Path, model_name: str = "model.so",
                 cache: Path | None = None) -> dict[str, str]:
    """Export `ex` (compiled for `aarch64_target`) with the runtime and host into `out_dir`."""
    import tvm  # noqa: F401
    from tvm.support import cc

    why = missing_toolchain(cache)
    if why:
        raise TargetUnavailableError(f"tvm target (device=aarch64): {why}")
    lib = out_dir / model_name
    ex.export_library(str(lib), fcompile=cc.cross_compiler(CXX))
    lib_dir = out_dir / "lib"
    lib_dir.mkdir(exist_ok=True)
    for name in RUNTIME_LIBS:
        shutil.copy2(runtime_dir(cache) / name, lib_dir / name)
    runner = build_runner(out_dir, lib_dir)
    readme = out_dir / "README.md"
    if not readme.exists() or model_name == "model.so":  # the quantized model is the headline
        readme.write_text(README.format(tvm=TVM_VERSION, ffi=TVM_FFI_VERSION, model=model_name))
    return {"model": str(lib), "runner": str(runner), "readme": str(readme),
            **{f"runtime:{n}": str(lib_dir / n) for n in RUNTIME_LIBS}}


def run_bundle(model: Path, manifest_path: Path, inputs: Sequence[np.ndarray], *,
               timeout: float = 300.0) -> list[np.ndarray]:
    """Run `model` with the bundle's runner under qemu-aarch64 (natively on aarch64)."""
    bundle = model.parent
    manifest = json.loads(manifest_path.read_text())
    specs = manifest["inputs"]
    if len(inputs) != len(specs):
        raise ValueError(f"bundle {bundle} takes {len(specs)} inputs, got {len(inputs)}")
    native = os.uname().machine == "aarch64"
    if not native and shutil.which(QEMU) is None:
        raise TargetUnavailableError(f"{QEMU} not found; fix: apt-get install -y qemu-user")
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, (x, spec) in enumerate(zip(inputs, specs)):
            arr = np.ascontiguousarray(x, dtype=spec["dtype"])
            if list(arr.shape) != spec["shape"]:
                raise ValueError(f"input {spec['name']}: shape {arr.shape} != {spec['shape']}")
            paths.append(str(Path(tmp) / f"input_{i}.npy"))
            np.save(paths[-1], arr)
        cmd = [str(bundle / "runner"), str(model), tmp, *paths]
        if not native:
            cmd = [QEMU, "-L", str(SYSROOT), *cmd]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"bundle runner failed ({proc.returncode}): {proc.stderr.strip()}")
        return [np.load(Path(tmp) / f"output_{i}.npy") for i in range(len(manifest["outputs"]))]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quantflow.targets.tvm_edge")
    sub = parser.add_subparsers(dest="cmd", required=True)
    fetch = sub.add_parser("fetch-runtime", help="download the aarch64 TVM runtime libraries")
    fetch.add_argument("--cache", type=Path, default=None)
    fetch.add_argument("--wheels", type=Path, default=None,
                       help="use already downloaded aarch64 wheels from this directory")
    sub.add_parser("check", help="say whether aarch64 bundles can be built and run here")
    args = parser.parse_args(argv)
    if args.cmd == "fetch-runtime":
        print(fetch_runtime(args.cache, args.wheels))
        return 0
    why = missing_toolchain(need_qemu=True)
    print(why or "ok: cross compiler, qemu and aarch64 runtime are available")
    return 1 if why else 0


if __name__ == "__main__":
    sys.exit(main())
