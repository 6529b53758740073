"""Pipeline step 1, "Load": turn whatever model file the user has into an eval-mode `nn.Module`.

The next step (`quantflow.ir.capture`) runs `torch.export.export` on the module, so the
contract of this file is: the returned module runs in eager mode, is in eval mode, and can be
exported. Files are recognised by content, not by extension (a `.pt` may be TorchScript, a
state dict or a pickled module):

- ``zoo:NAME``: a model from `quantflow.zoo`; its input shape is known.
- ExportedProgram (``torch.export.save``; a zip with ``models/model.json``): inspected first
  (`quantflow.archive`: pickled weights/constants/sample inputs, AOTInductor libraries and
  symbolic sizes that sympy would `eval` are refused without ``trust_pickle``), then unlifted
  like `ir.unlift` (guards dropped, parameters as attributes); example inputs come from the
  placeholders' fake tensors, dynamic dimensions set to 1 (batch) or their example hint.
- TorchScript (``torch.jit.save``; a zip with ``code/__torch__*`` or ``constants.pkl``):
  `torch.export` refuses ScriptModules. With example inputs (``input_shape``) the archive is
  converted by torch's `TS2EPConverter` (names kept, `aten.convolution` rewritten to
  `aten.conv2d`/`conv1d` by the `canonical_convs` pass, the form the passes match). Without
  them the ScriptModule is wrapped so that a later `torch.export` traces through its
  interpreter; that works for scripted and traced modules, but weights become anonymous
  constants (and traced convs `aten._convolution`, which `canonical_convs`, first in the
  default pipeline, rewrites too), so pass ``input_shape`` for TorchScript when possible.
- state dict (a torch.save'd mapping of tensors, loaded with ``weights_only=True``, so no code
  runs) plus ``arch="module:factory"``: the factory builds the module, weights load strictly.
- a pickled whole module: unpickling runs code from the file, so it needs ``trust_pickle``.
- ``.onnx``: converted with `onnx2torch` when it is installed.

Every loaded model's floating-point parameters, buffers and constants must be finite, and
example inputs are priced against available memory before they are allocated
(`quantflow.resources`): a file may declare any shape.

Every failure is an `InputError` (or `UnsafeInputError`, `CaptureError` for a TorchScript
that cannot be converted, `ResourceError` for a shape that cannot fit) whose message names the
file and the fix.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import sys
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, fx, nn

from quantflow import archive, resources, validate
from quantflow.errors import CaptureError, InputError, UnsafeInputError
from quantflow.ir import unlift
from quantflow.passes.canonical import canonical_convs

log = logging.getLogger("quantflow.load")
aten = torch.ops.aten

Source = Literal["exported-program", "torchscript", "state-dict", "pickle", "zoo", "onnx"]

#: nesting keys under which training checkpoints commonly keep the state dict
_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")
#: how many offending keys an error message lists
_SHOW = 5


@dataclass(frozen=True)
class LoadedModel:
    """A loaded model. `example_inputs` is None when the file does not say what it takes."""

    module: nn.Module
    example_inputs: tuple[Tensor, ...] | None
    source: Source
    path: str
    name: str


# ---------------------------------------------------------------- example inputs


def _brief(exc: BaseException) -> str:
    """First line of a torch error (some span pages); the full one stays in the chain."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _example(shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
             where: str = "the model") -> Tensor:
    """A deterministic example input: values only steer tracing, never results. Priced
    first: a file or flag may declare any shape, and capture holds the input twice."""
    resources.check_alloc(2 * resources.tensor_bytes(shape, dtype),
                          f"{where}: an example input of shape {tuple(shape)}",
                          "pass a smaller --input-shape (batch first, e.g. 1,3,224,224)")
    if dtype.is_floating_point:
        gen = torch.Generator().manual_seed(0)
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.zeros(shape, dtype=dtype)


def _check_shape(shape: tuple[int, ...], where: str) -> tuple[int, ...]:
    if not shape or any(not isinstance(d, int) or d <= 0 for d in shape):
        raise InputError(
            f"{where}: input shape {shape} is invalid; pass positive sizes including the batch, "
            "e.g. --input-shape 1,3,224,224"
        )
    return tuple(shape)


def _given(input_shape: tuple[int, ...] | None, path: Path) -> tuple[Tensor, ...] | None:
    """The example input for an explicit `input_shape`, or None without one."""
    if not input_shape:
        return None
    return (_example(_check_shape(input_shape, str(path)), where=str(path)),)


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
        return (_example(_check_shape(tuple(input_shape), loaded.path), dtype,
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


def _placeholder_inputs(ep: torch.export.ExportedProgram, where: str
                       ) -> tuple[Tensor, ...] | None:
    """Example user inputs rebuilt from the placeholders' fake tensors (None if not tensors)."""
    from torch.export.graph_signature import InputKind, TensorArgument

    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    out: list[Tensor] = []
    for spec in ep.graph_signature.input_specs:
        if spec.kind != InputKind.USER_INPUT:
            continue
        if not isinstance(spec.arg, TensorArgument):
            return None  # a non-tensor input (int, None, ...) cannot be synthesised from shape
        val = nodes[spec.arg.name].meta.get("val")
        if not isinstance(val, Tensor):
            return None
        shape = tuple(_concrete_dim(ep, d, i) for i, d in enumerate(val.shape))
        out.append(_example(shape, val.dtype, f"{where} (as it declares)"))
    return tuple(out) if out else None


def _concrete_dim(ep: torch.export.ExportedProgram, dim: int | torch.SymInt, index: int) -> int:
    """Static dims as they are; a dynamic dim becomes 1 (batch) or its example hint, clamped
    into the range the program was exported for."""
    if isinstance(dim, int):
        return dim
    hint = dim.node.hint
    value = 1 if index == 0 or hint is None else int(hint)
    rng = ep.range_constraints.get(dim.node.expr)
    if rng is not None:
        # bounds are sympy numbers; an unbounded one is torch's int_oo, not an Integer
        if getattr(rng.lower, "is_Integer", False):
            value = max(value, int(rng.lower))
        if getattr(rng.upper, "is_Integer", False):
            value = min(value, int(rng.upper))
    return value


# ---------------------------------------------------------------- graph clean-up


def _plain_graph_module(ep: torch.export.ExportedProgram, path: str) -> fx.GraphModule:
    """`ir.unlift(ep)` re-wrapped as a plain GraphModule: `ep.module()` overrides `.eval()` to
    raise NotImplementedError, and `ir.capture` calls `.eval()`."""
    unlifted = unlift(ep)
    gm = fx.GraphModule(unlifted, unlifted.graph, class_name="LoadedGraphModule")
    _reject_training_graph(gm, path)
    return gm.eval()


def _reject_training_graph(gm: fx.GraphModule, path: str) -> None:
    """A graph captured in train mode computes batch statistics and random dropout; the mode is
    baked into the ops, so `.eval()` cannot fix it and quantizing it would be wrong."""
    for node in gm.graph.nodes:
        training = None
        if node.target == aten.batch_norm.default and len(node.args) > 5:
            training = node.args[5]
        elif node.target == aten.dropout.default and len(node.args) > 2:
            training = node.args[2]
        if training is True:
            raise InputError(
                f"{path}: node {node.name!r} ({node.target}) was captured in training mode; "
                "call model.eval() before torch.export/torch.jit.trace and save it again"
            )


# ---------------------------------------------------------------- per-format loaders


def _load_zoo(name: str, spec: str, input_shape: tuple[int, ...] | None) -> LoadedModel:
    zoo = importlib.import_module("quantflow.zoo")  # lazy: it imports every zoo architecture
    try:
        module = zoo.get_model(name)
    except KeyError as exc:
        raise InputError(f"{spec}: {exc.args[0] if exc.args else exc}") from exc
    except FileNotFoundError as exc:
        raise InputError(f"{spec}: {exc}") from exc
    shape = input_shape if input_shape is not None else (1, *zoo.MODELS[name].input_shape)
    example = _example(_check_shape(shape, spec), where=spec)
    return LoadedModel(module.eval(), (example,), "zoo", spec, name)


@contextlib.contextmanager
def _quiet_torch_export() -> Iterator[None]:
    """torch.export.load logs a full traceback at WARNING level before retrying a damaged
    archive in its pre-2.8 layout (and, with --trust-pickle, a warning whose format string
    is broken); the failure is reported here, once, without them."""
    loggers = [logging.getLogger(name) for name in ("torch.export", "torch._export")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _load_exported(path: Path, input_shape: tuple[int, ...] | None,
                   trust_pickle: bool = False) -> LoadedModel:
    # before torch sees the file: torch.export.load runs pickles and `eval`s expressions
    archive.check_archive(path, trust_pickle)
    try:
        with _quiet_torch_export():
            ep = torch.export.load(str(path))
    except Exception as exc:  # torch raises many types for a damaged archive
        raise InputError(
            f"{path}: cannot read the ExportedProgram ({_brief(exc)}); the file "
            "is corrupt or truncated, or was saved by an incompatible torch; save it again "
            "with torch.export.save"
        ) from exc
    try:
        gm = _plain_graph_module(ep, str(path))
    except InputError:
        raise
    except Exception as exc:  # a graph torch read but cannot rebuild as a module
        raise InputError(
            f"{path}: the ExportedProgram's graph cannot be rebuilt ({_brief(exc)}); save it "
            "again with torch.export.save"
        ) from exc
    if input_shape:
        inputs: tuple[Tensor, ...] | None = (
            _example(_check_shape(input_shape, str(path)), where=str(path)),)
    else:
        inputs = _placeholder_inputs(ep, str(path))
    return LoadedModel(gm, inputs, "exported-program", str(path), path.stem)


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
            f"{shapes} ({_brief(exc)}); check --input-shape, or export the "
            "original model with torch.export.save (or save its state_dict and pass --arch)"
        ) from exc
    gm = _plain_graph_module(ep, path)
    # here, not only in the pipeline: the loaded graph is what the report's "before the
    # passes" conv counts are taken from, and callers of load_model see conv2d/conv1d
    canonical_convs(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def _load_torchscript(path: Path, input_shape: tuple[int, ...] | None) -> LoadedModel:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.jit.load is deprecated": we convert it
            script = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise InputError(
            f"{path}: cannot read the TorchScript archive ({_brief(exc)}); the "
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
    inputs = (_example(_check_shape(input_shape, str(path)), where=str(path)),)
    gm = convert_torchscript(script, inputs, str(path))
    return LoadedModel(gm, inputs, "torchscript", str(path), path.stem)


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
            f"({_brief(exc)}); make it importable (run from its folder or add "
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
            f"({_brief(exc)}); point --arch at a function that needs none"
        ) from exc
    if not isinstance(module, nn.Module):
        raise InputError(
            f"{path}: --arch {arch!r} returned a {type(module).__name__}, not an nn.Module"
        )
    _check_keys(module, sd, path, arch)
    module.load_state_dict(sd, strict=True)
    inputs = _given(input_shape, path)
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


def _load_torch_save(
    path: Path, arch: str | None, trust_pickle: bool, input_shape: tuple[int, ...] | None
) -> LoadedModel:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        msg = str(exc)
        if "Weights only load failed" not in msg and "Unsupported global" not in msg:
            raise InputError(
                f"{path}: not a readable PyTorch file ({_brief(exc)}); it is corrupt or "
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
                f"{path}: unpickling failed ({_brief(exc2)}); the classes it "
                "was saved with must be importable here (same module names), or save a "
                "state dict / ExportedProgram instead"
            ) from exc2
    if isinstance(obj, nn.Module):
        source: Source = "pickle"
        inputs = _given(input_shape, path)
        return LoadedModel(obj.eval(), inputs, source, str(path), path.stem)
    if isinstance(obj, Mapping):
        return _load_state_dict(_unwrap_state_dict(obj, path), path, arch, input_shape)
    raise InputError(
        f"{path}: holds a {type(obj).__module__}.{type(obj).__qualname__}, not a model or a "
        "state dict; save model.state_dict(), an ExportedProgram (torch.export.save) or a "
        "TorchScript module"
    )


def _load_onnx(path: Path, input_shape: tuple[int, ...] | None) -> LoadedModel:
    if importlib.util.find_spec("onnx2torch") is None:
        raise InputError(
            f"{path}: ONNX input needs the onnx2torch converter: pip install onnx2torch "
            "(or pass the original PyTorch model: .pt2, TorchScript or state dict + --arch)"
        )
    import onnx
    import onnx2torch

    try:
        proto = onnx.load(str(path))
        module = onnx2torch.convert(proto)
    except Exception as exc:
        raise InputError(
            f"{path}: onnx2torch could not convert this model ({_brief(exc)}); "
            "pass the original PyTorch model instead"
        ) from exc
    if input_shape is None:
        # the first graph input's static dims; symbolic ones (dim_param) -> 1
        init = {i.name for i in proto.graph.initializer}
        first = next((i for i in proto.graph.input if i.name not in init), None)
        dims = first.type.tensor_type.shape.dim if first is not None else []
        input_shape = tuple(d.dim_value if d.dim_value > 0 else 1 for d in dims) or None
    inputs = _given(input_shape, path)
    return LoadedModel(module.eval(), inputs, "onnx", str(path), path.stem)


# ---------------------------------------------------------------- entry point


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
        "); expected an ExportedProgram (.pt2), TorchScript, a torch.save'd state dict or .onnx"
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
        input_shape = _check_shape(tuple(input_shape), path)
    if path.startswith("zoo:"):
        return _load_zoo(path[len("zoo:") :], path, input_shape)
    p = Path(path)
    if not p.exists():
        raise InputError(f"model file {p} does not exist; check the path (or use zoo:NAME)")
    if p.is_dir():
        raise InputError(
            f"{p} is a directory; pass the model file inside it (.pt2, .pt/.pth, .onnx)"
        )
    if p.stat().st_size == 0:
        raise InputError(f"{p} is empty (0 bytes); the save was interrupted, save it again")
    if p.suffix.lower() == ".onnx":
        return _load_onnx(p, input_shape)
    kind = _zip_kind(p)
    if arch is not None and kind in ("exported-program", "torchscript"):
        log.warning(
            "%s: is a %s, which carries its architecture; ignoring --arch %s", p, kind, arch
        )
    if kind == "exported-program":
        return _load_exported(p, input_shape, trust_pickle)
    if kind == "torchscript":
        return _load_torchscript(p, input_shape)
    if kind is None and not _is_legacy_torch_save(p):
        raise InputError(
            f"{p}: not a PyTorch file (neither a zip archive nor torch.save's legacy format); "
            "it is corrupt or truncated, or not a model; expected an ExportedProgram (.pt2), "
            "TorchScript, a torch.save'd state dict or .onnx"
        )
    return _load_torch_save(p, arch, trust_pickle, input_shape)
