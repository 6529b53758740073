"""Quantization specs: frozen, validated, JSON-serializable dataclasses.

`QSpec` says how one tensor is quantized, `LayerPlan` how one layer (weighted op or
activation-only op such as add) is, `QuantPlan` how the whole graph is: a default plus
per-node overrides keyed by fx node name. The search (issue: mixed precision) writes a
`QuantPlan`; `--config plan.json` reads one back.

Integer conventions follow ONNX QuantizeLinear: q = saturate(round_half_even(x / s) + zp).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

GRANULARITIES = ("tensor", "channel")
CALIBRATORS = ("minmax", "percentile", "entropy", "mse")
#: 7-bit weights are int8 codes in [-63, 63]: what ONNX Runtime's `reduce_range` does to a
#: whole model, used here only for single layers the parity gate repairs
BITS = (4, 7, 8, 16)


def _reduce_frozen(obj: Any) -> tuple[Any, tuple[Any, ...]]:
    """Pickle support for the dataclasses below that freeze a mapping in a MappingProxyType
    (which does not pickle): rebuild from the fields, the mapping as a plain dict. Search
    workers (other processes, Ray) receive plans and kernel rules this way."""
    return type(obj), tuple(dict(v) if isinstance(v, MappingProxyType) else v
                            for v in (getattr(obj, f.name) for f in fields(obj)))


@dataclass(frozen=True)
class QSpec:
    """How one tensor is quantized.

    bits/signed: the integer type (int8, uint8, int16, uint16; 4-bit is stored in int8 with a
      [-7, 7] range, the simulation and size accounting use 4 bits).
    symmetric: zero point fixed at 0 (signed) and the range narrowed to [-(2^(b-1)-1), 2^(b-1)-1]
      so that -x is representable; asymmetric: zero point chosen from the calibrated range.
    granularity/axis: one scale per tensor, or one per slice along `axis` (weights: output
      channels, axis 0 for conv and linear weights).
    calibrator: how the range is chosen from statistics (weights use the exact min/max unless
      told otherwise; activations use calibration data).
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    granularity: str = "tensor"
    axis: int = 0
    calibrator: str = "minmax"
    percentile: float = 99.99

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"QSpec.bits must be one of {BITS}, got {self.bits}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"QSpec.granularity must be one of {GRANULARITIES}, "
                             f"got {self.granularity!r}")
        if self.calibrator not in CALIBRATORS:
            raise ValueError(f"QSpec.calibrator must be one of {CALIBRATORS}, "
                             f"got {self.calibrator!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"QSpec.percentile must be in (50, 100], got {self.percentile}")
        if self.symmetric and not self.signed:
            raise ValueError("QSpec: symmetric quantization needs a signed type "
                             "(an unsigned symmetric range would waste half the codes)")
        if self.bits in (4, 7) and not (self.signed and self.symmetric):
            raise ValueError(f"QSpec: {self.bits}-bit is supported for signed symmetric "
                             "weights only")

    @property
    def qmin(self) -> int:
        if self.signed:
            return -(2 ** (self.bits - 1)) + (1 if self.symmetric else 0)
        return 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def storage_bits(self) -> int:
        """Bits of the integer type that holds the values (4-bit values live in int8)."""
        return 8 if self.bits in (4, 7) else self.bits

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> QSpec:
        _check_type("QSpec", d, Mapping)
        unknown = set(d) - set(QSpec.__dataclass_fields__)
        if unknown:
            raise ValueError(f"QSpec: unknown keys {sorted(map(str, unknown))}")
        for key, value in d.items():
            _check_type(f"QSpec.{key}", value, _QSPEC_TYPES[key])
        return QSpec(**dict(d))


@dataclass(frozen=True)
class LayerPlan:
    """How one layer is quantized: its weight and its input activation(s).

    `None` keeps that part in float. A layer with `act=None` reads float inputs; its weight may
    still be quantized (weight-only quantization). The activation spec applies to the inputs the
    layer reads; the producer's output is quantized with it on that edge.
    """

    weight: QSpec | None = None
    act: QSpec | None = None

    @property
    def is_float(self) -> bool:
        return self.weight is None and self.act is None

    def to_dict(self) -> dict[str, Any]:
        return {"weight": self.weight.to_dict() if self.weight else None,
                "act": self.act.to_dict() if self.act else None}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> LayerPlan:
        _check_type("LayerPlan", d, Mapping)
        unknown = set(d) - {"weight", "act"}
        if unknown:
            raise ValueError(f"LayerPlan: unknown keys {sorted(map(str, unknown))}")
        w, a = d.get("weight"), d.get("act")
        for key, v in (("weight", w), ("act", a)):
            if v is not None:
                _check_type(key, v, Mapping)
        return LayerPlan(QSpec.from_dict(w) if w else None, QSpec.from_dict(a) if a else None)

    def label(self) -> str:
        """Short human label, e.g. W8A8, W4A8, W8A16, FP32."""
        if self.is_float:
            return "FP32"
        w = f"W{self.weight.bits}" if self.weight else "Wf"
        a = f"A{self.act.bits}" if self.act else "Af"
        return w + a


#: ONNX Runtime on x86: int8 symmetric per-channel weights and uint8 asymmetric activations
#: (U8S8). The AVX512-VNNI/AVX2 kernels (vpdpbusd / vpmaddubsw) multiply unsigned by signed
#: bytes, so U8S8 maps straight onto them; signed activations (S8S8) make ORT shift inputs by
#: 128 at run time or fall back to slower paths. Asymmetric activations also spend all 256
#: codes on post-ReLU ranges that are all positive.
ORT_WEIGHT = QSpec(bits=8, signed=True, symmetric=True, granularity="channel", axis=0)
ORT_ACT = QSpec(bits=8, signed=False, symmetric=False, granularity="tensor")
#: TensorRT explicit quantization accepts only symmetric int8 (zero point 0) for both.
TRT_ACT = QSpec(bits=8, signed=True, symmetric=True, granularity="tensor")


@dataclass(frozen=True)
class QuantPlan:
    """Whole-model plan: `default` for every quantizable node, `layers` overrides by node name.

    `equalize`: run cross-layer equalization before quantizing (see passes.equalize).
    `bias_correction`: fold the expected output shift caused by weight rounding,
      −(Q(W) − W)·E[x], into each layer's bias (Nagel et al. 2019, empirical variant).
    `smooth`: SmoothQuant migration strength α in (0, 1] for LayerNorm → linear groups
      (passes.smooth, scales from the calibration data); 0 = off.
    """

    default: LayerPlan = field(default_factory=lambda: LayerPlan(ORT_WEIGHT, ORT_ACT))
    layers: Mapping[str, LayerPlan] = field(default_factory=dict)
    equalize: bool = False
    bias_correction: bool = True
    smooth: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.smooth <= 1.0:
            raise ValueError(f"QuantPlan.smooth must be in [0, 1], got {self.smooth}")
        # freeze the mapping so a plan can be shared between threads and hashed into caches
        object.__setattr__(self, "layers", MappingProxyType(dict(self.layers)))

    __reduce__ = _reduce_frozen

    def for_node(self, name: str) -> LayerPlan:
        return self.layers.get(name, self.default)

    def with_layer(self, name: str, plan: LayerPlan) -> QuantPlan:
        return replace(self, layers={**self.layers, name: plan})

    def with_calibrator(self, calibrator: str, percentile: float | None = None) -> QuantPlan:
        """The same plan with the activation calibrator replaced everywhere."""

        def upd(lp: LayerPlan) -> LayerPlan:
            if lp.act is None:
                return lp
            kw: dict[str, Any] = {"calibrator": calibrator}
            if percentile is not None:
                kw["percentile"] = percentile
            return replace(lp, act=replace(lp.act, **kw))

        return replace(self, default=upd(self.default),
                       layers={k: upd(v) for k, v in self.layers.items()})

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "quantflow.QuantPlan/1",
            "default": self.default.to_dict(),
            "layers": {k: v.to_dict() for k, v in sorted(self.layers.items())},
            "equalize": self.equalize,
            "bias_correction": self.bias_correction,
            "smooth": self.smooth,
        }

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> QuantPlan:
        """Schema-checked: every key known, every value of its type (a JSON string "false"
        is not a boolean), so a hand-edited plan fails here, naming the key, not later."""
        if not isinstance(d, Mapping) or d.get("format") != "quantflow.QuantPlan/1":
            got = d.get("format") if isinstance(d, Mapping) else type(d).__name__
            raise ValueError(f"not a quantflow plan (format={got!r}); expected "
                             "'quantflow.QuantPlan/1' as written by `quantflow compile`")
        unknown = set(d) - _PLAN_KEYS
        if unknown:
            raise ValueError(f"unknown keys {sorted(map(str, unknown))}; a plan has "
                             f"{sorted(_PLAN_KEYS)}")
        if "default" not in d:
            raise ValueError("missing 'default' (the plan for every layer not in 'layers')")
        layers = d.get("layers", {})
        _check_type("layers", layers, dict)
        for key in ("equalize", "bias_correction"):
            _check_type(key, d.get(key, False), bool)
        _check_type("smooth", d.get("smooth", 0.0), (int, float))
        plans = {}
        for name, lp in layers.items():
            try:
                plans[str(name)] = LayerPlan.from_dict(lp)
            except ValueError as exc:
                raise ValueError(f"layers[{name!r}]: {exc}") from None
        try:
            default = LayerPlan.from_dict(d["default"])
        except ValueError as exc:
            raise ValueError(f"default: {exc}") from None
        return QuantPlan(default=default, layers=plans,
                         equalize=bool(d.get("equalize", False)),
                         bias_correction=bool(d.get("bias_correction", True)),
                         smooth=float(d.get("smooth", 0.0)))

    def save(self, path: str | Path, compiled: Mapping[str, Any] | None = None) -> None:
        """Write the plan; `compiled` adds what compiling it did (device, kernel rules, layers
        changed for portability) under "compiled", for people: loading ignores it."""
        d = self.to_dict()
        if compiled is not None:
            d["compiled"] = dict(compiled)
        Path(path).write_text(json.dumps(d, indent=2) + "\n")

    @staticmethod
    def load(path: str | Path) -> QuantPlan:
        """Read and schema-check a plan file; ValueError (naming the file and what is wrong)
        for anything that is not one, OSError when it cannot be read."""
        p = Path(path)
        if p.is_file() and p.stat().st_size > MAX_PLAN_BYTES:
            raise ValueError(f"{p}: {p.stat().st_size} bytes is not a plan (at most "
                             f"{MAX_PLAN_BYTES})")
        try:
            return QuantPlan.from_dict(json.loads(p.read_text(encoding="utf-8")))
        except UnicodeDecodeError as exc:
            raise ValueError(f"{p}: not a text file ({exc.reason})") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno}, column "
                             f"{exc.colno})") from None
        except RecursionError:
            raise ValueError(f"{p}: JSON nested too deeply to be a plan") from None
        except ValueError as exc:
            raise ValueError(f"{p}: {exc}") from None


#: keys of a plan file ("compiled" is what compiling it did, written for people)
_PLAN_KEYS = frozenset({"format", "default", "layers", "equalize", "bias_correction",
                        "smooth", "compiled"})
#: plans are small (a few KB per hundred layers); anything larger is not one
MAX_PLAN_BYTES = 64 * 2**20
_QSPEC_TYPES: dict[str, type | tuple[type, ...]] = {
    "bits": int, "signed": bool, "symmetric": bool, "granularity": str, "axis": int,
    "calibrator": str, "percentile": (int, float)}


def _check_type(key: str, value: Any, want: type | tuple[type, ...]) -> None:
    """JSON types: bool is not an int here, and floats must be finite."""
    kinds = want if isinstance(want, tuple) else (want,)
    ok = isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))
    if ok and isinstance(value, float) and not math.isfinite(value):
        ok = False
    if not ok:
        names = " or ".join("JSON object" if k is Mapping else k.__name__ for k in kinds)
        raise ValueError(f"{key} must be of type {names}, got {value!r}")


def int8_plan(calibrator: str = "minmax", *, act: QSpec = ORT_ACT,
              weight: QSpec = ORT_WEIGHT) -> QuantPlan:
    """Uniform INT8: per-channel symmetric weights, per-tensor activations."""
    return QuantPlan(default=LayerPlan(weight, replace(act, calibrator=calibrator)))


@dataclass(frozen=True)
class PairLimit:
    """The integer kernels add two neighbouring u8·s8 products in a saturating int16.

    `acc_max`: the accumulator's limit (int16: 32767). Which weights are neighbours is the
    kernel's K order (quantflow.pair_limit.kernel_order). `why` names the kernels, for the
    report. Declared by a target for the devices whose kernels do this (targets/ort_isa.py).
    """

    acc_max: int = 32767
    why: str = "x86 without VNNI: vpmaddubsw sums u8*s8 pairs in a saturating int16"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: how a layer the parity gate found off is repaired: "pairs" applies the pair limit to it
#: (pair-aware rounding and scale growth), "7bit" narrows its weights to [-64, 64]
REPAIRS = ("pairs", "7bit")


@dataclass(frozen=True)
class KernelRules:
    """What a target's integer kernels need from the quantized graph, beyond the plan.

    placement: where Q/DQ pairs go ("ort" or "trt", see quantflow.quantize).
    pair_limit: weights must keep every kernel pair exact (None: the device's kernels
      accumulate exactly). Applies to layers with 8-bit activations and int8 weights;
      depthwise convolutions are exempt (their kernels widen before adding).
    repairs: per-layer fixes forced by the parity gate (layer name -> one of REPAIRS).
    """

    placement: str = "ort"
    pair_limit: PairLimit | None = None
    repairs: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = {k: v for k, v in self.repairs.items() if v not in REPAIRS}
        if bad:
            raise ValueError(f"KernelRules.repairs: unknown repair(s) {bad}; use {REPAIRS}")
        object.__setattr__(self, "repairs", MappingProxyType(dict(self.repairs)))

    __reduce__ = _reduce_frozen

    @staticmethod
    def of(rules: KernelRules | str) -> KernelRules:
        """Accept a bare placement name where rules are expected. A bare "ort" means the safe
        default, portable ONNX Runtime weights (the pair limit); build
        `KernelRules(placement="ort")` to ask for full int8 weights."""
        if isinstance(rules, KernelRules):
            return rules
        return KernelRules(placement=rules, pair_limit=PairLimit() if rules == "ort" else None)

    def key(self) -> str:
        """Stable text for cache keys (the search database keys quantized results by it)."""
        parts = [self.placement]
        if self.pair_limit is not None:
            parts.append(f"pairs{self.pair_limit.acc_max}")
        parts += [f"{k}={v}" for k, v in sorted(self.repairs.items())]
        return "|".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"placement": self.placement,
                "pair_limit": self.pair_limit.to_dict() if self.pair_limit else None,
                "repairs": dict(self.repairs)}
