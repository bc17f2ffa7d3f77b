"""Probe features: the chosen layers' mean-pooled ln_1 outputs for the first n examples of a split, with their labels,
from one sharded forward pass (steps.make_feature_step), batch by batch with a progress bar."""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from igpt_jax.data import pipeline
from igpt_jax.data.sources import Source

FEATURE_KEY = 0x66_65_61_74  # folded into the seed's key: BERT's probe masks, the same for every checkpoint


def extract(
    config: ml_collections.ConfigDict, source: Source, split: str, n: int, feature_step, params, clusters, mesh
) -> tuple[np.ndarray, np.ndarray]:
    """(float32 features [layers, n, d], int32 labels [n]) of examples 0..n-1 of `split`, in order."""
    key = jax.random.fold_in(jax.random.key(config.seed), FEATURE_KEY)
    parts = []
    batches = math.ceil(n / config.batch_size)
    for i in tqdm(range(batches), desc=f"features: {split}", disable=jax.process_index() != 0):
        batch = pipeline.eval_batch(source, split, config, i, n, mesh)
        with jax.set_mesh(mesh):
            parts.append(np.asarray(jax.device_get(feature_step(params, batch, clusters, jax.random.fold_in(key, i)))))
    return np.concatenate(parts, axis=1)[:, :n], source.labels(split, np.arange(n))


def pixels(config: ml_collections.ConfigDict, source: Source, split: str, n: int) -> np.ndarray:
    """The raw-pixel baseline's features [1, n, H*W*3]: each image as it reaches the model, scaled to [-1, 1]."""
    images = source.get(split, np.arange(n), None)
    return (images.reshape(1, n, -1).astype(np.float32) / 127.5 - 1.0).astype(np.float32)
