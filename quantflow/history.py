"""The run history of `quantflow gate --history DIR`: DIR/history.jsonl, one JSON record per
gated run, oldest first.

A record (schema "quantflow.history/1"):
  schema, date (ISO 8601 UTC), commit (`git rev-parse HEAD`, else $GITHUB_SHA or
  $CI_COMMIT_SHA, else null), model, target, device, host {machine, model, cores, isa_class},
  versions {package: version}, passed (the gate's verdict for this run), report (path),
  metrics (quantflow.regress.Metrics: measure, quality, quantized_bytes, latency_ms, iqr_ms,
  mad_ms, runs, and the key fields again).

Appends are atomic for readers and concurrent writers: the whole line goes out in one
O_APPEND write under an exclusive lock, then fsync; a line left half-written by a crash (or
edited by hand) is skipped with a warning on load, and the next append starts on a new line.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from quantflow.regress import Metrics

SCHEMA = "quantflow.history/1"
FILE = "history.jsonl"


def commit() -> str | None:
    """The commit being gated: the git checkout's HEAD, else what the CI says."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=False)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass  # no git here: fall back to the CI's variables
    return os.environ.get("GITHUB_SHA") or os.environ.get("CI_COMMIT_SHA") or None


def record_of(report: dict[str, Any], metrics: Metrics, *, passed: bool,
              report_path: str) -> dict[str, Any]:
    """The history record of one gated run."""
    host = report.get("host", {})
    return {"schema": SCHEMA,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "commit": commit(), "model": metrics.model, "target": metrics.target,
            "device": metrics.device,
            "host": {k: host.get(k) for k in ("machine", "model", "cores", "isa_class")},
            "versions": report.get("versions", {}), "passed": passed, "report": report_path,
            "metrics": metrics.to_dict()}


def append(directory: Path, record: dict[str, Any]) -> Path:
    """Append `record` to DIR/history.jsonl (made if missing) atomically; return the file."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILE
    line = json.dumps(record, sort_keys=True) + "\n"
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        _lock(fd)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = "\n" + line  # a torn last line stays alone (and is skipped on load)
        data = line.encode()
        while data:  # one write for any sane record; loop in case the OS writes less
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def _lock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: O_APPEND single writes are the only guard there
        return
    fcntl.flock(fd, fcntl.LOCK_EX)  # released by close


def load(directory: Path | str) -> list[dict[str, Any]]:
    """Every record in DIR/history.jsonl, oldest first ([] when there is none); a line that
    is not a complete record is skipped with a warning naming it."""
    path = Path(directory) / FILE
    if not path.exists():
        return []
    records: list[dict[str, Any]] = []
    for n, text in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not text.strip():
            continue
        try:
            rec = json.loads(text)
            ok = (isinstance(rec, dict) and rec.get("schema") == SCHEMA
                  and isinstance(rec.get("metrics"), dict)
                  and set(rec["metrics"]) == set(Metrics.__dataclass_fields__))
        except json.JSONDecodeError:
            ok = False
        if not ok:
            print(f"quantflow: warning: {path}:{n}: not a complete history record, skipped",
                  file=sys.stderr)
            continue
        records.append(rec)
    return records


def matching(records: list[dict[str, Any]], metrics: Metrics) -> list[dict[str, Any]]:
    """The records of the same model, target, device and CPU class as `metrics`."""
    key = metrics.key()
    return [r for r in records
            if {k: r["metrics"].get(k) for k in key} == key]
