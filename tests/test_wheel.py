"""The wheel works without the source tree: build it, install it into a fresh venv, compile a
zoo model from a folder outside the repository, and find every non-Python file a feature reads
(report schema, zoo weights, the TVM edge runner source, the scripts run or shipped by path).

Slow (minutes: a venv with torch and the other dependencies from the local package index)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
#: what the build reads; copied (symlinks kept: quantflow/passes -> ../passes) so that a stale
#: build/ folder in the checkout cannot put deleted modules into the wheel
SOURCES = ("pyproject.toml", "README.md", "quantflow", "passes", "targets")
#: package folders in the source tree -> where their files land in the wheel
PACKAGES = {"quantflow": "quantflow", "passes": "quantflow/passes", "targets": "quantflow/targets"}
#: non-Python files the features read at run time (wheel paths)
DATA_FILES = ("quantflow/report.schema.json", "quantflow/targets/tvm_host/runner.cc",
              "quantflow/targets/tvm_records/x86-vnni/database_tuning_record.json.gz",
              "quantflow/targets/tvm_records/x86-avx2/database_tuning_record.json.gz",
              "quantflow/zoo/weights/resnet_fmnist.pt", "quantflow/zoo/weights/resnet_fmnist.json")
#: each step runs pip or a compile; generous, the machine is shared
STEP_TIMEOUT_S = 1500

CHECK_INSTALLED = """
import importlib.resources as res, json, sys
from pathlib import Path
import quantflow
from quantflow.report import SCHEMA_FILE
from quantflow.targets.emulate import RUNNER
from quantflow.targets.trt_bundle import BUILD_SCRIPT
from quantflow.targets.tvm_edge import RUNNER_SRC
from quantflow.zoo import WEIGHTS_DIR
pkg, targets = res.files("quantflow"), res.files("quantflow.targets")
found = {
    "package": str(Path(quantflow.__file__).resolve().parent),
    "schema": pkg.joinpath("report.schema.json").is_file(),
    "runner_cc": targets.joinpath("tvm_host/runner.cc").is_file(),
    "tvm_records": sorted(p.name for p in targets.joinpath("tvm_records").iterdir()),
    "ort_runner": targets.joinpath("ort_runner.py").is_file(),
    "trt_build_engine": targets.joinpath("trt_build_engine.py").is_file(),
    # the paths the code itself uses, next to its modules
    "paths": [str(p) for p in (SCHEMA_FILE, RUNNER, BUILD_SCRIPT, RUNNER_SRC)
              if not p.is_file()],
    "weights": sorted(p.name for p in WEIGHTS_DIR.iterdir()),
}
print(json.dumps(found))
"""


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # check=False: the assertion below shows the output, which CalledProcessError would hide
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False,
                          timeout=STEP_TIMEOUT_S)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n" \
                                 f"{proc.stderr[-4000:]}"
    return proc


def source_files() -> set[str]:
    """Wheel paths of every module and data file in the package folders."""
    out = set(DATA_FILES)
    for folder, dest in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder)
            if "__pycache__" in rel.parts or (folder == "quantflow" and rel.parts[0] in
                                              ("passes", "targets")):
                continue  # the symlinked folders are listed under their own name
            out.add(f"{dest}/{rel.as_posix()}")
    return out


def test_wheel_installs_and_compiles_outside_the_repo(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    # a clean environment: nothing from the repository or the test's venv leaks in
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    env.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")

    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", str(src),
         "-w", str(dist)], tmp_path, env)
    wheel = next(dist.glob("quantflow-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert source_files() - names == set()

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], tmp_path, env)
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt")]
    # torch first and pinned, as tools/setup.sh does: the CPU wheel, not the CUDA build
    run([*pip, "torch==2.13.0"], tmp_path, env)
    run([*pip, str(wheel)], tmp_path, env)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    found = json.loads(run([py, "-c", CHECK_INSTALLED], elsewhere, env).stdout)
    assert Path(found["package"]).is_relative_to(venv), found["package"]
    assert found["schema"] and found["runner_cc"] and found["ort_runner"] \
        and found["trt_build_engine"], found
    assert found["paths"] == []
    assert {"x86-avx2", "x86-vnni"} <= set(found["tvm_records"]), found["tvm_records"]
    assert {"resnet_fmnist.pt", "resnet_fmnist.json"} <= set(found["weights"])

    out = elsewhere / "out"
    run([str(venv / "bin" / "quantflow"), "compile", "zoo:resnet_fmnist", "--calib-samples",
         "64", "--eval-samples", "200", "-o", str(out)], elsewhere, env)
    report = json.loads((out / "report.json").read_text())
    assert report["schema"] == "quantflow.report/2" and report["target"] == "ort"
    assert (out / "model.onnx").is_file() and (out / "plan.json").is_file()
