"""What every loader returns (`LoadedModel`), and the example-input helpers they share.

Kept apart from `quantflow.load` (the dispatch) so that the per-format loaders and
`quantflow.validate` can name `LoadedModel` without importing the dispatch, which imports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from quantflow import resources
from quantflow.errors import InputError

Source = Literal["exported-program", "torchscript", "state-dict", "pickle", "zoo", "onnx"]


@dataclass(frozen=True)
class LoadedModel:
    """A loaded model. `example_inputs` is None when the file does not say what it takes."""

    module: nn.Module
    example_inputs: tuple[Tensor, ...] | None
    source: Source
    path: str
    name: str


def brief(exc: BaseException) -> str:
    """First line of a torch error (some span pages); the full one stays in the chain."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def example_input(shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
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


def check_shape(shape: tuple[int, ...], where: str) -> tuple[int, ...]:
    """`shape` as a tuple of positive sizes (batch included); else an InputError at `where`."""
    if not shape or any(not isinstance(d, int) or d <= 0 for d in shape):
        raise InputError(
            f"{where}: input shape {shape} is invalid; pass positive sizes including the batch, "
            "e.g. --input-shape 1,3,224,224"
        )
    return tuple(shape)


def given_input(input_shape: tuple[int, ...] | None, path: Path) -> tuple[Tensor, ...] | None:
    """The example input for an explicit `input_shape`, or None without one."""
    if not input_shape:
        return None
    return (example_input(check_shape(input_shape, str(path)), where=str(path)),)
