"""The regression rules of `quantflow gate`: one run's report against a baseline (another
report, or the median of earlier runs from the history), metric by metric, as pure functions
on dicts.

Not the in-compile gate (quantflow/gate.py: `compile --max-drop/--max-latency`, exit 10),
which bounds one compile against its own FP32 model and a fixed latency; this compares runs
with each other, so a change that makes a model worse than it was fails CI.

Rules (candidate c, baseline b; thresholds from config.GateThresholds):
  accuracy  fail iff b − c > --max-acc-drop points. The measure is top-1 accuracy when the
            evaluation data has labels, else top-1 agreement (or mean cosine with
            `--metric cosine`) with FP32, in percent; both runs must use the same measure.
  size      fail iff quantized_bytes c > b · (1 + --max-size-growth/100).
  latency   fail iff median c > b · (1 + --max-latency-growth/100) AND c − b > K · noise,
            noise = √(se_b² + se_c²), se = 1.858 · MAD / √runs (the standard error of a
            median of normal timings: 1.2533 · 1.4826 · MAD / √n); a history baseline's se is
            at least the IQR of its runs' medians (their spread from run to run). The noise
            bound keeps scattered timings (few runs, a busy machine) from failing; the growth
            bound absorbs what the noise cannot see, a machine uniformly slower than when the
            baseline ran, so it must exceed that drift (history's medians widen the noise
            bound by it). Compared only on the same CPU class (host.isa_class) or the same board
            (`measured_where`).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from quantflow.config import GateThresholds
from quantflow.errors import InputError

#: what makes two runs comparable at all (a mismatch is an input error, exit 3)
KEY = ("model", "target", "device")
METRICS = ("accuracy", "size", "latency")


@dataclass(frozen=True)
class Metrics:
    """What the gate compares, read from a report (or a history record)."""

    model: str
    target: str
    device: str
    isa_class: str
    measure: str  # accuracy | agreement | cosine
    quality: float | None  # percent
    quantized_bytes: int
    latency_ms: float | None
    iqr_ms: float | None
    mad_ms: float | None
    runs: int | None

    def key(self) -> dict[str, str]:
        return {k: getattr(self, k) for k in (*KEY, "isa_class")}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measured_where(report: dict[str, Any]) -> str:
    """What latencies are comparable on: the build host's CPU class, or the board they were
    timed on ("device:NAME" for a Ray device node, `--measure-on`; "rpc:KEY" for a TVM RPC
    board), as the recorded latency's device names it."""
    device = str((report.get("latency", {}).get("quantized") or {}).get("device", ""))
    found = re.search(r"\[device:([^,\]]+)", device)
    if found:
        return f"device:{found.group(1)}"
    if device.startswith("rpc:"):
        return device.split()[0]
    return str(report["host"]["isa_class"])


def metrics_of(report: dict[str, Any], where: str) -> Metrics:
    """The gate's metrics from a report.json dict; `where` names the file for errors."""
    try:
        q = report["quality"]
        if q.get("accuracy_drop") is not None:
            measure, quality = "accuracy", q["quantized"]["accuracy"]
        elif report.get("config", {}).get("metric") == "cosine":
            measure, quality = "cosine", 100.0 * float(q["quantized"]["cosine"])
        else:
            measure, quality = "agreement", 100.0 * float(q["quantized"]["agreement"])
        lat = report["latency"].get("quantized") or {}
        return Metrics(model=report["model"]["name"], target=report["target"],
                       device=report["device"].get("resolved", "host"),
                       isa_class=measured_where(report), measure=measure,
                       quality=None if quality is None else float(quality),
                       quantized_bytes=int(report["size"]["quantized_bytes"]),
                       latency_ms=lat.get("median_ms"), iqr_ms=lat.get("iqr_ms"),
                       mad_ms=lat.get("mad_ms"), runs=lat.get("runs"))
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise InputError(f"{where}: not a complete quantflow report (missing {exc}); fix: pass "
                         "the report.json that `quantflow compile -o DIR` wrote") from None


def metrics_of_record(record: dict[str, Any]) -> Metrics:
    """The metrics stored in a history record (quantflow/history.py)."""
    return Metrics(**record["metrics"])


def check_comparable(cand: Metrics, base: Metrics, cand_name: str, base_name: str) -> None:
    """An InputError naming both files when they are runs of different things."""
    for k in KEY:
        if getattr(cand, k) != getattr(base, k):
            raise InputError(f"{cand_name} and {base_name} are different runs: {k} "
                             f"{getattr(cand, k)!r} vs {getattr(base, k)!r}; fix: compare "
                             f"reports of the same model, target and device")
    if cand.measure != base.measure:
        raise InputError(f"{cand_name} measures {cand.measure} but {base_name} measures "
                         f"{base.measure}; fix: evaluate both on the same data and --metric")


@dataclass(frozen=True)
class Baseline:
    """What the candidate is held to: one report, or the median of history runs."""

    source: str
    measure: str
    isa_class: str
    quality: float | None
    quantized_bytes: float
    latency_ms: float | None
    noise_ms: float | None  # standard error of the baseline median (see the module doc)
    runs: int  # how many runs it summarises


def baseline_of(m: Metrics, source: str) -> Baseline:
    return Baseline(source=source, measure=m.measure, isa_class=m.isa_class, quality=m.quality,
                    quantized_bytes=m.quantized_bytes, latency_ms=m.latency_ms,
                    noise_ms=median_se(m), runs=1)


def median_se(m: Metrics) -> float:
    """Standard error of a run's median latency from its timings' MAD (0 when unknown)."""
    if not m.mad_ms or not m.runs:
        return 0.0
    return 1.2533 * 1.4826 * m.mad_ms / math.sqrt(m.runs)


def _iqr(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q3 - q1


def _median(values: Sequence[float | None]) -> float | None:
    vs = [float(v) for v in values if v is not None]
    return statistics.median(vs) if vs else None


def baseline_from_history(records: Sequence[dict[str, Any]], cand: Metrics,
                          last: int) -> Baseline | None:
    """The median of the last `last` passing runs of the candidate's model, target, device,
    CPU class and measure (records oldest first); None when there are none yet."""
    runs = [m for m in (metrics_of_record(r) for r in records if r.get("passed"))
            if m.key() == cand.key() and m.measure == cand.measure][-last:]
    if not runs:
        return None
    medians = [m.latency_ms for m in runs if m.latency_ms is not None]
    noise = max([_iqr(medians), *(median_se(m) for m in runs)])
    return Baseline(source=f"history: median of the last {len(runs)} passing run(s)",
                    measure=cand.measure, isa_class=cand.isa_class,
                    quality=_median([m.quality for m in runs]),
                    quantized_bytes=float(statistics.median(m.quantized_bytes for m in runs)),
                    latency_ms=_median(medians), noise_ms=noise if medians else None,
                    runs=len(runs))


@dataclass(frozen=True)
class Check:
    """One metric's verdict; `status` is pass, fail or skip, `message` says it all."""

    metric: str
    status: str
    baseline: float | None
    candidate: float | None
    threshold: str
    rule: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def latency_rule(t: GateThresholds) -> str:
    return (f"regression iff candidate median > baseline median x (1 + "
            f"{t.max_latency_growth:g}%) and candidate - baseline > {t.latency_noise_k:g} x "
            "noise (noise = sqrt(se_b^2 + se_c^2), se = 1.858 x MAD / sqrt(runs), the standard "
            "error of a median; from history se_b >= the IQR of the runs' medians)")


def _accuracy(c: Metrics, b: Baseline, t: GateThresholds) -> Check:
    rule = f"regression iff baseline - candidate > {t.max_acc_drop:g} points ({c.measure}, %)"
    if c.quality is None or b.quality is None:
        return Check("accuracy", "skip", b.quality, c.quality, f"{t.max_acc_drop:g} points",
                     rule, f"{c.measure}: not measured in both runs (no evaluation data)")
    drop = b.quality - c.quality
    bad = drop > t.max_acc_drop
    msg = (f"{c.measure} {c.quality:.2f}% vs baseline {b.quality:.2f}%: "
           f"{'dropped' if drop > 0 else 'changed'} {drop:+.2f} points "
           f"{'>' if bad else '<='} --max-acc-drop {t.max_acc_drop:g}")
    return Check("accuracy", "fail" if bad else "pass", b.quality, c.quality,
                 f"{t.max_acc_drop:g} points", rule, msg)


def _size(c: Metrics, b: Baseline, t: GateThresholds) -> Check:
    limit = b.quantized_bytes * (1 + t.max_size_growth / 100)
    rule = f"regression iff candidate bytes > baseline bytes x (1 + {t.max_size_growth:g}%)"
    growth = 100.0 * (c.quantized_bytes / b.quantized_bytes - 1) if b.quantized_bytes else 0.0
    bad = c.quantized_bytes > limit
    msg = (f"quantized size {c.quantized_bytes} B vs baseline {b.quantized_bytes:.0f} B: "
           f"{growth:+.2f}% {'>' if bad else '<='} --max-size-growth {t.max_size_growth:g}%")
    return Check("size", "fail" if bad else "pass", b.quantized_bytes, c.quantized_bytes,
                 f"{limit:.0f} B", rule, msg)


def _latency(c: Metrics, b: Baseline, t: GateThresholds) -> Check:
    rule = latency_rule(t)
    if c.latency_ms is None or b.latency_ms is None:
        return Check("latency", "skip", b.latency_ms, c.latency_ms, "-", rule,
                     "latency: not measured in both runs")
    if c.isa_class != b.isa_class:
        return Check("latency", "skip", b.latency_ms, c.latency_ms, "-", rule,
                     f"latency: measured on different CPU classes ({c.isa_class} vs baseline "
                     f"{b.isa_class}), not comparable")
    noise = math.hypot(b.noise_ms or 0.0, median_se(c))
    limit = max(b.latency_ms * (1 + t.max_latency_growth / 100),
                b.latency_ms + t.latency_noise_k * noise)
    bad = c.latency_ms > limit
    growth = 100.0 * (c.latency_ms / b.latency_ms - 1) if b.latency_ms else 0.0
    msg = (f"median latency {c.latency_ms:.4f} ms vs baseline {b.latency_ms:.4f} ms "
           f"({growth:+.1f}%, noise {noise:.4f} ms): {'>' if bad else '<='} limit "
           f"{limit:.4f} ms")
    return Check("latency", "fail" if bad else "pass", b.latency_ms, c.latency_ms,
                 f"{limit:.4f} ms", rule, msg)


def compare(cand: Metrics, base: Baseline | None, t: GateThresholds) -> list[Check]:
    """Accuracy, size and latency verdicts, in that order; all skipped without a baseline."""
    if base is None:
        return [Check(m, "skip", None, None, "-", "-", f"{m}: no baseline yet (first run of "
                      f"{cand.model} / {cand.target} / {cand.device} / {cand.isa_class})")
                for m in METRICS]
    return [_accuracy(cand, base, t), _size(cand, base, t), _latency(cand, base, t)]
