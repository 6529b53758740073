"""Why an op runs in float in ONNX Runtime's optimized QDQ graph: one reason per op type.

ORT's CPU integer kernels come from QDQ fusions (QLinearConv, QGemm/QLinearMatMul, QLinearAdd,
QLinearMul, pools, concat, QLinearSigmoid/LeakyRelu/Softmax, QLinearReduceMean, QLinearWhere).
An op outside that list computes in float on the dequantized tensor whatever the quantizer
does; one inside it stays float when the Q/DQ around it matched no fusion (an input or output
not quantized on that path). `summarize_graph` (ort_graph.py) reports the reason for every op
type left on a dequantized tensor or computing a layer in float (`float_op_reasons`).
Pure data, no onnxruntime import.
"""

from __future__ import annotations

#: ops that have no integer kernel in ORT's CPU provider, with what they usually are
_NO_KERNEL: dict[str, str] = {
    "Erf": "GELU's erf: no integer kernel in ORT",
    "Gelu": "GELU: no integer kernel in ORT",
    "FastGelu": "GELU (tanh form): no integer kernel in ORT",
    "BiasGelu": "bias + GELU: no integer kernel in ORT",
    "Div": "division by a computed tensor (normalization, GRN): no QLinearDiv in ORT",
    "ReduceL2": "L2 norm (GRN's ‖x‖₂): no integer kernel in ORT",
    "ReduceSumSquare": "sum of squares (a norm): no integer kernel in ORT",
    "LayerNormalization": "LayerNorm: no integer kernel (mean/variance need float)",
    "SimplifiedLayerNormalization": "RMSNorm: no integer kernel (needs float statistics)",
    "SkipLayerNormalization": "residual + LayerNorm: no integer kernel",
    "InstanceNormalization": "InstanceNorm: no integer kernel (per-sample statistics)",
    "GroupNormalization": "GroupNorm: no integer kernel (per-sample statistics)",
    "BatchNormalization": "standalone BN (not after a conv/linear it folds into): no "
                          "integer kernel",
    "Sqrt": "square root: no integer kernel in ORT",
    "Pow": "power: no integer kernel in ORT",
    "Reciprocal": "reciprocal: no integer kernel in ORT",
    "Sub": "subtraction: no QLinearSub in ORT",
    "Tanh": "tanh: no QLinearTanh in ORT's CPU provider",
    "Acos": "acos (Chebyshev basis): no integer kernel in ORT",
    "Cos": "cos (Chebyshev basis): no integer kernel in ORT",
    "Sin": "sin: no integer kernel in ORT",
    "Exp": "exp: no integer kernel in ORT",
    "Log": "log: no integer kernel in ORT",
    "Clip": "clamp not fused into a preceding integer op: no standalone integer kernel",
    "Softplus": "softplus: no integer kernel in ORT",
    "Mish": "mish: no integer kernel in ORT",
    "HardSwish": "hard swish: no integer kernel in ORT's CPU provider",
    "Neg": "negation: no integer kernel in ORT",
    "Abs": "abs: no integer kernel in ORT",
    "Max": "elementwise max: no integer kernel in ORT",
    "Min": "elementwise min: no integer kernel in ORT",
    "CumSum": "cumulative sum: no integer kernel in ORT",
}
#: ops ORT could run in integers when Q/DQ surround them, and the integer kernel's name
_FUSABLE: dict[str, str] = {
    "Conv": "QLinearConv", "FusedConv": "QLinearConv", "NhwcFusedConv": "QLinearConv",
    "ConvTranspose": "QLinearConvTranspose", "Gemm": "QGemm", "FusedGemm": "QGemm",
    "MatMul": "QLinearMatMul", "FusedMatMul": "QLinearMatMul", "Add": "QLinearAdd",
    "Mul": "QLinearMul", "Sigmoid": "QLinearSigmoid", "LeakyRelu": "QLinearLeakyRelu",
    "Softmax": "QLinearSoftmax", "ReduceMean": "QLinearReduceMean",
    "GlobalAveragePool": "QLinearGlobalAveragePool", "AveragePool": "QLinearAveragePool",
    "Concat": "QLinearConcat", "Where": "QLinearWhere",
}
#: data movement: exact on any representation, ORT just did not move the Q/DQ across it
_MOVEMENT = frozenset({"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Slice",
                       "Split", "Gather", "Expand", "Pad", "Resize", "MaxPool", "Relu",
                       "Identity", "Cast", "Tile", "DepthToSpace", "SpaceToDepth"})


def float_reason(op_type: str) -> str:
    """Why `op_type` computes in float in ORT's optimized QDQ graph (one line)."""
    if op_type in _NO_KERNEL:
        return _NO_KERNEL[op_type]
    if op_type in _FUSABLE:
        return (f"{_FUSABLE[op_type]} exists, but the Q/DQ around this node matched no "
                "fusion (an input or the output is not quantized on this path, or the plan "
                "kept the layer float)")
    if op_type in _MOVEMENT:
        return ("data movement on the dequantized tensor (exact; no arithmetic, ORT did not "
                "move the Q/DQ across it)")
    return f"{op_type}: no integer kernel known in ORT's CPU provider"
