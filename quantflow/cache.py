"""Where quantflow keeps what it can rebuild: one folder, honouring XDG_CACHE_HOME.

Search evaluations (search.sqlite), latency tables, TVM tuning databases, the aarch64 TVM
runtime and the arm64 Python for emulation all live under `cache_dir()`; deleting it costs
time, never results.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """`$XDG_CACHE_HOME/quantflow/<parts>` (default `~/.cache/quantflow/<parts>`)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base, "quantflow", *parts)
