"""What the fuzz tests feed and what counts as a crash (tests/test_fuzz.py).

A fuzz target takes a file and must end in one of its allowed outcomes: a result, or an
exception of an allowed class (a QuantflowError the CLI maps to a documented exit code; for
the plan parser, the ValueError the CLI turns into a usage error). Anything else — another
exception class, a hang, the payload marker appearing — is a finding.
"""

from __future__ import annotations

import io
import json
import random
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from quantflow.errors import QuantflowError

#: the kept corpus of interesting inputs, one folder per target
CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"


def load_model_target(path: Path) -> object:
    from quantflow.load import load_model

    return load_model(str(path))


def load_data_target(path: Path) -> object:
    from quantflow.data import load_tensor_data

    x, y = load_tensor_data(path, "imagenet", 64)
    # samples first: finite floats of any rank >= 2 (images, volumes, audio frames), or
    # non-negative int64 token ids
    assert x.dim() >= 2
    assert (x.dtype.is_floating_point and bool(x.isfinite().all())) or \
        (x.dtype == torch.int64 and bool((x >= 0).all()))
    assert y is None or (y.dim() == 1 and y.shape[0] == x.shape[0] and bool((y >= 0).all()))
    return x


def load_plan_target(path: Path) -> object:
    from quantflow.spec import QuantPlan

    plan = QuantPlan.load(path)
    assert QuantPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    return plan


def load_onnx_target(path: Path) -> object:
    from quantflow.targets.onnx_artifact import load_onnx_artifact

    return load_onnx_artifact(path, "ort")


@dataclass(frozen=True)
class Target:
    name: str
    suffixes: tuple[str, ...]
    run: Callable[[Path], object]
    allowed: tuple[type[BaseException], ...] = (QuantflowError,)


TARGETS = {t.name: t for t in (
    Target("model", (".pt2", ".pt"), load_model_target),
    Target("data", (".npy", ".npz", ".pt"), load_data_target),
    Target("plan", (".json",), load_plan_target, (ValueError,)),
    Target("onnx", (".onnx",), load_onnx_target),
)}


# ---------------------------------------------------------------- mutations

INTERESTING = [b"\x00", b"\xff", b"\x80\x02", b"\x80\x05", b"PK\x03\x04", b"nan", b"-1",
               b"9" * 20, b"{", b"}", b"]", b"\"", b"cos\nsystem\n"]


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """A few byte-level edits: flips, inserts, deletes, truncation, chunk duplication."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(6)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            buf[min(pos, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[pos:pos] = rng.choice(INTERESTING)
        elif op == 2:
            del buf[pos:pos + rng.randint(1, 64)]
        elif op == 3:
            del buf[pos:]
        elif op == 4 and buf:
            n = rng.randint(1, 256)
            buf[pos:pos] = buf[max(0, pos - n):pos]
        else:
            buf[pos:pos + 1] = bytes([rng.randrange(256)])
    return bytes(buf)


def _mutate_json(doc: object, rng: random.Random) -> object:
    """Replace one scalar somewhere in `doc` by a hostile value."""
    values = [None, -1, 0, 2**63, 10**30, 1e308, "nan", "", "x" * 1000, [], {}, True,
              "__import__('os')", [[[[[]]]]], -(2**63)]
    nodes: list[tuple[object, object]] = []
    stack: list[object] = [doc]
    while stack:
        cur = stack.pop()
        items = cur.items() if isinstance(cur, dict) else enumerate(cur) \
            if isinstance(cur, list) else ()
        for k, v in items:
            nodes.append((cur, k))
            if isinstance(v, (dict, list)):
                stack.append(v)
    if nodes:
        owner, k = rng.choice(nodes)
        owner[k] = rng.choice(values)  # type: ignore[index]
    return doc


def mutate(data: bytes, rng: random.Random) -> bytes:
    """Structure-aware when `data` is a zip (a member's bytes or JSON is edited and the zip
    rebuilt, so the edit reaches torch's and numpy's parsers) or JSON; else byte-level."""
    if data[:4] == b"PK\x03\x04" and rng.random() < 0.8:
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                members = {i.filename: zf.read(i.filename) for i in zf.infolist()}
        except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError):
            return mutate_bytes(data, rng)
        if members:
            name = rng.choice(sorted(members))
            members[name] = mutate(members[name], rng)
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w") as out:
                for k, v in members.items():
                    out.writestr(k, v)
            return buf.getvalue()
    if data[:1] in (b"{", b"[") and rng.random() < 0.7:
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            return mutate_bytes(data, rng)
        return json.dumps(_mutate_json(doc, rng)).encode()
    return mutate_bytes(data, rng)


def outcome(target: Target, path: Path) -> str:
    """'ok' or 'ExceptionName: message shape' for an allowed outcome (used to tell new
    behaviour apart); raises for a finding."""
    try:
        target.run(path)
    except target.allowed as exc:
        text = re.sub(r"\d+", "N", str(exc).replace(str(path), "PATH"))
        return f"{type(exc).__name__}: {text[:60]}"
    return "ok"
