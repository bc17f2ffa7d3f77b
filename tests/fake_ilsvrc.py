"""A tiny ILSVRC2012 manual_dir cut from real photos, in the layout TFDS's imagenet2012 builder reads.

For smoke tests and benchmarks with no network: the real builder, the real decode and crop path, real JPEGs (the
photos scikit-image ships). Needs scikit-image (the `test` extra). Train: ILSVRC2012_img_train.tar holding one tar
per synset (labels must be synsets from TFDS's labels.txt); validation: a flat tar of ILSVRC2012_val_%08d.JPEG.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def _photos() -> list[np.ndarray]:
    from skimage import data

    return [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.immunohistochemistry()]


def _jpeg(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_ilsvrc_manual_dir(
    path: Path, per_class: int = 4, corrupt: str | None = None, max_side: int = 320, num_val: int = 10
) -> None:
    """ILSVRC2012_img_{train,val}.tar as the imagenet2012 builder reads them, cut from real photos.
    `corrupt` names one training JPEG to replace with bytes that are not an image."""
    path = Path(path)
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    synsets = ["n02123045", "n03063599", "n04266014", "n09246464", "n03733131"]  # all in TFDS's labels.txt

    def crop(photo):
        h, w = photo.shape[:2]
        ch, cw = int(rng.integers(128, min(h, max_side))), int(rng.integers(128, min(w, max_side)))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        return photo[y : y + ch, x : x + cw, :3]

    photos = _photos()
    with tarfile.open(path / "ILSVRC2012_img_train.tar", "w") as outer:
        for k, synset in enumerate(synsets):
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
                for j in range(per_class):
                    name = f"{synset}_{j + 1}.JPEG"
                    data = b"not a jpeg" if name == corrupt else _jpeg(crop(photos[k]))
                    _add(inner, name, data)
            _add(outer, f"{synset}.tar", inner_bytes.getvalue())
    with tarfile.open(path / "ILSVRC2012_img_val.tar", "w") as val:
        for i in range(num_val):
            _add(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG", _jpeg(crop(photos[i % len(photos)])))
