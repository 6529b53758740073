"""Pipeline step 1, "Load": turn whatever model file the user has into an eval-mode `nn.Module`.

The next step (`quantflow.ir.capture`) runs `torch.export.export` on the module, so the
contract of every loader is: the returned module runs in eager mode, is in eval mode, and can
be exported. Files are recognised by content, not by extension (a `.pt` may be
TorchScript, a state dict or a pickled module); this module tells them apart and dispatches:

- ``zoo:NAME``: a model from `quantflow.zoo`; its input shape is known.
- ExportedProgram (``torch.export.save``; a zip with ``models/model.json``):
  `quantflow.load_exported` (inspected by `quantflow.archive` before torch reads it).
- TorchScript (``torch.jit.save``; a zip with ``code/__torch__*`` or ``constants.pkl``):
  `quantflow.load_torchscript` (converted with example inputs, else wrapped for export).
- state dict (a torch.save'd mapping of tensors, loaded with ``weights_only=True``, so no code
  runs) plus ``arch="module:factory"``, or a pickled whole module, which needs
  ``trust_pickle`` (unpickling runs code from the file): `quantflow.load_torch_save`.
- ``.onnx``: `quantflow.load_onnx` (converted by `quantflow.onnx_import`: constant folding,
  shape arithmetic kept in Python, MatMul/LayerNorm/GELU fused back into layers).

`LoadedModel` and the example-input helpers live in `quantflow.loaded`. Every loaded model's
floating-point parameters, buffers and constants must be finite, and example inputs are priced
against available memory before they are allocated (`quantflow.resources`): a file may declare
any shape.

Every failure is an `InputError` (or `UnsafeInputError`, `CaptureError` for a TorchScript
that cannot be converted, `ResourceError` for a shape that cannot fit) whose message names the
file and the fix.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from quantflow import archive, validate
from quantflow.errors import InputError
from quantflow.load_exported import load_exported
from quantflow.load_onnx import load_onnx
from quantflow.load_torch_save import load_torch_save
from quantflow.load_torchscript import load_torchscript
from quantflow.loaded import LoadedModel, Source, check_shape, example_input

log = logging.getLogger("quantflow.load")

__all__ = ["LoadedModel", "Source", "load_model", "resolve_example_inputs"]


def resolve_example_inputs(
    loaded: LoadedModel,
    input_shape: tuple[int, ...] | None,
    calib_sample: Tensor | None,
) -> tuple[Tensor, ...]:
    """Inputs to export with: explicit `input_shape` (incl. batch) > the model's known inputs >
    the first calibration sample (`calib_sample[:1]`, so a whole calibration batch works too)."""
    if input_shape is not None:
        known = loaded.example_inputs
        dtype = known[0].dtype if known is not None and len(known) == 1 else torch.float32
        return (example_input(check_shape(tuple(input_shape), loaded.path), dtype,
                              loaded.path),)
    if loaded.example_inputs is not None:
        return loaded.example_inputs
    if calib_sample is not None:
        if calib_sample.dim() == 0 or calib_sample.shape[0] == 0:
            raise InputError(
                f"{loaded.path}: the calibration data (shape {tuple(calib_sample.shape)}) has "
                "no sample to infer the model's input shape from; pass --input-shape 1,3,224,224"
            )
        return (calib_sample[:1].clone(),)
    raise InputError(
        f"{loaded.path}: the model file does not record its input shape and there is no "
        "calibration data to infer it from; pass --input-shape 1,3,224,224 (batch first)"
    )


def _load_zoo(name: str, spec: str, input_shape: tuple[int, ...] | None) -> LoadedModel:
    zoo = importlib.import_module("quantflow.zoo")  # lazy: it imports every zoo architecture
    try:
        module = zoo.get_model(name)
    except KeyError as exc:
        raise InputError(f"{spec}: {exc.args[0] if exc.args else exc}") from exc
    except FileNotFoundError as exc:
        raise InputError(f"{spec}: {exc}") from exc
    shape = input_shape if input_shape is not None else (1, *zoo.MODELS[name].input_shape)
    dtype = getattr(zoo.MODELS[name], "input_dtype", torch.float32)
    example = example_input(check_shape(shape, spec), dtype, where=spec)
    return LoadedModel(module.eval(), (example,), "zoo", spec, name)


#: torch.save's legacy (non-zip) format starts with a pickled magic number: these are its bytes
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def _is_legacy_torch_save(path: Path) -> bool:
    """Checked before torch.load so that arbitrary bytes are never fed to the unpickler."""
    with path.open("rb") as fh:
        head = fh.read(32)
    return head.startswith(b"\x80") and _LEGACY_MAGIC in head


def _zip_kind(path: Path) -> str | None:
    """'exported-program' | 'torchscript' | 'torch-save' for a torch zip, None otherwise."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except archive.ZIP_ERRORS:
        return None
    if any(n.endswith(("/models/model.json", "serialized_exported_program.json")) for n in names):
        return "exported-program"
    if any("/code/__torch__" in n or n.endswith("/constants.pkl") for n in names):
        return "torchscript"
    if any(n.endswith("data.pkl") for n in names):
        return "torch-save"
    raise InputError(
        f"{path}: a zip archive but not a PyTorch file (entries: {', '.join(names[:4]) or 'none'}"
        "); fix: pass an ExportedProgram (.pt2), TorchScript, a torch.save'd state dict or .onnx"
    )


def load_model(
    path: str,
    *,
    arch: str | None = None,
    trust_pickle: bool = False,
    input_shape: tuple[int, ...] | None = None,
) -> LoadedModel:
    """Load `path` (a file or ``zoo:NAME``) as an eval-mode module; see the module docstring."""
    loaded = _load(path, arch, trust_pickle, input_shape)
    validate.model_finite(loaded.module, loaded.path)
    return loaded


def _load(
    path: str, arch: str | None, trust_pickle: bool, input_shape: tuple[int, ...] | None
) -> LoadedModel:
    if input_shape is not None:
        input_shape = check_shape(tuple(input_shape), path)
    if path.startswith("zoo:"):
        return _load_zoo(path[len("zoo:") :], path, input_shape)
    p = Path(path)
    if not p.exists():
        raise InputError(f"model file {p} does not exist; fix: check the path (or use zoo:NAME)")
    if p.is_dir():
        raise InputError(
            f"{p} is a directory; pass the model file inside it (.pt2, .pt/.pth, .onnx)"
        )
    if p.stat().st_size == 0:
        raise InputError(f"{p} is empty (0 bytes); the save was interrupted, save it again")
    if p.suffix.lower() == ".onnx":
        return load_onnx(p, input_shape)
    kind = _zip_kind(p)
    if arch is not None and kind in ("exported-program", "torchscript"):
        log.warning(
            "%s: is a %s, which carries its architecture; ignoring --arch %s", p, kind, arch
        )
    if kind == "exported-program":
        return load_exported(p, input_shape, trust_pickle)
    if kind == "torchscript":
        return load_torchscript(p, input_shape)
    if kind is None and not _is_legacy_torch_save(p):
        raise InputError(
            f"{p}: not a PyTorch file (neither a zip archive nor torch.save's legacy format); "
            "it is corrupt or truncated, or not a model; fix: pass an ExportedProgram (.pt2), "
            "TorchScript, a torch.save'd state dict or .onnx"
        )
    return load_torch_save(p, arch, trust_pickle, input_shape)
