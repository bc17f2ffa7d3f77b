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

`auto` picks, at trace time, `ring` when the mesh has a `sequence` axis of more than one device, else the kernel that
AUTO, a table of measurements, gives for the platform of the mesh's devices (not the host's: a CPU compiling for a TPU
topology gets the TPU's), the sequence length and the dtype. A kernel that cannot take a call (dtype, head size,
length, platform) runs its fallback and logs why once. Decoding (sampling) uses `cached_attention`, which reads a
key/value cache and needs none of this.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from igpt_jax import sharding
from igpt_jax.attention import ring
from igpt_jax.attention.blockwise import blockwise_attention
from igpt_jax.attention.cudnn import cudnn_attention
from igpt_jax.attention.fallback import running
from igpt_jax.attention.ring import ring_attention
from igpt_jax.attention.splash import splash_attention
from igpt_jax.attention.xla import cached_attention, xla_attention

__all__ = [
    "AUTO",
    "KERNELS",
    "AutoRule",
    "Kernel",
    "allowed_names",
    "cached_attention",
    "get",
    "resolve",
    "running",
    "sequence_kernel",
    "xla_attention",
]

AttentionFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Kernel:
    """An attention implementation and the traits the rest of the framework reads from it: adding a kernel is its
    file and its entry in KERNELS."""

    fn: AttentionFn
    # Whether XLA's cost analysis sees its FLOPs: a custom call (Pallas, cuDNN) is opaque to it, so the planner
    # compares XLA's count with the analytic FLOPs outside attention.
    costed_by_xla: bool
    # (tokens per image, sequence shards) -> why it cannot split an image's tokens that way, or None; for kernels
    # that run over the mesh's `sequence` axis, which `auto` takes whenever the mesh splits the sequence.
    split_refusal: Callable[[int, int], str | None] | None = None

    @property
    def splits_sequence(self) -> bool:
        return self.split_refusal is not None


KERNELS: dict[str, Kernel] = {
    "xla": Kernel(xla_attention, costed_by_xla=True),
    "blockwise": Kernel(blockwise_attention, costed_by_xla=True),
    "cudnn": Kernel(cudnn_attention, costed_by_xla=False),
    "splash": Kernel(splash_attention, costed_by_xla=False),
    "ring": Kernel(ring_attention, costed_by_xla=True, split_refusal=ring.split_refusal),
}


@dataclasses.dataclass(frozen=True)
class AutoRule:
    """What `auto` runs on one platform, and what that rests on. `by_length`: (longest sequence, kernel) rows in
    increasing order, the last row's length None (any longer), for bfloat16/float16 inputs; `float32`: the kernel for
    float32 inputs. benchmarks/accelerator.py measures the rows (its `auto_rows`) on the device at hand."""

    by_length: tuple[tuple[int | None, str], ...]
    float32: str
    basis: str

    def kernel(self, length: int, dtype) -> str:
        if jnp.dtype(dtype) == jnp.float32:
            return self.float32
        return next(name for longest, name in self.by_length if longest is None or length <= longest)


AUTO: dict[str, AutoRule] = {
    "cpu": AutoRule(
        ((None, "blockwise"),),
        "blockwise",
        "benchmarks/train_speed.py on 2 CPU cores: blockwise trains 1.3-1.5x faster than xla at 1,024 tokens",
    ),
    "gpu": AutoRule(
        ((1024, "blockwise"), (None, "cudnn")),
        "xla",  # cuDNN's flash kernel takes no float32
        "one H200 run, bf16, causal, forward + backward: blockwise 3.17 ms against cuDNN's 7.06 at 1,024 tokens, cuDNN "
        "6.51 against 7.24 at 2,304; lengths between them not measured yet (benchmarks/accelerator.py measures 256 to "
        "4,096)",
    ),
    "tpu": AutoRule(((None, "splash"),), "splash", "MaxText's default on TPU; not measured here"),
}


def allowed_names() -> list[str]:
    return ["auto", *KERNELS]


def resolve(
    name: str, platform: str | None = None, sequence: int | None = None, length: int = 0, dtype="bfloat16"
) -> str:
    """The implementation's name: `name` itself, or for `auto` `ring` when the mesh splits the sequence over
    `sequence` > 1 devices, else AUTO's kernel for `platform`, a sequence of `length` tokens and `dtype` (xla on a
    platform AUTO does not list). Both default to the current mesh's (the platform then to JAX's backend); the
    compile-only planner passes its target's."""
    sequence = sharding.sequence_shards() if sequence is None else sequence
    if name == "auto" and sequence > 1:
        return sequence_kernel()  # any other kernel would see the whole sequence: XLA gathers it onto every device
    if name == "auto":
        rule = AUTO.get(platform or sharding.mesh_platform())
        name = "xla" if rule is None else rule.kernel(length, dtype)
    if name not in KERNELS:
        raise ValueError(f"config.model.attention={name!r} is unknown; allowed: {allowed_names()}")
    return name


def _auto(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool) -> jax.Array:
    return KERNELS[resolve("auto", length=q.shape[1], dtype=q.dtype)].fn(q, k, v, causal=causal)


def get(name: str) -> AttentionFn:
    """The attention function called `name`; `auto` chooses when it is traced, by the mesh it runs on."""
    if name == "auto":
        return _auto
    return KERNELS[resolve(name)].fn


def sequence_kernel() -> str:
    """The kernel `auto` takes when the mesh splits the sequence: the first that does."""
    return next(name for name, kernel in KERNELS.items() if kernel.splits_sequence)
