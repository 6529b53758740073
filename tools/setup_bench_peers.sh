#!/usr/bin/env bash
# Side venv for the peer tools of tools/bench_ort.py (nncf, torchao PT2E): they must not change
# the project's torch or onnxruntime, so they live in their own venv, which bench_ort.py calls
# through --nncf-python / --torchao-python (default /tmp/benchvenv/bin/python).
#
#   bash tools/setup_bench_peers.sh [VENV]      # default $BENCHVENV or /tmp/benchvenv
#
# Order matters: torch 2.13.0 (CPU) alone first (an unpinned torch pulls GBs of CUDA wheels;
# pip finds the local CPU wheel), then nncf + onnx + onnxruntime, then torchao 0.18.0. Every
# install takes a small constraints file pinning torch 2.13.0 and the project's onnxruntime
# (from constraints.txt: the same ORT build, so the same kernels as the project's ORT), and the
# script fails if pip freeze shows either moved. Idempotent: re-running is fast.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-${BENCHVENV:-/tmp/benchvenv}}
PY=${PYTHON:-python3}
TORCH=2.13.0
TORCHAO=0.18.0
ORT=$(sed -nE 's/^onnxruntime==([^ ]+)$/\1/p' constraints.txt)
[ -n "$ORT" ] || { echo "setup_bench_peers: no onnxruntime pin in constraints.txt" >&2; exit 1; }

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PINS="$VENV/peer-constraints.txt"
printf 'torch==%s\nonnxruntime==%s\n' "$TORCH" "$ORT" >"$PINS"
PIP=("$VENV/bin/python" -m pip install -q -c "$PINS")

check() {  # torch and onnxruntime still the pinned versions after each step
  local frz
  frz=$("$VENV/bin/python" -m pip freeze)
  grep -qE "^torch==${TORCH//./\\.}(\+cpu)?$" <<<"$frz" || {
    echo "setup_bench_peers: torch is not $TORCH after $1:" >&2
    grep -iE '^torch==' <<<"$frz" >&2 || true
    exit 1
  }
  if [ "$1" != torch ]; then
    grep -qxF "onnxruntime==$ORT" <<<"$frz" || {
      echo "setup_bench_peers: onnxruntime is not $ORT after $1:" >&2
      grep -iE '^onnxruntime' <<<"$frz" >&2 || true
      exit 1
    }
  fi
}

"${PIP[@]}" "torch==$TORCH"
check torch
"${PIP[@]}" nncf onnx "onnxruntime==$ORT"
check nncf
"${PIP[@]}" "torchao==$TORCHAO"
check torchao
"$VENV/bin/python" - <<'EOF'
import nncf, onnx, onnxruntime, torch, torchao
print(f"setup_bench_peers: done: torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
      f"onnx {onnx.__version__}, nncf {nncf.__version__}, torchao {torchao.__version__}")
EOF
