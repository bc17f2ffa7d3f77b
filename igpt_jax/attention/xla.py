"""The reference attention (`xla`): plain softmax(q k^T / sqrt(d)) v as XLA fuses it, and the decoding attention over
a key/value cache. Every other implementation is tested against `xla_attention`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

# OpenAI masks with w*b - 1e10*(1-b); any value that underflows exp() in fp32 gives the same probabilities.
MASK_VALUE = -1e10


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool) -> jax.Array:
    """Plain softmax(q k^T / sqrt(d)) v, materialising [heads, q_len, k_len] scores. Exact reference."""
    scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if causal:
        q_len, k_len = scores.shape[-2:]
        allowed = jnp.tril(jnp.ones((q_len, k_len), dtype=bool), k=k_len - q_len)
        scores = jnp.where(allowed, scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def cached_attention(
    q: jax.Array, k_blocks: Sequence[jax.Array], v_blocks: Sequence[jax.Array], length: jax.Array
) -> jax.Array:
    """Decoding attention: queries q [batch, 1, heads, head_dim] at position `length` - 1 over the first `length`
    positions of a key/value cache held as consecutive blocks along the positions, each [batch, heads, block,
    head_dim] (positions at and after `length` are ignored).

    Only the blocks passed are read: a decoding loop passes those filled so far, so the early positions of an image
    do not stream the whole cache from memory, which bounds decoding on a CPU. Heads-major blocks make both products
    batched over (batch, heads) with no transpose of the cache. Same scale, mask value and fp32 softmax as
    `xla_attention`, so cached decoding reproduces the full forward pass's logits.
    """
    scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))
    scores = jnp.concatenate(
        [jnp.einsum("bqhd,bhsd->bhqs", q, k, preferred_element_type=jnp.float32) for k in k_blocks], axis=-1
    )
    scores = jnp.where(jnp.arange(scores.shape[-1]) < length, scores * scale, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_blocks[0].dtype)
    sizes = [v.shape[2] for v in v_blocks]
    parts = jnp.split(probs, list(itertools.accumulate(sizes))[:-1], axis=-1)
    return sum(jnp.einsum("bhqs,bhsd->bqhd", p, v) for p, v in zip(parts, v_blocks, strict=True))
