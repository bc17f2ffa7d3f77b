"""Host-side image preprocessing: decode, the paper's crops, and an anti-aliased downsample to `image_size`.

ImageNet training (paper, section 3.1): resize the shorter side to a random length in [256, 384], take a random
224x224 crop, then downsample to the model's resolution; evaluation: shorter side 224, centre 224x224 crop, then
downsample. Low-resolution datasets (CIFAR, STL-10, Fashion-MNIST, the pre-downsampled ImageNets) are only resized
when their size differs. Downsampling uses Pillow's BOX filter (the mean over each output pixel's footprint, i.e.
area averaging: exact anti-aliasing, and what the pre-downsampled ImageNet variants used); upsampling uses bicubic.
Randomness comes from a per-example generator seeded by (run seed, position in the stream), so any process
produces the same pixels for the same example at the same step.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image

TRAIN_SHORT_SIDE = (256, 384)
CROP = 224


class DecodeError(ValueError):
    """An image that cannot be decoded; the message names the example."""


def decode(data: bytes, name: str) -> Image.Image:
    """Encoded bytes (JPEG, PNG) -> RGB PIL image; grayscale and CMYK become RGB."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        raise DecodeError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from e
    return image.convert("RGB") if image.mode != "RGB" else image


def _resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    if image.size == size:
        return image
    shrinking = size[0] < image.size[0] or size[1] < image.size[1]
    return image.resize(size, Image.BOX if shrinking else Image.BICUBIC)


def _short_side(image: Image.Image, target: int) -> Image.Image:
    w, h = image.size
    scale = target / min(w, h)
    return image.resize((max(round(w * scale), target), max(round(h * scale), target)), Image.BICUBIC)


def imagenet_train(image: Image.Image, size: int, rng: np.random.Generator, flip: bool) -> np.ndarray:
    image = _short_side(image, int(rng.integers(TRAIN_SHORT_SIDE[0], TRAIN_SHORT_SIDE[1] + 1)))
    w, h = image.size
    x, y = int(rng.integers(0, w - CROP + 1)), int(rng.integers(0, h - CROP + 1))
    image = image.crop((x, y, x + CROP, y + CROP))
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(_resize(image, (size, size)))


def imagenet_eval(image: Image.Image, size: int, rng: np.random.Generator | None, flip: bool) -> np.ndarray:
    del rng, flip
    image = _short_side(image, CROP)
    w, h = image.size
    x, y = (w - CROP) // 2, (h - CROP) // 2
    return np.asarray(_resize(image.crop((x, y, x + CROP, y + CROP)), (size, size)))


def resize_only(image: Image.Image, size: int, rng: np.random.Generator | None, flip: bool) -> np.ndarray:
    if flip and rng is not None and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(_resize(image, (size, size)))


Preprocess = Callable[[Image.Image, int, "np.random.Generator | None", bool], np.ndarray]

# (train, eval) preprocessing per family of datasets.
FAMILIES: dict[str, tuple[Preprocess, Preprocess]] = {
    "imagenet": (imagenet_train, imagenet_eval),
    "low_resolution": (resize_only, resize_only),
}
