"""Offline datasets for calibration and evaluation, plus loaders for the user's own data.

Everything here reads local files only (no network, ever) and is deterministic.

Built-in data:

* **Fashion-MNIST** from Debian's ``dataset-fashion-mnist`` package (gzip IDX files in
  ``/usr/share/datasets/fashion-mnist``; override with ``$QUANTFLOW_FASHION_MNIST_DIR``).
  Images are scaled to [0, 1] and normalized with :data:`FMNIST_MEAN` /
  :data:`FMNIST_STD` (the train-split pixel mean/std). Training and evaluation use the
  same constants -- a mismatch would silently cost accuracy and skew calibration.
* **Natural images** (quantflow/images.py, with the image preprocessing): the offline
  stand-in for ImageNet, 160 views of 8 bundled photos split by source photo.
"""

from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from quantflow import resources, validate
from quantflow.config import DATASETS, PREPROCESSINGS
from quantflow.errors import InputError, QuantflowError
from quantflow.images import (
    FMNIST_MEAN,
    FMNIST_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NATURAL_PHOTOS,
    natural_images,
    natural_images_split,
    natural_images_with_sources,
    normalize_fmnist,
    preprocess_image,
)

__all__ = [
    "BUILTIN_DATASETS",
    "FMNIST_CLASSES",
    "FMNIST_MEAN",
    "FMNIST_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NATURAL_PHOTOS",
    "PREPROCESSINGS",
    "DataError",
    "builtin_dataset",
    "fashion_mnist_dir",
    "load_fashion_mnist",
    "load_tensor_data",
    "natural_images",
    "natural_images_split",
    "natural_images_with_sources",
    "preprocess_image",
]

FMNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
#: the splits `builtin_dataset` serves: both sides of each entry of config.DATASETS
BUILTIN_DATASETS: tuple[str, ...] = tuple(sorted({n for pair in DATASETS.values() for n in pair}))

_DEFAULT_FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FMNIST_CALIB_SIZE = 512
FMNIST_CALIB_SEED = 0
_DATA_SUFFIXES = (".npy", ".npz", ".pt", ".pth")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class DataError(InputError, ValueError):
    """User or built-in data is missing or malformed; the message names the file and the fix."""


# --------------------------------------------------------------------------- Fashion-MNIST


def fashion_mnist_dir() -> Path:
    """Directory holding the Fashion-MNIST IDX files ($QUANTFLOW_FASHION_MNIST_DIR wins)."""
    return Path(os.environ.get("QUANTFLOW_FASHION_MNIST_DIR", _DEFAULT_FMNIST_DIR))


def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Parse a gzip IDX file (big-endian header: magic, then one uint32 per dimension)."""
    if not path.is_file():
        raise DataError(
            f"Fashion-MNIST file {path} not found. Install it with "
            "`apt-get install dataset-fashion-mnist` (or set QUANTFLOW_FASHION_MNIST_DIR)."
        )
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise DataError(f"cannot read Fashion-MNIST file {path}: {exc}") from exc
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DataError(f"{path} is not an IDX file of the expected kind (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: header says {dims}, found {data.size} bytes")
    return data.reshape(dims)


@lru_cache(maxsize=2)
def _fashion_mnist_raw(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Decompressed uint8 images (N,28,28) and labels (N,); cached since gunzip costs ~1 s."""
    img_name, lbl_name = _FMNIST_FILES[split]
    root = fashion_mnist_dir()
    images = _read_idx(root / img_name, 0x00000803)
    labels = _read_idx(root / lbl_name, 0x00000801)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"Fashion-MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels"
        )
    return images, labels


def load_fashion_mnist(
    split: Literal["train", "test"], limit: int | None = None
) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST as ``x`` float32 (N,1,28,28) normalized and ``y`` int64 (N,).

    ``limit`` keeps the first ``limit`` images (file order, which is class-balanced
    enough for quick checks).
    """
    if split not in _FMNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images, labels = _fashion_mnist_raw(split)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return normalize_fmnist(images), torch.from_numpy(labels.astype(np.int64))


def _fashion_mnist_calib() -> tuple[Tensor, Tensor]:
    """A fixed, seeded 512-image subset of the TRAIN split (never overlaps the test set)."""
    images, labels = _fashion_mnist_raw("train")
    gen = torch.Generator().manual_seed(FMNIST_CALIB_SEED)
    idx = torch.randperm(images.shape[0], generator=gen)[:FMNIST_CALIB_SIZE].sort().values.numpy()
    return normalize_fmnist(images[idx]), torch.from_numpy(labels[idx].astype(np.int64))


# --------------------------------------------------------------------------- user data


def _as_x(arr: object, where: str, limit: int | None = None) -> Tensor:
    """Samples first, (N, ...) with at least one dim per sample: float32 ((N,C,H,W) images,
    (N,C,D,H,W) volumes, (N,L) audio frames), or int64 token ids ((N,L) from int32/int64);
    the first `limit` samples, every one finite (sample named)."""
    if isinstance(arr, np.ndarray):
        if arr.ndim >= 2 and limit is not None:
            arr = arr[:limit]
        # priced before a memory-mapped file is read in (as float32, plus the copy)
        resources.check_alloc(int(arr.size) * (8 + arr.dtype.itemsize),
                              f"{where}: {arr.shape[0] if arr.ndim else 1} samples of shape "
                              f"{tuple(arr.shape[1:])}", "pass fewer samples "
                              "(--calib-samples / --eval-samples) or smaller ones")
        arr = np.array(arr)  # a writable in-memory copy, never a view of the mapped file
    x = torch.as_tensor(arr) if isinstance(arr, np.ndarray) else arr
    if not isinstance(x, Tensor):
        raise DataError(f"{where}: expected an (N, ...) array, got {type(arr).__name__}")
    if x.ndim < 2:
        raise DataError(f"{where}: expected samples first, (N, ...) with at least 2 dims "
                        f"(e.g. (N,C,H,W) images, (N,L) token ids), got shape {tuple(x.shape)}")
    if limit is not None:
        x = x[:limit]
    if x.dtype in (torch.int32, torch.int64):  # token ids: kept integer, never negative
        if x.numel() and int(x.min()) < 0:
            raise DataError(f"{where}: expected floating-point data (already preprocessed) or "
                            f"int32/int64 token ids (>= 0), found integers down to "
                            f"{int(x.min())}")
        return x.detach().to(torch.int64).contiguous()
    if not x.is_floating_point():
        raise DataError(
            f"{where}: expected floating-point data (already preprocessed) or int32/int64 token "
            f"ids, got dtype {x.dtype}"
        )
    x = x.detach().to(torch.float32).contiguous()
    validate.samples_finite(x, where)
    return x


def _as_y(arr: object, n: int, where: str, limited: bool = False) -> Tensor:
    y = torch.as_tensor(np.asarray(arr)) if isinstance(arr, np.ndarray) else arr
    if not isinstance(y, Tensor) or y.ndim != 1:
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(arr).__name__
        raise DataError(f"{where}: labels 'y' must be a 1-D integer array, got {shape}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DataError(f"{where}: labels 'y' must be integers, got dtype {y.dtype}")
    y = y[:n] if y.shape[0] > n and limited else y
    if y.shape[0] != n:
        raise DataError(f"{where}: x has {n} samples but y has {y.shape[0]} labels")
    y = y.to(torch.int64)
    validate.labels_in_range(y, None, where)  # the model's classes are checked after capture
    return y


def _zip_size(path: Path) -> int:
    """Uncompressed size of a zip-based file (.npz, torch.save): a small, highly compressed
    file can declare gigabytes."""
    import zipfile

    from quantflow.archive import ZIP_ERRORS

    try:
        with zipfile.ZipFile(path) as zf:
            return sum(i.file_size for i in zf.infolist())
    except ZIP_ERRORS:
        return 0  # not a zip (legacy torch.save, .npy): its size on disk is what it holds


def _load_data_file(path: Path, limit: int | None = None) -> tuple[Tensor, Tensor | None]:
    """Never runs code from the file: .npy/.npz with allow_pickle=False, .pt with torch's
    weights-only unpickler (tensors and plain containers)."""
    where = str(path)
    suffix = path.suffix.lower()
    limited = limit is not None
    try:
        if suffix == ".npy":
            # memory-mapped: only the samples kept are read
            return _as_x(np.load(path, allow_pickle=False, mmap_mode="r"), where, limit), None
        resources.check_alloc(_zip_size(path), f"{where}: its uncompressed contents",
                              "this file declares more data than this machine can hold; "
                              "split it or pass a smaller one")
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                if "x" not in npz.files:
                    raise DataError(f"{where}: .npz must contain an array 'x' (found {npz.files})")
                x = _as_x(npz["x"], where, limit)
                y = (_as_y(npz["y"], x.shape[0], where, limited) if "y" in npz.files else None)
                return x, y
        # weights_only=True never executes pickled code from the user's file.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except QuantflowError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()
        raise DataError(f"cannot read data file {where}: {type(exc).__name__}: "
                        f"{first[0][:300] if first else ''}; fix: save (N,C,H,W) float arrays "
                        "with numpy.save / numpy.savez(x=..., y=...) or torch.save") from exc
    if isinstance(obj, dict):
        if "x" not in obj:
            raise DataError(f"{where}: a dict in a .pt file must have key 'x' (found {list(obj)})")
        x = _as_x(obj["x"], where, limit)
        y = obj.get("y")
        return x, (_as_y(y, x.shape[0], where, limited) if y is not None else None)
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        x = _as_x(obj[0], where, limit)
        return x, _as_y(obj[1], x.shape[0], where, limited)
    return _as_x(obj, where, limit), None


def _load_image_file(path: Path, preprocessing: str | None) -> Tensor:
    if preprocessing is None:
        raise DataError(
            f"{path} is an image; pass a preprocessing name ({', '.join(PREPROCESSINGS)})"
        )
    try:
        with Image.open(path) as img:
            img.load()
            return preprocess_image(img, preprocessing)
    # PIL: OSError for unreadable files, DecompressionBombError for images of more than
    # 2 x Image.MAX_IMAGE_PIXELS pixels, SyntaxError/ValueError from some decoders
    except (OSError, Image.DecompressionBombError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {type(exc).__name__}: {exc}; fix: pass "
                        "a valid image of a sane size (or preprocessed arrays)") from exc


def load_tensor_data(
    path: str | os.PathLike[str], preprocessing: str | None = None, limit: int | None = None
) -> tuple[Tensor, Tensor | None]:
    """Load the user's data as ``(x float32 (N, ...) or int64 token ids, y int64 (N,) or None)``.

    Accepts: a ``.npy`` or ``.pt`` file holding an (N,C,H,W) float array (a ``.pt`` may
    also hold ``{"x": ..., "y": ...}`` or an ``(x, y)`` pair); a ``.npz`` with ``x`` and
    optional ``y``; a folder of such files (concatenated in name order); or an image
    file / folder of images, which needs ``preprocessing`` (see :data:`PREPROCESSINGS`).

    ``limit`` keeps the first ``limit`` samples and reads no more than it needs (a large
    ``.npy`` is memory-mapped; a folder stops at the file that reaches it). Every sample is
    checked to be finite; labels must not be negative.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path {p} does not exist; fix: check the path, or name a "
                        "built-in set (see --calib in `quantflow compile --help`)")
    if p.is_file():
        if p.suffix.lower() in _IMAGE_SUFFIXES:
            return _load_image_file(p, preprocessing).unsqueeze(0), None
        if p.suffix.lower() in _DATA_SUFFIXES:
            return _load_data_file(p, limit)
        raise DataError(
            f"{p}: unsupported file type {p.suffix!r}; expected one of "
            f"{', '.join(_DATA_SUFFIXES + _IMAGE_SUFFIXES)}"
        )
    files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    data = [f for f in files if f.suffix.lower() in _DATA_SUFFIXES]
    images = [f for f in files if f.suffix.lower() in _IMAGE_SUFFIXES]
    if data and images:
        raise DataError(f"folder {p} mixes array files and images; use one kind per folder")
    if images:
        return torch.stack([_load_image_file(f, preprocessing) for f in images[:limit]]), None
    if not data:
        raise DataError(
            f"folder {p} holds no data files ({', '.join(_DATA_SUFFIXES)}) or images "
            f"({', '.join(_IMAGE_SUFFIXES)})"
        )
    parts: list[tuple[Tensor, Tensor | None]] = []
    for f in data:
        left = None if limit is None else limit - sum(x.shape[0] for x, _ in parts)
        if left is not None and left <= 0:
            break
        parts.append(_load_data_file(f, left))
    data = data[:len(parts)]
    shapes = {tuple(x.shape[1:]) for x, _ in parts}
    if len(shapes) > 1:
        detail = ", ".join(f"{f.name}: {tuple(x.shape[1:])}" for f, (x, _) in zip(data, parts))
        raise DataError(f"folder {p}: files disagree on (C,H,W): {detail}")
    with_y = [y is not None for _, y in parts]
    if any(with_y) and not all(with_y):
        missing = [f.name for f, has in zip(data, with_y) if not has]
        raise DataError(f"folder {p}: some files have labels 'y' and some do not ({missing})")
    x = torch.cat([x for x, _ in parts])
    ys = [y for _, y in parts if y is not None]
    return x, (torch.cat(ys) if ys else None)


def builtin_dataset(name: str) -> tuple[Tensor, Tensor | None]:
    """A named built-in dataset as ``(x, y)``; ``y`` is None where there are no labels.

    * ``fashion-mnist``: the 10k test split with labels.
    * ``fashion-mnist-calib``: 512 seeded images of the train split (with labels).
    * ``natural-images``: the 80 evaluation views (no labels; compare against float).
    * ``natural-images-calib``: the 80 calibration views (disjoint source photos).
    * ``sentences``: token ids of 500 real sentences (no labels; the zoo's text models).
    * ``sentences-calib``: token ids of 256 other sentences.
    * ``tones``: 1000 audio frames of harmonic tones (CREPE's input; no labels).
    * ``tones-calib``: 256 frames from another seed.
    * ``fmnist-clips``: 2000 test clips (N, 1, 8, 28, 28) with labels (zoo.volumetric).
    * ``fmnist-clips-calib``: 512 train clips the zoo model was not trained on.
    """
    if name == "fashion-mnist":
        return load_fashion_mnist("test")
    if name == "fashion-mnist-calib":
        return _fashion_mnist_calib()
    if name == "natural-images":
        return natural_images_split()[1], None
    if name == "natural-images-calib":
        return natural_images_split()[0], None
    if name in ("sentences", "sentences-calib"):
        from quantflow.zoo.minilm import sentence_ids  # lazy: needs the tokenizer package

        return sentence_ids(name == "sentences-calib"), None
    if name in ("fmnist-clips", "fmnist-clips-calib"):
        if name == "fmnist-clips":
            return fmnist_clips("test", limit=2000)
        return fmnist_clips("train", limit=512, start=50000)
    if name in ("tones", "tones-calib"):
        from quantflow.zoo.crepe import tone_frames

        return tone_frames(name == "tones-calib"), None
    raise KeyError(f"unknown built-in dataset {name!r}; known: {', '.join(BUILTIN_DATASETS)}")


def fmnist_clips(split: str, limit: int | None = None, start: int = 0) -> tuple[Tensor, Tensor]:
    """Clips of the Fashion-MNIST `split` (normalized as the 2-D zoo models) and labels:
    `quantflow.zoo.volumetric.clips` of the images `start` .. `start + limit`."""
    from quantflow.zoo.volumetric import clips  # lazy: the zoo imports torch modules only

    x, y = load_fashion_mnist("train" if split == "train" else "test")
    stop = None if limit is None else start + limit
    x, y = x[start:stop], y[start:stop]
    return clips(x, start), y
