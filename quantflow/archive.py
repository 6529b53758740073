"""Inspect a torch.export `.pt2` archive before `torch.export.load` touches it.

`torch.export.load` is not a safe loader (its own docstring says so). Reading this torch's
loader (torch/export/pt2_archive/_package.py, torch/_export/serde/serialize.py), code from
the file runs through:

1. weights and tensor constants whose config entry says ``use_pickle``: `torch.load(...,
   weights_only=False)`;
2. opaque constants (``opaque_obj_*``): `pickle.loads`; custom objects (``custom_obj_*``):
   TorchScript's unpickler for torchbind classes;
3. sample inputs (``data/sample_inputs/<model>.pt``), legacy weight/constant files and the
   pre-2.8 layout's ``serialized_*.pt``: `torch.load` with ``weights_only=True``, and on
   failure *silently retried* with ``weights_only=False``;
4. symbolic sizes (``expr_str`` in the graph JSON): `sympy.sympify`, which `eval`s the string
   with Python's builtins in scope (``__import__('os').system(...)`` runs), and would never
   finish an integer tower like ``Pow(Integer(9**9), Integer(9**9))``;
5. ``data/aotinductor/``: shared libraries that are dlopen'ed.

`inspect_archive` finds each of those without unpickling or evaluating anything: configs and
graph JSON are parsed as JSON, expressions are checked on their syntax tree (`ast`, never
run) against sympy's constructors and torch's size functions, and the
pickles torch would first try with ``weights_only=True`` are tried here the same way (torch's
restricted unpickler admits tensors and plain containers only), so an archive that passes
never reaches torch's fallback. Graph nodes must call ATen-level operators (torch's verifier
also insists on OpOverloads; checking here names the node). `check_archive` turns findings
into an `UnsafeInputError` (exit 3) unless the user passed --trust-pickle.
"""

from __future__ import annotations

import ast
import io
import json
import logging
import pickletools
import re
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quantflow import resources
from quantflow.errors import InputError, UnsafeInputError

log = logging.getLogger("quantflow.archive")

#: operator namespaces a graph node may call: ATen and its decompositions, Q/DQ, torch's
#: higher-order ops, and the Python operators torch.export uses for symbolic sizes
SAFE_TARGET_PREFIXES = ("torch.ops.aten.", "torch.ops.prims.", "torch.ops.quantized_decomposed.",
                        "torch.ops.higher_order.", "_operator.", "math.", "torch.sym_")
#: ATen operators that reach outside the process (aten.from_file maps a file into a tensor)
UNSAFE_TARGETS = ("torch.ops.aten.from_file",)
#: functions a symbolic size may call: sympy's constructors as torch serializes them (srepr:
#: `Mul(Integer(2), Symbol('s0', positive=True, integer=True))`), the functions torch's
#: deserializer registers, comparisons and logic
SAFE_EXPR_CALLS = frozenset({
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Abs",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality", "StrictLessThan", "LessThan",
    "StrictGreaterThan", "GreaterThan", "And", "Or", "Not", "Piecewise", "ExprCondPair",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt",
    "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv",
    "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt",
    "RoundToInt", "RoundDecimal", "ToFloat", "Identity",
})
SAFE_EXPR_NAMES = frozenset({"oo", "zoo", "nan", "true", "false", "S"})
#: integer towers never finish (Pow(Integer(9**9), Integer(9**9))): powers are capped
_POW_CALLS = frozenset({"Pow", "PowByNatural", "FloatPow"})
MAX_EXPONENT, MAX_POWERS = 8, 4
_SYMBOL = re.compile(r"[a-z]{1,5}[0-9]{1,9}\Z")
_SAFE_AST = (ast.Expression, ast.Call, ast.Name, ast.Load, ast.Constant, ast.keyword,
             ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp, ast.Add, ast.Sub, ast.Mult,
             ast.Div, ast.FloorDiv, ast.Mod, ast.USub, ast.UAdd, ast.Not, ast.Invert, ast.Lt,
             ast.LtE, ast.Gt, ast.GtE, ast.Eq, ast.NotEq, ast.And, ast.Or, ast.BitAnd,
             ast.BitOr)
#: what Python's zipfile raises for a hostile or damaged zip (besides BadZipFile: undecodable
#: names, unknown compression methods, encryption, inflate errors, truncation)
ZIP_ERRORS: tuple[type[Exception], ...] = (
    zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError,
    NotImplementedError, RuntimeError, zlib.error)
#: longest symbolic size accepted (real ones are a few dozen to a few hundred characters)
MAX_EXPR = 2000


@dataclass(frozen=True)
class Finding:
    """One part of an archive that would run code when loaded."""

    member: str
    what: str

    def __str__(self) -> str:
        return f"{self.member}: {self.what}"


def pickle_globals(data: bytes) -> list[str]:
    """The classes/functions a pickle (or a torch.save zip's data.pkl) names, read with
    pickletools (no unpickling); torch's own rebuild helpers are left out."""
    try:
        if data[:4] == b"PK\x03\x04":
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                name = next(n for n in zf.namelist() if n.endswith("data.pkl"))
                data = zf.read(name)
        found: list[str] = []
        strings: list[str] = []
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # noqa: BLE001 - only decorates a message; never worth failing
        return []
    boring = ("torch._utils.", "collections.", "torch.serialization.", "torch.FloatStorage",
              "torch.LongStorage")
    return list(dict.fromkeys(g for g in found if not g.startswith(boring)))


def _needs_full_unpickler(data: bytes) -> str | None:
    """None when torch's weights-only unpickler reads `data`; else why not (the globals the
    pickle references, or the unpickler's complaint)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means torch would fall back
        refs = pickle_globals(data)
        if refs:
            return f"references {', '.join(refs[:4])}"
        first = str(exc).strip().splitlines()
        return f"not plain tensors ({type(exc).__name__}: {first[0][:160] if first else ''})"


def _exponent(node: ast.expr) -> int | None:
    """The value of `3` or `Integer(3)`, else None."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
            node.func.id == "Integer" and len(node.args) == 1:
        node = node.args[0]
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    return None


def _unsafe_expr(expr: str) -> str | None:
    """None when `expr` is a plain symbolic size (checked on its syntax tree, never run);
    else what is wrong with it. sympy `eval`s these strings with Python's builtins in scope."""
    if len(expr) > MAX_EXPR:
        return f"a {len(expr)}-character expression"
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        return f"not an expression ({type(exc).__name__})"
    powers = 0
    for node in ast.walk(tree):
        if not isinstance(node, _SAFE_AST):
            return f"{type(node).__name__} is not part of a symbolic size"
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else None
            if name not in SAFE_EXPR_CALLS:
                return f"calls {ast.unparse(node.func)[:40]!r}"
            if name in _POW_CALLS:
                powers += 1
                e = _exponent(node.args[1]) if len(node.args) == 2 else None
                if e is None or abs(e) > MAX_EXPONENT or powers > MAX_POWERS:
                    return "a power too large for a tensor size"
        elif isinstance(node, ast.Name) and not (
                node.id in SAFE_EXPR_CALLS or node.id in SAFE_EXPR_NAMES
                or _SYMBOL.match(node.id)):
            return f"{node.id!r} is not part of a symbolic size"
        elif isinstance(node, ast.keyword) and not (
                node.arg and node.arg.isidentifier() and not node.arg.startswith("_")
                and isinstance(node.value, ast.Constant) and type(node.value.value) is bool):
            return f"keyword {node.arg!r} is not a sympy assumption"
        elif isinstance(node, ast.Constant):
            v = node.value
            if type(v) is str and not _SYMBOL.match(v):
                return f"string {v[:40]!r} is not a size symbol"
            if type(v) is int and abs(v) > 2**64:
                return "an integer larger than any tensor size"
            if type(v) not in (int, float, bool, str):
                return f"a {type(v).__name__} constant"
    return None


def _walk(obj: Any) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """(key, value, owner) for every key in a JSON document, depth first, without recursion
    (a hostile document can nest deeper than Python's stack)."""
    stack = [obj]
    while stack:
        cur = stack.pop()
        if isinstance(cur, dict):
            for k, v in cur.items():
                yield k, v, cur
                if isinstance(v, (dict, list)):
                    stack.append(v)
        elif isinstance(cur, list):
            stack.extend(v for v in cur if isinstance(v, (dict, list)))


def _graph_findings(member: str, doc: Any) -> list[Finding]:
    found = []
    for key, value, owner in _walk(doc):
        if key == "expr_str" and isinstance(value, str):
            why = _unsafe_expr(value)
            if why:
                found.append(Finding(member, f"symbolic size {value[:80]!r} would be evaluated "
                                     f"as Python by sympy ({why})"))
        elif key == "target" and isinstance(value, str) and "inputs" in owner and (
                not value.startswith(SAFE_TARGET_PREFIXES) or value.startswith(UNSAFE_TARGETS)):
            name = owner.get("name") or "?"
            found.append(Finding(member, f"node {name!r} calls {value[:80]!r}, which is not "
                                 "an ATen operator"))
    return found


def _json(zf: zipfile.ZipFile, member: str) -> Any:
    try:
        return json.loads(zf.read(member))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise InputError(f"{zf.filename}: archive entry {member} is not valid JSON "
                         f"({type(exc).__name__}: {str(exc)[:120]}); "
                         "the file is corrupt; save it again with torch.export.save") from exc


def _config_findings(zf: zipfile.ZipFile, member: str, kind: str) -> list[Finding]:
    """Entries of a weights/constants config that torch would unpickle."""
    doc = _json(zf, member)
    entries = doc.get("config") if isinstance(doc, dict) else None
    if not isinstance(entries, dict):
        raise InputError(f"{zf.filename}: archive entry {member} has no 'config' mapping; the "
                         "file is corrupt; save it again with torch.export.save")
    found = []
    for fqn, meta in entries.items():
        if not isinstance(meta, dict):
            continue
        path = str(meta.get("path_name", ""))
        if meta.get("use_pickle") or path.startswith(("opaque_obj_", "custom_obj_")):
            what = ("a pickled Python object" if path.startswith("opaque_obj_")
                    else "a pickled TorchScript custom object" if path.startswith("custom_obj_")
                    else "pickled (a tensor subclass, read with the full unpickler)")
            found.append(Finding(f"{member.rsplit('/', 1)[0]}/{path}", f"{kind} {fqn!r} is {what}"))
    return found


def inspect_archive(path: Path) -> list[Finding]:
    """Everything in the `.pt2` at `path` that `torch.export.load` would run as code.
    Raises InputError for a file that is not a readable zip, ResourceError for one whose
    contents would not fit in memory."""
    try:
        zf = zipfile.ZipFile(path)
    except ZIP_ERRORS as exc:
        raise InputError(f"{path}: not a readable .pt2 archive ({exc}); the file is corrupt or "
                         "truncated; save it again with torch.export.save") from exc
    with zf:
        infos = zf.infolist()
        resources.check_alloc(sum(i.file_size for i in infos),
                              f"{path}: the archive's {len(infos)} entries",
                              "this is not a model this machine can load (a damaged or hostile "
                              "archive declares more data than it holds)")
        # the reader addresses entries relative to the archive's top folder
        rel = {i.filename: i.filename.split("/", 1)[1] if "/" in i.filename else i.filename
               for i in infos if not i.is_dir()}
        found: list[Finding] = []
        try:
            for full, r in rel.items():
                if r.startswith("data/aotinductor/"):
                    found.append(Finding(full, "AOTInductor compiled code (a shared library "
                                         "torch.export.load would load and run)"))
                elif (r.startswith("models/") and r.endswith(".json")
                      or r == "serialized_exported_program.json"):
                    found += _graph_findings(full, _json(zf, full))
                elif r.endswith(("_weights_config.json", "_constants_config.json")):
                    kind = "weight" if r.endswith("_weights_config.json") else "constant"
                    found += _config_findings(zf, full, kind)
            for full, r in rel.items():
                # sample inputs, legacy weight/constant files and serialized_*.pt go through
                # torch.load(weights_only=True) with a silent weights_only=False retry; a
                # raw record may never claim such a name, so these are always checked
                torch_loads = r.startswith("data/sample_inputs/") or r.endswith((".pt", ".pkl"))
                if not torch_loads and not _looks_pickled(zf, full, r):
                    continue
                why = _needs_full_unpickler(zf.read(full))
                if why:
                    found.append(Finding(full, f"pickled data that torch would unpickle with "
                                         f"weights_only=False ({why})"))
        except ZIP_ERRORS as exc:
            raise InputError(f"{path}: damaged archive ({exc}); save it again with "
                             "torch.export.save") from exc
    return found


def _looks_pickled(zf: zipfile.ZipFile, full: str, rel: str) -> bool:
    """An entry outside the known layout that starts like a pickle (protocol 2+ opcode) or a
    torch.save zip: torch ignores those today, but nothing pickled is let through."""
    known = rel.endswith((".json", "archive_format", "archive_version", "byteorder", "version",
                          "serialization_id")) or rel.startswith(("extra/", "data/weights/",
                                                                  "data/constants/"))
    if known:
        return False
    with zf.open(full) as fh:
        head = fh.read(4)
    return head[:1] == b"\x80" or head == b"PK\x03\x04"


def check_archive(path: Path, trust_pickle: bool) -> None:
    """Refuse (UnsafeInputError, exit 3) an archive that would run code, unless trusted."""
    found = inspect_archive(path)
    if not found:
        return
    listed = "; ".join(str(f) for f in found[:3]) + (f"; and {len(found) - 3} more"
                                                     if len(found) > 3 else "")
    if trust_pickle:
        log.warning("%s: loading with --trust-pickle although it holds code: %s", path, listed)
        return
    raise UnsafeInputError(
        f"{path}: refused: loading this archive would run code from it ({listed}). quantflow "
        "never runs code from a model file unless told to. Fix: export the model again with "
        "torch.export.save from plain tensors (no tensor subclasses, opaque or custom objects, "
        "AOTInductor packages), or save its state_dict and pass --arch; if you trust the file "
        "and its author, pass --trust-pickle")
