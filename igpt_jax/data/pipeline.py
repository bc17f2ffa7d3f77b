"""Global batches: each process loads its rows of step s's batch and JAX assembles the sharded global array."""

from __future__ import annotations

import jax

from igpt_jax import sharding
from igpt_jax.data import order
from igpt_jax.data.sources import Source


def global_batch(source: Source, split: str, config, step: int, mesh, *, shuffle: bool = True) -> dict:
    """Step `step`'s global batch as a sharded jax.Array; each process loads only its own rows."""
    n = source.num_examples(split)
    indices = order.global_indices(config.seed, step, config.batch_size, n, shuffle=shuffle)
    local = source.get(split, order.process_slice(indices, jax.process_index(), jax.process_count()))
    array = jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, local.ndim), local)
    return {source.kind: array}
