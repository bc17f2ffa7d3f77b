"""`splash`: Pallas's TPU splash attention (jax.experimental.pallas.ops.tpu.splash_attention), MaxText's TPU kernel.

The kernel works per image on [heads, S, head_dim] with block sizes that divide S, so the sequence is padded to a
multiple of 128 (784 -> 896; 1,024, 2,304 = 9 x 256 and 4,096 need none): with a causal mask the padding keys come
after every real query and are never seen; a bidirectional (BERT) call needs S itself to be a multiple of 128 and
otherwise falls back to `blockwise`, with the reason logged. Blocks are the largest of 512, 256 and 128 that
divide. Under a mesh it runs inside shard_map, images over the batch axes and heads over `tensor` (the logical
`act_batch` and `heads` rules), as MaxText's tpu_flash_attention does; each shard builds the kernel for its own
heads. Queries are pre-scaled by 1/sqrt(head_dim) (splash does not scale). Off TPU (tests on a CPU) the kernel runs
in Pallas's interpreter: slow, but the same program, so it is tested here against `xla`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from igpt_jax import sharding
from igpt_jax.attention import blockwise, fallback

ALIGN = 128
BLOCKS = (512, 256, 128)


def _kernel(heads: int, length: int, causal: bool, interpret: bool):
    # imported here: Pallas's TPU modules load only when a config asks for splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

    shape = (length, length)
    one = mask_lib.CausalMask(shape) if causal else mask_lib.FullMask(shape)
    block = next(b for b in BLOCKS if length % b == 0)
    sizes = kernel_lib.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    return kernel_lib.make_splash_mha(
        mask=mask_lib.MultiHeadMask([one] * heads),
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool) -> jax.Array:
    length = q.shape[1]
    padded = -(-length // ALIGN) * ALIGN
    if not causal and padded != length:
        reason = f"a bidirectional mask needs the length a multiple of {ALIGN}, got {length}"
        fallback.note("splash", reason, "blockwise")
        return blockwise.blockwise_attention(q, k, v, causal=causal)
    interpret = sharding.mesh_platform() != "tpu"
    scale = 1.0 / float(q.shape[-1]) ** 0.5

    def local(q, k, v):
        return jax.vmap(_kernel(q.shape[1], padded, causal, interpret))(q, k, v)

    args = tuple(blockwise.heads_major(x, padded) for x in (q * jnp.asarray(scale, q.dtype), k, v))
    spec = sharding.current_spec(("act_batch", "heads", None, None))
    if spec is None:
        o = local(*args)
    else:
        o = jax.shard_map(local, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(*args)
    return jnp.swapaxes(o[:, :, :length], 1, 2)
