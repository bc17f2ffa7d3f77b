"""Global batches: each process loads only its rows of step s's batch; JAX assembles the sharded global array.

Which rows a process loads comes from the batch sharding itself (the rows its devices hold), so the assembled array
is the same bytes whatever the number of processes. A background thread keeps `depth` batches ready ahead of the
device, so the step does not wait on decoding when the host keeps up.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from igpt_jax import sharding
from igpt_jax.data import order
from igpt_jax.data.sources import Source
from igpt_jax.defaults import tokens_per_image


def local_rows(batch_sharding: jax.sharding.Sharding, global_shape: tuple[int, ...]) -> slice:
    """The contiguous rows of the global batch that this process's devices hold."""
    intervals = set()
    for index in batch_sharding.addressable_devices_indices_map(global_shape).values():
        rows = index[0]
        intervals.add((rows.start or 0, global_shape[0] if rows.stop is None else rows.stop))
    lo, hi = min(a for a, _ in intervals), max(b for _, b in intervals)
    if sum(b - a for a, b in intervals) != hi - lo:
        raise ValueError(f"this process's devices hold non-contiguous batch rows {sorted(intervals)}")
    return slice(lo, hi)


def with_labels(config: ml_collections.ConfigDict) -> bool:
    """Batches carry class labels when the model has a classification head (fine-tuning)."""
    return bool(config.model.num_classes)


def load_rows(
    source: Source, split: str, config: ml_collections.ConfigDict, step: int, rows: slice, *, train: bool
) -> dict[str, np.ndarray]:
    """Rows `rows` of step `step`'s batch as numpy: {kind: uint8 images or int32 tokens} and, when the model
    classifies, {'labels': int32}."""
    n = source.num_examples(split)
    indices = order.global_indices(config.seed, step, config.batch_size, n, shuffle=train)[rows]
    positions = step * config.batch_size + np.arange(config.batch_size)[rows]
    rngs = [np.random.default_rng([config.seed, int(p)]) for p in positions] if train else None
    rows_out = {source.kind: source.get(split, indices, rngs)}
    if with_labels(config):
        rows_out["labels"] = np.asarray(source.labels(split, indices), np.int32)
    return rows_out


def _global_shape(kind: str, config: ml_collections.ConfigDict) -> tuple[int, ...]:
    if kind == "tokens":
        return (config.batch_size, tokens_per_image(config))
    size = config.model.image_size
    return (config.batch_size, size, size, 3)


def abstract_batch(kind: str, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> dict:
    """The batch's shapes, dtypes and shardings for a source of `kind` ('images' or 'tokens'), for lowering the
    train step without data."""
    shape = _global_shape(kind, config)
    dtype = np.int32 if kind == "tokens" else np.uint8
    batch = {kind: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(config, mesh, len(shape)))}
    if with_labels(config):
        batch["labels"] = jax.ShapeDtypeStruct(
            (config.batch_size,), np.int32, sharding=sharding.batch_sharding(config, mesh, 1)
        )
    return batch


def global_batch(
    source: Source,
    split: str,
    config: ml_collections.ConfigDict,
    step: int,
    mesh: jax.sharding.Mesh,
    *,
    train: bool = True,
) -> dict[str, jax.Array]:
    """Step `step`'s global batch, sharded over the mesh's batch axes, loaded process-locally."""
    specs = abstract_batch(source.kind, config, mesh)
    first = specs[source.kind]
    local = load_rows(source, split, config, step, local_rows(first.sharding, first.shape), train=train)
    return {
        name: jax.make_array_from_process_local_data(spec.sharding, local[name], spec.shape)
        for name, spec in specs.items()
    }


def eval_batch(
    source: Source, split: str, config: ml_collections.ConfigDict, index: int, num_examples: int, mesh
) -> dict[str, jax.Array]:
    """Batch `index` of the first `num_examples` examples of `split`, in order, with `weights` 1 for those and 0 for
    the rows that pad the last batch to the full batch size (they repeat examples from the split's start)."""
    batch = global_batch(source, split, config, index, mesh, train=False)
    spec = sharding.batch_sharding(config, mesh, 1)
    rows = local_rows(spec, (config.batch_size,))
    positions = index * config.batch_size + np.arange(config.batch_size)[rows]
    weights = (positions < num_examples).astype(np.float32)
    batch["weights"] = jax.make_array_from_process_local_data(spec, weights, (config.batch_size,))
    return batch


class Prefetcher:
    """Runs load(step) for start, start+1, ... in a background thread, up to `depth` steps ahead."""

    def __init__(self, load: Callable[[int], object], start: int, depth: int = 2):
        self._load = load
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(start,), daemon=True, name="prefetch")
        self._thread.start()

    def _run(self, step: int) -> None:
        while not self._stop.is_set():
            try:
                item = (step, self._load(step), None)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
                item = (step, None, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return
            step += 1

    def get(self, step: int):
        got, value, error = self._queue.get()
        if error is not None:
            raise error
        if got != step:
            raise RuntimeError(f"prefetcher out of order: wanted step {step}, got {got}")
        return value

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
