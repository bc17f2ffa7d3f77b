"""Host-side image preprocessing: decode, the paper's crops, and an anti-aliased downsample to `image_size`.

ImageNet training (paper, section 3.1): resize the shorter side to a random length in [256, 384], take a random
224x224 crop, then downsample to the model's resolution; evaluation: shorter side 224, centre 224x224 crop, then
downsample. Low-resolution datasets (CIFAR, STL-10, Fashion-MNIST, the pre-downsampled ImageNets) are only resized
when their size differs. Downsampling uses Pillow's BOX filter (the mean over each output pixel's footprint, i.e.
area averaging: exact anti-aliasing, and what the pre-downsampled ImageNet variants used); upsampling uses bicubic.
The crop and the downsample are one resampling of the crop's source region, and JPEGs much larger than needed are
decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) as long as the region keeps 4x the output resolution.
Randomness comes from a per-example generator seeded by (run seed, position in the stream), so any process
produces the same pixels for the same example at the same step.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image

from igpt_jax import errors

TRAIN_SHORT_SIDE = (256, 384)
CROP = 224


class DecodeError(errors.UsageError, ValueError):
    """An image that cannot be decoded; the message names the example."""


def open_image(data: bytes, name: str) -> Image.Image:
    """A lazily decoded image: its size is known, its pixels are decoded by `load` (after a possible draft)."""
    try:
        return Image.open(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        raise DecodeError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from e


def load(image: Image.Image, name: str, box: tuple[float, ...] | None = None, out: int = 0):
    """Decodes to RGB; returns (image, box in its pixels). With a crop `box` and output side `out`, the JPEG decoder
    may shrink by a power of two (DCT scaling, itself anti-aliased) while the box stays at least 4x the output."""
    original = image.size
    try:
        if box is not None and image.format == "JPEG":
            factor = int(min(box[2] - box[0], box[3] - box[1]) // (4 * out))
            if factor > 1:
                image.draft("RGB", (max(original[0] // factor, 1), max(original[1] // factor, 1)))
        image.load()
    except Exception as e:  # noqa: BLE001
        raise DecodeError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from e
    if box is not None:
        sx, sy = image.size[0] / original[0], image.size[1] / original[1]
        box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    return (image.convert("RGB") if image.mode != "RGB" else image), box


def _crop_box(size: tuple[int, int], short_side: int, rng: np.random.Generator | None) -> tuple[float, ...]:
    """The source region that becomes a 224x224 crop once the shorter side is resized to `short_side`:
    at a random position with `rng`, centred without."""
    w, h = size
    scale = short_side / min(w, h)
    rw, rh = max(round(w * scale), short_side), max(round(h * scale), short_side)
    if rng is None:
        x, y = (rw - CROP) // 2, (rh - CROP) // 2
    else:
        x, y = int(rng.integers(0, rw - CROP + 1)), int(rng.integers(0, rh - CROP + 1))
    fx, fy = w / rw, h / rh
    return (x * fx, y * fy, (x + CROP) * fx, (y + CROP) * fy)


def _downsample(image: Image.Image, size: int, box: tuple[float, ...] | None = None) -> np.ndarray:
    """To size x size from `box` (default: the whole image): BOX (area) filter down, bicubic up."""
    box = box or (0, 0, *image.size)
    shrinking = (box[2] - box[0]) > size or (box[3] - box[1]) > size
    return np.asarray(image.resize((size, size), Image.BOX if shrinking else Image.BICUBIC, box=box))


def imagenet_train(image: Image.Image, name: str, size: int, rng: np.random.Generator, flip: bool) -> np.ndarray:
    """Shorter side to U[256, 384], random 224 crop, optional flip, area-downsampled to `size`, done as one
    resampling of the crop's source region (crop and resize commute), with no intermediate 256-384 px image."""
    short = int(rng.integers(TRAIN_SHORT_SIDE[0], TRAIN_SHORT_SIDE[1] + 1))
    image, box = load(image, name, _crop_box(image.size, short, rng), size)
    out = _downsample(image, size, box)
    if flip and rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def imagenet_eval(image: Image.Image, name: str, size: int, rng: np.random.Generator | None, flip: bool) -> np.ndarray:
    """Shorter side 224, centre 224 crop, area-downsampled to `size`."""
    del rng, flip
    image, box = load(image, name, _crop_box(image.size, CROP, None), size)
    return _downsample(image, size, box)


def resize_only(image: Image.Image, name: str, size: int, rng: np.random.Generator | None, flip: bool) -> np.ndarray:
    """Low-resolution datasets: resized only when their size differs, optional flip."""
    image, _ = load(image, name)
    out = np.asarray(image) if image.size == (size, size) else _downsample(image, size)
    if flip and rng is not None and rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


Preprocess = Callable[[Image.Image, str, int, "np.random.Generator | None", bool], np.ndarray]


def cifar_augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The paper's CIFAR fine-tuning augmentation (section 3.4): reflect-pad 4 pixels on each side, a random crop back
    to the image's size, a random horizontal flip."""
    size = image.shape[0]
    padded = np.pad(image, ((CIFAR_PAD, CIFAR_PAD), (CIFAR_PAD, CIFAR_PAD), (0, 0)), mode="reflect")
    top, left = (int(v) for v in rng.integers(0, 2 * CIFAR_PAD + 1, size=2))
    out = padded[top : top + size, left : left + size]
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


CIFAR_PAD = 4

# data.augment: what training images go through after their family's preprocessing (evaluation never augments).
AUGMENTATIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "none": lambda image, rng: image,
    "cifar": cifar_augment,
}

# (train, eval) preprocessing per family of datasets.
FAMILIES: dict[str, tuple[Preprocess, Preprocess]] = {
    "imagenet": (imagenet_train, imagenet_eval),
    "low_resolution": (resize_only, resize_only),
}
