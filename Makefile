# The two commands of the README. Both set everything up first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-slow check bench

setup:
	bash tools/setup.sh

# Quantize the built-in default model (ResNet on Fashion-MNIST) for ONNX Runtime and report.
demo: setup
	$(VENV)/bin/quantflow compile zoo:resnet_fmnist --target ort --bits 8 --max-drop 1.0 -o out/demo

# Default test suite (~10 min on 2 cores), then mypy on the package.
test: setup
	$(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile
	$(PY) -m mypy

# Everything marked slow (minutes each).
test-slow: setup
	$(PY) -m pytest -q -m slow
