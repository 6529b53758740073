"""Errors that reach the user, each with a distinct CLI exit code.

Every message names the thing at fault (file, node, pass, layer) and the fix. The CLI maps the
class to its exit code, so scripts and CI can tell a bad input from an accuracy regression.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class QuantflowError(Exception):
    """Base class: a problem the user can act on (not a bug in quantflow)."""

    exit_code = 3
    #: the stage it was raised in (`in_stage`), also the prefix of its message
    stage: str | None = None


class UsageError(QuantflowError):
    """Options that contradict each other or the target (checked beyond argparse)."""

    exit_code = 2


class InputError(QuantflowError):
    """A model or data file is missing, corrupt, of the wrong kind or shape."""

    exit_code = 3


class UnsafeInputError(InputError):
    """Loading would execute code from the file (a pickled payload, an AOTInductor library,
    an executable expression) and the user did not opt in with --trust-pickle."""

    exit_code = 3


class CaptureError(QuantflowError):
    """torch.export could not capture the model, or the graph has an unsupported construct."""

    exit_code = 4


class UnsupportedOpError(CaptureError):
    """A node the chosen target or quantizer cannot handle; the message names the node."""

    exit_code = 4


class PassError(QuantflowError):
    """A graph pass broke output equivalence or graph validity (a quantflow bug: report it)."""

    exit_code = 5


class TargetUnavailableError(QuantflowError):
    """The target's runtime or toolchain is not installed here; the message says what to do."""

    exit_code = 6


class TargetRuntimeError(QuantflowError):
    """The target's runtime is there but failed to lower or run a model (the message says which
    model variant and what the runtime said)."""

    exit_code = 6


class ParityError(QuantflowError):
    """The runtime artifact computes a layer differently from the torch simulation on a CPU it
    is meant for, beyond one quantization step, and no repair fixed it. The message names the
    layer, the op, the CPU class and what to do."""

    exit_code = 7


class ResourceError(QuantflowError):
    """The requested work needs more memory than this machine has available (checked before
    allocating, so quantflow fails with the size instead of being killed). The message says
    how much would be needed, how much is available, and which shape or flag to shrink."""

    exit_code = 8


class DivergenceError(QuantflowError):
    """`quantflow debug --fail-on-divergence`: a layer diverged beyond its bound (the message
    names the first one, its cause and fix)."""

    exit_code = 9


class BudgetExceededError(QuantflowError):
    """The compiled model violates the user's budget (--max-drop and friends). For CI gates."""

    exit_code = 10


class RegressionError(QuantflowError):
    """`quantflow gate`: the run is worse than its baseline (quantflow/regress.py). One code
    per metric so CI can tell them apart; when several regress, the first of accuracy, size,
    latency sets the code and the message names them all."""

    exit_code = 11


class SizeRegressionError(RegressionError):
    """`quantflow gate`: the quantized artifact grew beyond --max-size-growth."""

    exit_code = 12


class LatencyRegressionError(RegressionError):
    """`quantflow gate`: the median latency grew beyond --max-latency-growth and the noise."""

    exit_code = 13


@contextlib.contextmanager
def in_stage(name: str) -> Iterator[None]:
    """Prefix a user error raised inside stage `name` with `stage NAME: `, so that the one
    line the CLI prints says where in the run it happened. Once: the innermost stage names
    it. The class (hence the exit code) and the traceback stay as they were."""
    try:
        yield
    except QuantflowError as exc:
        if exc.stage is None:
            exc.stage = name
            first = str(exc.args[0]) if exc.args else ""
            exc.args = (f"stage {name}: {first}", *exc.args[1:])
        raise


EXIT_CODES = {
    "ok": 0,
    "internal error (bug)": 1,
    "usage error (bad flags, a bad --config plan, an unusable -o)": UsageError.exit_code,
    "input error (model or data file: missing, corrupt, non-finite, or holding code "
    "that is refused without --trust-pickle)": InputError.exit_code,
    "capture error / unsupported op": CaptureError.exit_code,
    "pass error (equivalence broken)": PassError.exit_code,
    "target unavailable, or its runtime failed": TargetUnavailableError.exit_code,
    "parity check failed (the artifact is wrong on a CPU it is meant for)":
        ParityError.exit_code,
    "not enough memory for the declared shapes / batch (checked before allocating)":
        ResourceError.exit_code,
    "debug --fail-on-divergence: a layer diverged beyond its bound": DivergenceError.exit_code,
    "budget exceeded (accuracy drop over --max-drop, size or latency over budget)":
        BudgetExceededError.exit_code,
    "gate: accuracy regressed against the baseline (over --max-acc-drop)":
        RegressionError.exit_code,
    "gate: size regressed against the baseline (over --max-size-growth)":
        SizeRegressionError.exit_code,
    "gate: latency regressed against the baseline (over --max-latency-growth and the noise)":
        LatencyRegressionError.exit_code,
    "interrupted (Ctrl-C)": 130,
    "terminated (SIGTERM)": 143,
}
