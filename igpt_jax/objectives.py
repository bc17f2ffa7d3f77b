"""Training objectives (config.objective): the randomness a batch needs, and per-example losses.

Losses are cross-entropy in nats per token, as OpenAI reports them (2.0895 nats for iGPT-S on ImageNet 32x32);
metrics add bits per token (nats / ln 2). Bits per palette token are not the 8-bit bits/dim of other papers.

An objective is two functions. `noise(key, shape, config)` draws the batch's random inputs (BERT's mask) for the whole
batch at once, so that splitting the batch into microbatches changes memory, never the masks. `per_example(logits,
tokens, noise)` returns a vector [B] per metric: training averages them, evaluation weights and sums them (a padded
last batch counts only its real images). `per_example(model, tokens, noise, config, labels)` below runs the model
once and adds fine-tuning's classification loss when there are labels.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import ml_collections
import optax

if TYPE_CHECKING:
    from igpt_jax.model import IGPT

Metrics = dict[str, jax.Array]
Noise = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Objective:
    noise: Callable[[jax.Array, tuple[int, ...], ml_collections.ConfigDict], Noise]
    # (logits [B, N, V], tokens [B, N], noise) -> per-example metrics; the model's inputs come from `noise` (BERT's
    # mask), so one forward pass serves the loss and whatever else reads the same pass (a classification head).
    per_example: Callable[[jax.Array, jax.Array, Noise], Metrics]
    # Predicts each token from the ones before it: causal attention, inputs shifted in behind the SOS vector, and
    # images that can be drawn token by token (sampled, exported as Hugging Face's ImageGPT). Otherwise
    # bidirectional: every position attends to every other, and the noise's mask zeroes the masked inputs.
    left_to_right: bool


def _no_noise(key: jax.Array, shape: tuple[int, ...], config) -> Noise:
    del key, shape, config
    return {}


def _next_token(logits: jax.Array, tokens: jax.Array, noise: Noise) -> Metrics:
    """Every token scored from the ones before it (input [SOS, x_0 .. x_{N-2}]); the mean over an image's tokens."""
    del noise
    return {"loss": optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean(axis=1)}


def _bert_mask(key: jax.Array, shape: tuple[int, ...], config) -> Noise:
    return {"mask": jax.random.bernoulli(key, config.bert_mask_prob, shape)}


def _masked_tokens(logits: jax.Array, tokens: jax.Array, noise: Noise) -> Metrics:
    """BERT: positions masked with probability config.bert_mask_prob (input embedding zeroed); the loss of an image
    is the mean over its masked positions (OpenAI's order: per image first, then over the batch)."""
    mask = noise["mask"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
    per_image = jnp.sum(ce * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1)
    return {"loss": per_image, "masked_fraction": mask.mean(axis=1)}


OBJECTIVES: dict[str, Objective] = {
    "ar": Objective(_no_noise, _next_token, left_to_right=True),
    "bert": Objective(_bert_mask, _masked_tokens, left_to_right=False),
}


def get(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"config.objective={name!r} is unknown; allowed: {list(OBJECTIVES)}")
    return OBJECTIVES[name]


def per_example(
    model: IGPT, tokens: jax.Array, noise: Noise, config: ml_collections.ConfigDict, labels: jax.Array | None = None
) -> Metrics:
    """Per-example metrics [B] of one forward pass under config.objective. With `labels` (fine-tuning) the loss is
    config.finetune.generative_weight * generative + classification (the paper's L_GEN + L_CLF), and the metrics
    add both parts and the head's accuracy (1 or 0 per example)."""
    logits, out = model(tokens, mask=noise.get("mask"))
    metrics = get(config.objective).per_example(logits, tokens, noise)
    if labels is None:
        return metrics
    class_logits = out["class_logits"]
    classification = optax.softmax_cross_entropy_with_integer_labels(class_logits, labels)
    return metrics | {
        "loss": config.finetune.generative_weight * metrics["loss"] + classification,
        "generative_loss": metrics["loss"],
        "classification_loss": classification,
        "accuracy": (jnp.argmax(class_logits, axis=-1) == labels).astype(jnp.float32),
    }


def with_bits(metrics: Metrics) -> Metrics:
    """Adds bits per token to metrics that hold a mean generative loss in nats."""
    return metrics | {"bits_per_token": metrics.get("generative_loss", metrics["loss"]) / math.log(2.0)}


def batch_loss(model: IGPT, tokens: jax.Array, key: jax.Array, config) -> tuple[jax.Array, Metrics]:
    """(mean loss, mean metrics) of a batch under config.objective, its randomness drawn from `key`."""
    noise = get(config.objective).noise(key, tokens.shape, config)
    metrics = with_bits({k: v.mean() for k, v in per_example(model, tokens, noise, config).items()})
    return metrics["loss"], metrics
