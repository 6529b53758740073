"""Fuzzing the loaders (model files, data files, archives), the plan parser and the CLI flags.

Default suite: hypothesis properties (bounded examples) and a replay of the kept corpus in
tests/fuzz_corpus/. Slow suite: a time-bounded mutation fuzz of real files through every
loader (structure-aware: zip members and JSON documents are mutated and re-packed), with a
per-input timeout; inputs that show new behaviour are added to tests/fuzz_corpus/ (capped), a
crash is saved there under crashes/ and fails the run. No crash, no traceback, no hang.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import signal
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from quantflow.archive import _unsafe_expr
from quantflow.cli import main
from quantflow.errors import QuantflowError
from quantflow.spec import CALIBRATORS, GRANULARITIES, LayerPlan, QSpec, QuantPlan

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "corpus"))
import payloads as pl
from fuzz_targets import CORPUS, TARGETS, mutate, outcome
from make_corpus import MARKER

PROPS = settings(max_examples=40, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture,
                                        HealthCheck.too_slow])


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("seeds")
    marker = d / MARKER
    base = pl.pt2(pl.net(), torch.randn(1, 3, 8, 8))
    return {"dir": d, "marker": marker, "base": base, "members": pl.members(base),
            "blobs": [pl.torch_bytes(pl.Payload(marker, "((), {})")),
                      pl.torch_bytes({"x": torch.randn(2, 3, 8, 8)}),
                      json.dumps({"config": {"w": {"path_name": "opaque_obj_0",
                                                   "use_pickle": True}}}).encode(),
                      b"{}", b"", b"\x80\x05K\x01.", b"PK\x03\x04"]}


# ---------------------------------------------------------------- archives and models


@PROPS
@given(data=st.data())
def test_archive_loader_never_crashes(seeds: dict[str, Any], data: st.DataObject) -> None:
    """Any zip built from a real archive's members, payloads and mutations of both: a model
    or a QuantflowError, and never the payload's marker."""
    members: dict[str, bytes] = dict(seeds["members"])
    names = sorted(members)
    for _ in range(data.draw(st.integers(1, 4))):
        name = data.draw(st.sampled_from(
            [*names, f"{pl.root(members)}/data/sample_inputs/model.pt", "x/evil.pkl"]))
        blob = data.draw(st.sampled_from([*seeds["blobs"], members.get(name, b"")]))
        if data.draw(st.booleans()):
            blob = mutate(blob, random.Random(data.draw(st.integers(0, 2**32))))
        members[name] = blob
    if data.draw(st.booleans()):
        members.pop(data.draw(st.sampled_from(names)), None)
    path = seeds["dir"] / "a.pt2"
    path.write_bytes(pl.zip_bytes(members, compress=data.draw(st.booleans())))
    try:
        TARGETS["model"].run(path)
    except QuantflowError:
        pass
    assert not seeds["marker"].exists()


@PROPS
@given(text=st.one_of(st.text(max_size=200), st.lists(st.sampled_from(
    ["__import__", "(", ")", "'os'", ".", "system", "s0", "+", "*", "Pow", ",", "Integer",
     "9" * 30, "lambda", ":", "[", "]", "=", "True", "Symbol", "'s1'", "eval", "**", " ",
     "positive", "Mul", "8", "-", "__class__", "FloorDiv"]), max_size=25).map("".join)))
def test_symbolic_size_checker(text: str) -> None:
    """Total (never raises) and never admits what sympy would run: no dunder, attribute,
    call outside the allow-list, lambda, subscript or pow operator."""
    why = _unsafe_expr(text)
    if why is None:
        for bad in ("__", "lambda", "eval", "system", "[", "**", ":"):
            assert bad not in text, text


# ---------------------------------------------------------------- data


_DTYPES = st.sampled_from([np.float16, np.float32, np.float64, np.int32, np.uint8, np.bool_,
                           np.complex64])


@PROPS
@given(arr=hnp.arrays(_DTYPES, hnp.array_shapes(min_dims=0, max_dims=5, max_side=4)),
       labels=st.one_of(st.none(), hnp.arrays(np.int64, st.integers(0, 6),
                                              elements=st.integers(-3, 20))),
       fmt=st.sampled_from(["npy", "npz", "pt", "pt-tuple"]))
def test_data_loader_never_crashes(seeds: dict[str, Any], arr: np.ndarray,
                                   labels: np.ndarray | None, fmt: str) -> None:
    """Any array of any dtype/shape (NaN, Inf, empty, scalar) in every format: finite 4-D
    float samples with matching non-negative labels, or a DataError."""
    path = seeds["dir"] / f"d.{fmt.split('-')[0]}"
    if fmt == "npy":
        np.save(path, arr)
    elif fmt == "npz":
        np.savez(path, x=arr, **({"y": labels} if labels is not None else {}))
    elif fmt == "pt":
        torch.save({"x": torch.from_numpy(np.array(arr)), "y": None if labels is None
                    else torch.from_numpy(labels)}, path)
    else:
        torch.save((torch.from_numpy(np.array(arr)), torch.from_numpy(
            labels if labels is not None else np.zeros(0, np.int64))), path)
    try:
        TARGETS["data"].run(path)
    except QuantflowError:
        pass


@PROPS
@given(blob=st.binary(max_size=2048), suffix=st.sampled_from([".npy", ".npz", ".pt", ".png"]))
def test_data_loader_random_bytes(seeds: dict[str, Any], blob: bytes, suffix: str) -> None:
    path = seeds["dir"] / f"r{suffix}"
    path.write_bytes(blob)
    try:
        TARGETS["data"].run(path)
    except QuantflowError:
        pass


# ---------------------------------------------------------------- plans and configs

_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=20)
_QSPEC = st.builds(QSpec, bits=st.just(8), signed=st.just(True), symmetric=st.booleans(),
                   granularity=st.sampled_from(GRANULARITIES), axis=st.integers(0, 3),
                   calibrator=st.sampled_from(CALIBRATORS),
                   percentile=st.floats(50.01, 100.0))
_LAYER = st.builds(LayerPlan, st.none() | _QSPEC, st.none() | _QSPEC)


@PROPS
@given(doc=st.one_of(_JSON, st.fixed_dictionaries(
    {"format": st.just("quantflow.QuantPlan/1"), "default": _JSON | st.just({}),
     "layers": _JSON, "equalize": _JSON})))
def test_plan_parser_total(doc: Any) -> None:
    """Any JSON document: a plan that round-trips, or a ValueError naming what is wrong."""
    try:
        plan = QuantPlan.from_dict(doc)
    except ValueError as exc:
        assert str(exc)
        return
    assert QuantPlan.from_dict(plan.to_dict()) == plan


@PROPS
@given(default=_LAYER, layers=st.dictionaries(st.text(min_size=1, max_size=10), _LAYER,
                                               max_size=4),
       equalize=st.booleans(), bias=st.booleans())
def test_valid_plans_round_trip(tmp_path_factory: pytest.TempPathFactory, default: LayerPlan,
                                layers: dict[str, LayerPlan], equalize: bool,
                                bias: bool) -> None:
    plan = QuantPlan(default=default, layers=layers, equalize=equalize, bias_correction=bias)
    path = tmp_path_factory.getbasetemp() / "plan.json"
    plan.save(path, compiled={"device": "portable"})
    assert QuantPlan.load(path) == plan


# ---------------------------------------------------------------- CLI flags

_NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 10**6),
                     st.sampled_from(["nan", "inf", "-inf", "1e309", "0x10", "", "1,5", "-0"]))
#: flag -> whether a value is valid (then the run proceeds to the missing model: exit 3)
_FLAGS = {
    "--max-drop": lambda v: math.isfinite(v) and 0 <= v <= 100,
    "--max-latency": lambda v: math.isfinite(v) and v > 0,
    "--max-size": lambda v: math.isfinite(v) and v > 0,
    "--calib-samples": lambda v: v >= 1,
    "--eval-samples": lambda v: v >= 1,
    "--profile-runs": lambda v: v >= 1,
    "--threads": lambda v: v >= 1,
    "--tune-trials": lambda v: v >= 0,
}


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


@PROPS
@given(flag=st.sampled_from(sorted(_FLAGS)), value=_NUMBERS)
def test_numeric_flags(seeds: dict[str, Any], flag: str, value: Any,
                       capsys: pytest.CaptureFixture[str]) -> None:
    """Every value: exit 2 (argparse or validation) unless it is valid, then the run goes on
    to the (missing) model file: exit 3. -o is never created; no traceback."""
    out = seeds["dir"] / "o"
    extra = ["--target", "tvm"] if flag == "--tune-trials" else []
    code = _run(["compile", str(seeds["dir"] / "missing.pt2"), "--calib", "x.npy", *extra,
                 flag, str(value), "-o", str(out)])
    err = capsys.readouterr().err
    assert code in (2, 3) and "Traceback" not in err
    assert not out.exists()
    if code == 3:
        number = float(str(value))
        assert _FLAGS[flag](number), (flag, value)


@PROPS
@given(shape=st.one_of(st.text(max_size=30), st.lists(st.integers(-2, 10**7), max_size=10)
                       .map(lambda v: ",".join(map(str, v)))))
def test_input_shape_flag(seeds: dict[str, Any], shape: str,
                          capsys: pytest.CaptureFixture[str]) -> None:
    code = _run(["optimize", str(seeds["dir"] / "missing.pt2"), "--input-shape", shape,
                 "-o", str(seeds["dir"] / "o2")])
    assert code in (2, 3) and "Traceback" not in capsys.readouterr().err


# ---------------------------------------------------------------- the kept corpus


def _kept() -> Iterator[tuple[str, Path]]:
    """(target, file) for the kept inputs, and for any crash a fuzz run saved (a crash that
    was fixed stays as a regression test)."""
    for name in sorted(TARGETS):
        for folder in (CORPUS / name, CORPUS / "crashes" / name):
            if folder.is_dir():
                for f in sorted(folder.iterdir()):
                    if f.is_file():
                        yield name, f


@pytest.mark.parametrize(("target", "path"), list(_kept()),
                         ids=[f"{p.parent.name}-{p.name}" for _, p in _kept()])
def test_kept_corpus_replays_cleanly(target: str, path: Path) -> None:
    """Inputs an earlier fuzz run found interesting still end in an allowed outcome."""
    assert outcome(TARGETS[target], path)


# ---------------------------------------------------------------- bounded mutation fuzz

#: seconds per target ($QUANTFLOW_FUZZ_SECONDS), inputs kept per target, largest kept
#: input, seconds one input may take before it counts as a hang
FUZZ_SECONDS = float(os.environ.get("QUANTFLOW_FUZZ_SECONDS", "60"))
KEEP_PER_TARGET, KEEP_MAX_BYTES, INPUT_TIMEOUT = 25, 64 * 1024, 30


def _seed_files(tmp: Path) -> dict[str, list[bytes]]:
    from make_corpus import write

    write(tmp)
    names = {"model": ["net.pt2", "sample_inputs.pt2", "sympy_expr.pt2", "whole_module.pt",
                       "huge_input.pt2", "old_layout.pt2", "two_inputs.pt2"],
             "data": ["calib.npy", "labels_1000.npz", "payload_data.pt", "calib_nan.npy"],
             "plan": ["ghost_layers.json", "wrong_types.json"],
             "onnx": ["net.onnx"]}
    return {k: [(tmp / n).read_bytes() for n in v] for k, v in names.items()}


class _Hang(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise _Hang()


@pytest.mark.slow
@pytest.mark.parametrize("target_name", sorted(TARGETS))
def test_mutation_fuzz(target_name: str, tmp_path: Path) -> None:
    target = TARGETS[target_name]
    seeds = _seed_files(tmp_path / "seeds")[target_name]
    keep = CORPUS / target_name
    keep.mkdir(parents=True, exist_ok=True)
    seeds += [f.read_bytes() for f in sorted(keep.iterdir()) if f.is_file()]
    seen = {outcome(target, _write(tmp_path, target, s, i)) for i, s in enumerate(seeds)}
    rng = random.Random(0)
    old = signal.signal(signal.SIGALRM, _alarm)
    deadline, tried = time.monotonic() + FUZZ_SECONDS, 0
    try:
        while time.monotonic() < deadline:
            data = mutate(rng.choice(seeds), rng)
            path = _write(tmp_path, target, data, tried)
            tried += 1
            signal.alarm(INPUT_TIMEOUT)
            try:
                result = outcome(target, path)
            except BaseException as exc:
                saved = _save(CORPUS / "crashes" / target_name, data, path.suffix)
                if isinstance(exc, _Hang):
                    pytest.fail(f"{target_name}: hang over {INPUT_TIMEOUT}s on {saved}")
                raise AssertionError(f"{target_name}: {type(exc).__name__} on {saved}") from exc
            finally:
                signal.alarm(0)
            assert not (tmp_path / "seeds" / MARKER).exists(), f"payload ran: {path}"
            if result not in seen:
                seen.add(result)
                if len(data) <= KEEP_MAX_BYTES and \
                        sum(1 for _ in keep.iterdir()) < KEEP_PER_TARGET:
                    _save(keep, data, path.suffix)
                    seeds.append(data)
    finally:
        signal.signal(signal.SIGALRM, old)
    assert tried > 0


def _write(tmp: Path, target: Any, data: bytes, i: int) -> Path:
    suffix = target.suffixes[i % len(target.suffixes)]
    if data[:4] == b"PK\x03\x04" and ".pt2" in target.suffixes:
        suffix = ".pt2"
    elif data[:6] == b"\x93NUMPY":
        suffix = ".npy"
    path = tmp / f"in{i % 8}{suffix}"
    path.write_bytes(data)
    return path


def _save(folder: Path, data: bytes, suffix: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(data).hexdigest()[:16]}{suffix}"
    path.write_bytes(data)
    return path


def test_mutate_is_deterministic_and_keeps_zips_readable() -> None:
    base = pl.pt2(pl.net(), torch.randn(1, 3, 8, 8))
    a, b = mutate(base, random.Random(3)), mutate(base, random.Random(3))
    assert a == b
    readable = 0
    for seed in range(20):
        try:
            with zipfile.ZipFile(io.BytesIO(mutate(base, random.Random(seed)))) as zf:
                readable += bool(zf.namelist())
        except zipfile.BadZipFile:
            pass
    assert readable >= 10  # structure-aware: most mutants still reach torch's parsers
