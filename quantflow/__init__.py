"""quantflow: post-training quantization and deployment compiler for PyTorch models."""

__version__ = "0.1.0"
