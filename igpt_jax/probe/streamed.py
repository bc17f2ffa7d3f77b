"""The linear probe for feature sets too large to hold: minibatch SGD with momentum over streamed features.

The paper probed ImageNet this way (SGD, momentum 0.9, cosine learning rate). Features arrive batch by batch from a
pass over the split (`Passes`: each call starts a new pass and yields device arrays), are standardised with moments
streamed from a first pass, and update one classifier per (L2 strength, layer) at once: W [G, L, d, C]. Nothing
proportional to the number of examples is ever held, so memory stays flat however large the split.

The protocol is the full-batch path's (linear.sweep): the classifiers train on the first (1 - held-out) part of
train, the L2 strength is chosen per layer on the held-out end, a classifier per layer is trained again on all of
train with it and scored on test. Objective: mean cross-entropy + l2/2 |W|^2, the bias not penalised.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from igpt_jax.probe import linear
from igpt_jax.probe.linear import L2_GRID

# One pass over a split: (features [masks, L, B, d], labels [B], example index [B]; -1 marks rows padding the last
# batch). Train passes have one mask; test passes may have several (the modal prediction is scored).
Passes = Callable[[], Iterator[tuple[jax.Array, np.ndarray, np.ndarray]]]


@dataclasses.dataclass(frozen=True)
class Settings:
    epochs: int = 10
    learning_rate: float = 0.1  # on standardised features; decays to 0 along a cosine
    momentum: float = 0.9


def moments(passes: Passes, layers: int, dim: int) -> tuple[jax.Array, jax.Array]:
    """Per-layer feature mean and standard deviation [L, d] over a pass's real rows (sums in float32 on the device)."""
    total = jnp.zeros((layers, dim), jnp.float32)
    squares = jnp.zeros((layers, dim), jnp.float32)
    count = 0
    for x, _, index in passes():
        x = x[0]
        rows = jnp.asarray(index >= 0, jnp.float32)[None, :, None]
        total, squares = total + jnp.sum(x * rows, axis=1), squares + jnp.sum(x * x * rows, axis=1)
        count += int((index >= 0).sum())
    mean = total / max(count, 1)
    return mean, jnp.sqrt(jnp.maximum(squares / max(count, 1) - mean**2, 0.0)) + 1e-6


@functools.partial(jax.jit, static_argnames=("tx",), donate_argnums=(0, 1))
def _update(params, opt_state, x, y, used, mean, std, l2, tx):
    """One SGD step for every (strength g, layer l) classifier: params (W [G, L, d, C], b [G, L, C]), x [L, B, d],
    `used` [B] marks the rows this fit trains on, l2 [G, L]."""
    xs = (x - mean[:, None]) / std[:, None]

    def loss(params):
        w, b = params
        logits = jnp.einsum("lbd,gldc->glbc", xs, w) + b[:, :, None]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y[None, None])
        data = jnp.sum(ce * used, axis=-1) / jnp.maximum(jnp.sum(used), 1.0)
        return jnp.sum(data + 0.5 * l2 * jnp.sum(w * w, axis=(-2, -1)))

    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state


@jax.jit
def _correct(params, x, y, used, mean, std):
    """Correct predictions among the used rows, per classifier [G, L]; x [M, L, B, d] (M masks: the modal
    prediction counts)."""
    w, b = params
    logits = jnp.einsum("mlbd,gldc->mglbc", (x - mean[:, None]) / std[:, None], w) + b[None, :, :, None]
    predicted = jnp.argmax(logits, axis=-1)  # [M, G, L, B]
    voted = linear.modal(predicted, w.shape[-1], jax.random.key(linear.VOTE_KEY))  # one mask: its prediction
    return jnp.sum((voted == y[None, None]) * used, axis=-1)


def fit(
    passes: Passes,
    in_fit: Callable[[np.ndarray], np.ndarray],
    l2: np.ndarray,
    mean: jax.Array,
    std: jax.Array,
    num_classes: int,
    batches_per_pass: int,
    settings: Settings,
    desc: str,
):
    """Classifiers for every strength in l2 [G, L] and layer, trained on the rows where in_fit(index) holds."""
    g, layers = l2.shape
    dim = mean.shape[-1]
    params = (jnp.zeros((g, layers, dim, num_classes), jnp.float32), jnp.zeros((g, layers, num_classes), jnp.float32))
    schedule = optax.cosine_decay_schedule(settings.learning_rate, max(settings.epochs * batches_per_pass, 1))
    tx = optax.sgd(schedule, momentum=settings.momentum)
    opt_state = tx.init(params)
    l2 = jnp.asarray(l2, jnp.float32)
    for _ in tqdm(range(settings.epochs), desc=desc, disable=jax.process_index() != 0):
        for x, y, index in passes():
            used = in_fit(index)
            if used.any():
                used = jnp.asarray(used, jnp.float32)
                params, opt_state = _update(params, opt_state, x[0], jnp.asarray(y), used, mean, std, l2, tx)
    return params


def score(passes: Passes, params, in_score: Callable[[np.ndarray], np.ndarray], mean, std) -> np.ndarray:
    """Accuracy in percent [G, L] over the rows where in_score(index) holds."""
    correct, count = 0.0, 0
    for x, y, index in passes():
        used = in_score(index)
        if used.any():
            correct = correct + _correct(params, x, jnp.asarray(y), jnp.asarray(used, jnp.float32), mean, std)
            count += int(used.sum())
    return 100.0 * np.asarray(correct) / max(count, 1)


def sweep(
    train: Passes,
    n_train: int,
    test: Passes,
    num_classes: int,
    *,
    layers: int,
    dim: int,
    batch_size: int,
    heldout_fraction: float,
    settings: Settings = Settings(),
    l2_grid: tuple[float, ...] = L2_GRID,
    name: str = "probe",
) -> list[dict]:
    """Per layer: {'accuracy' (test, %), 'l2', 'heldout_accuracy' (%)}, as linear.sweep returns them; `name` says on
    the progress bars which features are probed."""
    n_fit = int(round(n_train * (1 - heldout_fraction)))
    batches = math.ceil(n_train / batch_size)
    mean, std = moments(train, layers, dim)
    grid = np.repeat(np.asarray(l2_grid, np.float32)[:, None], layers, axis=1)  # [G, L]
    params = fit(
        train,
        lambda i: (i >= 0) & (i < n_fit),
        grid,
        mean,
        std,
        num_classes,
        batches,
        settings,
        f"{name}: SGD, L2 grid",
    )
    scores = score(train, params, lambda i: i >= n_fit, mean, std)  # [G, L]
    best = [l2_grid[k] for k in np.argmax(scores, axis=0)]  # ties: the smallest L2 of the grid
    chosen = np.asarray(best, np.float32)[None]
    params = fit(train, lambda i: i >= 0, chosen, mean, std, num_classes, batches, settings, f"{name}: SGD, refit")
    test_accuracy = score(test, params, lambda i: i >= 0, mean, std)[0]
    return [
        {
            "accuracy": round(float(test_accuracy[i]), 3),
            "l2": best[i],
            "heldout_accuracy": round(float(scores.max(0)[i]), 3),
        }
        for i in range(layers)
    ]
