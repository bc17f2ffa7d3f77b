"""The colour palette: k-means centres in [-1, 1] RGB space that turn pixels into tokens, as OpenAI did.

OpenAI quantises each pixel to the nearest of 512 centres (squared Euclidean distance after x/127.5 - 1) and
decodes a token as rint(127.5 * (centre + 1)). Their centres ship as `kmeans_centers.npy`, a (512, 3) float array
in [-1, 1]; `save`/`load` read and write that format. `quantize` is pure jnp so it runs inside the jitted train
step on the accelerator (images travel as uint8). `fit` is k-means in JAX on a pixel sample.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from igpt_jax import errors
from igpt_jax.workdir import layout, storage
from igpt_jax.workdir.config_file import DamagedFileError

if TYPE_CHECKING:
    from igpt_jax.data.sources import Source

log = logging.getLogger(__name__)


def _normalise(pixels: jax.Array) -> jax.Array:
    return pixels.astype(jnp.float32) / 127.5 - 1.0


def _nearest(x: jax.Array, clusters: jax.Array) -> jax.Array:
    """Index of the nearest centre for each row of x [..., 3]: argmin of |x|^2 - 2 x.c + |c|^2 (OpenAI's form)."""
    d = (
        jnp.sum(jnp.square(x), axis=-1, keepdims=True)
        - 2.0 * jnp.einsum("...i,ki->...k", x, clusters, precision=jax.lax.Precision.HIGHEST)
        + jnp.sum(jnp.square(clusters), axis=-1)
    )
    return jnp.argmin(d, axis=-1).astype(jnp.int32)


def quantize(images: jax.Array, clusters: jax.Array) -> jax.Array:
    """uint8 images [..., H, W, 3] -> int32 tokens [..., H*W] in raster order."""
    if images.ndim < 3 or images.shape[-1] != 3:
        raise ValueError(f"quantize expects images [..., H, W, 3], got shape {tuple(images.shape)}")
    clusters = jnp.asarray(clusters, jnp.float32)
    x = _normalise(jnp.asarray(images)).reshape(*images.shape[:-3], -1, 3)
    return _nearest(x, clusters)


def dequantize(tokens: jax.Array, clusters: jax.Array) -> jax.Array:
    """int tokens [..., H*W] (H == W) -> uint8 images [..., H, W, 3]: rint(127.5 * (centre + 1))."""
    n = tokens.shape[-1]
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"dequantize expects square images: {n} tokens is not a square number")
    colours = jnp.asarray(clusters, jnp.float32)[jnp.asarray(tokens)]
    pixels = jnp.clip(jnp.rint(127.5 * (colours + 1.0)), 0, 255).astype(jnp.uint8)
    return pixels.reshape(*tokens.shape[:-1], side, side, 3)


def fit(
    images: np.ndarray,
    k: int = 512,
    seed: int = 0,
    *,
    num_pixels: int = 262_144,
    iterations: int = 30,
) -> np.ndarray:
    """k-means palette (float32 [K, 3] in [-1, 1]) from a random sample of the pixels of uint8 images [..., 3].

    Deterministic for a seed. Works on the distinct colours of the sample weighted by their counts, so data with
    few colours costs little. When the sample has at most `k` distinct colours (grayscale has 256), those colours
    are the palette, sorted, and K is their number: every centre owns pixels, none is empty or NaN.
    """
    pixels = np.asarray(images)
    if pixels.dtype != np.uint8 or pixels.ndim < 2 or pixels.shape[-1] != 3:
        raise ValueError(f"fit expects uint8 pixels [..., 3], got {pixels.dtype} {pixels.shape}")
    if k < 1:
        raise ValueError(f"fit needs k >= 1, got {k}")
    pixels = pixels.reshape(-1, 3)
    rng = np.random.default_rng(seed)
    if len(pixels) > num_pixels:
        pixels = pixels[rng.choice(len(pixels), num_pixels, replace=False)]
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    if len(colours) <= k:
        if len(colours) < k:
            log.warning(
                "palette: only %d distinct colours in the sample, so K=%d instead of %d", len(colours), len(colours), k
            )
        return np.asarray(_normalise(colours))
    centres = _kmeans(
        _normalise(jnp.asarray(colours)), jnp.asarray(counts, jnp.float32), k, jax.random.key(seed), iterations
    )
    return np.asarray(centres, np.float32)


def _kmeans(x: jax.Array, w: jax.Array, k: int, key: jax.Array, iterations: int) -> jax.Array:
    """Weighted Lloyd's algorithm with k-means++ seeding; an empty cluster is re-seeded at the worst-served point."""
    centres = _kmeans_plus_plus(x, w, k, key)

    def step(_, centres):
        assign = _nearest(x, centres)
        dist = jnp.sum(jnp.square(x - centres[assign]), axis=-1) * (w > 0)
        mass = jax.ops.segment_sum(w, assign, num_segments=k)
        sums = jax.ops.segment_sum(x * w[:, None], assign, num_segments=k)
        means = sums / jnp.maximum(mass, 1e-12)[:, None]
        empty = mass == 0
        # The i-th empty cluster moves to the i-th farthest point from its centre.
        farthest = jax.lax.top_k(dist, k)[1]
        rank = jnp.clip(jnp.cumsum(empty) - 1, 0, k - 1)
        return jnp.where(empty[:, None], x[farthest[rank]], means)

    return jax.jit(lambda c: jax.lax.fori_loop(0, iterations, step, c))(centres)


def _kmeans_plus_plus(x: jax.Array, w: jax.Array, k: int, key: jax.Array) -> jax.Array:
    """k-means++ seeding: each new centre drawn with probability proportional to weight * distance^2."""
    first = jax.random.choice(key, x.shape[0], p=w / jnp.sum(w))
    centres = jnp.zeros((k, 3), jnp.float32).at[0].set(x[first])
    best = jnp.sum(jnp.square(x - x[first]), axis=-1)

    def add(i, carry):
        centres, best = carry
        p = w * best
        idx = jax.random.choice(jax.random.fold_in(key, i), x.shape[0], p=p / jnp.sum(p))
        centres = centres.at[i].set(x[idx])
        return centres, jnp.minimum(best, jnp.sum(jnp.square(x - x[idx]), axis=-1))

    return jax.jit(lambda c, b: jax.lax.fori_loop(1, k, add, (c, b))[0])(centres, best)


def fingerprint(clusters: np.ndarray) -> str:
    """SHA-256 of the colours (float32, with their shape): what a checkpoint records of the palette its tokens used."""
    data = np.ascontiguousarray(np.asarray(clusters, np.float32))
    return hashlib.sha256(repr(data.shape).encode() + data.tobytes()).hexdigest()


def save(path: str | os.PathLike, clusters: np.ndarray) -> None:
    """Writes OpenAI's format: a float32 (K, 3) .npy in [-1, 1], whole (local or gs://)."""
    clusters = _checked(np.asarray(clusters, np.float32), str(path))
    buffer = io.BytesIO()
    np.save(buffer, clusters)
    storage.write_bytes(storage.path(path), buffer.getvalue())


def load(path: str | os.PathLike) -> np.ndarray:
    """Reads a (K, 3) palette such as OpenAI's kmeans_centers.npy (local or gs://), checking shape, range and
    finiteness. A missing file raises FileNotFoundError; an unreadable one ValueError."""
    data = storage.path(path).read_bytes()
    try:
        clusters = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"palette {path}: cannot read a .npy array ({e})") from e
    return _checked(np.asarray(clusters, np.float32), str(path))


def _checked(clusters: np.ndarray, name: str) -> np.ndarray:
    if clusters.ndim != 2 or clusters.shape[1] != 3 or len(clusters) == 0:
        raise ValueError(f"palette {name}: expected shape (K, 3), got {clusters.shape}")
    if not np.all(np.isfinite(clusters)) or np.abs(clusters).max() > 1.0 + 1e-6:
        raise ValueError(f"palette {name}: values must be finite and within [-1, 1] (RGB/127.5 - 1)")
    return clusters


# --- the run's palette: where it comes from, and the checks that keep a checkpoint's tokens meaning its colours

PALETTE_SAMPLE_IMAGES = 2048  # k-means is fitted on this many training images


class PaletteMismatchError(errors.UsageError, ValueError):
    """The palette the run's tokens were made with differs from the one config.data.palette names."""


def load_or_fit_palette(
    config,
    source: Callable[[], Source],
    directory: epath.Path,
    saved: np.ndarray | None = None,
    recorded: str | None = None,
    *,
    write: bool = True,
) -> np.ndarray | None:
    """The run's palette. Its one copy is the workdir's palette.npy, written once, before the first checkpoint;
    checkpoints record its fingerprint. Read from palette.npy, else from `saved` (a palette handed over: a pretrained
    run's, to fine-tuning), else config.data.palette, else fitted by k-means on a sample of the train split (a data set
    of tokens: the palette its tokens index, when it carries one, else none); palette.npy is written when missing
    (`write`). The data source (`source()`) is only opened when there is no palette yet. Stops (PaletteMismatchError,
    naming both) when the colours differ from the fingerprint the restored checkpoint `recorded` or from
    config.data.palette, and when a checkpoint exists but no palette does."""
    path = directory / layout.PALETTE
    missing = (
        f"{path} is missing, and the checkpoint's tokens were made with the palette whose SHA-256 is "
        f"{(recorded or '')[:16]}...: put the run's palette.npy back, or name a copy of it with "
        "--config.data.palette=PATH (checked against the checkpoint before use)"
    )
    if path.exists():
        clusters, origin = _workdir_palette(path, recorded), str(path)
    elif saved is not None:
        clusters, origin = saved, "the palette handed over with the checkpoint"
    elif config.data.palette:
        clusters, origin = load(config.data.palette), None
    elif source().kind == "tokens":
        clusters, origin = tokens_palette(source()), None
        if clusters is None:
            if recorded is not None:
                raise PaletteMismatchError(missing)
            return None
    else:
        clusters, origin = _fit_palette(config, source()), None
        if recorded is not None:  # a checkpoint whose palette.npy is gone: the same fit gives the same colours
            if fingerprint(clusters) != recorded:
                raise PaletteMismatchError(
                    f"{missing}; refitting on the train split gave other colours (SHA-256 "
                    f"{fingerprint(clusters)[:16]}...)"
                )
            log.warning(
                "%s was missing: refitted on the train split, the palette the checkpoint's tokens were made with "
                "(SHA-256 %s...)",
                path,
                recorded[:16],
            )
    if recorded is not None and fingerprint(clusters) != recorded:
        where = origin or f"config.data.palette={config.data.palette}"
        raise PaletteMismatchError(
            f"{where} ({len(clusters)} colours, SHA-256 {fingerprint(clusters)[:16]}...) is not the palette "
            f"the checkpoint's tokens were made with (SHA-256 {recorded[:16]}...). Nothing was changed. Ways on: "
            f"put the run's own palette.npy back in {directory}, or use another --workdir."
        )
    if origin is not None and config.data.palette:
        wanted = load(config.data.palette)
        if wanted.shape != clusters.shape or not np.array_equal(wanted, clusters):
            raise PaletteMismatchError(
                f"config.data.palette={config.data.palette} ({len(wanted)} colours) differs from {origin} "
                f"({len(clusters)} colours) that this workdir's tokens were made with. Nothing was changed. Ways on: "
                "leave config.data.palette empty to keep the workdir's palette, or use another --workdir."
            )
    if len(clusters) > config.model.vocab_size:
        raise ValueError(
            f"the palette has {len(clusters)} colours but config.model.vocab_size={config.model.vocab_size}"
        )
    if write and jax.process_index() == 0 and not path.exists():
        save(path, clusters)
    return clusters


def tokens_palette(source: Source) -> np.ndarray | None:
    """The colours a data set of tokens indexes (OpenAI's arrays carry theirs), or None (synthetic tokens)."""
    colours = getattr(source, "palette", None)
    return None if colours is None else colours()


def _fit_palette(config: ml_collections.ConfigDict, source: Source) -> np.ndarray:
    """k-means on a random sample of the train split (the first n positions of epoch 0's permutation): a pure
    function of the config and the data, so a refit gives the same colours."""
    from igpt_jax.data import order, splits  # the data layer reads palettes too: imported when a fit is needed

    train_split = splits(config)[0]
    total = source.num_examples(train_split)
    n = min(PALETTE_SAMPLE_IMAGES, total)
    sample = source.get(train_split, order.global_indices(config.seed, 0, n, total), None)
    start = time.perf_counter()
    clusters = fit(sample, k=config.model.vocab_size, seed=config.seed)
    log.info("palette: %d colours fitted on %d images in %.1fs", len(clusters), n, time.perf_counter() - start)
    return clusters


def _workdir_palette(path: epath.Path, recorded: str | None) -> np.ndarray:
    """The workdir's palette.npy; a damaged one stops the run naming the file and the ways on."""
    try:
        return load(path)
    except ValueError as e:
        needed = (
            f"the checkpoint's tokens were made with the palette whose SHA-256 is {recorded[:16]}..."
            if recorded
            else "no checkpoint depends on it yet"
        )
        raise DamagedFileError(
            f"{path} is damaged ({str(e).removeprefix(f'palette {path}: ')}); {needed}. Nothing was moved. Ways on: "
            "put the run's palette.npy back, or move it away and relaunch: the palette is fitted "
            "again on the train split, and used only if it has the colours the checkpoint records"
        ) from e
