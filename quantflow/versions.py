"""Versions of the packages whose behaviour the numbers in a report depend on.

Quantized outputs and latencies move with the runtime's kernels (onnxruntime, TVM), the
exporter (torch, onnx) and numpy's rounding, so reports record the exact versions next to the
figures. Read from installed package metadata (importlib.metadata): nothing heavy is imported,
so asking costs milliseconds even where torch takes seconds to import.
"""

from __future__ import annotations

from importlib import metadata

#: reported name -> distributions that provide it, the first installed one wins. Builds of one
#: project ship under several names (xgboost-cpu, onnxruntime-gpu); the report keeps the name of
#: the distribution found, so the build stays visible.
PACKAGES: dict[str, tuple[str, ...]] = {
    "quantflow": ("quantflow",),
    "torch": ("torch",),
    "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "numpy": ("numpy",),
    "apache-tvm": ("apache-tvm",),
    "xgboost": ("xgboost-cpu", "xgboost"),
}


def installed_versions() -> dict[str, str]:
    """{distribution name: version} for each package in PACKAGES that is installed.

    Keys are the distributions found (e.g. "xgboost-cpu", "onnxruntime-gpu"); a package that is
    not installed (apache-tvm without the tvm extra) is left out rather than failing the report.
    Versions are as installed, local labels included (torch "2.13.0+cpu").
    """
    found: dict[str, str] = {}
    for candidates in PACKAGES.values():
        for dist in candidates:
            try:
                found[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
            break
    return found
