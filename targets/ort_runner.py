"""Run one ONNX model with onnxruntime on inputs from an .npz; write the outputs to an .npz.

A standalone script (numpy and onnxruntime only, no torch, no quantflow imports) so that it
starts quickly under an instruction-set emulator (`qemu-x86_64 -cpu Haswell`, `qemu-aarch64`),
where importing torch would take minutes. `quantflow.targets.emulate` calls it; it is also
what a user can copy to a device to check an artifact there:

  python ort_runner.py model.onnx inputs.npz outputs.npz [--outputs a,b,c] [--threads 1]

Inputs are matched to the model's inputs by name; `--outputs` selects outputs (default: all).
The session uses the same options as `targets/ort.py` (ORT_ENABLE_ALL, sequential) so the
same kernels run. It prints one JSON line with the onnxruntime version and machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Any

import numpy as np
import onnxruntime as ort


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("inputs")
    ap.add_argument("outputs")
    ap.add_argument("--outputs", dest="names", default="")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(args.model, so, providers=["CPUExecutionProvider"])
    with np.load(args.inputs) as data:
        feeds = {i.name: data[i.name] for i in sess.get_inputs()}
        # several runs in one call: the caller stacked each input on a new leading axis and
        # stored their count as `__runs__`, so the model still sees its own static shapes
        runs = int(data["__runs__"]) if "__runs__" in data.files else 0
    names = [n for n in args.names.split(",") if n] or [o.name for o in sess.get_outputs()]
    results: dict[str, list[np.ndarray]] = {n: [] for n in names}
    # typed Any: numpy's stubs reject a **dict[str, ndarray] that could name `allow_pickle`
    arrays: dict[str, Any]
    if runs:
        for r in range(runs):
            outs = sess.run(names, {k: v[r] for k, v in feeds.items()})
            for n, o in zip(names, outs):
                results[n].append(np.asarray(o))
        arrays = {n: np.stack(v) for n, v in results.items()}
    else:
        outs = sess.run(names, feeds)
        arrays = {n: np.asarray(o) for n, o in zip(names, outs)}
    np.savez(args.outputs, **arrays)
    print(json.dumps({"onnxruntime": ort.__version__, "machine": platform.machine(),
                      "python": platform.python_version()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
