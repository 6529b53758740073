"""Read a QDQ ONNX artifact back from disk (`quantflow profile`): ORT and TensorRT files.

The file is checked before anything runs it: a corrupt, truncated or non-ONNX file is an
InputError (exit 3) naming it, never a protobuf traceback. Input shapes come from the graph
(static, batch included: what `lower` wrote); `meta["input_specs"]` carries them, as for TVM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantflow.errors import InputError
from quantflow.targets.base import Artifact


def load_onnx_artifact(path: str | Path, target: str) -> Artifact:
    """The Artifact of an ONNX file (or of the directory holding `model.onnx`)."""
    import onnx

    path = Path(path)
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        raise InputError(f"{path} does not exist; fix: pass the model.onnx that `quantflow "
                         "compile` wrote, or its directory")
    try:
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(model)
    except Exception as exc:  # protobuf DecodeError, onnx ValidationError, ...
        first = str(exc).strip().splitlines()
        raise InputError(f"{path}: not a valid ONNX model ({type(exc).__name__}: "
                         f"{first[0][:200] if first else ''}); the file is corrupt, truncated "
                         "or not ONNX; fix: compile it again with `quantflow compile`") from exc
    specs: list[dict[str, Any]] = [
        {"name": i.name, "dtype": "float32",
         "shape": [d.dim_value if d.dim_value > 0 else 1 for d in i.type.tensor_type.shape.dim]}
        for i in model.graph.input]
    meta = {"input_specs": specs,
            "metadata": {p.key: p.value for p in model.metadata_props}}
    return Artifact(target=target, precision="unknown", files={"model": str(path)},
                    input_names=tuple(s["name"] for s in specs),
                    output_names=tuple(o.name for o in model.graph.output), meta=meta)
