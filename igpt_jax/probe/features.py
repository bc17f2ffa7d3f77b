"""Probe features from one forward pass over a split: each chosen layer's mean-pooled normed input (layer l < L: block
l's ln_1 output; layer L: ln_f's output), batch by batch, with a progress bar. They are written once into a
feature_cache.Cache, which every solver then reads; raw pixels (the baseline) go the same way, as uint8.

Batches carry a masks axis: [masks, layers, B, d]. A BERT model sees masked inputs, as in pretraining; for its
ensemble evaluation (the paper's section 4.6) the test images are seen under several independent masks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from igpt_jax.data import pipeline
from igpt_jax.data.sources import Source
from igpt_jax.evaluators import base

FEATURE_KEY = 0x66_65_61_74  # folded into the seed's key: BERT's probe masks, the same for every checkpoint

Batches = Iterator[tuple[jax.Array | np.ndarray, np.ndarray, np.ndarray]]


def mask_key(seed: int, batch: int, mask: int) -> jax.Array:
    """The randomness (BERT's mask) of mask `mask` of batch `batch` of any pass: the same for every checkpoint and
    every pass; mask 0 is the one a single-mask probe uses."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), FEATURE_KEY), batch)
    return key if mask == 0 else jax.random.fold_in(key, mask)


def model_batches(
    config: ml_collections.ConfigDict,
    source: Source,
    split: str,
    n: int,
    feature_step,
    params,
    clusters,
    mesh,
    *,
    masks: int = 1,
    stop: base.StopCheck = base.never,
) -> Batches:
    """A pass over examples 0..n-1 of `split`, in order: (features [masks, layers, B, d] on the device, labels [B],
    example index [B], -1 for the rows that pad the last batch). `stop` is asked before every batch."""
    batch_size = config.batch_size
    labels = source.labels(split, np.arange(n))
    for i in tqdm(range(math.ceil(n / batch_size)), desc=f"features: {split}", disable=jax.process_index() != 0):
        base.check(stop)
        batch = pipeline.eval_batch(source, split, config, i, n, mesh)
        index = batch_index(i, batch_size, n)
        x = jnp.stack([feature_step(params, batch, clusters, mask_key(config.seed, i, m)) for m in range(masks)])
        yield x, labels[index % n], index


def token_batches(
    config: ml_collections.ConfigDict,
    source: Source,
    split: str,
    n: int,
    token_step,
    params,
    clusters,
    mesh,
    *,
    stop: base.StopCheck = base.never,
) -> Batches:
    """A pass of one layer's features at every position (the attentive probe's): [1, 1, B, N*d] on the device, with
    mask 0's randomness for BERT models."""
    batch_size = config.batch_size
    labels = source.labels(split, np.arange(n))
    for i in tqdm(range(math.ceil(n / batch_size)), desc=f"tokens: {split}", disable=jax.process_index() != 0):
        base.check(stop)
        batch = pipeline.eval_batch(source, split, config, i, n, mesh)
        index = batch_index(i, batch_size, n)
        x = token_step(params, batch, clusters, mask_key(config.seed, i, 0))
        yield x.reshape(1, 1, batch_size, -1), labels[index % n], index


def pixel_batches(
    config: ml_collections.ConfigDict, source: Source, split: str, n: int, *, stop: base.StopCheck = base.never
) -> Batches:
    """The raw-pixel baseline's pass: uint8 [1, 1, B, H*W*3], each image as it reaches the model (`scale_pixels`
    gives the probe's [-1, 1] values)."""
    batch_size = config.batch_size
    labels = source.labels(split, np.arange(n))
    for i in tqdm(range(math.ceil(n / batch_size)), desc=f"pixels: {split}", disable=jax.process_index() != 0):
        base.check(stop)
        index = batch_index(i, batch_size, n)
        images = source.get(split, index % n, None)
        yield images.reshape(1, 1, batch_size, -1), labels[index % n], index


def scale_pixels(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float32) / 127.5 - 1.0).astype(np.float32)


def batch_index(i: int, batch_size: int, n: int) -> np.ndarray:
    """Example indices of batch i of a pass over examples 0..n-1, -1 for the rows that pad the last batch."""
    index = i * batch_size + np.arange(batch_size)
    index[index >= n] = -1
    return index


def gather(batches: Batches, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A whole pass on the host: (float32 features [masks, layers, n, d], int32 labels [n]), padding rows dropped."""
    parts, labels = [], []
    for x, y, _ in batches:
        parts.append(np.asarray(jax.device_get(x), np.float32))
        labels.append(y)
    return np.concatenate(parts, axis=2)[:, :, :n], np.concatenate(labels)[:n]
