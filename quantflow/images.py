"""Images: preprocessing for image files and folders, and the offline natural-photo set.

ImageNet has no offline copy, so the ImageNet models are calibrated and evaluated on the 8 RGB
photos that ship with scikit-image and scikit-learn, each expanded into 20 deterministic views
(2 scales x 5 crops x horizontal flip) = 160 distinct 224x224 inputs. The calib/eval split is
by source photo, so a photo seen during calibration never appears in evaluation.
Everything here reads local files only and is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from quantflow.config import PREPROCESSINGS

#: Fashion-MNIST train-split pixel statistics (of pixel/255); exact: 0.28604, 0.35302.
#: Training and evaluation use the same constants: a mismatch would silently cost accuracy.
FMNIST_MEAN: float = 0.2860
FMNIST_STD: float = 0.3530
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- preprocessing


def normalize_fmnist(images_u8: np.ndarray) -> Tensor:
    x = torch.from_numpy(images_u8.astype(np.float32) / 255.0)
    return ((x - FMNIST_MEAN) / FMNIST_STD).unsqueeze(1).contiguous()





def _imagenet_tensor(img: Image.Image, size: int = 224, resize: int | None = None) -> Tensor:
    """Resize shorter side to ``resize`` (default size*256/224), center crop, normalize."""
    resize = round(size * 256 / 224) if resize is None else resize
    img = _resize_shorter(img.convert("RGB"), resize)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return _to_normalized(img.crop((left, top, left + size, top + size)))


def _resize_shorter(img: Image.Image, shorter: int) -> Image.Image:
    w, h = img.size
    if w <= h:
        new = (shorter, max(shorter, round(h * shorter / w)))
    else:
        new = (max(shorter, round(w * shorter / h)), shorter)
    return img.resize(new, Image.Resampling.BILINEAR)


def _to_normalized(img: Image.Image) -> Tensor:
    arr = np.asarray(img, dtype=np.float32) / 255.0  # H, W, 3
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy(((arr - mean) / std).transpose(2, 0, 1).copy())


def preprocess_image(pil_image: Image.Image, preprocessing: str) -> Tensor:
    """One PIL image -> a float32 (C,H,W) tensor, preprocessed like the model's training data.

    * ``"imagenet"``: RGB, shorter side 256 (bilinear), center crop 224, ImageNet mean/std.
    * ``"fashion-mnist"``: grayscale, resized to 28x28, FMNIST mean/std. Fashion-MNIST
      items are light objects on a black background; photos are not inverted for you.
    """
    if preprocessing == "imagenet":
        return _imagenet_tensor(pil_image)
    if preprocessing == "fashion-mnist":
        gray = pil_image.convert("L").resize((28, 28), Image.Resampling.BILINEAR)
        return normalize_fmnist(np.asarray(gray, dtype=np.uint8)[None])[0]
    raise ValueError(
        f"unknown preprocessing {preprocessing!r}; choose one of {list(PREPROCESSINGS)}"
    )


# --------------------------------------------------------------------------- natural images


@dataclass(frozen=True)
class NaturalPhoto:
    """One bundled photo. ``group`` ties near-duplicates (a stereo pair) to one split side."""

    name: str
    group: str
    load: Callable[[], np.ndarray]


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return np.asarray(getattr(skimage.data, name)())

    return load


def _motorcycle(index: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return np.asarray(skimage.data.stereo_motorcycle()[index])

    return load


def _sklearn(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return np.asarray(load_sample_image(filename))

    return load


#: The RGB natural photos available offline (scikit-image's other RGB images are
#: microscopy, astronomy or synthetic; ``skimage.data.cat`` is the same file as chelsea).
NATURAL_PHOTOS: tuple[NaturalPhoto, ...] = (
    NaturalPhoto("astronaut", "astronaut", _skimage("astronaut")),
    NaturalPhoto("chelsea", "chelsea", _skimage("chelsea")),
    NaturalPhoto("coffee", "coffee", _skimage("coffee")),
    NaturalPhoto("rocket", "rocket", _skimage("rocket")),
    NaturalPhoto("motorcycle_left", "motorcycle", _motorcycle(0)),
    NaturalPhoto("motorcycle_right", "motorcycle", _motorcycle(1)),
    NaturalPhoto("china", "china", _sklearn("china.jpg")),
    NaturalPhoto("flower", "flower", _sklearn("flower.jpg")),
)
#: Source groups used for calibration; all others are for evaluation (4 photos each).
CALIB_GROUPS: frozenset[str] = frozenset({"astronaut", "motorcycle", "china"})
# Views per photo, in output order: (shorter-side scale relative to size, crop, flip).
_CROPS = ("center", "top-left", "top-right", "bottom-left", "bottom-right")
_VIEWS = tuple(
    (scale, crop, flip) for scale in (256, 320) for crop in _CROPS for flip in (False, True)
)


def _view(resized: Image.Image, size: int, crop: str, flip: bool) -> Tensor:
    """One ``size`` x ``size`` crop (center or a corner) of an already-resized photo."""
    w, h = resized.size
    left = {"center": (w - size) // 2, "top-left": 0, "bottom-left": 0}.get(crop, w - size)
    top = {"center": (h - size) // 2, "top-left": 0, "top-right": 0}.get(crop, h - size)
    out = resized.crop((left, top, left + size, top + size))
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _to_normalized(out)


@lru_cache(maxsize=4)
def _natural_cached(size: int) -> tuple[Tensor, tuple[str, ...]]:
    pils = [(p.name, Image.fromarray(p.load()).convert("RGB")) for p in NATURAL_PHOTOS]
    # Resize each photo once per scale (resizing dominates the cost), crop many times.
    resized = {
        (name, scale): _resize_shorter(pil, round(size * scale / 224))
        for name, pil in pils
        for scale in {scale for scale, _, _ in _VIEWS}
    }
    views: list[Tensor] = []
    sources: list[str] = []
    # View-major order: the first 8 entries are the 8 photos with standard preprocessing,
    # so any ``limit`` still spans as many different photos as possible.
    for scale, crop, flip in _VIEWS:
        for name, _ in pils:
            views.append(_view(resized[name, scale], size, crop, flip))
            sources.append(name)
    return torch.stack(views), tuple(sources)


def natural_images_with_sources(
    size: int = 224, limit: int | None = None
) -> tuple[Tensor, list[str]]:
    """Like :func:`natural_images` but also returns each view's source photo name."""
    x, sources = _natural_cached(size)
    if limit is not None:
        x, sources = x[:limit], sources[:limit]
    return x.clone(), list(sources)


def natural_images(size: int = 224, limit: int | None = None) -> Tensor:
    """160 ImageNet-preprocessed float32 (N,3,size,size) views of the 8 bundled photos.

    Each photo gives 20 views: shorter side resized to size*256/224 and size*320/224,
    5 crops (center + corners) each, with and without a horizontal flip. The first 8
    rows are the standard single center crops of each photo.
    """
    return natural_images_with_sources(size, limit)[0]


def natural_images_split(size: int = 224) -> tuple[Tensor, Tensor]:
    """(calib, eval) natural-image views, disjoint by source photo (80 + 80 views).

    Calibration: astronaut, motorcycle left+right (a stereo pair, kept together), china.
    Evaluation: chelsea (cat), coffee, rocket, flower.
    """
    x, sources = natural_images_with_sources(size)
    group = {p.name: p.group for p in NATURAL_PHOTOS}
    calib = [i for i, s in enumerate(sources) if group[s] in CALIB_GROUPS]
    evals = [i for i, s in enumerate(sources) if group[s] not in CALIB_GROUPS]
    return x[calib], x[evals]


