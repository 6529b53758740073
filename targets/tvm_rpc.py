"""TVM RPC: time and tune TVM libraries on a remote device through TVM's own tracker/server.

The standard TVM set-up for boards (docs/tvm_rpc.md): a tracker anywhere
(`python -m tvm.exec.rpc_tracker --port 9190`), an RPC server on each board registered under a
key (`python -m tvm.exec.rpc_server --tracker HOST:9190 --key rpi5`), and the compiling host
asks the tracker for a session with that key. `--rpc-tracker HOST:PORT --rpc-key KEY` make the
TVM target

- profile through the tracker (`profile`): upload the exported library (`model.so`, built for
  the board: the host's CPU, or cross-compiled for the aarch64 edge bundle), load it into a
  Relax VM on the board and time `main` with the runtime's `time_evaluator`, so the clock runs
  on the board and no network time enters the numbers;
- tune with MetaSchedule's `RPCRunner` (`tuning_runner`): candidates are built here and
  measured on the board.

The latency's `device` names the RPC key and the board's CPU (`describe`), so a report, a
latency table or a tuning database is never mistaken for one measured elsewhere.

Failures are one-line errors with exit code 6: an unreachable tracker or a key no server has
registered is `TargetUnavailableError` (checked before lowering, `check`); a session or a
remote run that fails later is `TargetRuntimeError`, which the profile stage does not swallow.
No torch import: MetaSchedule's popen workers import this module.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import statistics
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantflow.errors import TargetRuntimeError, TargetUnavailableError

log = logging.getLogger("quantflow.targets.tvm")
#: how long `check` waits for a server with the key to register (a server started together
#: with the compile retries its tracker connection every 5 s)
REGISTER_WAIT_S = 20.0
#: longest wait for a free server of the key (another client may hold the board)
REQUEST_TIMEOUT_S = 120.0


def parse_tracker(text: str) -> tuple[str, int]:
    """`HOST:PORT` -> (host, port); ValueError naming the expected form."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--rpc-tracker must be HOST:PORT (e.g. 192.168.1.10:9190), got "
                         f"{text!r}")
    return host, int(port)


@dataclass(frozen=True)
class RPCDevice:
    """A device behind a TVM RPC tracker: the tracker's address and the server key."""

    tracker: str  # HOST:PORT
    key: str

    def __post_init__(self) -> None:
        parse_tracker(self.tracker)
        if not self.key or any(c.isspace() for c in self.key):
            raise ValueError(f"--rpc-key must be a non-empty word (the server's --key), got "
                             f"{self.key!r}")

    @property
    def host(self) -> str:
        return parse_tracker(self.tracker)[0]

    @property
    def port(self) -> int:
        return parse_tracker(self.tracker)[1]

    def fix(self) -> str:
        return (f"fix: start a tracker (python -m tvm.exec.rpc_tracker --port {self.port}) and "
                f"on the board an RPC server (python -m tvm.exec.rpc_server --tracker "
                f"{self.tracker} --key {self.key}), or pass the right --rpc-tracker/--rpc-key")


def check(dev: RPCDevice, wait_s: float = REGISTER_WAIT_S) -> None:
    """Fail fast (TargetUnavailableError) unless the tracker answers and a server with the key
    is registered there (waiting up to `wait_s` for one to register)."""
    deadline = time.monotonic() + wait_s
    while True:
        keys = _tracker_keys(dev)
        if dev.key in keys:
            return
        if time.monotonic() >= deadline:
            have = ", ".join(sorted(keys)) or "none"
            raise TargetUnavailableError(
                f"tvm RPC: no server with key {dev.key!r} is registered at tracker "
                f"{dev.tracker} (keys there: {have}); {dev.fix()}")
        time.sleep(0.5)


def _tracker_keys(dev: RPCDevice) -> set[str]:
    """Keys with at least one registered server; a tracker that does not answer within a few
    seconds is TargetUnavailableError (TVM's own client would retry for a minute)."""
    from tvm.rpc import base

    try:
        with socket.create_connection((dev.host, dev.port), timeout=5.0) as sock:
            sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            magic = struct.unpack("<i", base.recvall(sock, 4))[0]
            if magic != base.RPC_TRACKER_MAGIC:
                raise OSError("not a TVM RPC tracker")
            base.sendjson(sock, [base.TrackerCode.SUMMARY])
            reply = base.recvjson(sock)
    except (OSError, ValueError) as exc:
        raise TargetUnavailableError(
            f"tvm RPC: tracker {dev.tracker} is not reachable ({exc}); {dev.fix()}") from None
    ok = isinstance(reply, list) and len(reply) == 2 and reply[0] == base.TrackerCode.SUCCESS
    servers = reply[1].get("server_info", []) if ok else []
    return {str(s["key"]).split(":", 1)[-1] for s in servers}


def request(dev: RPCDevice, timeout_s: float = REQUEST_TIMEOUT_S) -> Any:
    """An RPC session on a server with the key, from the tracker (bounded wait). The session
    holds the server until its last reference goes: a tracker hands a busy server to no one
    else, so one compile keeps one session (`Board`) and drops it before tuning."""
    from tvm import rpc

    check(dev)
    got: list[Any] = []
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            got.append(rpc.connect_tracker(dev.host, dev.port).request(dev.key, max_retry=2))
        except (RuntimeError, OSError) as exc:
            errors.append(exc)

    worker = threading.Thread(target=ask, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not got:
        why = errors[0] if errors else f"no free server within {timeout_s:.0f} s"
        raise TargetRuntimeError(f"tvm RPC: no session for key {dev.key!r} at {dev.tracker} "
                                 f"({why}); fix: check the board's RPC server, or free it")
    return got.pop()


@contextlib.contextmanager
def remote_errors(dev: RPCDevice, what: str) -> Iterator[None]:
    """Whatever the board or the connection said, as one TargetRuntimeError line."""
    try:
        yield
    except (TargetRuntimeError, TargetUnavailableError):
        raise
    except Exception as exc:  # noqa: BLE001 - TVM raises RPCError, RuntimeError, OSError...
        msg = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        raise TargetRuntimeError(
            f"tvm RPC: {what} on {dev.key} failed: {msg[-1] if msg else exc!r}; fix: the "
            "board's TVM runtime must match apache-tvm here, and the library must be built for "
            "its CPU (--device aarch64 for an Arm64 board)") from None


class Board:
    """The board behind the tracker, with one session held while in use (`session`) and the
    libraries loaded on it (`vm`); `close` hands the server back."""

    def __init__(self, dev: RPCDevice) -> None:
        self.dev = dev
        self._sess: Any = None
        self._vms: dict[str, tuple[Any, Any]] = {}  # lib key -> (VM, remote device)
        self.description = f"rpc:{dev.key} @{dev.tracker}"

    def session(self) -> Any:
        if self._sess is None:
            release(self.dev)  # another Board here may hold the server (the tracker waits)
            self._sess = request(self.dev)
            _OPEN.add(self)
            with remote_errors(self.dev, "describing the board"):
                self.description = describe(self.dev, self._sess)
        return self._sess

    def close(self) -> None:
        import gc

        self._vms.clear()
        self._sess = None
        gc.collect()  # the session closes with its last reference; loaded modules hold it

    def llvm_cpu(self) -> tuple[str, str] | None:
        """(LLVM cpu, triple) of the board where its server has TVM's compiler, else None."""
        sess = self.session()
        try:
            return (str(sess.get_function("target.llvm_get_system_cpu")()),
                    str(sess.get_function("target.llvm_get_system_triple")()))
        except Exception:  # noqa: BLE001 - a runtime-only server
            return None

    def llvm_target(self, num_cores: int | None) -> Any:
        """An LLVM target for the board's CPU (`-mcpu` as LLVM on the board detects it;
        num-cores: its TVM thread pool unless given), or None if the board does not say."""
        import os

        import tvm

        cpu = self.llvm_cpu()
        if cpu is None:
            log.warning("tvm RPC: %s does not say its CPU (runtime-only server); compiling "
                        "for this host's CPU", self.dev.key)
            return None
        here = os.uname().machine
        if cpu[1].split("-")[0] != here:
            raise TargetUnavailableError(
                f"tvm RPC: the board {self.dev.key} is {cpu[1]}, this host {here}; fix: "
                "--device aarch64 for an Arm64 board (a cross-compiled library)")
        return tvm.target.Target({"kind": "llvm", "mcpu": cpu[0],
                                  "num-cores": int(num_cores or self.threads())})

    def threads(self, threads: int | None = None) -> int:
        """The board's TVM thread-pool size, after resizing it to `threads` if given."""
        sess = self.session()
        with remote_errors(self.dev, "sizing the thread pool"):
            if threads:
                sess.get_function("runtime.config_threadpool")(1, int(threads))
            return int(sess.get_function("runtime.NumThreads")())

    def vm(self, lib: Path) -> tuple[Any, Any]:
        """(Relax VM, remote CPU device) of `lib` uploaded to and loaded on the board, once
        per file version."""
        from tvm import relax

        key = f"{lib.resolve()}:{lib.stat().st_mtime_ns}"
        if key not in self._vms:
            sess = self.session()
            remote_name = f"quantflow_{lib.stem}_{lib.stat().st_mtime_ns}.so"
            with remote_errors(self.dev, f"loading {lib.name}"):
                sess.upload(str(lib), remote_name)
                rdev = sess.cpu()
                self._vms[key] = (relax.VirtualMachine(sess.load_module(remote_name), rdev),
                                  rdev)
        return self._vms[key]

    def run(self, lib: Path, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        import tvm

        vm, rdev = self.vm(lib)
        with remote_errors(self.dev, f"running {lib.name}"):
            # the stateful API: a tuple result does not cross RPC as a return value
            vm.set_input("main", *[tvm.runtime.tensor(np.ascontiguousarray(x), device=rdev)
                                   for x in inputs])
            vm.invoke_stateful("main")
            out = vm.get_outputs("main")
            return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]

    def time(self, lib: Path, inputs: Sequence[np.ndarray], *, warmup: int, runs: int,
             threads: int | None = None) -> tuple[list[float], int]:
        """Per-run times (ms) of `lib`'s `main` on the board, and its thread-pool size.

        Each timed run is one call measured by the board's own clock (`time_evaluator`,
        number=1), after `warmup` untimed calls; the inputs are copied to the board once.
        """
        import tvm

        n_threads = self.threads(threads)
        vm, rdev = self.vm(lib)
        with remote_errors(self.dev, f"timing {lib.name}"):
            args = [tvm.runtime.tensor(np.ascontiguousarray(x), device=rdev) for x in inputs]
            # a saved closure: the timed call does no argument conversion or lookup
            vm.save_function("main", "quantflow_main", *args)
            if warmup:
                vm.time_evaluator("quantflow_main", rdev, number=warmup, repeat=1)()
            res = vm.time_evaluator("quantflow_main", rdev, number=1, repeat=runs)()
            return [float(t) * 1e3 for t in res.results], n_threads


def describe(dev: RPCDevice, sess: Any) -> str:
    """`rpc:KEY @HOST:PORT — <remote CPU>`: the board's CPU as its LLVM names it (`cpu
    rocketlake, x86_64-linux-gnu`) where the server has TVM's compiler (the Python server
    does), else from a /proc/cpuinfo the server can read, else just the key."""
    head = f"rpc:{dev.key} @{dev.tracker}"
    try:
        cpu = str(sess.get_function("target.llvm_get_system_cpu")())
        triple = str(sess.get_function("target.llvm_get_system_triple")())
        return f"{head} — cpu {cpu}, {triple}"
    except Exception:  # noqa: BLE001, S110 - a runtime-only server: try the next source
        pass
    try:  # TVM's Python server resolves an absolute path as is; procfs reads may fail
        info = bytes(sess.download("/proc/cpuinfo")).decode(errors="replace")
    except Exception:  # noqa: BLE001 - a C++ or sandboxed server: the key alone names it
        return head
    return f"{head} — {cpu_from_cpuinfo(info)}"


def cpu_from_cpuinfo(text: str) -> str:
    """CPU model and logical core count from /proc/cpuinfo (x86 `model name`; Arm boards
    often have only `CPU implementer/part`, or a `Hardware`/`Model` line)."""
    fields: dict[str, str] = {}
    cores = 0
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        cores += key == "processor"
        fields.setdefault(key, value.strip())
    name = (fields.get("model name") or fields.get("Model") or fields.get("Hardware")
            or (f"Arm CPU implementer {fields['CPU implementer']} part {fields['CPU part']}"
                if "CPU part" in fields else "unknown CPU"))
    return f"{name} ({cores} logical cores)"


def latency_fields(times_ms: Sequence[float]) -> dict[str, float]:
    """median/p90/mean/IQR/MAD of timed runs, as `targets.base.time_runs` computes them."""
    from quantflow.targets.base import spread_ms

    times = sorted(times_ms)
    iqr, mad = spread_ms(times)
    return {"median_ms": statistics.median(times),
            "p90_ms": times[min(len(times) - 1, round(0.9 * (len(times) - 1)))],
            "mean_ms": statistics.fmean(times), "iqr_ms": iqr, "mad_ms": mad}


def profile(board: Board, lib: Path, inputs: Sequence[np.ndarray], *, warmup: int, runs: int,
            threads: int | None, per_layer: Callable[[], dict[str, float]] | None) -> Any:
    """A `Latency` of `lib` timed on the board (`Board.time`). With `per_layer` (per-layer
    times measured on this host), its shares of their sum are scaled to the board's median:
    an estimate (a layer's share can differ between CPUs), labelled so in the log."""
    from quantflow.targets.base import Latency

    times, n_threads = board.time(lib, inputs, warmup=warmup, runs=runs, threads=threads)
    st = latency_fields(times)
    per = None
    if per_layer is not None:
        here = per_layer()
        total = sum(here.values())
        scale = st["median_ms"] / total if total > 0 else 0.0
        per = {k: v * scale for k, v in here.items()}
        log.info("tvm RPC: per-layer times are this host's shares scaled to %s's median",
                 board.dev.key)
    batch = int(inputs[0].shape[0]) if inputs and inputs[0].ndim else 1
    return Latency(median_ms=st["median_ms"], p90_ms=st["p90_ms"], mean_ms=st["mean_ms"],
                   runs=len(times), warmup=warmup, threads=n_threads, batch=batch,
                   device=board.description, per_layer_ms=per, iqr_ms=st["iqr_ms"],
                   mad_ms=st["mad_ms"])


def quick_latency(board: Board, export: Callable[[Path], None], inputs: Sequence[np.ndarray],
                  out_dir: Path, threads: int | None) -> dict[str, float]:
    """Median and p90 of 10 runs on the board of a library `export` writes (untuned vs tuned
    latency at compile time)."""
    lib = out_dir / ".quick_latency.so"
    export(lib)
    try:
        times, _threads = board.time(lib, inputs, warmup=2, runs=10, threads=threads)
    finally:
        lib.unlink(missing_ok=True)
    stats = latency_fields(times)
    return {"median_ms": stats["median_ms"], "p90_ms": stats["p90_ms"]}


def runs_here(meta: dict[str, Any]) -> bool:
    """Whether a library built for `meta["target"]` runs on this host: an x86 library for
    this very CPU (an aarch64 one, or one for another `-mcpu`, may not)."""
    import re

    from tvm.target import codegen

    if str(meta.get("device")).startswith("aarch64"):
        return False
    # meta["target"] is the target's export as text (a JSON string of the Map's repr)
    mcpu = re.search(r'\\?"mcpu\\?": \\?"([\w.+-]+)', str(meta.get("target", "")))
    return mcpu is not None and mcpu.group(1) == str(codegen.llvm_get_system_cpu())


#: boards of this process holding a session (`release`)
_OPEN: weakref.WeakSet[Board] = weakref.WeakSet()


def release(dev: RPCDevice) -> None:
    """Close every session this process holds on `dev`'s servers: the tracker hands a held
    server to no one, so a new session (or MetaSchedule's runner) would wait for it forever.
    Used between stages, which each use the board in turn; never concurrently."""
    for board in list(_OPEN):
        if board.dev == dev:
            board.close()
            _OPEN.discard(board)


def tuning_runner(dev: RPCDevice, timeout_s: float = 60.0) -> Any:
    """MetaSchedule's RPC runner for the board: candidates built here, measured there."""
    import tvm.s_tir.meta_schedule as ms

    check(dev)
    release(dev)
    config = ms.runner.RPCConfig(tracker_host=dev.host, tracker_port=dev.port,
                                 tracker_key=dev.key, session_timeout_sec=int(timeout_s))
    return ms.runner.RPCRunner(rpc_config=config, max_workers=1)
