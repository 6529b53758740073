#!/usr/bin/env python3
"""Build a TensorRT engine from quantflow's explicitly quantized (Q/DQ) ONNX model.

Written by quantflow (targets/trt_build_engine.py, copied into every bundle with DEFAULTS set
to the lowering's flags). Run it on the deployment device: an engine is specific
to the GPU, the TensorRT version and the CUDA version it was built with.

Explicit quantization needs no calibrator: the scales are in the Q/DQ nodes. In a weakly typed
network the INT8 flag lets TensorRT use int8 kernels where the Q/DQ nodes say so, and FP16 lets
the layers kept in float run in half precision. A strongly typed network (TensorRT >= 10) takes
every type from the graph, so precision flags must not be set.

TensorRT docs: Python API (Builder, OnnxParser, IBuilderConfig, Runtime, EngineInspector)
https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/index.html; timing
cache: https://docs.nvidia.com/deeplearning/tensorrt/latest/performance/builder-performance.html
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
#: the flags quantflow lowered with; rewritten in every bundle (targets/trt_bundle.py)
DEFAULTS: dict[str, Any] = {
    "int8": True, "fp16": True, "strongly_typed": False, "workspace_mb": 1024,
}
_ORDER = ("int8", "fp8", "fp16", "bf16", "fp32")


def _precision(fmt: object) -> str | None:
    f = str(fmt).lower()
    for key, names in (("int8", ("int8",)), ("fp8", ("fp8",)), ("fp16", ("half", "fp16")),
                       ("bf16", ("bf16",)), ("fp32", ("float", "fp32"))):
        if any(n in f for n in names):
            return key
    return None


def summarize_layers(info: Any) -> dict[str, Any]:
    """Per-layer precision from the engine inspector's JSON (ProfilingVerbosity.DETAILED).

    A layer's precision is the lowest one among its input/output "Format/Datatype" strings
    ("Int8 NC/32HW32", "Half ...", "Row major linear FP32"): a conv reading int8 and writing
    float computes in int8. "Reformat" layers are conversions TensorRT inserted.
    """
    layers = info.get("Layers", []) if isinstance(info, dict) else []
    out: dict[str, Any] = {"layers": len(layers), "by_precision": {}, "fp32_layers": [],
                           "reformat_layers": []}
    for layer in layers:
        if not isinstance(layer, dict):  # LAYER_NAMES_ONLY verbosity: names only
            out["by_precision"]["unknown"] = out["by_precision"].get("unknown", 0) + 1
            continue
        name = str(layer.get("Name", "?"))
        tensors = list(layer.get("Inputs", [])) + list(layer.get("Outputs", []))
        precs = {_precision(t.get("Format/Datatype", "")) for t in tensors if isinstance(t, dict)}
        prec = next((p for p in _ORDER if p in precs), "unknown")
        out["by_precision"][prec] = out["by_precision"].get(prec, 0) + 1
        if layer.get("LayerType") == "Reformat" or "reformat" in name.lower():
            out["reformat_layers"].append(name)
        elif prec == "fp32":
            out["fp32_layers"].append(name)
    return out


def network_flags(trt: Any, strongly_typed: bool) -> int:
    flags = 0
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    elif hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        # required by TensorRT 8.x for ONNX; deprecated no-op in 10.x (always explicit batch)
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    return flags


def build(onnx_path: str | Path, engine_path: str | Path, *, int8: bool = True,
          fp16: bool = True, strongly_typed: bool = False, workspace_mb: int = 1024,
          timing_cache: str | Path | None = None, layer_info: str | Path | None = None,
          verbose: bool = False) -> dict[str, Any]:
    """Parse `onnx_path`, build and serialize the engine; return summarize_layers(...)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n{errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # for the engine inspector
    if not strongly_typed:
        if int8:
            config.set_flag(trt.BuilderFlag.INT8)  # Q/DQ scales: no calibrator needed
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
    cache_path = Path(timing_cache) if timing_cache else None
    blob = cache_path.read_bytes() if cache_path is not None and cache_path.exists() else b""
    cache = config.create_timing_cache(blob)
    if not config.set_timing_cache(cache, False):  # cache from another device/version: restart
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT engine build failed; rerun with --verbose for the log")
    with open(engine_path, "wb") as f:
        f.write(serialized)
    if cache_path is not None:
        with open(cache_path, "wb") as f:
            f.write(config.get_timing_cache().serialize())
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    if layer_info:
        Path(layer_info).write_text(json.dumps(info, indent=2) + "\n")
    return summarize_layers(info)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build model.engine from model.onnx (TensorRT).")
    p.add_argument("--onnx", default=str(HERE / "model.onnx"))
    p.add_argument("--engine", default=str(HERE / "model.engine"))
    p.add_argument("--int8", action=argparse.BooleanOptionalAction, default=DEFAULTS["int8"])
    p.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=DEFAULTS["fp16"])
    p.add_argument("--strongly-typed", action="store_true", default=DEFAULTS["strongly_typed"],
                   help="TensorRT >= 10: types from the graph, --int8/--fp16 ignored")
    p.add_argument("--workspace-mb", type=int, default=DEFAULTS["workspace_mb"])
    p.add_argument("--timing-cache", default=str(HERE / "timing.cache"))
    p.add_argument("--layers", default=str(HERE / "layers.json"), help="layer info JSON out")
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args(argv)
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        print(f"error: the TensorRT Python package is not importable here ({exc}); install "
              "TensorRT >= 8.6 for this GPU (NVIDIA docs: Installing TensorRT), or use the "
              "trtexec command in trtexec.txt", file=sys.stderr)
        return 2
    summary = build(a.onnx, a.engine, int8=a.int8, fp16=a.fp16, strongly_typed=a.strongly_typed,
                    workspace_mb=a.workspace_mb, timing_cache=a.timing_cache,
                    layer_info=a.layers, verbose=a.verbose)
    print(json.dumps(summary, indent=2))
    if summary["fp32_layers"] or summary["reformat_layers"]:
        print(f"note: {len(summary['fp32_layers'])} FP32 layer(s), "
              f"{len(summary['reformat_layers'])} reformat layer(s); see {a.layers}")
    print(f"wrote {a.engine}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
