"""Atomic output folders: `-o` is either the complete result of one run or as it was before.

`staging(path)` checks `-o` before any work, creates a hidden staging folder beside it (same
filesystem, so the final move is a rename), yields it, and on success renames it into place.
On any exception, Ctrl-C or SIGTERM it deletes the staging folder and leaves `-o` untouched.

What `-o` may be:
- absent: it is created (missing parent folders are created up front, beside nothing else);
- an empty folder, or a folder an earlier quantflow run wrote (it holds the `.quantflow`
  marker, or, from before the marker, a report.json of quantflow's schema): replaced as a whole by the new result; the old one is moved aside first and
  deleted only after the new one is in place (restored if that move fails);
- anything else: a usage error (exit 2) before any work: a file, a symbolic link, a non-empty
  folder quantflow did not write (never half-overwritten, never deleted), or a location that
  cannot be written.

Artifacts that record their own path (report.json, manifests, READMEs) are rewritten from the
staging path to the final one before the rename. A run killed with SIGKILL cannot clean up: its
staging folder (`.NAME.quantflow-tmp-PID-*`) stays beside `-o` and the next run with the same
`-o` removes it once that process is gone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantflow.errors import UsageError

log = logging.getLogger("quantflow.outdir")

#: file in every folder quantflow publishes: says that a later run may replace the folder
MARKER = ".quantflow"
#: text artifacts whose recorded paths are rewritten from the staging folder to `-o`
_TEXT_SUFFIXES = (".json", ".md", ".txt", ".py", ".sh")
_MAX_TEXT = 64 * 2**20
_SHOW = 4


def _tag(out: Path, kind: str) -> str:
    return f".{out.name}.quantflow-{kind}-"


def check(path: str | os.PathLike[str]) -> Path:
    """The absolute `-o` folder, if it can be (re)placed; UsageError (exit 2) otherwise."""
    out = Path(os.path.abspath(path))
    if out.parent == out or not out.name:
        raise UsageError(f"-o {path}: not a folder quantflow can create or replace; fix: name "
                         "a new folder, e.g. -o out/model")
    if out.is_symlink():
        raise UsageError(f"-o {path}: is a symbolic link; fix: pass the folder it points to, "
                         "or a new one")
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"-o {path}: exists and is not a folder; fix: pass a new or empty "
                             "folder, or remove that file")
        try:
            entries = sorted(e.name for e in out.iterdir())
        except OSError as exc:
            raise UsageError(f"-o {path}: cannot be read ({exc.strerror}); fix: pass a folder "
                             "you own") from None
        if entries and not _ours(out, entries):
            listed = ", ".join(entries[:_SHOW]) + (" ..." if len(entries) > _SHOW else "")
            raise UsageError(f"-o {path}: a non-empty folder that quantflow did not write "
                             f"({listed}); quantflow replaces -o as a whole and never deletes "
                             "files it did not write; fix: pass a new or empty folder")
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"-o {path}: {ancestor} is a file, not a folder; fix: pick another "
                         "location")
    return out


def _ours(out: Path, entries: list[str]) -> bool:
    """A folder quantflow wrote: the marker, or (written before the marker existed) a
    compile's report.json of quantflow's schema, or exactly an optimize's two files."""
    if MARKER in entries or set(entries) == {"model.pt2", "model.onnx"}:
        return True
    report = out / "report.json"
    try:
        if report.is_file() and report.stat().st_size < _MAX_TEXT:
            schema = json.loads(report.read_text()).get("schema")
            return isinstance(schema, str) and schema.startswith("quantflow.report/")
    except (OSError, ValueError, AttributeError):
        return False
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(out: Path) -> None:
    """Remove staging folders of runs that were killed; put back an old output a killed run
    had moved aside (it died between the two renames of a publish)."""
    for kind in ("tmp", "old"):
        for p in out.parent.glob(f"{_tag(out, kind)}*"):
            pid = p.name[len(_tag(out, kind)):].split("-", 1)[0]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if kind == "old" and not out.exists():
                log.warning("%s: restoring the previous output a killed run left at %s", out, p)
                os.rename(p, out)
            else:
                shutil.rmtree(p, ignore_errors=True)


def _make_staging(out: Path) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(out)
        while True:
            tmp = out.parent / f"{_tag(out, 'tmp')}{os.getpid()}-{secrets.token_hex(4)}"
            try:
                tmp.mkdir()  # mode from the umask, like any folder the user creates
                return tmp
            except FileExistsError:
                continue
    except OSError as exc:
        raise UsageError(f"-o {out}: cannot write in {out.parent} ({exc.strerror}); fix: pick "
                         "a writable location") from None


def relocate(obj: Any, tmp: Path, out: Path) -> Any:
    """`obj` (JSON-like) with every string's staging path replaced by the final path."""
    if isinstance(obj, str):
        return obj.replace(str(tmp), str(out))
    if isinstance(obj, dict):
        return {k: relocate(v, tmp, out) for k, v in obj.items()}
    if isinstance(obj, list):
        return [relocate(v, tmp, out) for v in obj]
    if isinstance(obj, tuple):
        return tuple(relocate(v, tmp, out) for v in obj)
    return obj


def _relocate_files(tmp: Path, out: Path) -> None:
    old, new = str(tmp).encode(), str(out).encode()
    for f in tmp.rglob("*"):
        if f.suffix in _TEXT_SUFFIXES and f.is_file() and not f.is_symlink() \
                and f.stat().st_size <= _MAX_TEXT:
            data = f.read_bytes()
            if old in data:
                f.write_bytes(data.replace(old, new))


def _publish(tmp: Path, out: Path, command: str) -> None:
    from quantflow import __version__

    _relocate_files(tmp, out)
    (tmp / MARKER).write_text(json.dumps({"written_by": f"quantflow {command}",
                                          "version": __version__}) + "\n")
    try:
        os.rename(tmp, out)  # absent or empty -o: one atomic rename
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    # a previous output: move it aside, move the new one in, then delete the old one
    old = out.parent / f"{_tag(out, 'old')}{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@dataclass(frozen=True)
class Staging:
    """Where a run writes (`tmp`) and where the result goes (`out`)."""

    tmp: Path
    out: Path

    def relocate(self, obj: Any) -> Any:
        return relocate(obj, self.tmp, self.out)


@contextlib.contextmanager
def staging(path: str | os.PathLike[str], command: str,
            publish_on: tuple[type[BaseException], ...] = ()) -> Iterator[Staging]:
    """Check `-o`, stage the run's output beside it, publish it atomically on success.

    Exceptions of the types in `publish_on` publish too, then propagate with the staging path
    in their message replaced by `-o` (compile's budget gate: a run over --max-drop still
    ships its artifacts and report, and exits 10). Anything else, KeyboardInterrupt included,
    removes the staging folder and leaves `-o` as it was."""
    out = check(path)
    try:
        stage = Staging(_make_staging(out), out)
        try:
            yield stage
        except publish_on as exc:
            _publish(stage.tmp, out, command)
            exc.args = tuple(stage.relocate(a) for a in exc.args)
            raise
        _publish(stage.tmp, out, command)
    except BaseException:
        # by pattern, not by `stage`: an interrupt can land between mkdir and assignment
        for p in out.parent.glob(f"{_tag(out, 'tmp')}{os.getpid()}-*"):
            shutil.rmtree(p, ignore_errors=True)
        raise
