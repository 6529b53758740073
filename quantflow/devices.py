"""Device and CPU-class names, in one light module (no torch) that the CLI can import.

- `DEVICES[target]`: what an artifact can be compiled for (`--device`), the default first.
  ort: which CPUs it must compute exactly on (targets/ort_isa.py); tvm: this machine or a
  cross-compiled aarch64 bundle (aarch64-dot: for CPUs with the dot-product extension, sdot); trt: the machine with the GPU.
- `ISA_CLASSES`: CPU classes by the int8 kernel family ONNX Runtime's MLAS runs on them
  (quantflow.hostcpu.CpuInfo.isa_class).
- `EMULATED_ISAS`: the classes targets/emulate.py can run an artifact on from any host
  (`--verify-on`).
"""

from __future__ import annotations

ORT_DEVICES = ("portable", "x86-vnni", "x86-avx2", "arm64", "host")
DEVICES: dict[str, tuple[str, ...]] = {
    "ort": ORT_DEVICES,
    "tvm": ("host", "aarch64", "aarch64-dot"),
    "trt": ("host",),
}
ISA_CLASSES = ("x86-sse", "x86-avx2", "x86-avx512", "x86-vnni", "arm64", "arm64-dot",
               "arm64-i8mm", "arm64-sve")
EMULATED_ISAS = ("x86-avx2", "arm64", "arm64-dot", "arm64-i8mm", "arm64-sve")
