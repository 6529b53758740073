"""Tap an ONNX Runtime artifact: the integer codes of every quantized tensor, on a given CPU.

The artifact is copied with each activation QuantizeLinear's output added to the graph
outputs (the exporter names that value after the fx quantize node). Graph outputs cannot be
removed by ORT's optimizer, but the QDQ fusions still fire: the fused kernel (QLinearConv,
QLinearAdd, ...) produces the same named value, so the tapped model runs the same integer
kernels as the artifact. `tap` checks that (same integer layers after optimization) rather
than assuming it, and says when it does not hold.

`tensor_codes` runs the tapped copy in-process (the host CPU) or, for another ISA, under an
emulator (targets/emulate.py); quantflow.parity compares the codes with the simulation.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from quantflow.errors import TargetRuntimeError
from quantflow.targets import emulate
from quantflow.targets.base import Artifact
from quantflow.targets.ort_graph import session_options, summarize_graph


def tap(model: onnx.ModelProto, names: Sequence[str]) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of `model` whose outputs also include the QuantizeLinear values in `names`
    that exist in it; returns the copy and the names tapped."""
    tapped = onnx.ModelProto()
    tapped.CopyFrom(model)
    produced = {o: n for n in tapped.graph.node if n.op_type == "QuantizeLinear"
                for o in n.output}
    present = {o.name for o in tapped.graph.output}
    taken = []
    for name in names:
        if name in produced and name not in present:
            elem = onnx.TensorProto.UINT8
            for init in tapped.graph.initializer:  # the zero point's type is the code type
                if len(produced[name].input) > 2 and init.name == produced[name].input[2]:
                    elem = init.data_type
            tapped.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
            taken.append(name)
    return tapped, taken


def _integer_layers(path: Path) -> list[str]:
    optimized = str(path.with_suffix(".opt.onnx"))
    ort.InferenceSession(str(path), session_options(1, optimized_path=optimized),
                         providers=["CPUExecutionProvider"])
    layers: list[str] = summarize_graph(onnx.load(optimized))["quantized_layers"]
    return layers


def tensor_codes(artifact: Artifact, names: Sequence[str], feeds: Sequence[Sequence[np.ndarray]],
                 isa: str = "host") -> list[dict[str, np.ndarray]]:
    """Codes of the tensors `names` for each run in `feeds`, computed by ORT on `isa`
    ("host": this process; otherwise an ISA of targets/emulate.py)."""
    model = onnx.load(str(artifact.path))
    tapped, taken = tap(model, names)
    with tempfile.TemporaryDirectory(prefix="quantflow-tap-") as tmp:
        path = Path(tmp) / "tapped.onnx"
        onnx.save(tapped, str(path))
        expected = artifact.meta.get("quantized_layers")
        if expected is not None and sorted(_integer_layers(path)) != sorted(expected):
            raise TargetRuntimeError(
                f"parity: tapping {artifact.path} changed which layers ORT fuses into integer "
                "kernels, so its tensors would not be the artifact's; this is a quantflow "
                "limitation (please report it)")
        runs = [dict(zip(artifact.input_names, xs)) for xs in feeds]
        if isa == "host":
            sess = ort.InferenceSession(str(path), session_options(1),
                                        providers=["CPUExecutionProvider"])
            results = []
            for feed in runs:
                outs = sess.run(taken, {k: np.ascontiguousarray(v) for k, v in feed.items()})
                results.append({n: np.asarray(o) for n, o in zip(taken, outs)})
            return results
        return emulate.run_onnx(path, runs, isa, outputs=taken)
