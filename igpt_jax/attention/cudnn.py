"""`cudnn`: cuDNN's fused flash attention on NVIDIA GPUs, through jax.nn.dot_product_attention(implementation='cudnn').

cuDNN takes bf16/fp16 inputs with a head_dim that is a multiple of 8 and at most 128 (iGPT's 64, 96 and 128 all
qualify); anything else, or a mesh that is not on GPUs, falls back to `xla` with the reason logged. The layout
[B, S, H, D] and the 1/sqrt(head_dim) scale are jax.nn.dot_product_attention's own, so no transpose is needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from igpt_jax import sharding
from igpt_jax.attention import fallback
from igpt_jax.attention.xla import xla_attention

DTYPES = (jnp.bfloat16, jnp.float16)
MAX_HEAD_DIM = 128


def refusal(q: jax.Array, platform: str) -> str | None:
    """Why cuDNN cannot take these inputs on `platform`, or None when it can."""
    if platform != "gpu":
        return f"needs GPU devices, the mesh is on {platform}"
    if q.dtype not in DTYPES:
        return f"needs bfloat16 or float16, got {q.dtype} (set config.model.dtype)"
    head_dim = q.shape[-1]
    if head_dim % 8 or head_dim > MAX_HEAD_DIM:
        return f"needs head_dim a multiple of 8 and at most {MAX_HEAD_DIM}, got {head_dim}"
    return None


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool) -> jax.Array:
    reason = refusal(q, sharding.mesh_platform())
    if reason is not None:
        fallback.note("cudnn", reason, "xla")
        return xla_attention(q, k, v, causal=causal)
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
