"""Every malicious or broken input of the corpus (tests/corpus/make_corpus.py) through the CLI:
its documented exit code, a one-line error naming the problem, no traceback, no code run from
the file (the payloads' marker never appears), and `-o` exactly as it was before."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from quantflow.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent / "corpus"))
from make_corpus import CASES, MARKER, Case, write


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    write(root)
    return root


def _snapshot(path: Path) -> object:
    """Everything observable about `path`: kind, and for folders every file's bytes."""
    if path.is_symlink():
        return ("symlink", os.readlink(path))
    if not path.exists():
        return None
    if path.is_file():
        return ("file", path.read_bytes())
    return ("dir", {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None
                    for p in sorted(path.rglob("*"))})


@pytest.fixture()
def read_only(tmp_path: Path) -> Iterator[Path]:
    """A folder this process cannot create anything in. root ignores permission bits, so
    root gets a path under /sys (mkdir there fails with EPERM even for root)."""
    if os.geteuid() == 0:
        if not Path("/sys/kernel").is_dir():
            pytest.skip("no read-only location for root on this system")
        yield Path("/sys/quantflow-test-read-only")
        return
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    yield ro
    ro.chmod(0o755)


def _out(case: Case, tmp_path: Path, read_only: Path) -> Path:
    out = tmp_path / "out"
    if case.out == "prior":  # an earlier run's output: must survive byte for byte
        out.mkdir()
        (out / ".quantflow").write_text('{"written_by": "quantflow compile"}\n')
        (out / "report.json").write_text('{"schema": "quantflow.report/1", "old": true}\n')
        (out / "plan.json").write_text("{}\n")
    elif case.out == "file":
        out.write_text("not a folder\n")
    elif case.out == "foreign":
        out.mkdir()
        (out / "thesis.tex").write_text("precious\n")
    elif case.out == "symlink":
        (tmp_path / "elsewhere").mkdir()
        out.symlink_to(tmp_path / "elsewhere")
    elif case.out == "readonly":
        out = read_only / "sub" / "out"
    return out


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        return int(exc.code or 0)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus_case(case: Case, corpus: Path, tmp_path: Path, read_only: Path,
                     capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    (corpus / MARKER).unlink(missing_ok=True)  # each case judged on its own
    out = _out(case, tmp_path, read_only)
    before, siblings = _snapshot(out), _siblings(out)
    for k, v in case.env:
        monkeypatch.setenv(k, v)
    argv = [a.format(root=corpus, out=out) for a in case.argv]
    code = _run(argv)
    err = capsys.readouterr().err
    assert code == case.code, f"{case.name}: exit {code}, expected {case.code}\n{err}"
    assert not (corpus / MARKER).exists(), f"{case.name}: code from the file ran"
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert case.expect in last, f"{case.name}: {case.expect!r} not in {last!r}"
    if code != 2 or "bad shape" not in last:  # argparse prints its usage before its line
        assert last.startswith("quantflow: error:"), last
    assert _snapshot(out) == before, f"{case.name}: -o changed"
    assert _siblings(out) == siblings, f"{case.name}: left files beside -o"


def _siblings(out: Path) -> list[str]:
    try:
        return sorted(p.name for p in out.parent.iterdir())
    except OSError:
        return []


def test_corpus_covers_every_kind() -> None:
    kinds = {c.kind for c in CASES}
    assert len(kinds) == 9 and len(CASES) >= 70
    assert len({c.name for c in CASES}) == len(CASES)
