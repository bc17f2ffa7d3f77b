"""Probe features: the chosen layers' mean-pooled ln_1 outputs for the first n examples of a split, from one sharded
forward pass (steps.make_feature_step) batch by batch, with a progress bar: streamed (`passes`, for the SGD probe) or
gathered on the host (`extract`, for the full-batch L-BFGS probe)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from igpt_jax.data import pipeline
from igpt_jax.data.sources import Source
from igpt_jax.evaluators import base

FEATURE_KEY = 0x66_65_61_74  # folded into the seed's key: BERT's probe masks, the same for every checkpoint


def passes(
    config: ml_collections.ConfigDict,
    source: Source,
    split: str,
    n: int,
    feature_step,
    params,
    clusters,
    mesh,
    stop: base.StopCheck = base.never,
):
    """A function that starts a pass over examples 0..n-1 of `split`, in order: it yields (features [L, B, d] on the
    device, labels [B], example index [B], -1 for the rows that pad the last batch). Batch i's randomness (BERT's
    masks) is the same in every pass. `stop` is asked before every batch (base.Abandoned)."""
    key = jax.random.fold_in(jax.random.key(config.seed), FEATURE_KEY)
    batch_size = config.batch_size
    labels = source.labels(split, np.arange(n))

    def one_pass() -> Iterator[tuple[jax.Array, np.ndarray, np.ndarray]]:
        for i in tqdm(range(math.ceil(n / batch_size)), desc=f"features: {split}", disable=jax.process_index() != 0):
            base.check(stop)
            batch = pipeline.eval_batch(source, split, config, i, n, mesh)
            index = _batch_index(i, batch_size, n)
            yield feature_step(params, batch, clusters, jax.random.fold_in(key, i)), labels[index % n], index

    return one_pass


def _batch_index(i: int, batch_size: int, n: int) -> np.ndarray:
    """Example indices of batch i of a pass over examples 0..n-1, -1 for the rows that pad the last batch."""
    index = i * batch_size + np.arange(batch_size)
    index[index >= n] = -1
    return index


def gather(one_pass, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A whole pass on the host: (float32 features [L, n, d], int32 labels [n]), padding rows dropped."""
    parts, labels = [], []
    for x, y, _ in one_pass():
        parts.append(np.asarray(jax.device_get(x)))
        labels.append(y)
    return np.concatenate(parts, axis=1)[:, :n], np.concatenate(labels)[:n]


def extract(
    config: ml_collections.ConfigDict, source: Source, split: str, n: int, feature_step, params, clusters, mesh
) -> tuple[np.ndarray, np.ndarray]:
    """(float32 features [layers, n, d], int32 labels [n]) of examples 0..n-1 of `split`, in order, on the host."""
    return gather(passes(config, source, split, n, feature_step, params, clusters, mesh), n)


def pixels(config: ml_collections.ConfigDict, source: Source, split: str, n: int) -> np.ndarray:
    """The raw-pixel baseline's features [1, n, H*W*3]: each image as it reaches the model, scaled to [-1, 1]."""
    return _scaled(source.get(split, np.arange(n), None))


def _scaled(images: np.ndarray) -> np.ndarray:
    return (images.reshape(1, len(images), -1).astype(np.float32) / 127.5 - 1.0).astype(np.float32)


def pixel_passes(
    config: ml_collections.ConfigDict, source: Source, split: str, n: int, stop: base.StopCheck = base.never
):
    """`passes` for the raw-pixel baseline: [1, B, H*W*3] per batch, read from the source batch by batch."""
    batch_size = config.batch_size
    labels = source.labels(split, np.arange(n))

    def one_pass() -> Iterator[tuple[jax.Array, np.ndarray, np.ndarray]]:
        for i in tqdm(range(math.ceil(n / batch_size)), desc=f"pixels: {split}", disable=jax.process_index() != 0):
            base.check(stop)
            index = _batch_index(i, batch_size, n)
            yield jax.numpy.asarray(_scaled(source.get(split, index % n, None))), labels[index % n], index

    return one_pass
