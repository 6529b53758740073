"""The files of a TVM artifact: the manifest `TVMTarget.lower` writes next to the library, and
reading an artifact back from it (`quantflow profile model.so`).

The manifest (`manifest.json`, `manifest_fp32.json` for the FP32 baseline) records the inputs and
outputs (name, shape, dtype), the sha256 of every file and the lowering's `meta` (target string,
integer/float layers, `kernel_layers` for per-layer profiles, tuning record). A library is read
back only if its sha256 matches, so a profile never times a library other than the one lowered.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx

from quantflow.errors import InputError
from quantflow.targets.base import Artifact


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def io_specs(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Input/output name, shape, dtype (names are fx node names, as in the ONNX export)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    ins = [{"name": n.name, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
           for n, t in zip(placeholders, example_inputs)]
    with torch.no_grad():
        outs = gm(*example_inputs)
    outs_t = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    args = out_node.args[0]
    arg_list = list(args) if isinstance(args, (tuple, list)) else [args]
    names = [a.name if isinstance(a, fx.Node) else f"output_{i}" for i, a in enumerate(arg_list)]
    return ins, [{"name": nm, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
                 for nm, t in zip(names, outs_t)]


def write_manifest(path: Path, *, target: str, precision: str, inputs: list[dict[str, Any]],
                   outputs: list[dict[str, Any]], files: dict[str, str],
                   meta: dict[str, Any]) -> None:
    """The manifest of an artifact whose `files` are written: I/O specs, sha256 per file, meta."""
    manifest = {
        "target": target, "precision": precision, "inputs": inputs,
        "outputs": outputs,
        "sha256": {Path(p).name: sha256_file(Path(p)) for p in files.values()},
        "meta": meta,
    }
    path.write_text(json.dumps(manifest, indent=2, default=str) + "\n")


def load_artifact(path: str | Path) -> Artifact:
    """The host artifact `TVMTarget.lower` wrote, from its library (`model.so`,
    `model_fp32.so`), its manifest (`manifest*.json`) or the output directory (the quantized
    one). The library must match the manifest's sha256."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    if path.suffix == ".json":
        manifest_path = path
    else:
        manifests = [m for m in sorted(path.parent.glob("manifest*.json"))
                     if path.name in json.loads(m.read_text()).get("sha256", {})]
        if not manifests:
            raise InputError(f"{path}: no manifest*.json next to it lists this library; "
                             "fix: profile the directory `quantflow compile --target tvm` wrote")
        manifest_path = manifests[0]
    if not manifest_path.exists():
        raise InputError(f"{manifest_path} does not exist; fix: pass the library or manifest "
                         "written by `quantflow compile --target tvm`")
    try:
        manifest = json.loads(manifest_path.read_text())
        libs = [n for n in manifest["sha256"] if n.startswith("model") and n.endswith(".so")]
        inputs, outputs = manifest["inputs"], manifest["outputs"]
    except (ValueError, KeyError) as exc:
        raise InputError(f"{manifest_path}: not a quantflow TVM manifest ({exc})") from exc
    if len(libs) != 1:
        raise InputError(f"{manifest_path}: expected one model*.so in sha256, found {libs}")
    lib = manifest_path.parent / libs[0]
    if not lib.exists():
        raise InputError(f"{lib} (listed in {manifest_path}) does not exist")
    if sha256_file(lib) != manifest["sha256"][libs[0]]:
        raise InputError(f"{lib} does not match the sha256 in {manifest_path}; fix: re-run "
                         "`quantflow compile --target tvm` (the library was rebuilt or replaced)")
    return Artifact(target="tvm", precision=str(manifest.get("precision", "unknown")),
                    files={"model": str(lib), "manifest": str(manifest_path)},
                    input_names=tuple(i["name"] for i in inputs),
                    output_names=tuple(o["name"] for o in outputs),
                    meta={**manifest.get("meta", {}), "input_specs": inputs})
