"""installed_versions() reports what is installed, and constraints.txt pins exactly that."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest

from quantflow.versions import PACKAGES, installed_versions

CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"


def _pins() -> dict[str, str]:
    """{normalized name: version} of the `name==version` lines of constraints.txt."""
    pins: dict[str, str] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt: {line!r} is not an exact pin"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins


def test_installed_versions_match_metadata() -> None:
    versions = installed_versions()
    for dist, version in versions.items():
        assert version == metadata.version(dist)
    # one entry per reported package at most, and the core ones are always there
    assert len(versions) <= len(PACKAGES)
    for dist in ("quantflow", "torch", "onnx", "onnxruntime", "numpy"):
        assert dist in versions


@pytest.mark.parametrize("dist", ["onnxruntime", "numpy", "torch"])
def test_constraints_pin_the_installed_version(dist: str) -> None:
    """Fails when a package was upgraded in the venv without regenerating the lock file
    (tools/update_constraints.sh), or the lock file moved without a reinstall (tools/setup.sh)."""
    installed = metadata.version(dist)
    pinned = _pins().get(dist)
    assert pinned is not None, f"constraints.txt does not pin {dist}"
    # torch's CPU wheel is 2.13.0+cpu; the lock pins the public version, which matches it
    assert pinned == installed.split("+", 1)[0], (
        f"{dist} {installed} is installed but constraints.txt pins {pinned}: run "
        "tools/update_constraints.sh after a deliberate upgrade, or tools/setup.sh to reinstall")
