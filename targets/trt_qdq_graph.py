"""A read-only index over a Q/DQ ONNX graph, and the `Violation` record, for TensorRT's rules.

`QdqGraph` answers what the rules in trt_rules.py ask: who produces and consumes a value, which
values are build-time constants, a Q/DQ node's type, scale and zero point, and which
DequantizeLinear really feeds an op once the data-movement ops TensorRT commutes Q/DQ through
are looked past. The documentation tags ([EQ], [OPS], [ONNX]) are listed in trt_rules.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

Severity = Literal["error", "warning"]

#: ops with a weight whose int8 kernels TensorRT fuses Q/DQ into, and the input index of W
WEIGHTED_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}
#: data-movement ops that TensorRT commutes DQ/Q through ("Q/DQ propagation" in [EQ]); walking
#: through them finds the op that really consumes / produces the quantized tensor
PASS_THROUGH_OPS = frozenset({"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
                              "Transpose", "MaxPool", "GlobalMaxPool"})
INT8, UINT8, INT4, UINT4 = TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4
FP8_TYPES = frozenset({TensorProto.FLOAT8E4M3FN})
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class Violation:
    """One broken rule. `node` is the ONNX node name, `value` its output (= fx node name)."""

    rule: str
    severity: Severity
    node: str
    value: str
    message: str

    def __str__(self) -> str:
        return f"[{self.severity}] {self.rule}: node {self.node!r} (value {self.value!r}): " \
               f"{self.message}"


class QdqGraph:
    """Read-only index over an ONNX graph: producers, consumers, constants, attributes."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.nodes = list(model.graph.node)
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                          0)
        self.consts: dict[str, np.ndarray] = {}
        self.const_types: dict[str, int] = {}
        for init in model.graph.initializer:
            self.consts[init.name] = numpy_helper.to_array(init)
            self.const_types[init.name] = init.data_type
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(node)
            if node.op_type == "Constant" and node.output:
                for attr in node.attribute:
                    if attr.name == "value":
                        self.consts[node.output[0]] = numpy_helper.to_array(attr.t)
                        self.const_types[node.output[0]] = attr.t.data_type
        self.graph_outputs = {o.name for o in model.graph.output}

    # -- small queries ------------------------------------------------------------------------
    @staticmethod
    def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    def is_const(self, value: str) -> bool:
        """A build-time constant: initializer, Constant node, or Q/DQ/Transpose of constants."""
        if value in self.consts:
            return True
        node = self.producer.get(value)
        if node is None or node.op_type not in ("QuantizeLinear", "DequantizeLinear",
                                                "Transpose", "Identity", "Reshape"):
            return False
        return self.is_const(node.input[0])

    def qtype(self, node: onnx.NodeProto) -> int:
        """The quantized element type of a Q/DQ node (ONNX defaults: no zero point -> uint8)."""
        if len(node.input) > 2 and node.input[2] and node.input[2] in self.const_types:
            return self.const_types[node.input[2]]
        if node.op_type == "QuantizeLinear":
            return int(self.attr(node, "output_dtype", 0) or UINT8)
        x = node.input[0]
        if x in self.const_types:
            return self.const_types[x]
        prod = self.producer.get(x)
        return self.qtype(prod) if prod is not None and prod.op_type == "QuantizeLinear" else UINT8

    def scale(self, node: onnx.NodeProto) -> np.ndarray | None:
        return self.consts.get(node.input[1])

    def zero_point(self, node: onnx.NodeProto) -> np.ndarray | None:
        return self.consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None

    def is_weight_qdq(self, node: onnx.NodeProto) -> bool:
        return self.is_const(node.input[0])

    def dq_through(self, value: str) -> onnx.NodeProto | None:
        """The DequantizeLinear producing `value`, looking back through data-movement ops."""
        node = self.producer.get(value)
        while node is not None and node.op_type in PASS_THROUGH_OPS:
            node = self.producer.get(node.input[0])
        return node if node is not None and node.op_type == "DequantizeLinear" else None

    def weight_dq(self, op: onnx.NodeProto) -> tuple[onnx.NodeProto, list[int] | None] | None:
        """The weight DequantizeLinear of a weighted op and the Transpose perm in between."""
        value = op.input[WEIGHTED_OPS[op.op_type]]
        perm: list[int] | None = None
        node = self.producer.get(value)
        while node is not None and node.op_type in ("Transpose", "Identity"):
            if node.op_type == "Transpose":
                p = [int(i) for i in self.attr(node, "perm", [])]
                perm = p if perm is None else [p[i] for i in perm]
            node = self.producer.get(node.input[0])
        if node is None or node.op_type != "DequantizeLinear" or not self.is_weight_qdq(node):
            return None
        return node, perm

    def final_consumers(self, value: str) -> list[onnx.NodeProto]:
        """Consumers of `value`, looking forward through data-movement ops."""
        out: list[onnx.NodeProto] = []
        for node in self.consumers.get(value, []):
            if node.op_type in PASS_THROUGH_OPS:
                out.extend(self.final_consumers(node.output[0]))
            else:
                out.append(node)
        return out

    def is_quantized_layer(self, op: onnx.NodeProto) -> bool:
        return (op.op_type in WEIGHTED_OPS and self.dq_through(op.input[0]) is not None
                and self.weight_dq(op) is not None)
