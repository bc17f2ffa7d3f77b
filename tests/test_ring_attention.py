"""Ring attention (igpt_jax/attention/ring.py) over a `sequence` mesh axis of the 8 fake devices equals xla, forward
and gradients; its zigzag schedule gives every device the same work and covers every visible chunk pair once."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from igpt_jax import attention, sharding
from igpt_jax.attention import ring

RULES = [("act_batch", "fsdp"), ("heads", None)]


@pytest.mark.parametrize("causal", [True, pytest.param(False, marks=pytest.mark.slow)])  # bidirectional: -m slow
@pytest.mark.parametrize(
    "sequence, query_block",
    [(4, ring.QUERY_BLOCK), (2, ring.QUERY_BLOCK), (8, ring.QUERY_BLOCK), (2, 4)],  # (2, 4): 4 blocks per chunk
)
def test_ring_equals_xla(sequence, query_block, causal, monkeypatch):
    monkeypatch.setattr(ring, "QUERY_BLOCK", query_block)
    mesh = jax.make_mesh((8 // sequence, sequence), ("fsdp", "sequence"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    q, k, v, weights = (jax.random.normal(key, (4, 64, 2, 16)) for key in jax.random.split(jax.random.key(0), 4))

    def loss(fn):
        def f(q, k, v):
            with sharding.axis_rules(RULES):
                return jnp.sum(fn(q, k, v, causal=causal) * weights)

        return f

    with jax.set_mesh(mesh):
        out = jax.jit(lambda q, k, v: ring.ring_attention(q, k, v, causal=causal))(q, k, v)
        grads = jax.jit(jax.grad(loss(ring.ring_attention), (0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(out, attention.xla_attention(q, k, v, causal=causal), atol=2e-5, rtol=0)
    for name, g, w in zip("qkv", grads, jax.grad(loss(attention.xla_attention), (0, 1, 2))(q, k, v), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("n", [2, 4, 8])
def test_every_device_computes_the_same_number_of_pairs(n):
    """Causal: per device, the (query chunk, key chunk) pairs not skipped, over all hops; the diagonal pairs count
    half. Equal across the ring (the acceptance allows 10%); a contiguous split would give 1 to 2n-1 half-blocks."""
    work = []
    for r in range(n):
        kinds = [kind for hop in ring.schedule(r, n) for kind in hop]
        work.append(kinds.count(ring.FULL) + 0.5 * kinds.count(ring.DIAGONAL))
    assert max(work) <= 1.1 * min(work), work


@pytest.mark.parametrize("n", [2, 4, 8])
def test_the_schedule_meets_every_visible_pair_once(n):
    """Over all devices and hops, each (query chunk, key chunk) pair appears once, computed exactly when the causal
    mask lets any of it through."""
    seen = {}
    for r in range(n):
        for hop, kinds in enumerate(ring.schedule(r, n)):
            s = (r - hop) % n
            for (a, b), kind in zip(itertools.product((r, 2 * n - 1 - r), (s, 2 * n - 1 - s)), kinds, strict=True):
                assert (a, b) not in seen
                seen[a, b] = kind
    assert len(seen) == (2 * n) ** 2
    for (a, b), kind in seen.items():
        assert kind == (ring.FULL if b < a else ring.DIAGONAL if a == b else ring.SKIP)


def _gradient_temp_mib(fn, in_layer_scan: bool) -> float:
    """Temporaries of the gradient of sum(fn(q, k, v)) for 4,096 tokens over sequence=2 x fsdp=4, alone or as a
    model runs it: two layers under lax.scan with full remat."""
    mesh = jax.make_mesh((4, 2), ("fsdp", "sequence"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    x = jax.ShapeDtypeStruct((4, 4096, 4, 16), jnp.float32)

    def layer(h, w):
        with sharding.axis_rules(RULES):
            return fn(h * w, h, h, causal=True), None

    def loss(q, weights):
        if not in_layer_scan:
            return jnp.sum(layer(q, weights[0])[0])
        remat = jax.checkpoint(layer, policy=jax.checkpoint_policies.nothing_saveable)
        return jnp.sum(jax.lax.scan(remat, q, weights)[0])

    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.grad(loss, (0, 1))).lower(x, jax.ShapeDtypeStruct((2,), jnp.float32)).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


@pytest.mark.parametrize("in_layer_scan", [False, True])
def test_ring_gradient_keeps_no_chunk_by_chunk_probabilities_or_masks(in_layer_scan):
    """The custom VJP's temporaries against xla's [S, S] scores. Alone: differentiating through the ring instead
    keeps every pair's probabilities per hop. In a remat'd layer scan: without the optimization barrier in
    ring._mask, JAX's partial evaluation computes every block's mask ahead and keeps it broadcast to the scores'
    shape (63 GiB a chip for iGPT-L at 192x192)."""
    ring_mib, xla_mib = (_gradient_temp_mib(fn, in_layer_scan) for fn in (ring.ring_attention, attention.xla_attention))
    assert ring_mib < 100 and ring_mib < xla_mib / 20, (ring_mib, xla_mib)


def test_ring_needs_a_sequence_axis():
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    q = jnp.zeros((8, 16, 2, 8))
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="'sequence' axis"):
        ring.ring_attention(q, q, q, causal=True)
