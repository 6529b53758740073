#!/usr/bin/env bash
# Rewrite constraints.txt from the venv: the deliberate way to move a dependency. Upgrade in the
# venv (e.g. `.venv/bin/pip install -U onnxruntime`), run the tests, run this, commit the result.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${VENV:-.venv}/bin/python
{
  cat <<'HEADER'
# The exact versions tools/setup.sh installs (`pip install -c constraints.txt`): the versions the
# test suite and the benchmarks ran with, so two installs of one commit get the same packages.
# Upgrading is a deliberate commit: upgrade in the venv, run the tests, then regenerate this file
# with `bash tools/update_constraints.sh` (pip freeze of .venv) and commit it.
# torch carries no local label: `torch==2.13.0` matches the CPU wheel 2.13.0+cpu (PEP 440 ignores
# a local label the specifier does not name), and pip prefers that wheel where it can see it, as a
# local version sorts after the public one.
HEADER
  "$PY" -m pip freeze --all --exclude-editable | grep -E '^pip==' || true
  "$PY" -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*$/\1/'
} >constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) pins"
