"""Blockwise causal attention for CPUs (and any backend without a fused kernel): causally masked blocks are never
computed, and the backward pass recomputes probabilities from a saved log-sum-exp instead of keeping them.

The sequence is cut into query blocks of about `block` positions. Query block i attends to the key prefix it can
see, positions 0 .. (i+1)*block for a causal mask (all of them otherwise), in one pair of matmuls; only the diagonal
block needs a mask. Each block's softmax is exact over its prefix (no running rescale), which keeps the matmuls
large: what a CPU wants. Causal work is (n+1)/2n of the full square for n blocks (56% for 1,024 tokens in blocks of
128).

The custom VJP keeps only q, k, v, the output and the log-sum-exp per query ([B, H, S] fp32), FlashAttention's
recipe: the backward recomputes p = exp(s - lse) block by block. Autodiff would instead save every block's
probabilities, about half an S x S matrix per head. The blocks' temporaries are XLA's to place: at 2,048 tokens the
gradient's are 60% of xla_attention's on a CPU, not one block's worth; on accelerators the fused kernels (splash,
cudnn) are the memory-lean ones.

`partial_attention` returns (output, log-sum-exp) for a query block over any key range and `merge` combines two such
partial results exactly (the online softmax); ring attention passes key/value blocks between devices and merges
what each hop returns with them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from igpt_jax.attention.xla import MASK_VALUE

DEFAULT_BLOCK = 128


def block_size(length: int, target: int = DEFAULT_BLOCK) -> int:
    """The query block for `length` positions: `length` itself when short, else the largest divisor of `length` in
    [target / 2, target] (784 = 7 x 112, 1024 = 8 x 128, 2304 = 18 x 128), else `target` with the sequence padded."""
    if length <= target:
        return length
    for size in range(target, target // 2 - 1, -1):
        if length % size == 0:
            return size
    return target


def partial_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float
) -> tuple[jax.Array, jax.Array]:
    """Softmax attention of q [B, H, Q, D] over k, v [B, H, K, D] restricted to `mask` ([Q, K] bool, True = may
    attend; None = everything). Returns the output [B, H, Q, D] in q's dtype and the log-sum-exp [B, H, Q] fp32."""
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    total = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32) / total
    return o.astype(q.dtype), (m + jnp.log(total))[..., 0]


def partial_gradients(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lse: jax.Array,
    do: jax.Array,
    delta: jax.Array,
    mask: jax.Array | None,
    scale: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dq, dk, dv) fp32 of partial_attention's query block over these keys, given the queries' FINAL log-sum-exp
    [B, H, Q] and delta = rowsum(dO * O) [B, H, Q] over all the keys they attend to (FlashAttention's backward: the
    probabilities p = exp(s - lse) are recomputed here, never stored)."""
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    p = jnp.exp(s - lse[..., None])
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    dv = jnp.einsum("bhqk,bhqd->bhkd", p.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dp = jnp.einsum("bhqd,bhkd->bhqk", do, v, preferred_element_type=jnp.float32)
    ds = (p * (dp - delta[..., None]) * scale).astype(q.dtype)
    dq = jnp.einsum("bhqk,bhkd->bhqd", ds, k, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bhqk,bhqd->bhkd", ds, q, preferred_element_type=jnp.float32)
    return dq, dk, dv


def merge(o1: jax.Array, lse1: jax.Array, o2: jax.Array, lse2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The attention over the union of two disjoint key sets, from each set's (output, log-sum-exp): exact. A side
    that saw no key (log-sum-exp -inf) weighs nothing; if neither did, the result is (0, -inf)."""
    lse = jnp.logaddexp(lse1, lse2)
    empty = jnp.isneginf(lse)
    safe = jnp.where(empty, 0.0, lse)  # exp(-inf - -inf) would be nan
    w1, w2 = jnp.exp(lse1 - safe)[..., None], jnp.exp(lse2 - safe)[..., None]
    o = o1.astype(jnp.float32) * w1 + o2.astype(jnp.float32) * w2
    return o.astype(o1.dtype), lse


def heads_major(x: jax.Array, padded: int) -> jax.Array:
    """[B, S, H, D] -> [B, H, padded, D], zero-padded along the positions: the layout the block kernels work in."""
    x = jnp.swapaxes(x, 1, 2)
    extra = padded - x.shape[2]
    return jnp.pad(x, ((0, 0), (0, 0), (0, extra), (0, 0))) if extra else x


def _key_mask(i: int, size: int, keys: int, length: int, causal: bool) -> jax.Array | None:
    """Which of the first `keys` keys query block i may see: causal (key <= query) and not padding (key < length)."""
    rows = i * size + jnp.arange(size)[:, None]
    cols = jnp.arange(keys)[None, :]
    if causal:
        return cols <= rows  # padding keys lie after every real query, so causality already hides them
    if keys > length:
        return jnp.broadcast_to(cols < length, (size, keys))
    return None


def _prefix(i: int, size: int, padded: int, causal: bool) -> int:
    return (i + 1) * size if causal else padded


def _forward(q, k, v, causal: bool, size: int, length: int):
    """q, k, v [B, H, Sp, D] (padded to whole blocks) -> output [B, H, Sp, D], log-sum-exp [B, H, Sp]."""
    padded = q.shape[2]
    scale = 1.0 / float(q.shape[-1]) ** 0.5
    outs, lses = [], []
    for i in range(padded // size):
        keys = _prefix(i, size, padded, causal)
        qi = q[:, :, i * size : (i + 1) * size]
        o, lse = partial_attention(qi, k[:, :, :keys], v[:, :, :keys], _key_mask(i, size, keys, length, causal), scale)
        outs.append(o)
        lses.append(lse)
    return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)


def _backward(q, k, v, o, lse, do, causal: bool, size: int, length: int):
    padded = q.shape[2]
    scale = 1.0 / float(q.shape[-1]) ** 0.5
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # [B, H, Sp]: rowsum(dO * O)
    dq_blocks = []
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for i in range(padded // size):
        rows = slice(i * size, (i + 1) * size)
        keys = _prefix(i, size, padded, causal)
        mask = _key_mask(i, size, keys, length, causal)
        qi, doi = q[:, :, rows], do[:, :, rows]
        kp, vp = k[:, :, :keys], v[:, :, :keys]
        dq_i, dk_part, dv_part = partial_gradients(qi, kp, vp, lse[:, :, rows], doi, delta[:, :, rows], mask, scale)
        dq_blocks.append(dq_i)
        dk = dk.at[:, :, :keys].add(dk_part)
        dv = dv.at[:, :, :keys].add(dv_part)
    dq = jnp.concatenate(dq_blocks, axis=2)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _attention(q, k, v, causal: bool, size: int, length: int):
    return _forward(q, k, v, causal, size, length)[0]


def _attention_fwd(q, k, v, causal, size, length):
    o, lse = _forward(q, k, v, causal, size, length)
    return o, (q, k, v, o, lse)


def _attention_bwd(causal, size, length, residuals, do):
    return _backward(*residuals, do, causal, size, length)


_attention.defvjp(_attention_fwd, _attention_bwd)


def blockwise_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, block: int = DEFAULT_BLOCK
) -> jax.Array:
    """The registry's signature (q, k, v [B, S, H, D] -> [B, S, H, D]), computed blockwise as the module says."""
    length = q.shape[1]
    if k.shape[1] != length:
        raise ValueError(f"blockwise attention needs as many keys as queries, got {k.shape[1]} and {length}")
    size = block_size(length, block)
    padded = -(-length // size) * size

    o = _attention(heads_major(q, padded), heads_major(k, padded), heads_major(v, padded), causal, size, length)
    return jnp.swapaxes(o[:, :, :length], 1, 2)
