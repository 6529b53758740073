"""TensorRT in this process: whether it can run here, and a built engine bound to CUDA buffers.

Used by `TrtTarget` only where `tensorrt_unavailable_reason()` is None (TensorRT importable and a
CUDA GPU visible); everywhere else the target runs the Q/DQ ONNX in onnxruntime instead.
"""

from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path

import numpy as np
import torch

from quantflow.errors import TargetUnavailableError
from quantflow.targets.base import Latency, spread_ms


def tensorrt_unavailable_reason() -> str | None:
    """None if TensorRT can build and run engines here, else why not (for messages)."""
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt Python package is not installed"
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - the PyPI stub and broken installs raise anything
        return f"`import tensorrt` failed ({type(exc).__name__}: {exc})"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch (torch.cuda.is_available() is False)"
    return None


class Engine:
    """A deserialized engine bound to torch CUDA buffers (TensorRT >= 8.6 name-based API).

    Each I/O tensor gets a device address via set_tensor_address; execute_async_v3 enqueues on
    a torch CUDA stream. Docs: IExecutionContext, https://docs.nvidia.com/deeplearning/tensorrt/
    latest/_static/python-api/infer/Core/ExecutionContext.html; "Migrating I/O Buffer Allocation
    to Named Tensors", https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/
    tensorrt-8x-to-10x-python-api-patterns.html. Not exercised in CI (no GPU there).
    """

    def __init__(self, engine_path: Path) -> None:
        import tensorrt as trt

        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise TargetUnavailableError(f"trt: could not deserialize {engine_path} (built with "
                                         "another TensorRT version or GPU?); rebuild it here")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names
                       if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.stream = torch.cuda.Stream()
        self._keep: list[torch.Tensor] = []

    def bind(self, feed: dict[str, np.ndarray]) -> list[torch.Tensor]:
        self._keep = []
        for name in self.inputs:
            t = torch.from_numpy(np.ascontiguousarray(feed[name])).cuda()
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
            self._keep.append(t)  # the buffer must outlive the enqueued work
        outs = []
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            np_dtype = np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))
            t = torch.empty(shape, dtype=torch.from_numpy(np.empty(0, np_dtype)).dtype,
                            device="cuda")
            self.context.set_tensor_address(name, t.data_ptr())
            outs.append(t)
        self._keep += outs
        return outs

    def execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("trt: execute_async_v3 failed (see the TensorRT log above)")

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        outs = self.bind(feed)
        self.execute()
        self.stream.synchronize()
        return [o.cpu().numpy() for o in outs]


def engine_latency(eng: Engine, feed: dict[str, np.ndarray], *, warmup: int, runs: int,
                   batch: int) -> Latency:
    """GPU time per inference: CUDA events around execute_async_v3, inputs resident."""
    eng.bind(feed)
    for _ in range(warmup):
        eng.execute()
    eng.stream.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(eng.stream)
        eng.execute()
        end.record(eng.stream)
        end.synchronize()
        times.append(float(start.elapsed_time(end)))
    times.sort()
    iqr, mad = spread_ms(times)
    return Latency(median_ms=statistics.median(times),
                   p90_ms=times[min(len(times) - 1, round(0.9 * (len(times) - 1)))],
                   mean_ms=statistics.fmean(times), runs=runs, warmup=warmup, threads=1,
                   batch=batch, device=f"{torch.cuda.get_device_name()} (TensorRT "
                                       f"{eng.trt.__version__}, GPU time, CUDA events)",
                   iqr_ms=iqr, mad_ms=mad)
