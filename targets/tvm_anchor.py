"""A kernel's anchor: its reduction block(s), the part a tuning record is keyed on
(tvm_records). No other quantflow import (tvm_records and tvm_schedules both read it)."""

from __future__ import annotations

import hashlib
from typing import Any


def reduction_blocks(func: Any) -> list[Any]:
    import tvm_ffi
    from tvm.s_tir import SBlock

    found: list[Any] = []

    def visit(node: Any) -> None:
        if node.init is not None:
            found.append(node)

    tvm_ffi.structural_walk(func.body, [(SBlock, visit)], order="pre")
    return found


def anchor_key(func: Any) -> str | None:
    """A stable key of a kernel's reduction block(s) (None: an elementwise kernel). Used for
    the per-workload trial counts; the record lookup itself is MetaSchedule's."""
    import tvm_ffi

    blocks = reduction_blocks(func)
    if not blocks:
        return None
    h = hashlib.sha256()
    for b in blocks:
        h.update(str(tvm_ffi.structural_hash(b, map_free_vars=True)).encode())
    return h.hexdigest()[:20]
