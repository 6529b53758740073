"""Kernel call -> fx layer name for a lowered TVM module (read by per-layer profiles).

No torch import here (see tvm_tune).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import numpy as np


def kernel_layers(fused: Any, weights: list[tuple[np.ndarray, str]]) -> dict[str, str]:
    """Kernel call -> fx layer name, from the output of `fuse`.

    Keys are the VM's kernel names as `targets.tvm_profile.per_kernel_ms` reports them: the kernel
    name, then `#n` for its n-th call within one run (FuseOps shares one function between
    identical call sites, e.g. float convs of equal shape). Call sites are main's bindings in
    order, the order the VM executes them. A call is named after the layer whose weight
    (`tvm_frontend.LoweringStats.weights`; by content, since the importer binds parameters as
    new constants and FoldConstant transposes linear weights) it receives as a constant
    argument; a pad kernel whose output goes to exactly one named call is `<layer> (pad)`.
    Other kernels (pools, reshapes, standalone quantizes) are left out.
    """
    from tvm import relax
    from tvm.ir.expr import Constant

    by_content: dict[str, list[str]] = {}
    for w, label in weights:
        for arr in ((w, w.T) if w.ndim == 2 else (w,)):
            by_content.setdefault(_digest(arr), []).append(label)
    seen: dict[str, int] = {}
    out: dict[str, str] = {}
    sites: list[tuple[str, Any, list[Any]]] = []  # (key, output var, call arguments)
    for block in fused["main"].body.blocks:
        for binding in block.bindings:
            call = binding.value
            if not isinstance(call, relax.Call):
                continue
            if isinstance(call.op, relax.GlobalVar):
                gv, args = call.op, list(call.args)
            elif getattr(call.op, "name", "") == "relax.call_tir":
                gv, args = call.args[0], list(call.args[1].fields)
            else:
                continue
            name = str(gv.name_hint)
            n = seen.get(name, 0)
            seen[name] = n + 1
            key = f"{name}#{n}" if n else name
            sites.append((key, binding.var, args))
            for a in args:
                labels = by_content.get(_digest(a.value.numpy())) if isinstance(a, Constant) \
                    else None
                if labels:  # equal weights in two layers: first come, first named
                    out[key] = labels.pop(0)
                    break
    for key, var, _args in sites:
        if key in out or not re.search(r"(^|_)pad\d*(_|#|$)", key):
            continue
        users = [out[k] for k, _v, args in sites if k in out and any(a.same_as(var) for a in args)]
        if len(users) == 1:
            out[key] = f"{users[0]} (pad)"
    return out


def _digest(a: np.ndarray) -> str:
    arr = np.ascontiguousarray(a)
    return f"{arr.dtype}{arr.shape}" + hashlib.sha1(arr.tobytes()).hexdigest()
