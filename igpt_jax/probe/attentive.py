"""The attentive probe (AIM, El-Nouby et al. 2024), beyond the paper: one learned query cross-attends over a layer's
token features, then a linear head classifies what it gathered. The trunk stays frozen, as in the linear probe; unlike
mean pooling, the probe chooses which positions to read.

The head: per-token normalisation (no gain), multi-head cross-attention from a learned query (keys, values and output
projections learned), normalisation, a linear classifier. Trained with AdamW and a cosine learning rate on the first
(1 - held-out) part of train, streamed from the feature cache (token features: [1, 1, n, N*d]); the weight decay is
chosen on the held-out end from WEIGHT_DECAYS, and that run's head is scored on test.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from igpt_jax.evaluators import base

WEIGHT_DECAYS = (1e-4, 1e-2, 1e-1)


@dataclasses.dataclass(frozen=True)
class Settings:
    epochs: int = 10
    learning_rate: float = 1e-3
    heads: int = 8


def _normalise(x: jax.Array) -> jax.Array:
    mean = x.mean(axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(x.var(axis=-1, keepdims=True) + 1e-6)


def init(key: jax.Array, dim: int, num_classes: int) -> dict:
    q, k, v, o = jax.random.split(key, 4)
    scale = 1 / math.sqrt(dim)
    return {
        "query": 0.02 * jax.random.normal(q, (dim,)),
        "wk": scale * jax.random.normal(k, (dim, dim)),
        "wv": scale * jax.random.normal(v, (dim, dim)),
        "wo": scale * jax.random.normal(o, (dim, dim)),
        "w": jnp.zeros((dim, num_classes)),
        "b": jnp.zeros((num_classes,)),
    }


def logits(params: dict, x: jax.Array, heads: int) -> jax.Array:
    """Class logits [B, C] for token features x [B, N, d]."""
    b, n, d = x.shape
    x = _normalise(x)
    k = (x @ params["wk"]).reshape(b, n, heads, d // heads)
    v = (x @ params["wv"]).reshape(b, n, heads, d // heads)
    q = params["query"].reshape(heads, d // heads)
    weights = jax.nn.softmax(jnp.einsum("hk,bnhk->bhn", q, k) / math.sqrt(d // heads), axis=-1)
    gathered = jnp.einsum("bhn,bnhk->bhk", weights, v).reshape(b, d) @ params["wo"]
    return _normalise(gathered) @ params["w"] + params["b"]


@functools.partial(jax.jit, static_argnames=("heads", "tx"), donate_argnums=(0, 1))
def _update(params, opt_state, x, y, used, heads: int, tx):
    def loss(params):
        ce = optax.softmax_cross_entropy_with_integer_labels(logits(params, x, heads), y)
        return jnp.sum(ce * used) / jnp.maximum(jnp.sum(used), 1.0)

    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state


@functools.partial(jax.jit, static_argnames=("heads",))
def _correct(params, x, y, used, heads: int):
    return jnp.sum((jnp.argmax(logits(params, x, heads), axis=-1) == y) * used)


def _tokens(x: jax.Array, dim: int) -> jax.Array:
    """Cached token features [1, 1, B, N*d] -> [B, N, d]."""
    return x[0, 0].reshape(x.shape[2], -1, dim)


def fit(train, n_fit: int, batches: int, dim: int, num_classes: int, weight_decay: float, settings: Settings, stop):
    """A head trained on the rows before n_fit of `train` (a cache's passes)."""
    params = init(jax.random.key(0), dim, num_classes)
    schedule = optax.cosine_decay_schedule(settings.learning_rate, max(settings.epochs * batches, 1))
    tx = optax.adamw(schedule, weight_decay=weight_decay)
    opt_state = tx.init(params)
    for _ in range(settings.epochs):
        for x, y, index in train():
            base.check(stop)
            used = (index >= 0) & (index < n_fit)
            if used.any():
                params, opt_state = _update(
                    params, opt_state, _tokens(x, dim), jnp.asarray(y), jnp.asarray(used, jnp.float32),
                    settings.heads, tx,
                )  # fmt: skip
    return params


def score(passes, params, dim: int, keep, heads: int) -> float:
    """Accuracy in percent over the rows where keep(index) holds."""
    correct, count = 0.0, 0
    for x, y, index in passes():
        used = keep(index)
        if used.any():
            correct += float(_correct(params, _tokens(x, dim), jnp.asarray(y), jnp.asarray(used, jnp.float32), heads))
            count += int(used.sum())
    return 100.0 * correct / max(count, 1)


def probe(
    train, n_train: int, test, num_classes: int, *, dim: int, batch_size: int, heldout_fraction: float,
    settings: Settings, stop: base.StopCheck = base.never,
) -> dict:  # fmt: skip
    """{'accuracy' (test, %), 'weight_decay', 'heldout_accuracy' (%)}: a head per weight decay on the fit part, the
    held-out end's best one scored on test."""
    n_fit = int(round(n_train * (1 - heldout_fraction)))
    batches = math.ceil(n_train / batch_size)
    runs = []
    for decay in WEIGHT_DECAYS:
        params = fit(train, n_fit, batches, dim, num_classes, decay, settings, stop)
        runs.append((score(train, params, dim, lambda i: i >= n_fit, settings.heads), decay, params))
    heldout, decay, params = max(runs, key=lambda r: r[0])  # ties: the smaller decay, listed first
    test_accuracy = score(test, params, dim, lambda i: i >= 0, settings.heads)
    return {
        "accuracy": round(test_accuracy, 3),
        "weight_decay": decay,
        "heldout_accuracy": round(float(np.round(heldout, 3)), 3),
    }
