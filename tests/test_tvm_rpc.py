"""TVM RPC (targets/tvm_rpc.py): a real tracker and server on the loopback address, started as
subprocesses of this venv's python (`python -m tvm.exec.rpc_tracker` / `rpc_server`), bounded
in time and always stopped, even when a test fails.

Proof that a measurement ran on the server and not in this process: the server's log records
each `load_module` of the uploaded library, and the reported latency device names the RPC
key. Numbers: a median > 0 and within 20x of the same library timed locally (both run on this
machine here; the bound only catches units or a timer measuring the network).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")
pytest.importorskip("tornado")  # the tracker needs it

from quantflow.cli import main
from quantflow.targets.tvm_rpc import RPCDevice, check, cpu_from_cpuinfo, parse_tracker

pytestmark = pytest.mark.tvm
KEY = "qf-test"
START_S = 120.0  # a tracker + a registered server: ~10 s here (the server retries every 5 s)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: run a module as `python -m` would, after asking Linux to SIGTERM this child when the test
#: process dies (PR_SET_PDEATHSIG) and making SIGTERM kill the child's whole process group
#: (the server's and tracker's popen workers too), so a killed pytest leaves nothing behind
_LAUNCH = ("import ctypes, os, runpy, signal, sys; "
           "signal.signal(signal.SIGTERM, lambda *_: os.killpg(0, signal.SIGKILL)); "
           # under qemu: what the server spawns its workers with (no binfmt for aarch64 here)
           "sys.executable = os.environ.get('QF_EXECUTABLE', sys.executable); "
           "ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
           "sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__')")


class LocalRPC:
    """A tracker and one server with `KEY`, as subprocess groups (the server forks workers)."""

    def __init__(self, log_dir: Path, key: str = KEY, python: tuple[str, ...] = (sys.executable,),
                 env: dict[str, str] | None = None) -> None:
        self.key = key
        self.port = _free_port()
        self.tracker = f"127.0.0.1:{self.port}"
        self.log = log_dir / "rpc_server.log"
        self.procs: list[subprocess.Popen[bytes]] = []
        self._spawn("rpc_tracker", "--host", "127.0.0.1", "--port", str(self.port),
                    "--port-end", str(self.port + 1), log=log_dir / "rpc_tracker.log")
        server_port = _free_port()
        self._spawn("rpc_server", "--host", "127.0.0.1", "--port", str(server_port),
                    "--port-end", str(server_port + 20), "--tracker", self.tracker,
                    "--key", key, log=self.log, python=python, env=env)

    def _spawn(self, module: str, *args: str, log: Path,
               python: tuple[str, ...] = (sys.executable,),
               env: dict[str, str] | None = None) -> None:
        env = {**os.environ, "TVM_NUM_THREADS": "1", **(env or {})}
        with log.open("wb") as out:
            self.procs.append(subprocess.Popen(
                [*python, "-c", _LAUNCH, f"tvm.exec.{module}", *args], stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True, env=env))

    def wait_ready(self) -> None:
        """Until the tracker answers (it imports tvm first) and the server has registered."""
        from quantflow.errors import TargetUnavailableError

        deadline = time.monotonic() + START_S
        while True:
            try:
                return check(RPCDevice(self.tracker, self.key),
                             wait_s=deadline - time.monotonic())
            except TargetUnavailableError:
                if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                    raise
                time.sleep(0.5)

    def loads(self) -> list[str]:
        """Paths the server loaded modules from (its `load_module` log lines)."""
        return re.findall(r"load_module (\S+)", self.log.read_text(errors="replace"))

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)


@contextmanager
def local_rpc(log_dir: Path, **kw: object) -> Iterator[LocalRPC]:
    rpc = LocalRPC(log_dir, **kw)  # type: ignore[arg-type]
    try:
        rpc.wait_ready()
        yield rpc
    finally:
        rpc.stop()


@pytest.fixture(scope="module")
def rpc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRPC]:
    with local_rpc(tmp_path_factory.mktemp("rpc")) as r:
        yield r


# ----------------------------------------------------------------------------- no server

def test_forms_are_checked() -> None:
    assert parse_tracker("10.0.0.2:9190") == ("10.0.0.2", 9190)
    for bad in ("10.0.0.2", ":9190", "h:0", "h:99999", "h:p"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_tracker(bad)
    with pytest.raises(ValueError, match="--rpc-key"):
        RPCDevice("h:1", "two words")


def test_cpu_from_cpuinfo() -> None:
    x86 = "processor\t: 0\nmodel name\t: AMD EPYC 9654\nprocessor\t: 1\nmodel name\t: AMD EPYC"
    assert cpu_from_cpuinfo(x86) == "AMD EPYC 9654 (2 logical cores)"
    arm = "processor\t: 0\nCPU implementer\t: 0x41\nCPU part\t: 0xd0b\n"
    assert cpu_from_cpuinfo(arm) == "Arm CPU implementer 0x41 part 0xd0b (1 logical cores)"


def test_rpc_flags_need_tvm_and_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, msg in ((["--target", "ort", "--rpc-tracker", "h:1", "--rpc-key", "k"],
                       "--target tvm only"),
                      (["--target", "tvm", "--rpc-tracker", "h:1"], "go together"),
                      (["--target", "tvm", "--rpc-tracker", "h", "--rpc-key", "k"],
                       "HOST:PORT")):
        assert main(["compile", "zoo:resnet_fmnist", "-o", "unused", *argv]) == 2
        assert msg in capsys.readouterr().err


def test_down_tracker_is_one_line_exit_6(tmp_path: Path) -> None:
    """No tracker listens on the port: `compile` fails before lowering, in one line naming the
    fix (no traceback), exit code 6 (TargetUnavailableError); in a few seconds, not TVM's own
    one-minute connection retry."""
    port = _free_port()
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "quantflow", "compile", "zoo:resnet_fmnist", "--target", "tvm",
         "--calib-samples", "8", "--eval-samples", "8", "--calibrator", "minmax",
         "--equalize", "off", "--rpc-tracker", f"127.0.0.1:{port}", "--rpc-key", KEY,
         "-q", "-o", str(tmp_path / "out")],
        check=False, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 6, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert f"tracker 127.0.0.1:{port} is not reachable" in lines[0]
    assert f"python -m tvm.exec.rpc_server --tracker 127.0.0.1:{port} --key {KEY}" in lines[0]
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 120


# ----------------------------------------------------------------------------- with a server

def test_compile_profiles_through_rpc(rpc: LocalRPC, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`compile --target tvm --rpc-tracker --rpc-key`: both artifacts are timed on the server
    (its log shows their libraries loaded) and the report's device names the key."""
    out = tmp_path / "out"
    code = main(["compile", "zoo:resnet_fmnist", "--target", "tvm", "--bits", "8",
                 "--calibrator", "minmax", "--equalize", "off", "--calib-samples", "32",
                 "--eval-samples", "32", "--profile-runs", "20", "--rpc-tracker", rpc.tracker,
                 "--rpc-key", KEY, "-q", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    latency = json.loads((out / "report.json").read_text())["latency"]
    loaded = [Path(p).name for p in rpc.loads()]
    assert any(n.startswith("quantflow_model_fp32_") for n in loaded), loaded
    assert any(n.startswith("quantflow_model_") and "fp32" not in n for n in loaded), loaded
    for which in ("fp32", "quantized"):
        lat = latency[which]
        assert lat["device"].startswith(f"rpc:{KEY} @{rpc.tracker} — "), lat["device"]
        assert re.search(r" — cpu \S+, x86_64-", lat["device"]), lat["device"]
        assert lat["runs"] == 20 and lat["threads"] == 1
        assert 0 < lat["median_ms"] <= lat["p90_ms"] < 1000

    # per-layer: this host's shares (same CPU here) scaled to the board's median
    per = latency["quantized"]["per_layer_ms"]
    assert len(per) >= 15 and all(v >= 0 for v in per.values()), per
    assert sum(per.values()) == pytest.approx(latency["quantized"]["median_ms"], rel=1e-9)

    # the same library timed in this process: the remote clock measures the same work
    assert main(["profile", str(out / "model.so"), "--runs", "20", "--threads", "1"]) == 0
    local = float(re.search(r"median ([\d.]+) ms", capsys.readouterr().out).group(1))  # type: ignore[union-attr]
    assert local / 20 < latency["quantized"]["median_ms"] < local * 20


def test_profile_cli_through_rpc(rpc: LocalRPC, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """`quantflow profile model.so --rpc-tracker --rpc-key` times a library on the server;
    the server's newest load is that library."""
    import torch

    from quantflow.ir import capture
    from quantflow.targets import get_target

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 14 * 14, 4)).eval()
    x = torch.randn(1, 3, 16, 16)
    local = get_target("tvm")
    art = local.lower(capture(net, (x,)), (x,), tmp_path, precision="fp32")
    before = len(rpc.loads())
    # run() executes on the board too (the evaluate stage's path): same outputs, bit for bit
    remote = get_target("tvm", rpc_tracker=rpc.tracker, rpc_key=KEY)
    (want,), (got,) = local.run(art, [x.numpy()]), remote.run(art, [x.numpy()])
    assert np.array_equal(got, want) and got.shape == (1, 4)
    assert len(rpc.loads()) == before + 1
    before = len(rpc.loads())
    assert main(["profile", str(tmp_path / "model_fp32.so"), "--runs", "10",
                 "--rpc-tracker", rpc.tracker, "--rpc-key", KEY]) == 0
    out = capsys.readouterr().out
    assert f"device: rpc:{KEY} @{rpc.tracker} — " in out
    assert float(re.search(r"median ([\d.]+) ms", out).group(1)) > 0  # type: ignore[union-attr]
    new = rpc.loads()[before:]
    assert len(new) == 1 and "model_fp32" in new[0], new


def test_unknown_key_names_the_keys_there(rpc: LocalRPC, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from quantflow.errors import TargetUnavailableError

    with pytest.raises(TargetUnavailableError, match=f"keys there: {KEY}"):
        check(RPCDevice(rpc.tracker, "no-such-board"), wait_s=0)


def test_tuning_measures_on_the_server(rpc: LocalRPC, tmp_path: Path) -> None:
    """`tune_trials` with RPC: MetaSchedule's RPC runner measures every candidate on the
    server (its log shows the candidate modules loaded), the records hold real run times, and
    the database is cached under the RPC key, apart from a local tuning's."""
    import torch

    from quantflow.ir import capture
    from quantflow.targets import get_target

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()
    x = torch.randn(1, 3, 12, 12)
    target = get_target("tvm", tune_trials=2, cache_dir=tmp_path / "cache",
                        rpc_tracker=rpc.tracker, rpc_key=KEY)
    before = len(rpc.loads())
    art = target.lower(capture(net, (x,)), (x,), tmp_path / "out", precision="fp32")
    tuning = art.meta["tuning"]
    assert tuning["runner"] == f"rpc:{KEY}" and not tuning["cache_hit"]
    work_dir = Path(tuning["work_dir"])
    assert work_dir.name.endswith(f"-rpc-{KEY}") and work_dir.parent == tmp_path / "cache"
    records = [json.loads(line) for line in (work_dir / "database_tuning_record.json")
               .read_text().splitlines()]
    run_secs = [float(s) for r in records for s in r[1][1]]
    assert records and all(0 < s < 1.0 for s in run_secs), run_secs  # 1e10 marks a failure
    candidates = [p for p in rpc.loads()[before:] if "tvm_tmp_mod" in p]
    # every record but those copied from the shipped database was measured on the server
    assert len(candidates) >= len(records) - tuning["seeded_records"], rpc.loads()[before:]
    for when in ("untuned_latency", "tuned_latency"):  # timed on the server too
        assert 0 < art.meta[when]["median_ms"] < 1000
    assert any(".quick_latency" in p for p in rpc.loads()[before:])


# ----------------------------------------------------------------------------- aarch64 board

ARM64_ROOT = Path.home() / ".cache" / "quantflow" / "arm64-python"
ARM64_TVM = Path.home() / ".cache" / "quantflow" / "arm64-tvm-site"


def _arm64_skip_reason() -> str | None:
    import shutil

    from quantflow.targets.tvm_edge import missing_toolchain

    if not (ARM64_TVM / ".done").exists() or not (ARM64_ROOT / "usr/bin/python3").exists():
        return "no aarch64 CPython/TVM packages: run tools/setup.sh (setup_arm64_tvm.sh)"
    if shutil.which("qemu-aarch64") is None:
        return "qemu-aarch64 not found: apt-get install -y qemu-user"
    return missing_toolchain()


@pytest.mark.slow
@pytest.mark.skipif(_arm64_skip_reason() is not None, reason=str(_arm64_skip_reason()))
def test_aarch64_board_under_qemu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An aarch64 "board": TVM's Python RPC server run by the aarch64 CPython under
    qemu-aarch64. `--device aarch64` with RPC: MetaSchedule tunes on it (candidates
    cross-compiled here, `tvm_intrin.export_aarch64`), the evaluate path runs the cross-compiled
    library there (= torch within 1e-5 relative) and profile times it there; the device names
    the board's aarch64 triple. (qemu times mean nothing: only their sanity is checked.)"""
    import torch

    from quantflow.ir import capture
    from quantflow.targets import get_target

    python = ("qemu-aarch64", "-L", str(ARM64_ROOT), str(ARM64_ROOT / "usr/bin/python3"))
    wrapper = tmp_path / "arm64-python.sh"
    wrapper.write_text("#!/bin/sh\nexec " + " ".join(python) + ' "$@"\n')
    wrapper.chmod(0o755)
    env = {"PYTHONPATH": f"{ARM64_TVM}:{ARM64_ROOT / 'site-packages'}", "PYTHONNOUSERSITE": "1",
           "QF_EXECUTABLE": str(wrapper)}
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 10 * 10, 4)).eval()
    x = torch.randn(1, 3, 12, 12)
    with local_rpc(tmp_path, key="arm", python=python, env=env) as board:
        target = get_target("tvm", device="aarch64", tune_trials=1, cache_dir=tmp_path / "db",
                            rpc_tracker=board.tracker, rpc_key="arm")
        art = target.lower(capture(net, (x,)), (x,), tmp_path / "out", precision="fp32")
        records = (Path(art.meta["tuning"]["work_dir"]) / "database_tuning_record.json")
        run_secs = [float(t) for line in records.read_text().splitlines()
                    for t in json.loads(line)[1][1]]
        assert run_secs and all(0 < t < 1.0 for t in run_secs), run_secs
        (got,) = target.run(art, [x.numpy()])
        want = net(x).detach().numpy()
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
        lat = target.profile(art, [x.numpy()], warmup=2, runs=5)
        assert re.search(r"^rpc:arm @\S+ — cpu \S+, aarch64-", lat.device), lat.device
        assert 0 < lat.median_ms <= lat.p90_ms < 1000
        assert any("model_fp32" in p for p in board.loads())
        # `quantflow profile` of the bundle's manifest on the board (a new session: the
        # target's own is released first, else the tracker would wait for it)
        assert main(["profile", str(tmp_path / "out" / "manifest_fp32.json"), "--runs", "5",
                     "--rpc-tracker", board.tracker, "--rpc-key", "arm"]) == 0
        assert re.search(r"device: rpc:arm @\S+ — cpu \S+, aarch64-", capsys.readouterr().out)
