"""Which examples each step reads: a pure function of (seed, step, batch size, split size).

Epoch e is a fresh permutation seeded by (seed, e); step s takes examples [s*B, (s+1)*B) of the concatenated epochs.
No iterator state exists, so a run resumes at any step instantly and on any number of processes.
"""

from __future__ import annotations

import functools

import numpy as np


def global_indices(seed: int, step: int, batch_size: int, num_examples: int, *, shuffle: bool = True) -> np.ndarray:
    """Example indices (int64 [batch_size]) of step `step`'s global batch."""
    start = step * batch_size
    positions = np.arange(start, start + batch_size)
    epochs, offsets = np.divmod(positions, num_examples)
    if not shuffle:
        return offsets
    out = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
        chosen = epochs == epoch
        out[chosen] = _permutation(seed, int(epoch), num_examples)[offsets[chosen]]
    return out


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """Epoch `epoch`'s order (cached: every step of an epoch reads the same one; ImageNet's is 10 MB)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)
