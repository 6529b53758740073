"""What the user sees while quantflow works: progress bars (rate, elapsed, ETA) and one line
per pipeline stage, on stderr.

Shown on a terminal only, unless forced (`force(True)` or QUANTFLOW_PROGRESS=1), and never
when quiet (`set_quiet(True)`, the CLI's -q, or QUANTFLOW_QUIET=1). stdout (the results) is
never touched. On a stream that is not a terminal (a CI log) a bar writes whole lines, no
carriage returns, and at most one every `LOG_INTERVAL_S` seconds, so a long run leaves a
readable log instead of megabytes of redraws.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm import tqdm

#: on a non-terminal a bar prints its first line after this many seconds and then at most
#: one line per this many seconds (short work leaves no trace in a CI log)
LOG_INTERVAL_S = 10.0

_quiet: bool | None = None  # None: QUANTFLOW_QUIET decides
_forced: bool | None = None  # None: QUANTFLOW_PROGRESS decides


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def set_quiet(quiet: bool | None) -> None:
    """True: no bars and no stage lines; None: back to the QUANTFLOW_QUIET default."""
    global _quiet
    _quiet = quiet


def force(on: bool | None) -> None:
    """True: show progress even when stderr is not a terminal (as rate-limited lines);
    None: back to the QUANTFLOW_PROGRESS default."""
    global _forced
    _forced = on


def is_quiet() -> bool:
    return _env_flag("QUANTFLOW_QUIET") if _quiet is None else _quiet


def _is_tty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or file-less stream
        return False


def enabled(stream: IO[str] | None = None) -> bool:
    """Whether progress goes to `stream` (default: the current sys.stderr)."""
    if is_quiet():
        return False
    forced = _env_flag("QUANTFLOW_PROGRESS") if _forced is None else _forced
    return forced or _is_tty(stream or sys.stderr)


def _columns(stream: IO[str]) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


class _Lines:
    """A file for tqdm on a non-terminal: each redraw becomes one plain line; the clearing
    writes of a closing bar (carriage returns and blanks) vanish."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, s: str) -> int:
        text = s.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")
        return len(s)

    def flush(self) -> None:
        self.stream.flush()


def bar(iterable_or_total: Iterable[Any] | int, desc: str, unit: str = "it", *,
        disable: bool = False, stream: IO[str] | None = None,
        interval: float = LOG_INTERVAL_S) -> tqdm[Any]:
    """A tqdm bar on stderr: `desc`, done/total, elapsed, ETA and rate in `unit`s.

    Pass an iterable (iterate the bar) or a total (call `.update(n)`, then `.close()` or use
    it as a context manager). `disable` is the caller's own switch (e.g. `progress=False`);
    the bar is also off when quiet or not on a terminal (see `enabled`). `interval`: the
    non-terminal rate limit in seconds.
    """
    out = stream or sys.stderr
    off = disable or not enabled(out)
    iterable, total = ((None, iterable_or_total) if isinstance(iterable_or_total, int)
                       else (iterable_or_total, None))
    if _is_tty(out):
        kw: dict[str, Any] = {"file": out, "mininterval": 0.1}
        # a terminal that reports no width (a bare pty, some CI runners) would get an empty
        # bar from tqdm: give it a fixed one instead
        kw.update({"dynamic_ncols": True} if _columns(out) else {"ncols": 100, "nrows": 20})
    else:
        # miniters=0 with mininterval: the clock alone decides; delay: short work is silent
        kw = {"file": _Lines(out), "mininterval": interval, "maxinterval": interval,
              "miniters": 0, "delay": interval, "ncols": 100}
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, disable=off, **kw)


class StageLine:
    """`[3/13] plan ... 4.1 s`: where a multi-stage run is. On a terminal the line is written
    when the stage starts (bars inside it draw over it and clear themselves) and completed
    with its time when it ends; forced onto a non-terminal, or with `inline=False` (log lines
    will interleave, e.g. under -v), a start and an end line."""

    def __init__(self, index: int, total: int, name: str,
                 stream: IO[str] | None = None, inline: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.text = f"[{index}/{total}] {name} ..."
        self.on = enabled(self.stream)
        self.tty = inline and _is_tty(self.stream)
        if self.on:
            self.stream.write(self.text if self.tty else self.text + "\n")
            self.stream.flush()

    def done(self, seconds: float, failed: bool = False) -> None:
        if not self.on:
            return
        what = "failed after" if failed else ("" if self.tty else "done,")
        end = f"{what} {seconds:.1f} s".strip()
        self.stream.write(f"\r{self.text} {end}\n" if self.tty else f"{self.text} {end}\n")
        self.stream.flush()


__all__ = ["LOG_INTERVAL_S", "StageLine", "bar", "enabled", "force", "is_quiet", "set_quiet"]
