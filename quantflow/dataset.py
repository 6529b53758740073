"""`Dataset`: inputs and optional labels, the unit calibration and evaluation data travel in."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dataset:
    """Inputs (N, ...) and optional labels; `name` says where they came from."""

    x: torch.Tensor
    y: torch.Tensor | None = None
    name: str = "data"
