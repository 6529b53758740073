"""Load an ``.onnx`` file as a module (`quantflow.onnx_import.OnnxModule`) with its input.

The file is parsed with `onnx` (external weight files next to it are read too), checked, and
converted; the graph's single input declares the example shape (symbolic dims such as a batch
become 1) and dtype, so ``quantflow compile model.onnx`` needs no --input-shape for a file that
declares its sizes. A file that is not ONNX, is truncated, misses its external data, is already
quantized or uses ops quantflow does not convert fails here with the file and the node named.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quantflow.errors import InputError
from quantflow.loaded import LoadedModel, brief, check_shape, example_input

log = logging.getLogger("quantflow.load")

#: ops that mean the file holds an already-quantized model
_QUANTIZED = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul",
              "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"}


def _parse(path: Path) -> Any:
    import onnx

    try:
        proto = onnx.load(str(path))
    except FileNotFoundError as exc:  # an external-data file named by the model is missing
        raise InputError(f"{path}: the model's external weight file is missing ({exc}); keep "
                         "the .onnx and its data files together in one directory") from exc
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning subclasses, ...
        if "should be stored in" in str(exc):  # onnx's wording for absent external data
            raise InputError(f"{path}: the model's external weight file is missing "
                             f"({brief(exc)}); keep the .onnx and its data files together in "
                             "one directory") from exc
        raise InputError(f"{path}: not a readable ONNX model ({brief(exc)}); the file is "
                         "truncated or not ONNX; export it again") from exc
    if not proto.graph.node:
        raise InputError(f"{path}: the ONNX graph has no nodes; the file is empty or not a "
                         "model (export it again)")
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise InputError(f"{path}: the ONNX model is invalid ({brief(exc)}); export it "
                         "again") from exc
    quantized = sorted({n.op_type for n in proto.graph.node} & _QUANTIZED)
    if quantized:
        raise InputError(f"{path}: already quantized (it has {', '.join(quantized)}); pass the "
                         "floating-point model")
    return proto


def _example(proto: Any, path: Path, input_shape: tuple[int, ...] | None) -> torch.Tensor:
    import onnx

    from quantflow.onnx_import import single_input

    first = single_input(proto.graph, str(path))
    tt = first.type.tensor_type
    dtype = getattr(torch, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)).name)
    if input_shape is None:
        # symbolic dims (a batch, a sequence length) -> 1 for the batch, else ask
        dims = list(tt.shape.dim)
        sym = [k for k, d in enumerate(dims) if d.dim_value <= 0]
        if not dims or any(k > 0 for k in sym):
            raise InputError(f"{path}: input {first.name!r} has symbolic sizes beyond the "
                             "batch; pass --input-shape with every size (batch first)")
        input_shape = tuple(d.dim_value if d.dim_value > 0 else 1 for d in dims)
    return example_input(check_shape(tuple(input_shape), str(path)), dtype, str(path))


def load_onnx(path: Path, input_shape: tuple[int, ...] | None) -> LoadedModel:
    from quantflow.onnx_import import OnnxModule

    proto = _parse(path)
    example = _example(proto, path, input_shape)
    module = OnnxModule(proto, str(path)).eval()
    return LoadedModel(module, (example,), "onnx", str(path), path.stem)
