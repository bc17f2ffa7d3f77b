"""Multinomial logistic regression on frozen features, fitted on the device: the paper's linear probe.

Features come as [layers, examples, dim]; every layer is fitted at once (vmap over layers: one compiled L-BFGS whose
while-loop runs until the slowest layer converges). The objective is scikit-learn's LogisticRegression with C =
1 / (l2 * n): mean cross-entropy + l2/2 * |W|^2, the bias not penalised, solved by optax's L-BFGS with a zoom line
search. The L2 strength is chosen per layer on a held-out part of train (the paper holds out 10%, ImageNet 4%), then
the probe is refitted on all of train with it and scored on test. Features are standardised with train's mean and
standard deviation first, which leaves the probe's power unchanged and its conditioning much better.

This is the full-batch path, for sets whose features fit in memory (CIFAR, STL-10, Fashion-MNIST, subsets).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from igpt_jax.evaluators import base

L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def standardize(train: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each feature to zero mean and unit variance over train's examples (axis -2), applied to every array."""
    mean = train.mean(axis=-2, keepdims=True)
    std = train.std(axis=-2, keepdims=True) + 1e-6
    return tuple(((x - mean) / std).astype(np.float32) for x in (train, *others))


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iter"))
def fit(
    x: jax.Array, y: jax.Array, l2: jax.Array, *, num_classes: int, max_iter: int = 1000, tol: float = 1e-4
) -> tuple[jax.Array, jax.Array]:
    """(W [d, C], b [C]) minimising mean cross-entropy + l2/2 |W|^2 on x [n, d], y [n]. Stops as scikit-learn's
    lbfgs does: once the largest gradient entry is at most `tol` (its default, 1e-4), or after max_iter. A
    gradient-norm tolerance of 1e-6 instead, often out of float32's reach on real features, ran fits to max_iter:
    9 s a fit on 4,500 Fashion-MNIST pixel images, against 2 s for the same accuracy as scikit-learn's converged fit
    (within 0.5 points)."""

    def loss(params):
        w, b = params
        logits = x @ w + b
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + 0.5 * l2 * jnp.sum(w * w)

    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(params, updates), state

    def going(carry):
        _, state = carry
        count = optax.tree.get(state, "count")
        largest = jnp.max(jnp.stack([jnp.max(jnp.abs(g)) for g in jax.tree.leaves(optax.tree.get(state, "grad"))]))
        return (count == 0) | ((count < max_iter) & (largest > tol))

    params = (jnp.zeros((x.shape[-1], num_classes), x.dtype), jnp.zeros((num_classes,), x.dtype))
    params, _ = jax.lax.while_loop(going, step, (params, solver.init(params)))
    return params


def _fit_layers(x, y, l2, num_classes: int):
    """fit() for every layer of x [L, n, d] at once, each with its own l2 [L]."""
    return jax.vmap(functools.partial(fit, num_classes=num_classes), in_axes=(0, None, 0))(x, y, l2)


@jax.jit
def accuracy(w: jax.Array, b: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-layer accuracy in percent: w [L, d, C], b [L, C], x [L, n, d], y [n]."""
    predicted = jnp.argmax(jnp.einsum("lnd,ldc->lnc", x, w) + b[:, None], axis=-1)
    return 100.0 * jnp.mean(predicted == y[None], axis=-1)


def sweep(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    num_classes: int,
    *,
    heldout_fraction: float,
    l2_grid: tuple[float, ...] = L2_GRID,
    progress: bool = True,
    stop: base.StopCheck = base.never,
) -> list[dict]:
    """Per layer: {'accuracy' (test, %), 'l2', 'heldout_accuracy' (%)}. x arrays [L, n, d]. `stop` is asked before
    every fit (base.Abandoned)."""
    train_x, test_x = standardize(train_x, test_x)
    n_fit = int(round(train_x.shape[1] * (1 - heldout_fraction)))
    layers = train_x.shape[0]
    scores = []
    for l2 in tqdm(l2_grid, desc="probe: L2 sweep", disable=not progress):
        base.check(stop)
        w, b = _fit_layers(train_x[:, :n_fit], train_y[:n_fit], jnp.full((layers,), l2, jnp.float32), num_classes)
        scores.append(np.asarray(accuracy(w, b, train_x[:, n_fit:], train_y[n_fit:])))
    scores = np.stack(scores)  # [grid, L]
    best = [l2_grid[k] for k in np.argmax(scores, axis=0)]  # ties: the smallest L2 of the grid
    base.check(stop)
    w, b = _fit_layers(train_x, train_y, jnp.asarray(best, jnp.float32), num_classes)
    test = np.asarray(accuracy(w, b, test_x, test_y))
    return [
        {"accuracy": round(float(test[i]), 3), "l2": best[i], "heldout_accuracy": round(float(scores.max(0)[i]), 3)}
        for i in range(layers)
    ]
