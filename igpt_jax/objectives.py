"""Training objectives (config.objective): each maps (model, tokens, key, config) to (loss, metrics).

Losses are mean cross-entropy in nats per token, as OpenAI reports them (2.0895 nats for iGPT-S on ImageNet 32x32);
metrics add bits per token (nats / ln 2). Bits per palette token are not the 8-bit bits/dim of other papers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from igpt_jax.model import IGPT

Metrics = dict[str, jax.Array]
Objective = Callable[[IGPT, jax.Array, jax.Array, ml_collections.ConfigDict], tuple[jax.Array, Metrics]]


def _metrics(loss: jax.Array) -> Metrics:
    return {"loss": loss, "bits_per_token": loss / math.log(2.0)}


def autoregressive(model: IGPT, tokens: jax.Array, key: jax.Array, config) -> tuple[jax.Array, Metrics]:
    """Every token scored from the ones before it (input [SOS, x_0 .. x_{N-2}])."""
    del key, config
    logits = model(tokens)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()
    return loss, _metrics(loss)


def masked(model: IGPT, tokens: jax.Array, key: jax.Array, config) -> tuple[jax.Array, Metrics]:
    """BERT: each position masked with probability config.bert_mask_prob; loss on masked positions only,
    averaged per image over its masked positions, then over the batch (OpenAI's order)."""
    mask = jax.random.bernoulli(key, config.bert_mask_prob, tokens.shape)
    logits = model(tokens, mask=mask)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
    per_image = jnp.sum(ce * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1)
    loss = per_image.mean()
    return loss, _metrics(loss) | {"masked_fraction": mask.mean()}


OBJECTIVES: dict[str, Objective] = {"ar": autoregressive, "bert": masked}


def get(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"config.objective={name!r} is unknown; allowed: {list(OBJECTIVES)}")
    return OBJECTIVES[name]
