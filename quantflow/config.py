"""The options of one compile, defined once: the CLI flags, their validation and docs/options.md
all derive from the fields below.

Each option is a field of a frozen dataclass whose metadata (`Flag`) carries its command-line
name, help and choices: `quantflow.cli` builds the `compile` flags from `flags(...)`,
`__post_init__` validates the choices from the same metadata (plus the rules between
options), and `options_markdown()` writes docs/options.md (a test keeps the file in step).
`CompileConfig` is what `pipeline.compile` takes; `DataOptions` says where calibration and
evaluation data come from (the CLI resolves them into tensors before compiling).

This module imports no torch, so the CLI starts fast and `--help` never waits for it.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import Field, asdict, dataclass, field, fields
from typing import Any

from quantflow.devices import DEVICES, EMULATED_ISAS
from quantflow.spec import CALIBRATORS, KernelRules

TARGETS = ("ort", "tvm", "trt")
BITS = ("8", "mixed")
CALIBRATOR_CHOICES = ("auto", *CALIBRATORS)
EQUALIZE = ("auto", "on", "off")
METRICS = ("auto", "agreement", "cosine")
#: built-in datasets: name -> (calibration split, evaluation split) of quantflow.data
DATASETS: dict[str, tuple[str, str]] = {
    "fashion-mnist": ("fashion-mnist-calib", "fashion-mnist"),
    "natural-images": ("natural-images-calib", "natural-images"),
    "sentences": ("sentences-calib", "sentences"),
    "tones": ("tones-calib", "tones"),
    "fmnist-clips": ("fmnist-clips-calib", "fmnist-clips"),
}
#: a zoo model's training dataset -> the built-in data it calibrates and evaluates on
ZOO_DATASETS = {"imagenet": "natural-images"}
PREPROCESSINGS = ("imagenet", "fashion-mnist")


@dataclass(frozen=True)
class Flag:
    """How an option appears on the command line (and in docs/options.md)."""

    name: str
    help: str
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    #: value | int | float | duration (5m, 300s) | list (comma-separated) | append (repeatable)
    kind: str = "value"


def option(default: Any, name: str, help: str, *, choices: tuple[str, ...] | None = None,
           metavar: str | None = None, kind: str = "value") -> Any:
    """A dataclass field that is also a command-line flag."""
    return field(default=default,
                 metadata={"flag": Flag(name, help, choices, metavar, kind)})


def _finite_at_least(name: str, v: float | None, low: float, *, strict: bool = False) -> None:
    # NaN compares false with everything, so `nan < 0` would let a NaN gate pass every
    # compile: bounds are checked as `not (ok)` to catch it
    if v is None:
        return
    ok = math.isfinite(v) and (v > low if strict else v >= low)
    if not ok:
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low}, "
                         f"got {v}")


@dataclass(frozen=True)
class CompileConfig:
    """Options of one compile; validated on construction, stored in the report."""

    target: str = option("ort", "--target", "ort: ONNX Runtime QDQ model; tvm: TVM Relax "
                         "library; trt: TensorRT explicit-quantization ONNX (+ engine where "
                         "TensorRT exists)", choices=TARGETS)
    bits: str = option("8", "--bits", "8: uniform INT8; mixed: per-layer precision chosen by "
                       "search", choices=BITS)
    calibrator: str = option("auto", "--calibrator", "activation range calibrator (auto: "
                             "the most faithful on the calibration data)",
                             choices=CALIBRATOR_CHOICES)
    equalize: str = option("auto", "--equalize", "cross-layer equalization (auto: when it "
                           "improves fidelity)", choices=EQUALIZE)
    plan_path: str | None = option(None, "--config", "re-use a saved quantization plan",
                                   metavar="PLAN.json")
    max_drop: float | None = option(None, "--max-drop", "fail (exit 10) when the accuracy "
                                    "drop exceeds POINTS (without labels: the --metric's "
                                    "loss vs FP32, in percent)", metavar="POINTS", kind="float")
    metric: str = option("auto", "--metric", "fidelity without labels: agreement (top-1 "
                         "agreement with FP32; classifiers) or cosine (mean cosine similarity "
                         "of each output with FP32's; embedding models); auto: what the zoo "
                         "model declares, else agreement", choices=METRICS)
    #: --bits mixed: weight size budget in MB, or × uniform INT8 (the CLI's --max-size sets
    #: one of the two: `1.5` is MB, `0.75x` a ratio)
    max_size_mb: float | None = None
    max_size_ratio: float | None = None
    max_latency_ms: float | None = option(None, "--max-latency", "--bits mixed: latency "
                                          "budget in ms, measured on the target",
                                          metavar="MS", kind="float")
    optimize_seconds: float = option(
        0.0, "--optimize-time", "spend up to this long on fidelity, e.g. 5m or 300s: a quarter "
        "on repairing the worst activation tensors (quantflow/repair.py), the rest on learned "
        "rounding of the weights (AdaRound with QDrop, quantflow/rounding.py); 0: neither",
        metavar="TIME",
        kind="duration")
    calib_batch: int = 32
    profile_runs: int = option(50, "--profile-runs", "timed runs per model", kind="int")
    profile_warmup: int = 10
    threads: int | None = option(None, "--threads", "runtime threads for profiling "
                                 "(default: all)", kind="int")
    tune_trials: int = option(0, "--tune-trials", "--target tvm: MetaSchedule tuning trials "
                              "per workload (0: no tuning: the records already tuned for this "
                              "target and those shipped for its ISA are used; records are kept "
                              "per target and workload, shared by every model and "
                              "re-calibration)", metavar="N", kind="int")
    tune_seconds: float = option(
        0.0, "--tune-time", "--target tvm: tune for up to this long, e.g. 10m or 600s (with "
        "--tune-trials: whichever ends first; alone: up to 512 trials per workload); starts "
        "from the shipped records (transfer tuning); 0: no time budget", metavar="TIME",
        kind="duration")
    rpc_tracker: str | None = option(
        None, "--rpc-tracker", "--target tvm: measure on a board through TVM RPC: the tracker "
        "(python -m tvm.exec.rpc_tracker) the board's RPC server registered with; profiling "
        "and --tune-trials run there (docs/tvm_rpc.md)", metavar="HOST:PORT")
    rpc_key: str | None = option(None, "--rpc-key", "--target tvm with --rpc-tracker: the key "
                                 "the board's RPC server registered under (its --key)",
                                 metavar="KEY")
    device: str | None = option(
        None, "--device", "what the artifact is for. --target ort: portable (default: exact "
        "on every CPU), x86-vnni, x86-avx2, arm64, host (this CPU's class); x86-vnni/arm64 "
        "artifacts use full int8 weights and are wrong on AVX2 x86 without VNNI. --target "
        "tvm: host (default), aarch64 (a cross-compiled edge bundle) or aarch64-dot (one for "
        "Arm CPUs with the dot-product extension: sdot)",
        choices=tuple(sorted({d for ds in DEVICES.values() for d in ds})))
    verify_isas: tuple[str, ...] = option(
        (), "--verify-on", "--target ort: also check the artifact layer by layer on these "
        "CPUs, by emulation; the host is always checked", choices=EMULATED_ISAS,
        metavar="ISA[,ISA]", kind="list")
    keep_float: tuple[str, ...] = option(
        (), "--keep-float", "keep the layers matching this glob in FP32 (repeatable; matched "
        "against fx node names and module paths, e.g. 'head.*' or fc); --bits mixed never "
        "assigns them bits", metavar="PATTERN", kind="append")
    bits_for: tuple[str, ...] = option(
        (), "--bits-for", "give the weighted layers matching PATTERN this precision: W8A8, "
        "W8A16, W4A8 or FP32 (repeatable; --bits mixed keeps them fixed and counts them in "
        "the budgets)", metavar="PATTERN=OPTION", kind="append")
    seed: int | None = option(None, "--seed", "seed of every random choice (calibration "
                              "subsets, search, Hessian draws, rounding); default 0: the same "
                              "options give the same plan and artifact", metavar="N",
                              kind="int")
    workers: int = option(1, "--workers", "--bits mixed: evaluate search candidates on N "
                          "local processes (1: in-process); the result is the same for any "
                          "N", metavar="N", kind="int")
    ray_address: str | None = option(None, "--ray", "a Ray cluster (host:port; default: "
                                     "$RAY_ADDRESS): --bits mixed evaluates its candidates "
                                     "there, --measure-on finds its device there; needs "
                                     "quantflow[ray], see docs/cluster.md", metavar="ADDRESS")
    measure_on: str | None = option(None, "--measure-on", "--target ort: time every latency "
                                    "(search tables, profile stage) on the Ray node started "
                                    "with the resource device:NAME (an edge board; needs --ray "
                                    "or $RAY_ADDRESS; TVM boards: --rpc-tracker)", metavar="NAME")

    def __post_init__(self) -> None:
        for name in ("keep_float", "bits_for", "verify_isas"):  # lists (a file, the API) too
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str)
                               else tuple(value or ()))
        from quantflow.overrides import check_patterns

        check_patterns(self.keep_float, self.bits_for)
        for f in fields(self):
            spec = f.metadata.get("flag")
            value = getattr(self, f.name)
            if spec is None or spec.choices is None or value is None:
                continue
            for v in (value if spec.kind == "list" else (value,)):
                if v not in spec.choices:
                    raise ValueError(f"{spec.name} must be one of {', '.join(spec.choices)}, "
                                     f"got {v!r}")
        if self.device is not None and self.device not in DEVICES[self.target]:
            raise ValueError(f"--device for --target {self.target} must be one of "
                             f"{DEVICES[self.target]}, got {self.device!r}")
        if (self.tune_trials or self.tune_seconds) and self.target != "tvm":
            raise ValueError("--tune-trials/--tune-time apply to --target tvm only")
        if (self.rpc_tracker or self.rpc_key) and self.target != "tvm":
            raise ValueError("--rpc-tracker/--rpc-key apply to --target tvm only (TVM RPC)")
        if (self.rpc_tracker is None) != (self.rpc_key is None):
            raise ValueError("--rpc-tracker HOST:PORT and --rpc-key KEY go together")
        if self.measure_on is not None:
            _measure_on(self.target, self.measure_on, self.resolved_ray_address)
        if self.workers > 1 and self.bits != "mixed":
            raise ValueError("--workers runs the --bits mixed search in parallel; with --bits "
                             f"{self.bits} there is no search (drop --workers)")
        if self.ray_address and self.bits != "mixed" and self.measure_on is None:
            raise ValueError("--ray gives the cluster to the --bits mixed search or to "
                             "--measure-on; this compile uses neither (drop --ray)")
        if self.rpc_tracker is not None:
            from quantflow.targets.tvm_rpc import RPCDevice

            RPCDevice(self.rpc_tracker, str(self.rpc_key))  # the forms; reachability: lower
        if self.verify_isas and self.target != "ort":
            raise ValueError("--verify-on applies to --target ort only (TVM and TensorRT "
                             "check their own numerics)")
        from quantflow.targets import ort_isa

        for isa in self.verify_isas:
            if not ort_isa.exact_on(self.resolved_device, isa):
                raise ValueError(f"--verify-on {isa}: an artifact for --device "
                                 f"{self.resolved_device} is not meant to be exact there; "
                                 "use --device portable")
        if self.max_drop is not None and not (math.isfinite(self.max_drop)
                                              and 0 <= self.max_drop <= 100):
            raise ValueError(f"--max-drop (max_drop) must be a finite number of points in "
                             f"[0, 100], got {self.max_drop}")
        _finite_at_least("--optimize-time", self.optimize_seconds, 0)
        _finite_at_least("--tune-time", self.tune_seconds, 0)
        for name in ("max_size_mb", "max_size_ratio", "max_latency_ms"):
            _finite_at_least(name, getattr(self, name), 0, strict=True)
        for name, low in (("calib_batch", 1), ("profile_runs", 1), ("profile_warmup", 0),
                          ("tune_trials", 0), ("threads", 1), ("seed", 0), ("workers", 1)):
            v = getattr(self, name)
            if v is not None and not v >= low:
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be >= {low}, "
                                 f"got {v}")
        if self.seed is not None and not self.seed < 2**32:  # numpy's seed range
            raise ValueError(f"--seed must be < 2**32, got {self.seed}")

    @property
    def placement(self) -> str:
        return "trt" if self.target == "trt" else "ort"

    @property
    def resolved_device(self) -> str:
        """The device, with the target's default filled in and `host` made concrete (ort)."""
        from quantflow import hostcpu
        from quantflow.targets import ort_isa

        device = self.device or DEVICES[self.target][0]
        if self.target == "ort":
            return ort_isa.resolve_device(device, hostcpu.host_cpu().isa_class)
        return device

    @property
    def kernel_rules(self) -> KernelRules:
        """What the target's kernels need from the quantizer on the chosen device."""
        from quantflow.targets import ort_isa

        limit = ort_isa.pair_limit(self.resolved_device) if self.target == "ort" else None
        return KernelRules(placement=self.placement, pair_limit=limit)

    @property
    def resolved_seed(self) -> int:
        """The seed every random choice uses (--seed; 0 when not given)."""
        return 0 if self.seed is None else self.seed

    def target_options(self) -> dict[str, object]:
        """Keyword options for `targets.get_target`."""
        opts: dict[str, object] = {"threads": self.threads} if self.threads else {}
        if self.target == "tvm":
            opts.update(tune_trials=self.tune_trials, device=self.resolved_device,
                        tune_seconds=self.tune_seconds or None)
            if self.rpc_tracker is not None:
                opts.update(rpc_tracker=self.rpc_tracker, rpc_key=self.rpc_key)
        if self.target == "ort":
            opts.update(device=self.resolved_device)
            if self.measure_on is not None:
                opts.update(measure_on=self.measure_on, ray_address=self.resolved_ray_address)
        return opts

    @property
    def resolved_ray_address(self) -> str | None:
        """--ray, else $RAY_ADDRESS, else None (no cluster)."""
        return self.ray_address or os.environ.get("RAY_ADDRESS") or None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _measure_on(target: str, name: str, ray_address: str | None) -> None:
    if target == "tvm":
        raise ValueError("--measure-on is for ONNX Runtime artifacts; a TVM board is measured "
                         "through TVM RPC: --rpc-tracker HOST:PORT --rpc-key KEY")
    if target != "ort":
        raise ValueError(f"--measure-on applies to --target ort, not {target}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"--measure-on {name!r}: a device name is letters, digits, _ . -")
    if not ray_address:
        raise ValueError(f"--measure-on {name} needs the Ray cluster its device node joined: "
                         "--ray HOST:PORT or $RAY_ADDRESS (docs/cluster.md)")


@dataclass(frozen=True)
class DataOptions:
    """Where calibration and evaluation data come from (resolved by quantflow.commands)."""

    calib: str | None = option(
        None, "--calib", "calibration data: " + " | ".join(DATASETS) + ", a .npy/.pt/.npz "
        "file with samples first ((N,C,H,W) floats, (N,C,D,H,W), (N,L); int token ids), a "
        "folder of such files or images, or `distilled` (ZeroQ: "
        "synthesized from the model's BatchNorm statistics) (default: the zoo model's "
        "dataset)", metavar="DATA")
    eval_data: str | None = option(None, "--eval", "evaluation data (.npz with x and y gives "
                                   "accuracy; default: the held-out split of a built-in "
                                   "dataset, else the calibration data)", metavar="DATA")
    preprocess: str = option("imagenet", "--preprocess", "preprocessing for image folders",
                             choices=PREPROCESSINGS)
    calib_samples: int = option(512, "--calib-samples", "calibration samples used",
                                kind="int")
    eval_samples: int | None = option(None, "--eval-samples", "limit evaluation samples",
                                      kind="int")

    def __post_init__(self) -> None:
        if self.preprocess not in PREPROCESSINGS:
            raise ValueError(f"--preprocess must be one of {', '.join(PREPROCESSINGS)}, "
                             f"got {self.preprocess!r}")
        for name, v in (("--calib-samples", self.calib_samples),
                        ("--eval-samples", self.eval_samples)):
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}; fix: pass {name} 1 or more")


@dataclass(frozen=True)
class GateThresholds:
    """`quantflow gate` (quantflow/regress.py): how much worse than its baseline a run may
    be. Not the in-compile budget (`--max-drop`, quantflow/gate.py), which bounds one compile
    against its own FP32 model."""

    max_acc_drop: float = option(1.0, "--max-acc-drop", "accuracy (or agreement / cosine "
                                 "with FP32 when the data has no labels) may fall this many "
                                 "points below the baseline", metavar="POINTS", kind="float")
    max_size_growth: float = option(5.0, "--max-size-growth", "the quantized artifact may "
                                    "grow this many percent", metavar="PCT", kind="float")
    max_latency_growth: float = option(30.0, "--max-latency-growth", "the median latency may "
                                       "grow this many percent (and must also exceed the "
                                       "noise, see --latency-noise-k)", metavar="PCT",
                                       kind="float")
    latency_noise_k: float = option(3.0, "--latency-noise-k", "a latency rise counts only "
                                    "beyond K x the noise (the standard error of the two "
                                    "medians, from their timings' MAD; with --history at "
                                    "least the spread of the recorded medians)",
                                    metavar="K", kind="float")
    history_runs: int = option(5, "--history-runs", "--history: the baseline is the median "
                               "of the last N passing runs of the same model, target, device "
                               "and CPU class", metavar="N", kind="int")

    def __post_init__(self) -> None:
        for name, v in (("--max-acc-drop", self.max_acc_drop),
                        ("--max-size-growth", self.max_size_growth),
                        ("--max-latency-growth", self.max_latency_growth),
                        ("--latency-noise-k", self.latency_noise_k)):
            _finite_at_least(name, v, 0.0)
        if self.history_runs < 1:
            raise ValueError(f"--history-runs must be >= 1, got {self.history_runs}")


def flags(cls: type) -> list[tuple[Field[Any], Flag]]:
    """The fields of `cls` that are command-line flags, in declaration order."""
    return [(f, f.metadata["flag"]) for f in fields(cls) if "flag" in f.metadata]


def options_markdown() -> str:
    """docs/options.md: every compile flag with its default, choices and help."""
    lines = ["# `quantflow compile` options", "",
             ("Generated from `quantflow/config.py` (`python -m quantflow.config`); a test "
             "keeps this file in step with the code."), "",
             "| flag | default | choices | what it does |", "|---|---|---|---|"]
    for cls in (CompileConfig, DataOptions):
        for f, spec in flags(cls):
            default = f.default if f.default not in (None, ()) else "-"
            choices = ", ".join(spec.choices) if spec.choices else ""
            lines.append(f"| `{spec.name}` | {default} | {choices} | {spec.help} |")
    lines += ["", ("`--max-size MB|RATIOx` (`--bits mixed`): weight size budget, in MB (e.g. "
              "1.5) or relative to uniform INT8 (e.g. 0.75x); it sets `max_size_mb` or "
              "`max_size_ratio`."), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(options_markdown(), end="")
