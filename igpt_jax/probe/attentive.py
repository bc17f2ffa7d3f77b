"""The attentive probe (AIM, El-Nouby et al. 2024), beyond the paper: one learned query cross-attends over a layer's
token features, then a linear head classifies what it gathered. The trunk stays frozen, as in the linear probe; unlike
mean pooling, the probe chooses which positions to read.

The head: per-token normalisation (no gain), multi-head cross-attention from a learned query (keys, values and output
projections learned), normalisation, a linear classifier. Trained with AdamW and a cosine learning rate on the first
(1 - held-out) part of train, streamed from the feature cache (token features: [1, 1, n, N*d]), one head per
weight decay of WEIGHT_DECAYS trained side by side on each batch (the cache is read once an epoch for all of them);
the head that scores best on the held-out end is scored on test.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from igpt_jax.evaluators import base

WEIGHT_DECAYS = (1e-4, 1e-2, 1e-1)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The probe entry's attentive_epochs and attentive_learning_rate (their defaults: igpt_jax.evaluators), and
    the model's head count."""

    epochs: int
    learning_rate: float
    heads: int


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


def _optimizer(learning_rate, weight_decay) -> optax.GradientTransformation:
    return optax.adamw(learning_rate, weight_decay=weight_decay)


@functools.partial(jax.jit, static_argnames=("heads",), donate_argnums=(0, 1))
def _update(params, opt_state, x, y, used, learning_rate, decays, heads: int):
    """One AdamW step of every head (one per weight decay: params and opt_state stacked on axis 0) on the same batch."""

    def one(params, opt_state, decay):
        def loss(params):
            ce = optax.softmax_cross_entropy_with_integer_labels(logits(params, x, heads), y)
            return jnp.sum(ce * used) / jnp.maximum(jnp.sum(used), 1.0)

        tx = _optimizer(learning_rate, decay)
        updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.vmap(one)(params, opt_state, decays)


@functools.partial(jax.jit, static_argnames=("heads",))
def _correct(params, x, y, used, heads: int):
    """Correct predictions among the used rows, per head (params stacked on axis 0)."""
    hits = jax.vmap(lambda p: jnp.argmax(logits(p, x, heads), axis=-1) == y)(params)
    return jnp.sum(hits * used, axis=-1)


def _tokens(x: jax.Array, dim: int) -> jax.Array:
    """Cached token features [1, 1, B, N*d] -> [B, N, d]."""
    return x[0, 0].reshape(x.shape[2], -1, dim)


def fit(train, n_fit: int, batches: int, dim: int, num_classes: int, settings: Settings, stop, progress: bool = True):
    """One head per WEIGHT_DECAYS, trained together on the rows before n_fit of `train` (a cache's passes): each
    epoch reads the cache once for all of them. Returns the heads' parameters stacked on axis 0."""
    decays = jnp.asarray(WEIGHT_DECAYS, jnp.float32)
    params = jax.vmap(lambda _: init(jax.random.key(0), dim, num_classes))(decays)
    schedule = optax.cosine_decay_schedule(settings.learning_rate, max(settings.epochs * batches, 1))
    opt_state = jax.vmap(lambda p: _optimizer(0.0, 0.0).init(p))(params)  # AdamW's state does not depend on either
    updates = 0
    bar = tqdm(total=settings.epochs * batches, desc="attentive probe", unit="batch", disable=not progress)
    for _ in range(settings.epochs):
        for x, y, index in train():
            base.check(stop)
            used = (index >= 0) & (index < n_fit)
            if used.any():
                params, opt_state = _update(
                    params, opt_state, _tokens(x, dim), jnp.asarray(y), jnp.asarray(used, jnp.float32),
                    schedule(updates), decays, settings.heads,
                )  # fmt: skip
                updates += 1
            bar.update()
    bar.close()
    return params


def score(passes, params, dim: int, keep, heads: int) -> np.ndarray:
    """Accuracy in percent of each head over the rows where keep(index) holds."""
    correct, count = 0.0, 0
    for x, y, index in passes():
        used = keep(index)
        if used.any():
            hits = _correct(params, _tokens(x, dim), jnp.asarray(y), jnp.asarray(used, jnp.float32), heads)
            correct = correct + np.asarray(hits, np.float64)
            count += int(used.sum())
    return 100.0 * np.asarray(correct) / max(count, 1)


def probe(
    train, n_train: int, test, num_classes: int, *, dim: int, batch_size: int, heldout_fraction: float,
    settings: Settings, stop: base.StopCheck = base.never,
) -> dict:  # fmt: skip
    """{'accuracy' (test, %), 'weight_decay', 'heldout_accuracy' (%)}: a head per weight decay on the fit part, the
    held-out end's best one scored on test."""
    n_fit = int(round(n_train * (1 - heldout_fraction)))
    batches = math.ceil(n_train / batch_size)
    params = fit(train, n_fit, batches, dim, num_classes, settings, stop)
    heldout = score(train, params, dim, lambda i: i >= n_fit, settings.heads)
    best = int(np.argmax(heldout))  # ties: the smaller decay, listed first
    chosen = jax.tree.map(lambda p: p[best : best + 1], params)
    (test_accuracy,) = score(test, chosen, dim, lambda i: i >= 0, settings.heads)
    return {
        "accuracy": round(float(test_accuracy), 3),
        "weight_decay": WEIGHT_DECAYS[best],
        "heldout_accuracy": round(float(heldout[best]), 3),
    }
