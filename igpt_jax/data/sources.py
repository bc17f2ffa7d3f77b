"""Sources: synthetic tokens and Fashion-MNIST from Debian's files. TFDS-backed sources register here too."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import ml_collections
import numpy as np

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


class Source(Protocol):
    kind: str  # 'images' (uint8 [n, H, W, 3]) or 'tokens' (int32 [n, H*W])

    def num_examples(self, split: str) -> int: ...

    def get(self, split: str, indices: np.ndarray) -> np.ndarray: ...


class Synthetic:
    """Random tokens, a pure function of (seed, example index): for speed runs and tests, no palette needed."""

    kind = "tokens"

    def __init__(self, config: ml_collections.ConfigDict):
        self.seed = config.seed
        self.shape = (config.model.image_size**2,)
        self.vocab = config.model.vocab_size

    def num_examples(self, split: str) -> int:
        return 1 << 30

    def get(self, split: str, indices: np.ndarray) -> np.ndarray:
        salt = 0 if split == "train" else 1
        rows = [np.random.default_rng([self.seed, salt, int(i)]).integers(0, self.vocab, self.shape) for i in indices]
        return np.stack(rows).astype(np.int32)


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped): images uint8 [n, rows, cols] or labels uint8 [n]."""
    try:
        with gzip.open(path) as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"{path}: not a readable gzip IDX file ({e})") from e
    ndim = raw[3]
    dims = np.frombuffer(raw, ">u4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != np.prod(dims):
        raise ValueError(f"{path}: header says {tuple(dims)} but holds {data.size} bytes")
    return data.reshape(dims)


class FashionMNIST:
    """Zalando's Fashion-MNIST (60k train, 10k test, 28x28 gray) from the IDX files Debian installs.

    `config.data.data_dir` may point at another folder holding the same four files. Gray becomes RGB; other
    image sizes are resized with PIL's antialiased bilinear filter.
    """

    kind = "images"
    FILES = {"train": "train-images-idx3-ubyte.gz", "test": "t10k-images-idx3-ubyte.gz"}

    def __init__(self, config: ml_collections.ConfigDict):
        self.dir = Path(config.data.data_dir or DEBIAN_FASHION_MNIST)
        self.size = config.model.image_size
        self._cache: dict[str, np.ndarray] = {}

    def _images(self, split: str) -> np.ndarray:
        if split not in self.FILES:
            raise ValueError(f"fashion_mnist has splits {list(self.FILES)}, not {split!r}")
        if split not in self._cache:
            path = self.dir / self.FILES[split]
            if not path.exists():
                raise FileNotFoundError(
                    f"{path} not found: install Debian's dataset-fashion-mnist (bash launch/setup_local.sh does) "
                    "or set --config.data.data_dir to a folder with the Fashion-MNIST .gz files"
                )
            self._cache[split] = _read_idx(path)
        return self._cache[split]

    def num_examples(self, split: str) -> int:
        return len(self._images(split))

    def get(self, split: str, indices: np.ndarray) -> np.ndarray:
        gray = self._images(split)[np.asarray(indices)]
        if gray.shape[1] != self.size:
            from PIL import Image

            gray = np.stack(
                [np.asarray(Image.fromarray(g).resize((self.size, self.size), Image.BILINEAR)) for g in gray]
            )
        return np.repeat(gray[..., None], 3, axis=-1)


SOURCES: dict[str, Callable[[ml_collections.ConfigDict], Source]] = {
    "synthetic": Synthetic,
    "fashion_mnist": FashionMNIST,
}


def get_source(config: ml_collections.ConfigDict) -> Source:
    name = config.data.dataset
    if name not in SOURCES:
        raise ValueError(f"config.data.dataset={name!r} is not available; allowed: {sorted(SOURCES)}")
    return SOURCES[name](config)
