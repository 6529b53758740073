"""Apache TVM target: PT2E graph -> Relax (integer convs/linears) -> tuned native library.

Pipeline (`TVMTarget.lower`):
1. `tvm_frontend.to_relax`: torch.export the graph and import it with
   `relax.frontend.torch.from_exported_program`; quantized convs and linears become
   uint8/int8 x int8 -> int32 kernels with zero-point correction, and the requantize is folded
   into the next quantize by operator fusion (algebra in tvm_int_math's docstring).
   Why not the QDQ-ONNX route: `relax.frontend.onnx` imports QDQ as fp32 convs between
   quantize/dequantize (simulation only), and the int rewrite would then have to rediscover
   which DQ feeds which conv; the fx graph says it directly.
   With `dot` (default: the ISA's int8 dot-product path, `dot_path`, tvm_dot), uint8 convs
   with in channels % 4 == 0 and out channels % lanes == 0 become an NHWC conv over a weight
   packed in lanes x 4 blocks (`tvm_int_math.vnni_conv2d_nhwc`), the form that tensorizes into
   vpdpbusd (VNNI), vpmaddubsw (AVX2), sdot or NEON (Arm); TVM's NCHW int8 conv cannot.
2. `tvm_tune.prepare` (legalize, fold constants, fuse); with `tune_trials`/`tune_seconds`,
   MetaSchedule tuning into the target's tuning cache (`tvm_tune.tune`); then every kernel
   gets a schedule from the records of its workload, tuned here or shipped for the ISA
   (`tvm_records.apply`: keyed by workload, so shared by models and re-calibrations).
3. `tvm.compile` for the host CPU (`llvm -mcpu=<this CPU>`, num-cores) or, with
   `device="aarch64"` (or "aarch64-dot": with the dot-product extension), a cross-compiled
   bundle (`tvm_edge`), and `export_library`.
4. `out_dir/manifest.json` (`tvm_artifact`): inputs/outputs (name, shape, dtype), sha256 of
   every file, target, integer/float layer lists, kernel -> fx layer names (`kernel_layers`,
   read by per-layer profiles), tuning record and untuned/tuned latencies. Like the ort target,
   fp32 and quantized artifacts share `out_dir` (the pipeline lowers both there): fp32 writes
   `model_fp32.so` + `manifest_fp32.json`, int8/mixed write `model.so` + `manifest.json`.

Numerics: integer layers reproduce the torch simulation up to requantize rounding, at most
1 output quantization step (tests assert it); float graphs match fp32 torch to ~1e-5 relative.

Threads: TVM's pool reads TVM_NUM_THREADS when it starts; `profile(threads=N)` reconfigures it
with the runtime's `config_threadpool`.

Profiling a library later (`quantflow profile model.so`): `load_artifact` reads it back with
its manifest (sha256 checked; `tvm_artifact`); `profile(per_layer=True)` times every kernel call
through the VM instrument and names it after its fx layer (`conv2d_3`, `conv2d_3 (pad)`) where
the manifest's `kernel_layers` knows it, by TVM's fused-kernel name otherwise (`tvm_profile`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import fx

from quantflow import devices
from quantflow.errors import TargetUnavailableError
from quantflow.targets import ARTIFACT_SUFFIXES
from quantflow.targets.base import Artifact, Latency, TargetCaps, device_description, time_runs
from quantflow.targets.tvm_artifact import io_specs, load_artifact, write_manifest
from quantflow.targets.tvm_cpu import _import_tvm, host_target, set_threads
from quantflow.targets.tvm_profile import by_layer, per_kernel_ms

PRECISIONS = ("int8", "mixed", "fp32")
#: this machine or a cross-compiled aarch64 bundle (named once, torch-free, for the CLI)
DEVICES = devices.DEVICES["tvm"]


@dataclass
class TVMTarget:
    """See the module docstring. `tune_trials` counts MetaSchedule trials per tuning task."""

    device: str = "host"
    tune_trials: int = 0
    cache_dir: Path | None = None
    num_cores: int | None = None
    #: LLVM CPU name for device="host" (None: this CPU); an older x86 CPU, e.g. haswell
    #: (AVX2), builds and tunes code for that class on this machine (tools/build_tvm_records.py)
    mcpu: str | None = None
    threads: int | None = None  # TVM thread pool size for run/profile (None: TVM's default)
    #: tuning time budget (`--tune-time`), alone or with tune_trials (first to end stops)
    tune_seconds: float | None = None
    #: use the tuning records shipped for the target's ISA class (tvm_records)
    shipped_records: bool = True
    #: integer convs in the packed dot-product layout (`dot_path`); None: where the target's
    #: ISA class has a dot-product path (tvm_dot.PATHS); False: never
    dot: bool | None = None
    #: a board behind a TVM RPC tracker (`tvm_rpc`): HOST:PORT and the server's key; profile
    #: and tuning measurements then run there
    rpc_tracker: str | None = None
    rpc_key: str | None = None
    name: str = "tvm"
    _vms: dict[str, Any] = field(default_factory=dict, repr=False)
    _board: Any = field(default=None, repr=False)  # tvm_rpc.Board, opened on first use
    #: integer convs/linears only for 8-bit activations (tvm_match `_INT_ACT`): a W8A16
    #: layer computes in float between its Q/DQ nodes
    caps: ClassVar[TargetCaps] = TargetCaps(
        per_layer_profile=True, threads=True, devices=DEVICES,
        integer_options=frozenset({"W8A8", "W4A8"}), layer_taps=True,
        artifact_suffixes=ARTIFACT_SUFFIXES["tvm"])

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"tvm target: device={self.device!r}; choose one of {DEVICES}")
        if self.tune_trials < 0:
            raise ValueError("tvm target: tune_trials must be >= 0")
        if self.tune_seconds is not None and not 0 < self.tune_seconds < float("inf"):
            raise ValueError("tvm target: tune_seconds must be a positive number of seconds")
        if (self.rpc_tracker is None) != (self.rpc_key is None):
            raise ValueError("tvm target: rpc_tracker and rpc_key go together (--rpc-tracker "
                             "HOST:PORT --rpc-key KEY)")
        if self.device.startswith("aarch64") and self.tuning and self.rpc is None:
            # MetaSchedule measures candidates by running them: that needs the board
            raise ValueError("tvm target: tune_trials > 0 with device='aarch64' measures on the "
                             "board (fix: --rpc-tracker HOST:PORT --rpc-key KEY, or "
                             "tune_trials=0)")

    @property
    def rpc(self) -> Any:
        """The `tvm_rpc.RPCDevice` measurements run on, or None (this machine)."""
        if self.rpc_tracker is None or self.rpc_key is None:
            return None
        from quantflow.targets.tvm_rpc import RPCDevice

        return RPCDevice(self.rpc_tracker, self.rpc_key)

    def board(self) -> Any:
        """The `tvm_rpc.Board` (one held session) for run/profile through RPC."""
        if self._board is None:
            from quantflow.targets.tvm_rpc import Board

            self._board = Board(self.rpc)
        return self._board

    # ------------------------------------------------------------------ lower
    def target(self) -> Any:
        if self.device.startswith("aarch64"):
            from quantflow.targets.tvm_edge import aarch64_target

            return aarch64_target(self.num_cores, dot=self.device == "aarch64-dot")
        if self.rpc is not None:  # the board's CPU, as LLVM there names it (None: unknown)
            board_target = self.board().llvm_target(self.num_cores)
            if board_target is not None:
                return board_target
        return host_target(self.num_cores, self.mcpu)

    @property
    def tuning(self) -> bool:
        return self.tune_trials > 0 or self.tune_seconds is not None

    def dot_path(self, target: Any) -> Any:
        """The int8 dot-product path for `target` (tvm_dot.DotPath) or None: one layout
        whether tuned, untuned or replaying records, so records tuned in one mode apply in
        the others."""
        from quantflow.targets import tvm_dot, tvm_records

        if self.dot is False:
            return None
        return tvm_dot.path_for(tvm_records.isa_class(target))

    def record_sources(self, work_dir: Path, target: Any) -> list[tuple[str, Any]]:
        from quantflow.targets.tvm_records import sources

        return sources(work_dir, target, use_shipped=self.shipped_records)

    def lower(self, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor],
              out_dir: Path, *, precision: str = "int8") -> Artifact:
        if precision not in PRECISIONS:
            raise ValueError(f"tvm target: precision={precision!r}; choose one of {PRECISIONS}")
        tvm = _import_tvm()
        from quantflow.targets import tvm_kernels, tvm_records, tvm_tune
        from quantflow.targets.tvm_frontend import to_relax

        if self.device.startswith("aarch64"):
            from quantflow.targets.tvm_edge import missing_toolchain

            why = missing_toolchain()
            if why:  # fail before the (slow) import and compile
                raise TargetUnavailableError(f"tvm target (device=aarch64): {why}")
        if self.rpc is not None:  # an unreachable board fails now, not after the compile
            from quantflow.targets.tvm_rpc import check

            check(self.rpc)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        target = self.target()
        dot = self.dot_path(target)
        mod, stats = to_relax(gm, example_inputs, dot=dot)
        fused = tvm_tune.fuse(mod, target)
        kernel_layers = tvm_kernels.kernel_layers(fused, stats.weights)
        mod = tvm_tune.fuse_tir(fused, target)
        inputs_spec, outputs_spec = io_specs(gm, example_inputs)
        meta: dict[str, Any] = {
            "device": self.device, "target": json.dumps(target.export(), default=str),
            "target_string": str(target),
            "int_layers": stats.int_layers, "float_layers": stats.float_layers,
            "tune_trials": self.tune_trials, "kernel_layers": kernel_layers,
            "dot_layers": stats.dot_layers, "tune_seconds": self.tune_seconds,
            "pair_bound_layers": stats.pair_bound_layers,
            "isa": tvm_records.isa_class(target),
            "int8_path": tvm_records.int8_path(target, len(stats.dot_layers),
                                               len(stats.pair_bound_layers)),
            # the debugger's tapped twin (tvm_taps.py) runs here, not on a board
            "layer_taps": self.device == "host",
        }
        np_inputs = [t.detach().numpy() for t in example_inputs]
        if self.rpc is not None:
            meta["rpc"] = {"tracker": self.rpc_tracker, "key": self.rpc_key}
        work_dir = tvm_tune.cache_dir_for(target, self.cache_dir, self.rpc)
        if self.tuning:  # on this host, or on the board through RPC
            before, _counts = tvm_records.apply(mod, target, self.record_sources(work_dir, target),
                                                dot)
            ex_before = tvm.compile(before, target)
            meta["untuned_latency"] = self._quick_latency(ex_before, np_inputs, out_dir)
            meta["tuning"] = tvm_tune.tune(mod, target, work_dir, rpc=self.rpc, path=dot,
                                           trials_per_task=self.tune_trials,
                                           seconds=self.tune_seconds,
                                           shipped=self.shipped_records)
        mod, meta["records"] = tvm_records.apply(mod, target, self.record_sources(work_dir, target),
                                                 dot)
        t0 = time.perf_counter()
        ex = tvm.compile(mod, target)
        if self.tuning and self.rpc is None and not self.device.startswith("aarch64"):
            from quantflow.targets.tvm_profile import keep_faster

            mod, kept = keep_faster(before, mod, ex_before, ex, np_inputs)
            meta["tuning"]["kept_untuned"] = kept
            if kept:
                ex = tvm.compile(mod, target)
        meta["compile_s"] = time.perf_counter() - t0
        if self.tuning:
            meta["tuned_latency"] = self._quick_latency(ex, np_inputs, out_dir)
        files: dict[str, str] = {}
        suffix = "_fp32" if precision == "fp32" else ""
        if self.device.startswith("aarch64"):
            from quantflow.targets.tvm_edge import write_bundle

            files.update(write_bundle(ex, out_dir, f"model{suffix}.so"))
        else:
            lib = out_dir / f"model{suffix}.so"
            self._export(ex, lib)
            files["model"] = str(lib)
        manifest_path = out_dir / f"manifest{suffix}.json"
        write_manifest(manifest_path, target=self.name, precision=precision,
                       inputs=inputs_spec, outputs=outputs_spec, files=files, meta=meta)
        files["manifest"] = str(manifest_path)
        return Artifact(target=self.name, precision=precision, files=files,
                        input_names=tuple(s["name"] for s in inputs_spec),
                        output_names=tuple(s["name"] for s in outputs_spec), meta=meta)

    def layer_codes(self, artifact: Artifact, qgm: fx.GraphModule, names: Sequence[str],
                    feeds: Sequence[Sequence[np.ndarray]], isa: str = "host"
                    ) -> list[dict[str, np.ndarray]]:
        """caps.layer_taps: codes from a tapped twin of the artifact (targets/tvm_taps.py)."""
        if isa != "host":
            raise ValueError("tvm target: layer taps run on this CPU only (isa='host')")
        from quantflow.targets.tvm_taps import layer_codes

        return layer_codes(self, artifact, qgm, names, feeds)

    def _quick_latency(self, ex: Any, inputs: list[np.ndarray], out_dir: Path
                       ) -> dict[str, float]:
        """Median of a few runs of an in-memory executable (for untuned vs tuned); on the
        board when measuring through RPC (`tvm_rpc.quick_latency`)."""
        if self.rpc is not None:
            from quantflow.targets.tvm_rpc import quick_latency

            return quick_latency(self.board(), lambda lib: self._export(ex, lib), inputs,
                                 out_dir, self.threads)
        tvm = _import_tvm()
        from tvm import relax

        vm = relax.VirtualMachine(ex, tvm.cpu())
        args = [tvm.runtime.tensor(x) for x in inputs]
        lat = time_runs(lambda: vm["main"](*args), warmup=2, runs=10, threads=self._threads(),
                        batch=int(inputs[0].shape[0]) if inputs and inputs[0].ndim else 1)
        return {"median_ms": lat.median_ms, "p90_ms": lat.p90_ms}

    def _export(self, ex: Any, lib: Path) -> None:
        """A shared library for the device: cross-compiled for aarch64 (as in the bundle)."""
        if self.device.startswith("aarch64"):
            from tvm.support import cc

            from quantflow.targets.tvm_edge import CXX

            ex.export_library(str(lib), fcompile=cc.cross_compiler(CXX))
        else:
            ex.export_library(str(lib))

    # ------------------------------------------------------------------ run
    def _vm(self, artifact: Artifact) -> Any:
        tvm = _import_tvm()
        from tvm import relax

        lib = Path(artifact.files["model"])
        key = f"{lib.resolve()}:{lib.stat().st_mtime_ns}"
        if key not in self._vms:
            if self.threads:
                set_threads(self.threads)
            self._vms[key] = relax.VirtualMachine(tvm.runtime.load_module(str(lib)), tvm.cpu())
        return self._vms[key]

    def run(self, artifact: Artifact, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        if self.rpc is not None:  # on the board: its CPU may not run here (and qemu is slow)
            return self.board().run(Path(artifact.files["model"]), inputs)
        if str(artifact.meta.get("device")).startswith("aarch64"):
            from quantflow.targets.tvm_edge import run_bundle

            return run_bundle(Path(artifact.files["model"]), Path(artifact.files["manifest"]),
                              inputs)
        tvm = _import_tvm()
        vm = self._vm(artifact)
        out = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(x)) for x in inputs])
        outs = list(out) if not hasattr(out, "numpy") else [out]
        return [o.numpy() for o in outs]

    # ------------------------------------------------------------------ profile
    def _threads(self) -> int:
        """Size of TVM's thread pool (TVM_NUM_THREADS, else TVM's default: physical cores)."""
        import tvm_ffi

        return int(tvm_ffi.get_global_func("runtime.NumThreads")())

    def load_artifact(self, path: str | Path) -> Artifact:
        """A host library this target wrote (`quantflow profile`; `tvm_artifact.load_artifact`)."""
        return load_artifact(path)

    def artifact_warning(self, artifact: Artifact) -> str | None:
        return None  # a host library was built for this machine's target string

    def measurement_device(self) -> str:  # the board behind the RPC tracker, else here
        return self.board().description if self.rpc is not None else device_description()

    def profile(self, artifact: Artifact, inputs: Sequence[np.ndarray], *, warmup: int = 10,
                runs: int = 50, threads: int | None = None, per_layer: bool = False) -> Latency:
        if self.rpc is not None:
            return self._profile_remote(artifact, inputs, warmup=warmup, runs=runs,
                                        threads=threads or self.threads, per_layer=per_layer)
        if str(artifact.meta.get("device")).startswith("aarch64"):
            raise TargetUnavailableError(
                "tvm target: an aarch64 bundle cannot be timed on this host (qemu timings are "
                "meaningless); fix: time it on the board through TVM RPC (--rpc-tracker "
                "HOST:PORT --rpc-key KEY), or copy the bundle there and run its README command")
        tvm = _import_tvm()
        vm = self._vm(artifact)
        args = [tvm.runtime.tensor(np.ascontiguousarray(x)) for x in inputs]
        main = vm["main"]
        threads = threads or self.threads
        batch = int(inputs[0].shape[0]) if inputs and inputs[0].ndim else 1
        previous = set_threads(threads) if threads is not None else None
        try:
            lat = time_runs(lambda: main(*args), warmup=warmup, runs=runs,
                            threads=self._threads(), batch=batch, device=device_description())
            if per_layer:
                kernels = per_kernel_ms(vm, args, runs=max(3, runs // 5))
                lat = replace(lat, per_layer_ms=by_layer(kernels,
                                                         artifact.meta.get("kernel_layers", {})))
        finally:
            if previous is not None:
                set_threads(previous)
        return lat

    def _profile_remote(self, artifact: Artifact, inputs: Sequence[np.ndarray], *, warmup: int,
                        runs: int, threads: int | None, per_layer: bool) -> Latency:
        """`profile` on the board behind the RPC tracker (`tvm_rpc.profile`). Per-layer times
        need the VM instrument, a Python callback that cannot run remotely: where this host
        runs the library (same CPU), its per-kernel shares are scaled to the board's time."""
        from quantflow.targets import tvm_rpc

        local = None
        if per_layer and tvm_rpc.runs_here(artifact.meta):
            def local() -> dict[str, float]:
                tvm = _import_tvm()
                args = [tvm.runtime.tensor(np.ascontiguousarray(x)) for x in inputs]
                return by_layer(per_kernel_ms(self._vm(artifact), args, runs=max(3, runs // 5)),
                                artifact.meta.get("kernel_layers", {}))
        return tvm_rpc.profile(self.board(), Path(artifact.files["model"]), inputs,
                               warmup=warmup, runs=runs, threads=threads, per_layer=local)


def make_target(*, device: str = "host", tune_trials: int = 0,
                tune_seconds: float | None = None, shipped_records: bool = True,
                cache_dir: str | Path | None = None, num_cores: int | None = None,
                mcpu: str | None = None, threads: int | None = None, dot: bool | None = None,
                rpc_tracker: str | None = None, rpc_key: str | None = None) -> TVMTarget:
    """`get_target("tvm", tune_trials=..., cache_dir=..., device="host"|"aarch64"|"aarch64-dot",
    threads=...)`.

    num_cores: the `num-cores` the kernels are compiled/tuned for (default: all logical
    cores here, 4 for aarch64); threads: the runtime thread pool for run/profile; dot: see
    `TVMTarget.dot`; rpc_tracker (HOST:PORT) and rpc_key: profile and tune on the board
    behind a TVM RPC tracker (`tvm_rpc`).
    """
    return TVMTarget(device=device, tune_trials=int(tune_trials), tune_seconds=tune_seconds,
                     shipped_records=shipped_records,
                     cache_dir=Path(cache_dir) if cache_dir is not None else None,
                     num_cores=num_cores, mcpu=mcpu, threads=threads, dot=dot,
                     rpc_tracker=rpc_tracker, rpc_key=rpc_key)
