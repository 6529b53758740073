"""The TensorRT deployment bundle: what `TrtTarget.lower` writes next to `model.onnx`.

A TensorRT engine can only be built on the GPU it will run on, so every lowering ships the means
to build it there: `build_engine.py` (targets/trt_build_engine.py with the lowering's flags as
its defaults), the equivalent `trtexec` command line and a README. The ONNX file itself is
prepared here too: TensorRT's DequantizeLinear takes no int32 input, so quantized biases are
folded to float constants (`fold_int32_bias_dq`).

Nothing here needs TensorRT; running the build script in-process is `load_build_script`.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

#: oldest TensorRT whose Python API has everything used here (name-based I/O tensors,
#: execute_async_v3, engine inspector, set_memory_pool_limit)
MIN_TRT = "8.6"


#: The standalone build script shipped in every bundle and run in-process when TensorRT exists:
#: `trt_build_engine.py`, plain Python >= 3.9 + tensorrt, no quantflow import (it must run on a
#: bare device). Its `DEFAULTS = {...}` line is rewritten with the lowering's flags.
BUILD_SCRIPT = Path(__file__).resolve().parent / "trt_build_engine.py"
_DEFAULTS_LINE = re.compile(r"^DEFAULTS: dict\[str, Any\] = \{[^}]*\}", re.MULTILINE)


def build_script(defaults: dict[str, Any]) -> str:
    """The bundle's build_engine.py with `defaults` (one line) as its default flags."""
    text, n = _DEFAULTS_LINE.subn(lambda _: f"DEFAULTS: dict[str, Any] = {defaults!r}",
                                  BUILD_SCRIPT.read_text())
    assert n == 1, "trt_build_engine.py must have exactly one DEFAULTS line"
    return text


def load_build_script(path: Path) -> ModuleType:
    """The build script a bundle ships, imported as a module, so that building the engine here
    runs the very file the device would run (one implementation)."""
    spec = importlib.util.spec_from_file_location("quantflow_trt_build_engine", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fold_int32_bias_dq(model: onnx.ModelProto) -> list[str]:
    """Replace DequantizeLinear(int32 constant) by its float value, in place; return the names.

    y = (x - zp) * s computed in float32 exactly as DequantizeLinear does, so the graph's
    numbers do not change. TensorRT's DequantizeLinear takes INT8/FP8/INT4/FP4 only.
    """
    inits = {i.name: i for i in model.graph.initializer}
    folded: list[str] = []
    for node in list(model.graph.node):
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        x_init = inits[node.input[0]]
        if x_init.data_type != TensorProto.INT32 or node.input[1] not in inits:
            continue
        x = numpy_helper.to_array(x_init).astype(np.float32)
        s = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        zp_name = node.input[2] if len(node.input) > 2 else ""
        zp = (numpy_helper.to_array(inits[zp_name]).astype(np.float32) if zp_name in inits
              else np.zeros_like(s))
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if s.ndim == 1 and s.size > 1:  # per-axis: broadcast along `axis`
            shape = [1] * x.ndim
            shape[axis % x.ndim] = s.size
            s, zp = s.reshape(shape), zp.reshape(shape)
        value = ((x - zp) * s).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        model.graph.node.remove(node)
        folded.append(node.output[0])
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    for init in list(model.graph.initializer):
        if init.name not in used:
            model.graph.initializer.remove(init)
    return folded


def trtexec_command(*, int8: bool, fp16: bool, strongly_typed: bool, workspace_mb: int) -> str:
    """The trtexec line equivalent to build_engine.py, plus a per-layer benchmark.

    Flags per the trtexec reference (https://docs.nvidia.com/deeplearning/tensorrt/latest/
    reference/command-line-programs.html and samples/trtexec/README.md): `--stronglyTyped`
    forbids precision flags; `--memPoolSize` needs TensorRT >= 8.4 (older: `--workspace`).
    """
    args = ["trtexec", "--onnx=model.onnx", "--saveEngine=model.engine"]
    if strongly_typed:
        args.append("--stronglyTyped")  # precision flags are not allowed with it
    else:
        args += ["--int8"] * int8 + ["--fp16"] * fp16
    args += [f"--memPoolSize=workspace:{workspace_mb}M", "--timingCacheFile=timing.cache",
             "--profilingVerbosity=detailed", "--dumpLayerInfo", "--exportLayerInfo=layers.json",
             "--dumpProfile", "--separateProfileRun"]
    return shlex.join(args)


def render_readme(*, trtexec: str, reason: str | None, warnings: list[str],
                  quantized: bool) -> str:
    status = ("The engine was built here (`model.engine`); rebuild it on every other device."
              if reason is None else
              f"No engine was built on the machine that wrote this bundle: {reason}.")
    warn = "\n".join(f"- {w}" for w in warnings) or "- none"
    model = ("an explicitly quantized (Q/DQ) ONNX model with symmetric int8 scales. No "
             "calibration data or calibrator is needed: the scales are in the Q/DQ nodes, and "
             "`--int8` only allows TensorRT to use int8 kernels where they say so; `--fp16` "
             "lets the layers kept in float run in half precision." if quantized else
             "the float (FP32 baseline) model, without Q/DQ nodes; `--fp16`, if given, lets "
             "TensorRT run it in half precision.")
    return f"""# TensorRT deployment bundle (quantflow)

{status}

A TensorRT engine is specific to the GPU model, the TensorRT version and the CUDA version it is
built with, so it must be built **on the target device**, with TensorRT >= {MIN_TRT} (8.6 or
10.x; `--stronglyTyped` needs 10.x): the builder times candidate kernels (tactics) on that very
GPU and serializes the fastest, and a plan file is not portable across GPUs or versions. Where
your TensorRT release deprecates weakly typed networks (precision flags), build with
`--strongly-typed` / `trtexec --stronglyTyped` instead; float layers then run in FP32.

`model.onnx` is portable: {model}

## Build

    python build_engine.py            # TensorRT Python API; writes model.engine, timing.cache,
                                      # layers.json and prints a per-layer precision report
    python build_engine.py --help     # --int8/--no-int8, --fp16/--no-fp16, --strongly-typed

or with trtexec (also benchmarks and prints per-layer times):

    {trtexec}

`timing.cache` makes rebuilds fast; it is valid only for the same device and TensorRT version.

## Check the result

`layers.json` (engine inspector, detailed verbosity) lists every fused layer with its input and
output formats: quantized convolutions show `Int8` inputs. Layers reported as FP32 and
`Reformat` layers are where time goes beyond the int8 kernels.

## Structural check of the Q/DQ placement (`qdq_check.json`)

Warnings found by quantflow's TensorRT rule checker:

{warn}
"""
