"""Builders of hostile and broken model/data files for the corpus (tests/corpus/make_corpus.py).

Every code payload is a real one: a pickle whose `__reduce__` calls `eval` on Python that
writes a marker file (and, where the loader needs a value to carry on, evaluates to one), or
a symbolic size that sympy would `eval`. `test_archive.py` proves each one runs when handed to
torch's own loaders, so a corpus case that leaves no marker shows quantflow refused it.
"""

from __future__ import annotations

import builtins
import io
import json
import pickle
import struct

# the shared test networks live one folder up (tests/nets.py); this folder is on sys.path
# for the tests and for make_corpus.py, so put its parent there too
import sys as _sys
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

_sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nets import ConvPool

Members = dict[str, bytes]


class Payload:
    """Unpickling this runs `eval`: it writes `marker`, then evaluates to `ret` (Python)."""

    def __init__(self, marker: Path, ret: str = "None") -> None:
        self.marker, self.ret = str(marker), ret

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        code = f"(__import__('pathlib').Path({self.marker!r}).write_text('pwned'), {self.ret})[1]"
        return (builtins.eval, (code,))


def expr_payload(marker: Path) -> str:
    """A symbolic size that sympy.sympify would `eval` into writing `marker` (and 1)."""
    return f"__import__('pathlib').Path({str(marker)!r}).write_text('pwned') and 1"


# ---------------------------------------------------------------- models


class Net(ConvPool):
    """The corpus's healthy model: 3x8x8 in, 10 classes out."""


class LogNet(Net):
    """Finite weights, but log of a negative number: NaN activations from finite inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.log(torch.relu(self.c(x)).mean((2, 3)) - 100.0))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.c(image * mask).mean((2, 3))


class Wide(ConvPool):
    """64 channels at full resolution: activations far larger than the input."""

    def __init__(self) -> None:
        super().__init__(width=64)


def net(seed: int = 0, cls: type[nn.Module] = Net) -> nn.Module:
    torch.manual_seed(seed)
    return cls().eval()


def pt2(model: nn.Module, *example: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.export.save(torch.export.export(model, example), buf)
    return buf.getvalue()


def torch_bytes(obj: object, *, zip_format: bool = True) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=zip_format)
    return buf.getvalue()


# ---------------------------------------------------------------- archive surgery


def members(data: bytes) -> Members:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {i.filename: zf.read(i.filename) for i in zf.infolist()}


def zip_bytes(m: Members, compress: bool = False) -> bytes:
    buf = io.BytesIO()
    mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(buf, "w", mode) as zf:
        for k, v in m.items():
            zf.writestr(k, v)
    return buf.getvalue()


def key(m: Members, suffix: str) -> str:
    return next(k for k in m if k.endswith(suffix))


def root(m: Members) -> str:
    return next(iter(m)).split("/", 1)[0]


def edit(data: bytes, change: Callable[[Members], None]) -> bytes:
    m = members(data)
    change(m)
    return zip_bytes(m)


def edit_json(m: Members, suffix: str, change: Callable[[Any], None]) -> None:
    k = key(m, suffix)
    doc = json.loads(m[k])
    change(doc)
    m[k] = json.dumps(doc).encode()


# ---------------------------------------------------------------- hostile .pt2 archives


def pt2_sample_inputs(base: bytes, marker: Path) -> bytes:
    """Sample inputs torch reads weights-only, then silently with the full unpickler: the
    payload returns valid inputs, so without quantflow's check the load succeeds (exit 0)."""
    inputs = "((__import__('torch').randn(1, 3, 8, 8),), {})"
    return edit(base, lambda m: m.__setitem__(key(m, "sample_inputs/model.pt"),
                                              torch_bytes(Payload(marker, inputs))))


def pt2_pickled_weight(base: bytes, marker: Path) -> bytes:
    def change(m: Members) -> None:
        cfg_key = key(m, "model_weights_config.json")
        cfg = json.loads(m[cfg_key])
        first = next(iter(cfg["config"].values()))
        first["use_pickle"] = True
        m[cfg_key] = json.dumps(cfg).encode()
        m[f"{root(m)}/data/weights/{first['path_name']}"] = torch_bytes(Payload(marker))
    return edit(base, change)


def pt2_constant(base: bytes, marker: Path, path_name: str, blob: bytes) -> bytes:
    """A constant entry pointing at `blob` (pickled tensor, opaque or custom object)."""
    def change(m: Members) -> None:
        edit_json(m, "model_constants_config.json", lambda d: d["config"].__setitem__(
            "evil", {"path_name": path_name, "is_param": False, "use_pickle": True,
                     "tensor_meta": None}))
        m[f"{root(m)}/data/constants/{path_name}"] = blob
    return edit(base, change)


def pt2_sympy(base: bytes, marker: Path) -> bytes:
    """The input's batch size as a symbolic expression that is Python code."""
    def change(doc: Any) -> None:
        sizes = doc["graph_module"]["graph"]["tensor_values"]["x"]["sizes"]
        sizes[0] = {"as_expr": {"expr_str": expr_payload(marker), "hint": {"as_int": 1}}}
    return edit(base, lambda m: edit_json(m, "models/model.json", change))


def pt2_target(base: bytes, marker: Path) -> bytes:
    """A graph node that calls torch.save (writes the marker when the graph runs)."""
    node = {"target": "torch.save", "name": "evil", "metadata": {},
            "inputs": [{"name": "obj", "arg": {"as_tensor": {"name": "x"}}, "kind": 1},
                       {"name": "f", "arg": {"as_string": str(marker)}, "kind": 1}],
            "outputs": [{"as_none": True}], "is_hop_single_tensor_return": None}
    return edit(base, lambda m: edit_json(
        m, "models/model.json", lambda d: d["graph_module"]["graph"]["nodes"].insert(0, node)))


def pt2_aotinductor(base: bytes) -> bytes:
    """An AOTInductor package member: torch.export.load dlopens these."""
    return edit(base, lambda m: m.__setitem__(f"{root(m)}/data/aotinductor/model/evil.so",
                                              b"\x7fELF" + b"\0" * 60))


def pt2_legacy_weights(base: bytes, marker: Path) -> bytes:
    """The pre-config weights file, which torch prefers over the config when present."""
    return edit(base, lambda m: m.__setitem__(f"{root(m)}/data/weights/model.pt",
                                              torch_bytes(Payload(marker, "{}"))))


def pt2_old_layout(base: bytes, marker: Path) -> bytes:
    """torch <= 2.7's layout (torch.export.load still reads it): serialized_*.pt pickles."""
    m = members(base)
    graph = m[key(m, "models/model.json")]
    return zip_bytes({"version": b"8.13", "serialized_exported_program.json": graph,
                      "serialized_state_dict.pt": torch_bytes({}),
                      "serialized_constants.pt": torch_bytes({}),
                      "serialized_example_inputs.pt": torch_bytes(Payload(marker, "((), {})"))})


def pt2_stray_pickle(base: bytes, marker: Path) -> bytes:
    return edit(base, lambda m: m.__setitem__(f"{root(m)}/extra_payload.pkl",
                                              pickle.dumps(Payload(marker), protocol=4)))


def pt2_huge_input(base: bytes) -> bytes:
    """Declares a 1x3x100000x100000 input (120 GB as float32) without holding it."""
    def change(doc: Any) -> None:
        tv = doc["graph_module"]["graph"]["tensor_values"]["x"]
        tv["sizes"] = [{"as_int": v} for v in (1, 3, 100000, 100000)]
        tv["strides"] = [{"as_int": v} for v in (3 * 10**10, 10**10, 100000, 1)]
    return edit(base, lambda m: edit_json(m, "models/model.json", change))


def pt2_version(base: bytes) -> bytes:
    return edit(base, lambda m: m.__setitem__(key(m, "archive_version"), b"99"))


def pt2_json(base: bytes, text: bytes) -> bytes:
    return edit(base, lambda m: m.__setitem__(key(m, "models/model.json"), text))


# ---------------------------------------------------------------- other files


def torchscript_payload(model: nn.Module, marker: Path) -> bytes:
    """A traced module whose data.pkl is a payload (torch.jit.load's unpickler refuses it)."""
    buf = io.BytesIO()
    torch.jit.save(torch.jit.trace(model, torch.randn(1, 3, 8, 8)), buf)
    return edit(buf.getvalue(), lambda m: m.__setitem__(
        key(m, "/data.pkl"), pickle.dumps(Payload(marker), protocol=2)))


def png_bomb(width: int = 200_000, height: int = 200_000) -> bytes:
    """A tiny PNG whose header declares 40 gigapixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
            + chunk(b"IEND", b""))


def npz_bomb(mib: int) -> bytes:
    """A compressed .npz whose 'x' inflates to `mib` MiB of zeros."""
    import numpy as np

    buf = io.BytesIO()
    np.savez_compressed(buf, x=np.zeros((mib * 2**18 // 192, 3, 8, 8), np.float32))
    return buf.getvalue()
