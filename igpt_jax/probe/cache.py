"""Probe features computed once per (model, split) and kept under the workdir: every solver pass, L2 sweep and refit
reads them instead of running the model again, and a second probe of the same checkpoint runs no forward pass.

Layout: `<workdir>/probe_features/<evaluator>/<model>/<split>-<digest>/` holds
  features   zarr3 array [masks, layers, n, d] (float32 or bfloat16; raw pixels as uint8), one chunk per batch
  labels     zarr3 array [n] int32
  spec.json  what the features were computed from; its digest names the folder. Written last, after every process
             has written its batches: a folder without it (an interrupted extraction) is computed again.
Arrays go through tensorstore with a key-value store for the workdir's location (`storage.kvstore`: local files or
gs://). Each process writes the batches i with i % processes == its index (every process holds every batch: the
feature step's output is replicated); readers stream them a batch at a time (memory flat in the number of images) or
gather them whole for the full-batch solver.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from igpt_jax.workdir import layout, storage

SPEC = "spec.json"
DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16, "uint8": np.uint8}

# One pass over a split: (features [masks, layers, B, d], labels [B], example index [B]; -1 marks padding rows).
Batches = Iterator[tuple[np.ndarray | jax.Array, np.ndarray, np.ndarray]]


def folder(workdir: epath.Path, evaluator: str, model: str, spec: dict) -> epath.Path:
    """Where the features `spec` describes live: the split's name made safe for a path, and the spec's digest."""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    split = re.sub(r"[^A-Za-z0-9_.-]+", "_", spec["split"]).strip("_")
    return workdir / layout.PROBE_FEATURES / evaluator / model / f"{split}-{digest}"


class Cache:
    """The features of one model on one split; `spec` is everything they depend on (JSON-able), including 'shape'
    [masks, layers, n, d], 'dtype' and 'split'."""

    def __init__(self, path: epath.Path, spec: dict):
        self.path, self.spec = path, spec
        self.shape = tuple(spec["shape"])
        self.dtype = DTYPES[spec["dtype"]]

    @property
    def n(self) -> int:
        return self.shape[2]

    def complete(self) -> bool:
        marker = self.path / SPEC
        return marker.exists() and json.loads(marker.read_text()) == self.spec

    def _array(self, name: str, **create):
        import tensorstore as ts

        spec = {"driver": "zarr3", "kvstore": storage.kvstore(self.path / name)}
        return ts.open(spec, **create).result()

    def fill(self, batches: Batches, batch_size: int) -> None:
        """Writes a whole pass (`batches` in order, batch i covering examples i*batch_size ...), then spec.json.

        Process 0 creates the arrays (replacing an interrupted attempt's) and the others open them once it has:
        processes on one host share the workdir's folder, and two creating it at once collide. Every array is
        chunked by batch, so each chunk has a single writer."""
        import tensorstore as ts

        masks, layers, n, d = self.shape
        created = {
            "features": dict(
                dtype=ts.dtype(np.dtype(self.dtype).name),
                shape=list(self.shape),
                chunk_layout=ts.ChunkLayout(chunk_shape=[masks, layers, batch_size, d]),
            ),
            "labels": dict(dtype=ts.int32, shape=[n], chunk_layout=ts.ChunkLayout(chunk_shape=[batch_size])),
        }
        mine, processes = jax.process_index(), jax.process_count()
        if mine == 0:
            arrays = {name: self._array(name, create=True, delete_existing=True, **kw) for name, kw in created.items()}
        if processes > 1:
            multihost_utils.sync_global_devices(f"igpt_feature_cache_created_{self.path.name}")
        if mine != 0:
            arrays = {name: self._array(name, open=True) for name in created}
        features, labels = arrays["features"], arrays["labels"]
        pending = []
        for i, (x, y, _) in enumerate(batches):
            if i % processes != mine:
                continue
            rows = slice(i * batch_size, min((i + 1) * batch_size, n))
            count = rows.stop - rows.start
            block = np.asarray(jax.device_get(x))[:, :, :count].astype(self.dtype)
            pending.append(features[:, :, rows, :].write(block))
            pending.append(labels[rows].write(np.asarray(y[:count], np.int32)))
        for write in pending:
            write.result()
        if processes > 1:
            multihost_utils.sync_global_devices(f"igpt_feature_cache_{self.path.name}")
        if mine == 0:
            storage.write_text(self.path / SPEC, json.dumps(self.spec, indent=2, sort_keys=True) + "\n")

    def gather(self, transform: Callable[[np.ndarray], np.ndarray] = lambda x: x) -> tuple[np.ndarray, np.ndarray]:
        """(float32 features [masks, layers, n, d], int32 labels [n]) on the host."""
        features = np.asarray(self._array("features").read().result())
        return transform(features).astype(np.float32), np.asarray(self._array("labels").read().result(), np.int32)

    def passes(self, batch_size: int, transform: Callable[[np.ndarray], np.ndarray] = lambda x: x):
        """A function that starts a pass over the cached features in batches: (float32 features [masks, layers, B,
        d] on the device, labels [B], example index [B], -1 for the rows that pad the last batch), a batch read at a
        time."""
        features, labels = self._array("features"), self._array("labels")
        n = self.n

        def one_pass():
            for i in range(math.ceil(n / batch_size)):
                rows = slice(i * batch_size, min((i + 1) * batch_size, n))
                count = rows.stop - rows.start
                x = transform(np.asarray(features[:, :, rows, :].read().result())).astype(np.float32)
                y = np.asarray(labels[rows].read().result(), np.int32)
                index = np.arange(rows.start, rows.start + batch_size)
                index[count:] = -1
                if count < batch_size:  # padded to the batch: one compiled shape for every batch
                    x = np.concatenate([x, np.zeros((*x.shape[:2], batch_size - count, x.shape[-1]), x.dtype)], 2)
                    y = np.concatenate([y, np.zeros(batch_size - count, np.int32)])
                yield jnp.asarray(x), y, index

        return one_pass

    def remove(self) -> None:
        """Deletes the folder (a probe configured not to keep its features), once every process is done reading."""
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"igpt_feature_cache_removed_{self.path.name}")
        if jax.process_index() == 0 and self.path.exists():
            self.path.rmtree()
