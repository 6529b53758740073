"""Command line: a thin layer over `quantflow.pipeline.compile` and friends.

Exit codes (also in `quantflow --help`, table in errors.EXIT_CODES): 0 ok; 1 internal error;
2 bad arguments (flags, --config, -o); 3 bad model or data file (incl. code refused without
--trust-pickle); 4 capture error / unsupported op; 5 a pass broke equivalence; 6 target runtime
unavailable; 7 parity; 8 not enough memory; 9 `quantflow debug --fail-on-divergence`: a layer
diverged; 10 budget exceeded (accuracy drop over --max-drop)
— for CI gates; 11/12/13 `quantflow gate`: accuracy/size/latency regressed against the
baseline; 130 Ctrl-C; 143 SIGTERM. A user error prints one line (`-v` adds the traceback);
only a bug (exit 1) prints a traceback unasked.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from quantflow import progress
from quantflow.config import TARGETS, CompileConfig, DataOptions, Flag, GateThresholds, flags
from quantflow.devices import EMULATED_ISAS
from quantflow.errors import EXIT_CODES, InputError, QuantflowError, ResourceError

EPILOG = "exit codes:\n" + "\n".join(f"  {code:>3}  {what}" for what, code in EXIT_CODES.items())


#: most dimensions an --input-shape may have (batch + channels + up to 3 spatial + slack)
MAX_DIMS = 8


def _shape(s: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in s.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad shape {s!r}; write it like 1,3,224,224") from None
    if not 1 <= len(shape) <= MAX_DIMS or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"bad shape {s!r}: 1 to {MAX_DIMS} positive sizes, "
                                         "batch first, e.g. 1,3,224,224")
    return shape


def _size(s: str) -> tuple[str, float]:
    try:
        if s.lower().endswith("x"):
            return ("ratio", float(s[:-1]))
        return ("mb", float(s.lower().removesuffix("mb")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {s!r}; write MB (1.5) or a ratio to "
                                         "uniform INT8 (0.75x)") from None


def _add_model_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("model", nargs="?" if optional else None,
                   help="model file: .pt2 (torch.export), TorchScript, a state_dict with "
                   "--arch, a pickled module with --trust-pickle, or zoo:NAME (see `quantflow "
                   "zoo`)")
    p.add_argument("--arch", metavar="MODULE:FACTORY",
                   help="architecture for a state_dict file, e.g. mypkg.models:resnet18")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a pickled whole module, or a .pt2 archive that holds "
                   "pickled objects, AOTInductor code or executable expressions (this runs code "
                   "from the file: only for files whose author you trust; data files are never "
                   "unpickled)")
    p.add_argument("--input-shape", type=_shape, metavar="N,C,H,W",
                   help="example input shape incl. batch (default: from the model or data)")
    _add_common_args(p)


def _add_common_args(p: argparse.ArgumentParser) -> None:
    """-q and -v: every subcommand takes them (call this for a new one)."""
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars or stage lines on stderr (results and errors still "
                   "print; also QUANTFLOW_QUIET=1)")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="-v: stage log, -vv: debug (pass decisions and skip reasons)")


def _choice_list(choices: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    """argparse type of a comma-separated list of choices (`--verify-on x86-avx2,arm64`)."""
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(t.strip() for t in text.split(",") if t.strip())
        bad = [i for i in items if i not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown value(s) {bad}; choose from "
                                             f"{', '.join(choices)}")
        return items

    return parse


def _duration(text: str) -> float:
    """Seconds from `300`, `300s`, `5m` or `1h`."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    t = text.strip().lower()
    try:
        return float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad duration {text!r}; write 300, 300s, 5m or 1h"
                                         ) from None


_TYPES: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "value": str,
                                           "duration": _duration}


def _add_option(p: argparse.ArgumentParser, dest: str, default: Any, spec: Flag) -> None:
    """One flag from its definition in quantflow/config.py."""
    kw: dict[str, Any] = {"dest": dest, "default": default, "help": spec.help}
    if spec.metavar:
        kw["metavar"] = spec.metavar
    if spec.kind == "append":  # repeatable: --keep-float a --keep-float b
        kw.update(action="append", default=None if default == () else default)
    elif spec.kind == "list":
        assert spec.choices is not None
        kw["type"] = _choice_list(spec.choices)
        kw["help"] += f" (comma-separated: {', '.join(spec.choices)})"
    else:
        kw["type"] = _TYPES[spec.kind]
        if spec.choices:
            kw["choices"] = spec.choices
    p.add_argument(spec.name, **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quantflow", description="Post-training quantization and deployment compiler for "
        "PyTorch models.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("compile", help="quantize a model and lower it to a target",
                       description="Capture, optimize, calibrate, quantize, lower, evaluate and "
                       "profile a model; write artifacts and report.json to -o.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(c, optional=True)  # it may come from --options (options_file.py)
    for cls in (CompileConfig, DataOptions):  # flags, choices and help: quantflow/config.py
        for f, spec in flags(cls):  # no default: a flag not given leaves --options' value
            _add_option(c, f.name, argparse.SUPPRESS, spec)
    c.add_argument("--options", metavar="FILE", help="read compile options from a TOML or "
                   "YAML file (default: ./quantflow.toml if it exists); flags override it")
    c.add_argument("--print-config", action="store_true", help="print the merged options "
                   "as TOML and exit")
    c.add_argument("--max-size", type=_size, metavar="MB|RATIOx",
                   help="--bits mixed: weight size budget, in MB (e.g. 1.5) or relative to "
                   "uniform INT8 (e.g. 0.75x)")
    c.add_argument("-o", "--out", metavar="DIR", help="output directory")

    o = sub.add_parser("optimize", help="run only the graph passes; write the float deploy form",
                       description="Run the pass pipeline (BN folding, re-parameterization, "
                       "clean-up) and write OUT/model.pt2 and OUT/model.onnx.")
    _add_model_args(o)
    o.add_argument("-o", "--out", required=True, metavar="DIR", help="output directory")

    p = sub.add_parser("profile", help="measure latency of a compiled artifact",
                       description="Latency of a compiled artifact on this machine: median, "
                       "p90, threads, device, and with --per-layer the time per layer.")
    p.add_argument("artifact", help="model.onnx, a TVM model.so / manifest.json, or the "
                   "directory written by `quantflow compile`")
    p.add_argument("--target", choices=TARGETS,
                   help="runtime (default: detected from the artifact)")
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int)
    p.add_argument("--per-layer", action="store_true",
                   help="per-layer times (ORT profiler; TVM: per kernel, named after fx layers)")
    p.add_argument("--rpc-tracker", metavar="HOST:PORT", help="TVM artifacts: time on the board "
                   "behind this TVM RPC tracker (with --rpc-key; docs/tvm_rpc.md)")
    p.add_argument("--rpc-key", metavar="KEY", help="the key of the board's TVM RPC server")
    p.add_argument("--measure-on", metavar="NAME", help="ONNX Runtime artifacts: time on the "
                   "Ray node started with the resource device:NAME (docs/cluster.md)")
    p.add_argument("--ray", metavar="ADDRESS", help="the Ray cluster of --measure-on "
                   "(default: $RAY_ADDRESS)")
    _add_common_args(p)

    _add_gate(sub)
    _add_debug(sub)
    r = sub.add_parser("report", help="rebuild report.html from a compile's report.json",
                       description="Render OUT/report.json as OUT/report.html (one "
                       "self-contained page: tables and SVG plots, no network, no script).")
    r.add_argument("out", metavar="OUT", help="the directory `quantflow compile -o` wrote "
                   "(or its report.json)")
    r.add_argument("--history", metavar="DIR", help="also plot the runs in DIR/history.jsonl "
                   "(`quantflow gate --record`) of the same model, target, device and CPU")
    _add_common_args(r)
    _add_common_args(sub.add_parser("zoo", help="list the built-in models"))
    return parser


def _add_debug(sub: Any) -> None:
    """`quantflow debug`: per-layer parity FP32 / simulation / runtime (quantflow/debug_cmd.py)."""
    d = sub.add_parser("debug", help="find the layer where quantization goes wrong",
                       description="Quantize and lower the model as `compile` would, then "
                       "compare every layer's output between FP32, the torch simulation and "
                       "the runtime artifact on real samples: the first layer that diverges "
                       "beyond its bound, the worst layers, and a fix for each.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(d, optional=True)
    for cls in (CompileConfig, DataOptions):  # the compile's options: the same artifact
        for f, spec in flags(cls):
            _add_option(d, f.name, argparse.SUPPRESS, spec)
    d.add_argument("--options", metavar="FILE", help="compile options from a TOML or YAML "
                   "file, as for compile (default: ./quantflow.toml if it exists)")
    d.add_argument("--max-size", type=_size, metavar="MB|RATIOx", help="--bits mixed: weight "
                   "size budget, as for compile")
    d.add_argument("--samples", type=int, default=32, help="evaluation samples compared "
                   "(default 32)")
    d.add_argument("--runtime-isa", default="host", choices=("host", *EMULATED_ISAS),
                   help="CPU the runtime's tensors are computed on: this one, or an emulated "
                   "CPU class (--target ort; e.g. x86-avx2 shows the int16 saturation)")
    d.add_argument("--json", action="store_true", help="print the analysis as JSON")
    d.add_argument("--fail-on-divergence", action="store_true", help="exit 9 when a layer "
                   "diverged (for CI)")
    d.add_argument("-o", "--out", metavar="DIR", help="also write DIR/debug.json and keep the "
                   "artifacts there")


def _add_gate(sub: Any) -> None:
    """`quantflow gate`: the CI regression gate (quantflow/regression_gate.py)."""
    g = sub.add_parser("gate", help="fail CI when a compile is worse than its baseline",
                       description="Compare a compile's report.json with a baseline report "
                       "or with the recent runs in a history folder: accuracy (or agreement "
                       "/ cosine), quantized size, median latency (noise-aware).",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("report", help="the candidate: OUT/report.json of `quantflow compile`")
    g.add_argument("--baseline", metavar="BASE.json", help="baseline report.json")
    g.add_argument("--history", metavar="DIR", help="history folder (DIR/history.jsonl): the "
                   "baseline is the median of its last --history-runs passing runs of the "
                   "same model, target, device and CPU class (unless --baseline is given)")
    for f, spec in flags(GateThresholds):
        _add_option(g, f.name, f.default, spec)
    g.add_argument("--junit", metavar="FILE", help="write JUnit XML: one testcase per metric")
    g.add_argument("--record", action="store_true", help="append this run to --history DIR "
                   "(with its verdict; only passing runs become baselines) and redraw "
                   "report.html beside the report with the history")
    _add_common_args(g)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a CI timeout, `kill`): unwinds like Ctrl-C, so output folders are cleaned."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM into an exception for the duration of a command (main thread only:
    Python delivers signals there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with _sigterm_unwinds():
        try:
            return _run(args)
        finally:  # -q is this command's: a later call in the same process decides afresh
            progress.set_quiet(None)


def _run(args: argparse.Namespace) -> int:
    level = {0: logging.WARNING, 1: logging.INFO}.get(getattr(args, "verbose", 0), logging.DEBUG)
    # without -q the environment (QUANTFLOW_QUIET) decides, as for library calls
    progress.set_quiet(True if getattr(args, "quiet", False) else None)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if level > logging.DEBUG:  # torch's deprecation chatter is not the user's business
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    try:
        from quantflow import commands

        return int(getattr(commands, f"cmd_{args.command}")(args))
    except QuantflowError as exc:
        if level <= logging.INFO:  # -v: where it was raised, for a bug report or curiosity
            traceback.print_exc()
        print(f"quantflow: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Terminated:
        print("quantflow: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("quantflow: interrupted", file=sys.stderr)
        return 130
    except FileNotFoundError as exc:
        print(f"quantflow: error: {InputError(str(exc))}", file=sys.stderr)
        return InputError.exit_code
    except MemoryError:  # an allocation the checks in quantflow.resources did not price
        print("quantflow: error: ran out of memory; fix: use smaller inputs or fewer samples",
              file=sys.stderr)
        return ResourceError.exit_code
    except Exception:  # noqa: BLE001 - the last resort: a bug; show it all, ask for a report
        traceback.print_exc()
        print("quantflow: internal error (a bug in quantflow; please report it with the "
              "traceback above)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
