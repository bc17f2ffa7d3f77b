"""OpenAI's pre-quantized data sets, read by index: the arrays its `download.py --dataset imagenet|cifar10` fetches.

OpenAI published its models' test losses (2.0895, 2.0614 and 2.0466 nats for iGPT-S, M and L at 32x32) on these
arrays, so reading them is how an imported OpenAI checkpoint is checked against OpenAI's own figures. They are
tokens already: `{prefix}_{tr,va,te}X.npy` hold [N, 1024] indices into `kmeans_centers.npy`, the palette they were
quantized with, and `{prefix}_{tr,va,te}Y.npy` one-hot labels [N, classes]; the images were centre-cropped, so they
suit evaluation, not training with the paper's random crops. The files live in config.data.data_dir (local or
gs://) under OpenAI's names, and are read row by row from the .npy header's offsets: a batch reads its rows only,
wherever the files are, and a training array of gigabytes is never loaded whole.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import ml_collections
import numpy as np

from igpt_jax import palette
from igpt_jax.defaults import tokens_per_image
from igpt_jax.workdir import storage

# config.data.*_split names and OpenAI's file infixes (its run.py reads trX/vaX/teX as train, valid and test).
SPLIT_FILES = {"train": "tr", "validation": "va", "test": "te"}
CLUSTERS_FILE = "kmeans_centers.npy"  # download.py --clusters puts it beside the arrays


@dataclasses.dataclass(frozen=True)
class OpenAISpec:
    prefix: str  # download.py's --dataset: the files are {prefix}_{tr,va,te}{X,Y}.npy
    num_classes: int
    labelled: bool = True


HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class NpyRows:
    """Rows of a 2-D (or 1-D) .npy file by index, through the storage layer: the header says where row i starts."""

    def __init__(self, location: storage.Path):
        self.location = location
        with location.open("rb") as f:
            try:
                version = np.lib.format.read_magic(f)
                read_header = HEADER_READERS.get(version)
                if read_header is None:
                    raise ValueError(f"format version {version}; readable: {sorted(HEADER_READERS)}")
                self.shape, fortran_order, self.dtype = read_header(f)
            except ValueError as e:
                raise ValueError(f"{location} is not a .npy array file ({e})") from e
            self.offset = f.tell()
        if fortran_order and len(self.shape) > 1 or self.dtype.hasobject or not 1 <= len(self.shape) <= 2:
            raise ValueError(f"{location}: expected a C-ordered 1-D or 2-D numeric array, found {self.shape}")
        self.row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, indices: Sequence[int]) -> np.ndarray:
        out = np.empty((len(indices), *self.shape[1:]), self.dtype)
        with self.location.open("rb") as f:
            for k, i in enumerate(indices):
                if not 0 <= i < len(self):
                    raise IndexError(f"{self.location}: row {i} of {len(self)}")
                f.seek(self.offset + int(i) * self.row_bytes)
                out[k] = np.frombuffer(f.read(self.row_bytes), self.dtype).reshape(self.shape[1:])
        return out


class OpenAIArrays:
    """One of OpenAI's pre-quantized data sets in config.data.data_dir, as a source of tokens."""

    kind = "tokens"

    def __init__(self, config: ml_collections.ConfigDict, spec: OpenAISpec):
        self.spec = spec
        self.folder = storage.path(config.data.data_dir or ".")
        self.palette_file = self.folder / CLUSTERS_FILE
        self.width = tokens_per_image(config)
        self.vocab = config.model.vocab_size
        self._arrays: dict[str, NpyRows] = {}

    def _file(self, split: str, part: str) -> storage.Path:
        return self.folder / f"{self.spec.prefix}_{SPLIT_FILES[split]}{part}.npy"

    def _array(self, split: str, part: str) -> NpyRows:
        """The split's tokens ('X') or labels ('Y'), opened once; a missing file says how OpenAI's are fetched."""
        if split not in SPLIT_FILES:
            raise ValueError(f"{self.spec.prefix} arrays have the splits {list(SPLIT_FILES)}, not {split!r}")
        if (split, part) not in self._arrays:
            location = self._file(split, part)
            if not location.exists():
                raise FileNotFoundError(
                    f"{location} is missing: OpenAI's arrays are fetched by its download.py (github.com/openai/"
                    f"image-gpt: python download.py --dataset {self.spec.prefix} --clusters --download_dir DIR) and "
                    "read from config.data.data_dir=DIR"
                )
            array = NpyRows(location)
            if part == "X" and (len(array.shape) != 2 or array.shape[1] != self.width):
                raise ValueError(
                    f"{location} holds {array.shape} tokens; this model reads {self.width} per image "
                    f"(config.model.image_size={math.isqrt(self.width)}; OpenAI's arrays are 32x32)"
                )
            self._arrays[split, part] = array
        return self._arrays[split, part]

    def num_examples(self, split: str) -> int:
        return len(self._array(split, "X"))

    def get(self, split: str, indices: np.ndarray, rngs: Sequence[np.random.Generator] | None = None) -> np.ndarray:
        del rngs  # tokens: no augmentation
        tokens = self._array(split, "X").rows([int(i) for i in indices]).astype(np.int32)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab):
            raise ValueError(
                f"{self._file(split, 'X')}: tokens outside 0 .. {self.vocab - 1} (config.model.vocab_size) among rows "
                f"{[int(i) for i in indices[:8]]}..."
            )
        return tokens

    def labels(self, split: str, indices: np.ndarray) -> np.ndarray:
        rows = self._array(split, "Y").rows([int(i) for i in indices])
        return (rows.argmax(axis=1) if rows.ndim == 2 else rows).astype(np.int32)  # OpenAI's are one-hot

    def num_classes(self) -> int:
        return self.spec.num_classes

    def check_split(self, split: str) -> str | None:
        """What stops `split` being read (its name, a missing or misshapen file); None when it holds tokens."""
        try:
            n = self.num_examples(split)
        except (ValueError, FileNotFoundError) as e:
            return str(e)
        return None if n else f"{self._file(split, 'X')} holds no images"

    def palette(self) -> np.ndarray | None:
        """The colours the tokens index: kmeans_centers.npy beside the arrays, None when it is not there."""
        return palette.load(self.palette_file) if self.palette_file.exists() else None


SPECS = {
    "openai_imagenet": OpenAISpec("imagenet", 1000),
    "openai_cifar10": OpenAISpec("cifar10", 10),
}
