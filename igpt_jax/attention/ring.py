"""`ring`: attention over a sequence split across devices (context parallelism), for images too long for one chip.

The sequence axis of q, k, v is sharded over the mesh axis `sequence`. Each of its n devices keeps its queries and
passes its keys and values around the ring (lax.ppermute), n hops; at each hop it attends its queries to the block it
holds with `blockwise.partial_attention` and merges the result into what it has (`blockwise.merge`: the online
softmax, exact). Gradients flow back through the same ring (ppermute's transpose is the reverse permutation).

Causal load balance: split naively, device 0 would attend to one block while device n-1 attends to n. The sequence
is therefore cut into 2n chunks and device r holds chunks r and 2n-1-r (the "zigzag" order). Then, for every device
and every hop, exactly two of the four (query chunk, key chunk) pairs are visible, apart from hop 0's two diagonal
pairs, which are half-masked: every device does the same work. `schedule(r, n)` says which pairs a device computes;
the kernel and the balance test both read it. Pairs entirely in the future are skipped with lax.cond, not masked.

The zigzag permutation is applied to q, k, v here and undone on the output, so callers see the usual order; it
costs one all-to-all of q, k, v and o per layer over the sequence axis.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from igpt_jax import sharding
from igpt_jax.attention import blockwise

SEQUENCE_AXIS = "sequence"
FULL, DIAGONAL, SKIP = "full", "diagonal", "skip"


def zigzag(length: int, n: int) -> jax.Array:
    """The token order that gives device r chunks r and 2n-1-r of 2n equal chunks (positions, as indices)."""
    chunk = length // (2 * n)
    order = [c for r in range(n) for c in (r, 2 * n - 1 - r)]
    return jnp.concatenate([jnp.arange(c * chunk, (c + 1) * chunk) for c in order])


def pair_kind(query_chunk: int, key_chunk: int, causal: bool) -> str:
    if not causal or key_chunk < query_chunk:
        return FULL
    return DIAGONAL if key_chunk == query_chunk else SKIP


def schedule(r: int, n: int, causal: bool = True) -> list[list[str]]:
    """For device r of n: per hop, the kind of each (query chunk, key chunk) pair it meets, in the kernel's order
    (its chunks r, 2n-1-r against the visiting device's s, 2n-1-s, s = r - hop mod n)."""
    hops = []
    for hop in range(n):
        s = (r - hop) % n
        queries, keys = (r, 2 * n - 1 - r), (s, 2 * n - 1 - s)
        hops.append([pair_kind(a, b, causal) for a in queries for b in keys])
    return hops


_EMPTY_LSE = -jnp.inf


def _attend(q, k, v, kind_code, scale):
    """One pair under lax.switch: 0 full, 1 diagonal (causal within the chunk), 2 skip (nothing visible)."""
    size = q.shape[2]
    causal_mask = jnp.arange(size)[None, :] <= jnp.arange(size)[:, None]

    def full(q, k, v):
        return blockwise.partial_attention(q, k, v, None, scale)

    def diagonal(q, k, v):
        return blockwise.partial_attention(q, k, v, causal_mask, scale)

    def skip(q, k, v):
        return jnp.zeros_like(q), jnp.full(q.shape[:3], _EMPTY_LSE, jnp.float32)

    return jax.lax.switch(kind_code, (full, diagonal, skip), q, k, v)


_CODES = {FULL: 0, DIAGONAL: 1, SKIP: 2}


def _local(q, k, v, *, n: int, causal: bool):
    """Inside shard_map: q, k, v [B, H, 2c, D], this device's two chunks (zigzag order)."""
    r = jax.lax.axis_index(SEQUENCE_AXIS)
    c = q.shape[2] // 2
    scale = 1.0 / float(q.shape[-1]) ** 0.5
    # the kinds of every (device, hop, pair), a static table indexed by the device's traced position
    table = jnp.array([[[_CODES[kind] for kind in hop] for hop in schedule(d, n, causal)] for d in range(n)])
    q_chunks = (q[:, :, :c], q[:, :, c:])
    acc = [(jnp.zeros_like(qc), jnp.full(qc.shape[:3], _EMPTY_LSE, jnp.float32)) for qc in q_chunks]
    for hop in range(n):
        k_chunks, v_chunks = (k[:, :, :c], k[:, :, c:]), (v[:, :, :c], v[:, :, c:])
        for a in range(2):
            for b in range(2):
                part = _attend(q_chunks[a], k_chunks[b], v_chunks[b], table[r, hop, 2 * a + b], scale)
                acc[a] = blockwise.merge(*acc[a], *part)
        if hop < n - 1:
            shift = [(i, (i + 1) % n) for i in range(n)]
            k, v = jax.lax.ppermute(k, SEQUENCE_AXIS, shift), jax.lax.ppermute(v, SEQUENCE_AXIS, shift)
    return jnp.concatenate([acc[0][0], acc[1][0]], axis=2)


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool) -> jax.Array:
    """The registry's signature ([B, S, H, D]); needs a mesh with a `sequence` axis whose size n divides S / 2."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or SEQUENCE_AXIS not in mesh.axis_names:
        raise ValueError(f"ring attention needs a mesh with a {SEQUENCE_AXIS!r} axis (config.mesh.ici.sequence)")
    n = mesh.shape[SEQUENCE_AXIS]
    length = q.shape[1]
    if length % (2 * n):
        raise ValueError(f"ring attention over sequence={n} needs the length a multiple of {2 * n}, got {length}")
    order = zigzag(length, n)
    inverse = jnp.argsort(order)
    batch_axes, head_axes = sharding.current_spec(("act_batch", "heads")) or (None, None)
    spec = jax.sharding.PartitionSpec(batch_axes, head_axes, SEQUENCE_AXIS, None)

    def heads_major(x):
        return jnp.swapaxes(jnp.take(x, order, axis=1), 1, 2)

    local = functools.partial(_local, n=n, causal=causal)
    o = jax.shard_map(local, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(
        heads_major(q), heads_major(k), heads_major(v)
    )
    return jnp.take(jnp.swapaxes(o, 1, 2), inverse, axis=1)
