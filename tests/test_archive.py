""".pt2 inspection (quantflow.archive): every way a torch.export archive runs code is found
before torch sees the file; clean archives, dynamic shapes included, pass untouched.

Each payload is first shown to be live: torch's own loader runs it (the marker appears). Then
quantflow refuses the same file (exit-3 error naming the archive entry, no marker), and runs
it only when told to with --trust-pickle."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from quantflow.errors import InputError, UnsafeInputError
from quantflow.load import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent / "corpus"))
import payloads as pl
from make_corpus import MARKER, write

#: payloads torch.export.load runs (the others are refused by torch itself, or ignored)
LIVE = ("sample_inputs", "pickled_weight", "pickled_constant", "opaque_object", "sympy_expr",
        "legacy_weights", "old_layout")
#: (file, archive entry the error must name)
REFUSED = {"sample_inputs": "sample_inputs/model.pt", "pickled_weight": "weights/weight_0",
           "pickled_constant": "constants/tensor_9", "opaque_object": "opaque_obj_0",
           "custom_object": "custom_obj_0", "sympy_expr": "models/model.json",
           "graph_target": "torch.save", "aotinductor": "aotinductor", "legacy_weights":
           "weights/model.pt", "old_layout": "serialized_example_inputs.pt",
           "stray_pickle": "extra_payload.pkl"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("archives")
    write(root)
    return root


@pytest.fixture()
def marker(corpus: Path) -> Iterator[Path]:
    m = corpus / MARKER
    m.unlink(missing_ok=True)
    yield m
    m.unlink(missing_ok=True)


@pytest.mark.parametrize("name", LIVE)
def test_payload_is_live_under_torch(corpus: Path, marker: Path, name: str) -> None:
    logging.disable(logging.CRITICAL)
    try:
        torch.export.load(str(corpus / f"{name}.pt2"))
    except Exception:  # noqa: BLE001, S110 - some fail after running the payload; the point
        pass
    finally:
        logging.disable(logging.NOTSET)
    assert marker.exists(), f"{name}: the payload should run under torch.export.load"


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_without_trust(corpus: Path, marker: Path, name: str) -> None:
    path = corpus / f"{name}.pt2"
    with pytest.raises(UnsafeInputError) as exc:
        load_model(str(path))
    msg = str(exc.value)
    assert str(path) in msg and REFUSED[name] in msg and "--trust-pickle" in msg
    assert exc.value.exit_code == 3
    assert not marker.exists()


def test_trust_pickle_is_the_only_way_in(corpus: Path, marker: Path) -> None:
    """--trust-pickle means what it says: the sample inputs' payload runs and the model loads
    (the payload returns valid inputs, which is why this used to pass silently with exit 0)."""
    loaded = load_model(str(corpus / "sample_inputs.pt2"), trust_pickle=True)
    assert marker.exists() and loaded.source == "exported-program"


class _Dyn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.register_buffer("scale", torch.full((8,), 0.5))
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.adaptive_avg_pool2d(torch.relu(self.c(x)) * self.scale[:, None, None],
                                              4)
        return self.fc(y.reshape(y.shape[0], -1))[: x.shape[0] // 1]


def test_clean_archives_pass(tmp_path: Path) -> None:
    """Dynamic batch and spatial sizes (sympy expressions with powers), buffers, constants."""
    from quantflow.archive import inspect_archive

    b, h = torch.export.Dim("b", max=1024), torch.export.Dim("h", min=4, max=64)
    ep = torch.export.export(_Dyn().eval(), (torch.randn(4, 3, 16, 16),),
                             dynamic_shapes=({0: b, 2: 2 * h, 3: 2 * h},))
    path = tmp_path / "dyn.pt2"
    torch.export.save(ep, path)
    assert inspect_archive(path) == []
    loaded = load_model(str(path))
    assert loaded.example_inputs is not None


@pytest.mark.parametrize("expr", [
    "s0", "Symbol('s77', positive=True, integer=True)",
    "Mul(Integer(12), Pow(Symbol('s39', positive=True, integer=True), Integer(2)))",
    "FloorDiv(s0, 2) + Mod(s1, 4) - 1", "Max(1, s0)", "Eq(s0, 2) & Ne(s1, 3)", "-s0 + 3",
    "PowByNatural(s0, 2)", "2.5*s0", "CeilToInt(IntTrueDiv(s0, 3))"])
def test_symbolic_sizes_accepted(expr: str) -> None:
    from quantflow.archive import _unsafe_expr

    assert _unsafe_expr(expr) is None


@pytest.mark.parametrize("expr", [
    "__import__('os').system('true')", "s0.__class__", "eval('1')", "open('x')",
    "lambda: 1", "s0[0]", "Symbol('x; import os')", "Pow(Integer(99999), Integer(99999999))",
    "s0 ** 2", "Integer(2)*" * 200 + "1", "exec", "getattr(s0, 'x')", "Symbol('s0', evil=s0)",
    "Pow(Pow(Pow(Pow(Pow(s0, 8), 8), 8), 8), 8)", "(" * 500 + "s0" + ")" * 500, "5!",
    "preview(s0)", "sympify('1')", "S.true.__class__", "f'{1}'", "[s0 for s0 in (1,)]"])
def test_symbolic_sizes_refused(expr: str) -> None:
    from quantflow.archive import _unsafe_expr

    assert _unsafe_expr(expr) is not None


def test_damaged_archives_are_input_errors(corpus: Path) -> None:
    for name in ("truncated", "noise", "graph_not_json"):
        with pytest.raises(InputError) as exc:
            load_model(str(corpus / f"{name}.pt2"))
        assert type(exc.value) is not UnsafeInputError and name in str(exc.value)


def test_payload_builders_round_trip(tmp_path: Path) -> None:
    """The surgery helpers keep every member (so a refusal is about the payload only)."""
    from quantflow.archive import inspect_archive

    base = pl.pt2(pl.net(), torch.randn(1, 3, 8, 8))
    assert pl.members(pl.zip_bytes(pl.members(base))) == pl.members(base)
    path = tmp_path / "same.pt2"
    path.write_bytes(pl.zip_bytes(pl.members(base)))
    assert inspect_archive(path) == []
