#!/usr/bin/env bash
# The aarch64 TVM Python packages for an emulated TVM RPC "board" (tests/test_tvm_rpc.py, slow:
# `python -m tvm.exec.rpc_server` under qemu-aarch64 with the aarch64 CPython of
# tools/setup_arm64_python.sh). Unpacks the aarch64 wheels of apache-tvm (same version as the
# compiler: the module ABI must match) and its runtime deps into
# ~/.cache/quantflow/arm64-tvm-site (~350 MB unpacked). Warns and exits 0 on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-${VENV:-.venv}/bin/python}
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/quantflow"
SITE="$CACHE/arm64-tvm-site"
[ -f "$SITE/.done" ] && exit 0
warn() { echo "quantflow: warning: aarch64 TVM packages not set up ($*); the emulated RPC board test is skipped" >&2; exit 0; }
pin() { grep -i "^$1==" constraints.txt | head -1; }
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: --platform manylinux2014_aarch64 \
  --platform manylinux_2_28_aarch64 --python-version 3.11 -d "$TMP" \
  "$(pin apache-tvm)" "$(pin apache-tvm-ffi)" "$(pin psutil)" "$(pin cloudpickle)" \
  "$(pin ml_dtypes)" "$(pin typing_extensions)" || warn "pip download failed"
rm -rf "$SITE"; mkdir -p "$SITE"
for w in "$TMP"/*.whl; do "$PY" -m zipfile -e "$w" "$SITE" || warn "cannot unpack $w"; done
touch "$SITE/.done"
