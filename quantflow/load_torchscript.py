"""Loading TorchScript (``torch.jit.save``): converted to an fx graph, or wrapped for export.

`torch.export` refuses ScriptModules. With example inputs (``input_shape``) the archive is
converted by torch's `TS2EPConverter` (names kept); the converter records traced convs as
`aten.convolution`, which the `canonical_convs` pass rewrites to `aten.conv2d`/`conv1d`, the
form the passes match. Without example inputs the ScriptModule is wrapped so that a later
`torch.export` traces through its interpreter; that works for scripted and traced modules, but
weights become anonymous constants (and traced convs `aten._convolution`, which
`canonical_convs`, first in the default pipeline, rewrites too), so pass ``input_shape`` for
TorchScript when possible.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, fx, nn

from quantflow.errors import CaptureError, InputError
from quantflow.load_exported import plain_graph_module
from quantflow.loaded import LoadedModel, brief, check_shape, example_input
from quantflow.passes.canonical import canonical_convs

log = logging.getLogger("quantflow.load")


class _ScriptModuleCall(nn.Module):
    """Calls a ScriptModule that is kept out of the module tree (in a tuple): `torch.export`
    rejects ScriptModules in the tree, but traces through a hidden one's interpreter, lifting
    its weights as constants."""

    def __init__(self, script: torch.jit.ScriptModule) -> None:
        super().__init__()
        self._script = (script,)

    def forward(self, *args: Any) -> Any:
        return self._script[0](*args)


def convert_torchscript(
    script: torch.jit.ScriptModule, example_inputs: tuple[Tensor, ...], path: str
) -> fx.GraphModule:
    """TorchScript -> ExportedProgram (torch's TS2EPConverter) -> plain eval GraphModule."""
    try:
        from torch._export.converter import TS2EPConverter
    except ImportError as exc:
        raise CaptureError(
            f"{path}: this torch has no TorchScript converter (torch._export.converter); "
            "export the original model with torch.export.save and pass the .pt2 instead"
        ) from exc
    try:
        # torch logs/warns about specialized batch dims and unused num_batches_tracked here:
        # noise for a user who asked for a fixed input shape
        noisy = logging.getLogger("torch._export.non_strict_utils")
        level = noisy.level
        noisy.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ep = TS2EPConverter(script, example_inputs).convert()
        finally:
            noisy.setLevel(level)
    except Exception as exc:
        shapes = [tuple(t.shape) for t in example_inputs]
        raise CaptureError(
            f"{path}: cannot convert this TorchScript to torch.export with inputs of shape "
            f"{shapes} ({brief(exc)}); check --input-shape, or export the "
            "original model with torch.export.save (or save its state_dict and pass --arch)"
        ) from exc
    gm = plain_graph_module(ep, path)
    # here, not only in the pipeline: the loaded graph is what the report's "before the
    # passes" conv counts are taken from, and callers of load_model see conv2d/conv1d
    canonical_convs(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def load_torchscript(path: Path, input_shape: tuple[int, ...] | None) -> LoadedModel:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.jit.load is deprecated": we convert it
            script = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise InputError(
            f"{path}: cannot read the TorchScript archive ({brief(exc)}); the "
            "file is corrupt or truncated; save it again with torch.jit.save"
        ) from exc
    script.eval()
    for p in script.parameters():
        p.requires_grad_(False)  # inference only; export would warn about each one
    if input_shape is None:
        log.info(
            "%s: TorchScript without --input-shape: exported through its interpreter "
            "(weights become anonymous constants)",
            path,
        )
        return LoadedModel(
            _ScriptModuleCall(script).eval(), None, "torchscript", str(path), path.stem
        )
    inputs = (example_input(check_shape(input_shape, str(path)), where=str(path)),)
    gm = convert_torchscript(script, inputs, str(path))
    return LoadedModel(gm, inputs, "torchscript", str(path), path.stem)
