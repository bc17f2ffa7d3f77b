"""The optimizer from `config.optimizer`: Adam (b1 0.9, b2 0.95 in the paper), a warmup-then-decay learning rate,
optional decoupled weight decay on matrices and optional global-norm clipping. fp32 state whatever the compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import ml_collections
import optax


def _cosine(o, total_steps: int) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        0.0, o.learning_rate, max(o.warmup_steps, 1), max(total_steps, o.warmup_steps + 1), end_value=0.0
    )


def _linear(o, total_steps: int) -> optax.Schedule:
    warmup = optax.linear_schedule(0.0, o.learning_rate, max(o.warmup_steps, 1))
    decay = optax.linear_schedule(o.learning_rate, 0.0, max(total_steps - o.warmup_steps, 1))
    return optax.join_schedules([warmup, decay], [o.warmup_steps])


def _constant(o, total_steps: int) -> optax.Schedule:
    del total_steps
    return optax.linear_schedule(0.0, o.learning_rate, max(o.warmup_steps, 1))


# Linear warmup from 0, then: cosine to 0 (the paper), linear to 0, or constant.
SCHEDULES: dict[str, Callable[[ml_collections.ConfigDict, int], optax.Schedule]] = {
    "cosine": _cosine,
    "linear": _linear,
    "constant": _constant,
}


def schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    name = config.optimizer.schedule
    if name not in SCHEDULES:
        raise ValueError(f"config.optimizer.schedule={name!r} is unknown; allowed: {list(SCHEDULES)}")
    return SCHEDULES[name](config.optimizer, config.total_steps)


def make(
    config: ml_collections.ConfigDict, learning_rate: optax.Schedule | None = None
) -> optax.GradientTransformation:
    """Adam(W) at `learning_rate` (default: `schedule(config)`), with clipping first when configured."""
    o = config.optimizer
    parts = []
    if o.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
    parts.append(
        optax.adamw(
            schedule(config) if learning_rate is None else learning_rate,
            b1=o.b1,
            b2=o.b2,
            eps=1e-8,
            weight_decay=o.weight_decay,
            mask=decays,
        )
    )
    return optax.chain(*parts)


def decays(params: dict) -> dict:
    """True for the matrices (embeddings, projections, head), False for norm gains and the SOS vector. Judged per
    layer: the blocks' parameters carry a leading `layers` axis, so a stacked gain [layers, d] is a vector."""

    def is_matrix(path, p) -> bool:
        stacked = getattr(path[0], "key", None) == "blocks"
        return p.ndim - int(stacked) >= 2

    return jax.tree_util.tree_map_with_path(is_matrix, params)
