"""Loading a ``torch.save`` file: a state dict plus ``arch="module:factory"``, or (only with
``trust_pickle``) a pickled whole module.

The file is first read with ``weights_only=True``, so no code runs; a file that needs more
(pickled classes) is refused with the classes it references, read without unpickling, unless
the user trusts it. A state dict may sit inside a training checkpoint or carry
DataParallel's ``module.`` prefixes; the factory builds the module and the weights load
strictly, with missing/unexpected keys and shape mismatches named (the first few).
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from quantflow import archive
from quantflow.errors import InputError, UnsafeInputError
from quantflow.loaded import LoadedModel, Source, brief, given_input

log = logging.getLogger("quantflow.load")

#: nesting keys under which training checkpoints commonly keep the state dict
_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")
#: how many offending keys an error message lists
_SHOW = 5


def _import_factory(arch: str, path: Path) -> Any:
    module_name, sep, attr = arch.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(
            f"{path}: --arch {arch!r} is not of the form module:factory "
            "(e.g. --arch mypkg.models:resnet18)"
        )
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # a console script does not put the working directory on sys.path, but users
            # naturally name a model file that sits next to them
            if exc.name != module_name.split(".")[0] or "" in sys.path:
                raise
            sys.path.insert(0, "")
            try:
                module = importlib.import_module(module_name)
            finally:
                sys.path.remove("")
    except Exception as exc:
        raise InputError(
            f"{path}: cannot import module {module_name!r} of --arch {arch!r} "
            f"({brief(exc)}); make it importable (run from its folder or add "
            "that folder to PYTHONPATH)"
        ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise InputError(
            f"{path}: module {module_name!r} has no callable {attr!r} (--arch {arch!r}); "
            "name a class or function that builds the model with no arguments"
        )
    return factory


def _unwrap_state_dict(obj: Mapping[Any, Any], path: Path) -> dict[str, Tensor]:
    """The state dict inside `obj`: itself, or a training checkpoint's 'state_dict'/'model'."""
    if not all(isinstance(v, Tensor) for v in obj.values()):
        for key in _CHECKPOINT_KEYS:
            inner = obj.get(key)
            if (
                isinstance(inner, Mapping)
                and inner
                and all(isinstance(v, Tensor) for v in inner.values())
            ):
                log.info("%s: using the state dict under checkpoint key %r", path, key)
                return _unwrap_state_dict(inner, path)
        bad = [f"{k!r}: {type(v).__name__}" for k, v in obj.items() if not isinstance(v, Tensor)]
        raise InputError(
            f"{path}: holds a dict that is not a state dict (non-tensor entries "
            f"{', '.join(bad[:_SHOW])}); save model.state_dict(), an ExportedProgram "
            "(torch.export.save) or a TorchScript module instead"
        )
    sd = {str(k): v for k, v in obj.items()}
    # nn.DataParallel / DistributedDataParallel prefix every key with "module."
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _load_state_dict(
    sd: dict[str, Tensor], path: Path, arch: str | None, input_shape: tuple[int, ...] | None
) -> LoadedModel:
    if arch is None:
        raise InputError(
            f"{path}: holds a state dict (weights only, {len(sd)} tensors, e.g. "
            f"{', '.join(list(sd)[:3])}) but no architecture; pass --arch module:factory "
            "(arch='module:factory') naming a function or class that builds the model"
        )
    factory = _import_factory(arch, path)
    try:
        module = factory()
    except Exception as exc:
        raise InputError(
            f"{path}: --arch {arch!r} failed when called with no arguments "
            f"({brief(exc)}); point --arch at a function that needs none"
        ) from exc
    if not isinstance(module, nn.Module):
        raise InputError(
            f"{path}: --arch {arch!r} returned a {type(module).__name__}, not an nn.Module"
        )
    _check_keys(module, sd, path, arch)
    module.load_state_dict(sd, strict=True)
    inputs = given_input(input_shape, path)
    return LoadedModel(module.eval(), inputs, "state-dict", str(path), path.stem)


def _check_keys(module: nn.Module, sd: Mapping[str, Tensor], path: Path, arch: str) -> None:
    """Name the first missing/unexpected keys and shape mismatches (torch's own message lists
    them all, which for a wrong architecture is hundreds of lines)."""
    want = module.state_dict()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shapes = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in want.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if not (missing or unexpected or shapes):
        return
    parts = [
        f"{label} ({len(items)}): {'; '.join(items[:_SHOW])}{' ...' if len(items) > _SHOW else ''}"
        for label, items in (
            ("missing in file", missing),
            ("unexpected in file", unexpected),
            ("shape mismatches", shapes),
        )
        if items
    ]
    raise InputError(
        f"{path}: the state dict does not match --arch {arch!r}: "
        + " | ".join(parts)
        + "; fix: pass the factory that built these weights (same variant, width and number "
        "of classes)"
    )


def _pickle_globals(path: Path) -> list[str]:
    """The classes/functions a torch.save file's pickle references, read without unpickling."""
    try:
        return archive.pickle_globals(path.read_bytes())
    except OSError:
        return []


def load_torch_save(
    path: Path, arch: str | None, trust_pickle: bool, input_shape: tuple[int, ...] | None
) -> LoadedModel:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        msg = str(exc)
        if "Weights only load failed" not in msg and "Unsupported global" not in msg:
            raise InputError(
                f"{path}: not a readable PyTorch file ({brief(exc)}); it is corrupt or "
                "truncated, or not a model; expected an ExportedProgram (.pt2), TorchScript, a state dict or .onnx"
            ) from exc
        if not trust_pickle:
            refs = _pickle_globals(path)
            what = f" (it references {', '.join(refs[:4])})" if refs else ""
            raise UnsafeInputError(
                f"{path}: holds pickled Python objects{what}, not plain weights; unpickling "
                "runs arbitrary code from the file. Better: save model.state_dict() and pass "
                "--arch, or save an ExportedProgram with torch.export.save. If you trust the "
                "file, opt in with --trust-pickle (trust_pickle=True)"
            ) from exc
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise InputError(
                f"{path}: unpickling failed ({brief(exc2)}); the classes it "
                "was saved with must be importable here (same module names), or save a "
                "state dict / ExportedProgram instead"
            ) from exc2
    if isinstance(obj, nn.Module):
        source: Source = "pickle"
        inputs = given_input(input_shape, path)
        return LoadedModel(obj.eval(), inputs, source, str(path), path.stem)
    if isinstance(obj, Mapping):
        return _load_state_dict(_unwrap_state_dict(obj, path), path, arch, input_shape)
    raise InputError(
        f"{path}: holds a {type(obj).__module__}.{type(obj).__qualname__}, not a model or a "
        "state dict; save model.state_dict(), an ExportedProgram (torch.export.save) or a "
        "TorchScript module"
    )
