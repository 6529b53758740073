"""Build quantflow/zoo/text/sentences.txt: 1000 real English sentences, offline.

Source: the docstrings of CPython 3.11's standard library (PSF license), written by people to
be read by people. A sentence is kept when it is 8-30 words of plain prose (letters, commas,
colons, apostrophes and hyphens, ending in a full stop), deduplicated case-insensitively,
then shuffled with seed 0. The file is committed so every machine measures the same sentences
whatever Python it runs; re-run this script only to change the corpus.

    python tools/make_sentences.py [N]
"""

from __future__ import annotations

import ast
import random
import re
import sys
import sysconfig
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "quantflow" / "zoo" / "text" / "sentences.txt"
PROSE = re.compile(r"[A-Z][A-Za-z ,;:'\-]+[a-z]\.")


def docstrings(root: Path) -> list[str]:
    out: list[str] = []
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if {"test", "idlelib", "site-packages"} & set(path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
                doc = ast.get_docstring(node)
                if doc:
                    out.append(doc)
    return out


def sentences(docs: list[str]) -> list[str]:
    seen: set[str] = set()
    kept: list[str] = []
    for doc in docs:
        for para in doc.split("\n\n"):
            for s in re.split(r"(?<=[.!?])\s+", " ".join(para.split())):
                if 8 <= len(s.split()) <= 30 and PROSE.fullmatch(s) and s.lower() not in seen:
                    seen.add(s.lower())
                    kept.append(s)
    return kept


def main(n: int = 1000) -> None:
    if sys.version_info[:2] != (3, 11):
        sys.exit("run with Python 3.11: the committed corpus comes from its standard library")
    kept = sentences(docstrings(Path(sysconfig.get_paths()["stdlib"])))
    random.Random(0).shuffle(kept)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(kept[:n]) + "\n")
    print(f"{min(n, len(kept))} of {len(kept)} sentences -> {OUT}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
