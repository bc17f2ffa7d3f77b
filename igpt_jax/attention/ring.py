"""`ring`: attention over a sequence split across devices (context parallelism), for images too long for one chip.

The sequence axis of q, k, v is sharded over the mesh axis `sequence`. Each of its n devices keeps its queries and
passes its keys and values around the ring (lax.ppermute), n hops; at each hop it attends its queries to the block it
holds and merges the result into what it has (`blockwise.merge`: the online softmax, exact). Within a (query chunk,
key chunk) pair, queries go `QUERY_BLOCK` at a time (lax.map), so no more than [B, H, block, chunk] scores exist.

Gradients: a custom VJP, FlashAttention's backward run around the same ring. The forward keeps only q, k, v, the
output and the log-sum-exp; the backward recomputes each pair's probabilities, keeps dq on the device and sends each
key block's dk and dv along with it, n shifts, back to the device that owns it. Differentiating through the ring
instead would keep every hop's visiting keys and every pair's probabilities, [B, H, chunk, chunk] per pair and hop.

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

SEQUENCE_AXIS = sharding.SEQUENCE_AXIS
FULL, DIAGONAL, SKIP = "full", "diagonal", "skip"


def zigzag(length: int, n: int) -> jax.Array:
    """The token order that gives device r chunks r and 2n-1-r of 2n equal chunks (positions, as indices)."""
    chunk = length // (2 * n)
    order = [c for r in range(n) for c in (r, 2 * n - 1 - r)]
    return jnp.concatenate([jnp.arange(c * chunk, (c + 1) * chunk) for c in order])


def split_refusal(length: int, n: int) -> str | None:
    """Why `length` tokens cannot be split over a ring of n devices (2n equal zigzag chunks), or None when they can.
    Read by the kernel at trace time and by the config check before anything starts."""
    if length % (2 * n):
        return (
            f"ring attention cuts each image's {length} tokens into {2 * n} equal chunks, so the token count must be "
            f"a multiple of {2 * n}"
        )
    return None


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
_CODES = {FULL: 0, DIAGONAL: 1, SKIP: 2}
QUERY_BLOCK = 512


def query_block(chunk: int, target: int = QUERY_BLOCK) -> int:
    """Queries per block inside one (query chunk, key chunk) pair: the largest divisor of `chunk` up to `target`
    (the whole chunk when it is short or has no divisor above target / 4). Scores are [B, H, block, chunk] at a time."""
    if chunk <= target:
        return chunk
    size = next(s for s in range(target, 0, -1) if chunk % s == 0)
    return size if size >= target // 4 else chunk


def _blocks(x: jax.Array, size: int) -> jax.Array:
    """[B, H, c, ...] -> [c / size, B, H, size, ...]: query blocks first, for lax.map / lax.scan."""
    b, h, c = x.shape[:3]
    return jnp.moveaxis(x.reshape(b, h, c // size, size, *x.shape[3:]), 2, 0)


def _unblocks(x: jax.Array) -> jax.Array:
    nb, b, h, size = x.shape[:4]
    return jnp.moveaxis(x, 0, 2).reshape(b, h, nb * size, *x.shape[4:])


def _mask(code: jax.Array, first_row: jax.Array, size: int, keys: int, q: jax.Array) -> jax.Array:
    """[size, keys]: everything for a full pair, key <= query for the diagonal pair (same chunk on both sides).

    The mask depends on the block index alone, so when the layer is differentiated inside a scan with remat, JAX's
    partial evaluation would compute it ahead for every block and keep it broadcast to the scores' shape: 1.3 GiB per
    pair for iGPT-L at 192x192, 40 GiB a chip in all (73.0 against 32.6). Tying it to the queries
    (optimization_barrier) keeps it in the loop, where it fuses into the scores."""
    first_row, code, _ = jax.lax.optimization_barrier((first_row, code, q))
    rows = first_row + jnp.arange(size)[:, None]
    return (jnp.arange(keys)[None, :] <= rows) | (code == _CODES[FULL])


def _pair_forward(q, k, v, code, scale, size):
    """(output fp32, log-sum-exp) of a query chunk over a key chunk, one query block at a time; (0, -inf) when the
    pair is skipped (lax.cond: the work is not done, not masked)."""

    def compute(q, k, v):
        def one(args):
            qi, i = args
            o, lse = blockwise.partial_attention(qi, k, v, _mask(code, i * size, size, k.shape[2], qi), scale)
            return o.astype(jnp.float32), lse

        o, lse = jax.lax.map(one, (_blocks(q, size), jnp.arange(q.shape[2] // size)))
        return _unblocks(o), _unblocks(lse)

    def skip(q, k, v):
        return jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:3], _EMPTY_LSE, jnp.float32)

    return jax.lax.cond(code == _CODES[SKIP], skip, compute, q, k, v)


def _pair_backward(q, k, v, lse, do, delta, code, scale, size):
    """(dq, dk, dv) fp32 of one pair, from the final log-sum-exp and delta = rowsum(dO * O) of the queries
    (FlashAttention's backward: p = exp(s - lse) recomputed block by block, never stored)."""

    def compute(q, k, v):
        def one(carry, args):
            dk, dv = carry
            qi, lse_i, do_i, delta_i, i = args
            mask = _mask(code, i * size, size, k.shape[2], qi)
            dq_i, dk_i, dv_i = blockwise.partial_gradients(qi, k, v, lse_i, do_i, delta_i, mask, scale)
            return (dk + dk_i, dv + dv_i), dq_i

        zeros = jnp.zeros(k.shape, jnp.float32)
        blocks = (_blocks(q, size), _blocks(lse, size), _blocks(do, size), _blocks(delta, size))
        (dk, dv), dq = jax.lax.scan(one, (zeros, zeros), (*blocks, jnp.arange(q.shape[2] // size)))
        return _unblocks(dq), dk, dv

    def skip(q, k, v):
        return jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)

    return jax.lax.cond(code == _CODES[SKIP], skip, compute, q, k, v)


def _halves(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    c = x.shape[2] // 2
    return x[:, :, :c], x[:, :, c:]


def _codes(n: int, causal: bool) -> jax.Array:
    """[device, hop, pair] -> the pair's kind code: a static table indexed by the device's traced position."""
    return jnp.array([[[_CODES[kind] for kind in hop] for hop in schedule(d, n, causal)] for d in range(n)])


def _shift(x: jax.Array, n: int) -> jax.Array:
    """Each device's block to the next device on the ring."""
    return jax.lax.ppermute(x, SEQUENCE_AXIS, [(i, (i + 1) % n) for i in range(n)])


def _ring_forward(q, k, v, n: int, causal: bool, size: int):
    """Inside shard_map: q, k, v [B, H, 2c, D], this device's two chunks (zigzag order) -> (o in q's dtype, lse)."""
    r = jax.lax.axis_index(SEQUENCE_AXIS)
    scale = 1.0 / float(q.shape[-1]) ** 0.5
    table = _codes(n, causal)
    q_chunks = _halves(q)
    acc = [(jnp.zeros(qc.shape, jnp.float32), jnp.full(qc.shape[:3], _EMPTY_LSE, jnp.float32)) for qc in q_chunks]
    for hop in range(n):
        k_chunks, v_chunks = _halves(k), _halves(v)
        for a in range(2):
            for b in range(2):
                part = _pair_forward(q_chunks[a], k_chunks[b], v_chunks[b], table[r, hop, 2 * a + b], scale, size)
                acc[a] = blockwise.merge(*acc[a], *part)
        if hop < n - 1:
            k, v = _shift(k, n), _shift(v, n)
    o = jnp.concatenate([acc[0][0], acc[1][0]], axis=2).astype(q.dtype)
    return o, jnp.concatenate([acc[0][1], acc[1][1]], axis=2)


def _ring_backward(q, k, v, o, lse, do, n: int, causal: bool, size: int):
    """The same ring in reverse roles: dq stays, each key block's dk and dv travel with it and, after the n-th
    shift, arrive back at the device that owns it. Nothing from the forward pass is kept but q, k, v, o and lse."""
    r = jax.lax.axis_index(SEQUENCE_AXIS)
    scale = 1.0 / float(q.shape[-1]) ** 0.5
    table = _codes(n, causal)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
    q_c, lse_c, do_c, delta_c = _halves(q), _halves(lse), _halves(do), _halves(delta)
    dq = [jnp.zeros(x.shape, jnp.float32) for x in q_c]
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for hop in range(n):
        k_c, v_c = _halves(k), _halves(v)
        dk_c, dv_c = list(_halves(dk)), list(_halves(dv))
        for a in range(2):
            for b in range(2):
                code = table[r, hop, 2 * a + b]
                g = _pair_backward(q_c[a], k_c[b], v_c[b], lse_c[a], do_c[a], delta_c[a], code, scale, size)
                dq[a], dk_c[b], dv_c[b] = dq[a] + g[0], dk_c[b] + g[1], dv_c[b] + g[2]
        dk, dv = jnp.concatenate(dk_c, axis=2), jnp.concatenate(dv_c, axis=2)
        if hop < n - 1:
            k, v = _shift(k, n), _shift(v, n)
        dk, dv = _shift(dk, n), _shift(dv, n)
    return jnp.concatenate(dq, axis=2).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _ring(q, k, v, n: int, causal: bool, size: int):
    return _ring_forward(q, k, v, n, causal, size)[0]


def _ring_fwd(q, k, v, n, causal, size):
    o, lse = _ring_forward(q, k, v, n, causal, size)
    return o, (q, k, v, o, lse)


def _ring_bwd(n, causal, size, residuals, do):
    return _ring_backward(*residuals, do, n, causal, size)


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool) -> jax.Array:
    """The registry's signature ([B, S, H, D]); needs a mesh with a `sequence` axis whose size n divides S / 2."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or SEQUENCE_AXIS not in mesh.axis_names:
        raise ValueError(f"ring attention needs a mesh with a {SEQUENCE_AXIS!r} axis (config.mesh.ici.sequence)")
    n = mesh.shape[SEQUENCE_AXIS]
    length = q.shape[1]
    reason = split_refusal(length, n)
    if reason is not None:
        raise ValueError(f"sequence={n}: {reason}")
    order = zigzag(length, n)
    inverse = jnp.argsort(order)
    batch_axes, head_axes = sharding.current_spec(("act_batch", "heads")) or (None, None)
    spec = jax.sharding.PartitionSpec(batch_axes, head_axes, SEQUENCE_AXIS, None)

    def heads_major(x):  # zigzag order, then the block kernels' [B, H, S, D] layout
        return blockwise.heads_major(jnp.take(x, order, axis=1), length)

    size = query_block(length // (2 * n), QUERY_BLOCK)

    def local(q, k, v):
        return _ring(q, k, v, n, causal, size)

    o = jax.shard_map(local, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(
        heads_major(q), heads_major(k), heads_major(v)
    )
    return jnp.take(jnp.swapaxes(o, 1, 2), inverse, axis=1)
