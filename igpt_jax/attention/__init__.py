"""Attention implementations behind one signature, chosen by name (`config.model.attention`).

Every implementation takes q, k, v of shape [batch, length, heads, head_dim] and returns the same shape, scaling
logits by 1/sqrt(head_dim) as OpenAI does, with the softmax in fp32:

- `xla` (xla.py): the plain formula, [heads, S, S] scores materialised; the reference every other one is tested
  against.
- `blockwise` (blockwise.py): query blocks over their causal key prefix with a FlashAttention-style custom VJP; no
  S x S matrix, masked blocks skipped. Pure JAX, so any backend; the fastest on CPUs.
- `cudnn` (cudnn.py): cuDNN's fused flash attention on NVIDIA GPUs (bf16/fp16).
- `splash` (splash.py): Pallas's TPU splash attention, sharded with shard_map.
- `ring` (ring.py): context parallelism over the mesh's `sequence` axis: keys and values passed around the ring,
  zigzag chunks for causal balance, a custom VJP. `auto` takes it whenever the mesh splits the sequence.

`auto` picks, at trace time, `ring` when the mesh has a `sequence` axis of more than one device, else the first of
_AUTO_PREFERENCE for the platform of the mesh's devices (not the host's:
a CPU compiling for a TPU topology gets splash). A kernel that cannot take a call (dtype, head size, length,
platform) runs its fallback and logs why once. Decoding (sampling) uses `cached_attention`, which reads a key/value
cache and needs none of this.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from igpt_jax import sharding
from igpt_jax.attention.blockwise import blockwise_attention
from igpt_jax.attention.cudnn import cudnn_attention
from igpt_jax.attention.fallback import running
from igpt_jax.attention.ring import ring_attention
from igpt_jax.attention.splash import splash_attention
from igpt_jax.attention.xla import cached_attention, xla_attention

__all__ = ["IMPLEMENTATIONS", "allowed_names", "cached_attention", "get", "resolve", "running", "xla_attention"]

AttentionFn = Callable[..., jax.Array]

IMPLEMENTATIONS: dict[str, AttentionFn] = {
    "xla": xla_attention,
    "blockwise": blockwise_attention,
    "cudnn": cudnn_attention,
    "splash": splash_attention,
    "ring": ring_attention,
}

# What `auto` means on each platform, best first; the first registered name wins. Measured on CPU: blockwise trains
# 1.3-1.5x faster than xla (benchmarks/train_speed.py). GPU: cuDNN's flash kernel where it applies (it falls back to
# xla for fp32). TPU: splash, MaxText's default there.
_AUTO_PREFERENCE: dict[str, tuple[str, ...]] = {
    "cpu": ("blockwise", "xla"),
    "gpu": ("cudnn", "xla"),
    "tpu": ("splash", "xla"),
}


def allowed_names() -> list[str]:
    return ["auto", *IMPLEMENTATIONS]


def resolve(name: str, platform: str | None = None, sequence: int | None = None) -> str:
    """The implementation's name: `name` itself, or for `auto` `ring` when the mesh splits the sequence over
    `sequence` > 1 devices, else the best registered for `platform`. Both default to the current mesh's (the platform
    then to JAX's backend); the compile-only planner passes its target's."""
    sequence = sharding.sequence_shards() if sequence is None else sequence
    if name == "auto" and sequence > 1:
        return "ring"  # any other kernel would see the whole sequence: XLA gathers it onto every device
    if name == "auto":
        platform = platform or sharding.mesh_platform()
        name = next((c for c in _AUTO_PREFERENCE.get(platform, ()) if c in IMPLEMENTATIONS), "xla")
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"config.model.attention={name!r} is unknown; allowed: {allowed_names()}")
    return name


def _auto(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool) -> jax.Array:
    return IMPLEMENTATIONS[resolve("auto")](q, k, v, causal=causal)


def get(name: str) -> AttentionFn:
    """The attention function called `name`; `auto` chooses when it is traced, by the mesh it runs on."""
    if name == "auto":
        return _auto
    return IMPLEMENTATIONS[resolve(name)]
