"""The Quantune configuration space, candidate plans, their costs and their features.

A candidate = one global configuration (activation calibrator × activation scheme
(asymmetric / symmetric) × weight granularity (per-channel / per-tensor)) + one precision
option per weighted layer:

    W8A8   8-bit weights, 8-bit activations (the integer kernels every target has)
    W8A16  8-bit weights, 16-bit activations (more activation resolution, no weight saving)
    W4A8   4-bit weights (MSE-clipped, half the bytes of W8), 8-bit activations
    FP32   the layer stays float

`features()` turns a candidate into a fixed-length, model-agnostic vector (fractions, sums
and HAWQ sensitivities rather than per-layer slots), so a cost model trained on one network's
evaluations can rank another network's candidates (warm start).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from quantflow.spec import CALIBRATORS, GRANULARITIES, LayerPlan, QSpec, QuantPlan

OPTIONS = ("W8A8", "W8A16", "W4A8", "FP32")
#: (weight bits, activation bits); 32 means float
OPTION_BITS = {"W8A8": (8, 8), "W8A16": (8, 16), "W4A8": (4, 8), "FP32": (32, 32)}

#: what the options mean (`layer_plan`); part of every database key, so evaluations stored by
#: an older meaning are never reused. 2: A16 always takes min-max ranges. 3: an FP32 layer
#: reads the float tensor, not a sibling's dequantized copy (quantize.py).
SPACE_VERSION = 3


@dataclass(frozen=True)
class GlobalConfig:
    """The whole-model part of a candidate."""

    calibrator: str = "minmax"
    act_symmetric: bool = False
    weight_granularity: str = "channel"

    def __post_init__(self) -> None:
        if self.calibrator not in CALIBRATORS:
            raise ValueError(f"calibrator must be one of {CALIBRATORS}")
        if self.weight_granularity not in GRANULARITIES:
            raise ValueError(f"weight_granularity must be one of {GRANULARITIES}")

    @property
    def scheme_key(self) -> tuple[bool, str]:
        """What the HAWQ sensitivities depend on (the calibrator does not enter them)."""
        return (self.act_symmetric, self.weight_granularity)


@dataclass(frozen=True)
class Candidate:
    """A global config and one option per layer (aligned with `SearchSpace.layers`)."""

    glob: GlobalConfig
    options: tuple[str, ...]

    def key(self) -> str:
        """Stable identity for the database."""
        return json.dumps({"g": [self.glob.calibrator, self.glob.act_symmetric,
                                 self.glob.weight_granularity], "o": list(self.options)},
                          separators=(",", ":"))

    @staticmethod
    def from_key(key: str) -> Candidate:
        d = json.loads(key)
        return Candidate(GlobalConfig(d["g"][0], bool(d["g"][1]), d["g"][2]), tuple(d["o"]))

    def label(self) -> str:
        counts = {o: self.options.count(o) for o in OPTIONS if o in self.options}
        g = self.glob
        return (f"{g.calibrator}/{'sym' if g.act_symmetric else 'asym'}/{g.weight_granularity}: "
                + " ".join(f"{k}x{v}" for k, v in counts.items()))


def layer_plan(option: str, g: GlobalConfig) -> LayerPlan:
    """The LayerPlan of a precision option under a global configuration."""
    if option not in OPTION_BITS:
        raise ValueError(f"unknown precision option {option!r}; choose from {OPTIONS}")
    wbits, abits = OPTION_BITS[option]
    if wbits == 32:
        return LayerPlan(None, None)
    # 4-bit weights need MSE clipping: with 15 levels a few outliers waste most of the grid
    weight = QSpec(bits=wbits, signed=True, symmetric=True, granularity=g.weight_granularity,
                   axis=0, calibrator="mse" if wbits == 4 else "minmax")
    # 16-bit activations take the full observed range: with 65536 levels clipping buys no
    # resolution, and a clipped range saturates on inputs unlike the calibration data
    # (bench_results/imagenet_fidelity: MobileNetV2 flips an FP32 prediction with a 0.57
    # top-2 margin under percentile-clipped A16)
    act = QSpec(bits=abits, signed=g.act_symmetric, symmetric=g.act_symmetric,
                granularity="tensor", calibrator="minmax" if abits == 16 else g.calibrator)
    return LayerPlan(weight, act)


def global_configs(calibrators: Sequence[str] = CALIBRATORS,
                   schemes: Sequence[bool] = (False, True),
                   granularities: Sequence[str] = ("channel", "tensor")) -> list[GlobalConfig]:
    return [GlobalConfig(c, s, g) for c in calibrators for s in schemes for g in granularities]


@dataclass
class SearchSpace:
    """Layers, allowed options and the per-layer tables that price and featurize candidates.

    sens[scheme_key]: Ω[l, k] HAWQ sensitivity; size: [L, K] weight bytes; latency: [L, K] ms
    (measured, or a proxy), with `latency_rest` the time no layer accounts for. A candidate's
    latency is the sum of its layers' entries plus the rest: the Q/DQ a runtime adds where
    int8 and float layers meet is not priced (measured at 0 on every model tried,
    docs/benchmarks.md "Latency-aware vs FLOPs×bits proxy"; latency limits are checked end
    to end, `validate.py`).
    """

    layers: list[str]
    options: tuple[str, ...]
    globs: list[GlobalConfig]
    sens: dict[tuple[bool, str], np.ndarray]
    size: np.ndarray
    latency: np.ndarray | None = None
    latency_rest: float = 0.0
    #: layer (or any node) -> option the user fixed (quantflow/overrides.py), see `fix`
    fixed: dict[str, str] = field(default_factory=dict)
    #: [L, K]: the option index a candidate's choice k for layer l stands for (`pin`)
    remap: np.ndarray | None = None
    #: uniform INT8's weight bytes before `fix` (what --max-size RATIOx is relative to)
    int8_bytes: float | None = None

    def fix(self, fixed: dict[str, str], free: tuple[str, ...] | None = None) -> None:
        """Fix layers to options and keep the others to `free` (default: all options), in place.

        Every choice of a fixed layer stands for its fixed option, and a free layer's
        disallowed option for W8A8 (or its first allowed one): their table columns are copied
        from the option they stand for, so the ILP seeds, random draws and budgets price a
        candidate exactly as `pin` later rewrites it, and the search never changes them."""
        self.int8_bytes = self.int8_size()
        self.fixed = dict(fixed)
        free = free or self.options
        fallback = self.options.index("W8A8") if "W8A8" in free else self.options.index(free[0])
        remap = np.tile(np.arange(len(self.options)), (len(self.layers), 1))
        for i, name in enumerate(self.layers):
            if name in fixed:
                remap[i, :] = self.options.index(fixed[name])
            else:
                for k, o in enumerate(self.options):
                    if o not in free:
                        remap[i, k] = fallback
        rows = np.arange(len(self.layers))[:, None]
        for key in self.sens:
            self.sens[key] = self.sens[key][rows, remap]
        self.size = self.size[rows, remap]
        if self.latency is not None:
            self.latency = self.latency[rows, remap]
        self.remap = remap

    def pin(self, options: tuple[str, ...]) -> tuple[str, ...]:
        """A candidate's options with the fixed and disallowed choices rewritten (`fix`)."""
        if self.remap is None:
            return options
        pos = {o: k for k, o in enumerate(self.options)}
        return tuple(self.options[int(self.remap[i, pos[o]])] for i, o in enumerate(options))

    def index(self, c: Candidate) -> np.ndarray:
        pos = {o: i for i, o in enumerate(self.options)}
        return np.asarray([pos[o] for o in c.options])

    def plan(self, c: Candidate) -> QuantPlan:
        """The QuantPlan: weighted layers per option; other quantized ops (add, pools) W8A8."""
        default = layer_plan("W8A8", c.glob)
        layers = {n: layer_plan(o, c.glob) for n, o in self.fixed.items()}  # adds, pools too
        layers.update((n, layer_plan(o, c.glob)) for n, o in zip(self.layers, c.options))
        return QuantPlan(default=default, layers=layers)

    def _sum(self, table: np.ndarray, c: Candidate) -> float:
        return float(table[np.arange(len(self.layers)), self.index(c)].sum())

    def size_bytes(self, c: Candidate) -> float:
        return self._sum(self.size, c)

    def int8_size(self) -> float:
        if self.int8_bytes is not None:
            return self.int8_bytes
        return float(self.size[:, self.options.index("W8A8")].sum()) \
            if "W8A8" in self.options else float(self.size.min(axis=1).sum())

    def latency_ms(self, c: Candidate) -> float | None:
        if self.latency is None:
            return None
        return self._sum(self.latency, c) + self.latency_rest

    def sensitivity(self, c: Candidate) -> float:
        return self._sum(self.sens[c.glob.scheme_key], c)

    def features(self, c: Candidate) -> np.ndarray:
        """Fixed-length, model-agnostic features (see module docstring)."""
        idx = self.index(c)
        n_layers = len(self.layers)
        g = c.glob
        f: list[float] = [float(g.calibrator == k) for k in CALIBRATORS]
        f += [float(g.act_symmetric), float(g.weight_granularity == "channel")]
        opt_onehot = np.zeros((n_layers, len(OPTIONS)))
        for i, o in enumerate(c.options):
            opt_onehot[i, OPTIONS.index(o)] = 1.0
        params = self.size[:, self.options.index("FP32")] if "FP32" in self.options \
            else self.size.max(axis=1)
        f += list(opt_onehot.mean(axis=0))  # fraction of layers per option
        f += list((params[:, None] * opt_onehot).sum(axis=0) / max(params.sum(), 1e-12))
        sens = self.sens[g.scheme_key]
        chosen = sens[np.arange(n_layers), idx]
        ref = sens[:, self.options.index("W8A8")] if "W8A8" in self.options else sens.max(axis=1)
        f += [float(np.log10(chosen.sum() + 1e-12)), float(np.log10(chosen.max() + 1e-12)),
              float(chosen.sum() / max(ref.sum(), 1e-12))]
        # sensitivity-weighted option fractions: 4 bits on a flat layer is not 4 bits on a
        # sharp one
        f += list((ref[:, None] * opt_onehot).sum(axis=0) / max(ref.sum(), 1e-12))
        f += list(opt_onehot[0]) + list(opt_onehot[-1])  # first/last layers are special
        f += [self.size_bytes(c) / max(self.int8_size(), 1e-12)]
        lat = self.latency_ms(c)
        if self.latency is not None and lat is not None:
            int8 = float(self.latency[:, self.options.index("W8A8")].sum()) + self.latency_rest \
                if "W8A8" in self.options else 1.0
            f += [lat / max(int8, 1e-12)]
        else:
            f += [0.0]
        return np.asarray(f, dtype=np.float64)

    def feasible(self, c: Candidate, max_size: float | None, max_latency: float | None) -> bool:
        if max_size is not None and self.size_bytes(c) > max_size * (1 + 1e-9):
            return False
        lat = self.latency_ms(c)
        return not (max_latency is not None and lat is not None and lat > max_latency * (1 + 1e-09))


def size_table(numels: Sequence[int], options: Sequence[str]) -> np.ndarray:
    """Weight bytes per layer and option (4-bit weights count half a byte, as deployed)."""
    return np.asarray([[n * OPTION_BITS[o][0] / 8.0 for o in options] for n in numels])
