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

from igpt_jax import errors
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


def modal(predictions: jax.Array, num_classes: int, key: jax.Array) -> jax.Array:
    """The most frequent class over the leading (masks) axis of int predictions [M, ...], ties broken at random (the
    paper's BERT ensemble: 5 masks per image, the modal prediction). Counts are integers, so a random bonus below 1
    only decides between tied classes."""
    counts = jax.nn.one_hot(predictions, num_classes).sum(axis=0)
    return jnp.argmax(counts + 0.5 * jax.random.uniform(key, counts.shape), axis=-1)


VOTE_KEY = 0x766F7465  # the tie-breaking of every vote: the same for every probe


@functools.partial(jax.jit, static_argnames=("num_classes",))
def accuracy(w: jax.Array, b: jax.Array, x: jax.Array, y: jax.Array, *, num_classes: int = 0) -> jax.Array:
    """Per-layer accuracy in percent: w [L, d, C], b [L, C], x [L, n, d] or [M, L, n, d] (M masks: the modal
    prediction counts), y [n]."""
    x = x if x.ndim == 4 else x[None]
    predicted = jnp.argmax(jnp.einsum("mlnd,ldc->mlnc", x, w) + b[None, :, None], axis=-1)  # [M, L, n]
    voted = modal(predicted, num_classes or w.shape[-1], jax.random.key(VOTE_KEY))  # one mask: its prediction
    return 100.0 * jnp.mean(voted == y[None], axis=-1)


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
    name: str = "probe",
) -> list[dict]:
    """Per layer: {'accuracy' (test, %), 'l2', 'heldout_accuracy' (%)}. train_x [L, n, d]; test_x [L, n, d], or
    [M, L, n, d] for M masks of each test image (the modal prediction is scored). `stop` is asked before every fit
    (base.Abandoned); `name` says on the progress bar which features are probed."""
    train_x, test_x = standardize(train_x, test_x)
    n_fit = int(round(train_x.shape[1] * (1 - heldout_fraction)))
    scores, best = choose_l2(train_x[:, :n_fit], train_y[:n_fit], train_x[:, n_fit:], train_y[n_fit:], num_classes,
                             l2_grid=l2_grid, progress=progress, stop=stop, name=name)  # fmt: skip
    base.check(stop)
    w, b = _fit_layers(train_x, train_y, jnp.asarray(best, jnp.float32), num_classes)
    test = np.asarray(accuracy(w, b, test_x, test_y, num_classes=num_classes))
    return [
        {"accuracy": round(float(test[i]), 3), "l2": best[i], "heldout_accuracy": round(float(scores.max(0)[i]), 3)}
        for i in range(train_x.shape[0])
    ]


def choose_l2(fit_x, fit_y, heldout_x, heldout_y, num_classes: int, *, l2_grid, progress: bool, stop, name="probe"):
    """(held-out accuracy [grid, L], each layer's best strength): one fit per strength of the grid, every layer at
    once; ties go to the smallest strength."""
    layers = fit_x.shape[0]
    scores = []
    for l2 in tqdm(l2_grid, desc=f"{name}: L2 sweep", disable=not progress):
        base.check(stop)
        w, b = _fit_layers(fit_x, fit_y, jnp.full((layers,), l2, jnp.float32), num_classes)
        scores.append(np.asarray(accuracy(w, b, heldout_x, heldout_y, num_classes=num_classes)))
    scores = np.stack(scores)
    return scores, [l2_grid[k] for k in np.argmax(scores, axis=0)]


class TooFewLabelsError(errors.UsageError, ValueError):
    """The probe's train images hold fewer of a class than a low-data probe draws: a setting to change."""


def balanced_subset(labels: np.ndarray, per_class: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of `per_class` examples of every class, drawn without replacement."""
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise TooFewLabelsError(
                f"a low-data probe of {per_class} labels per class: class {c} has {len(members)} of the {len(labels)} "
                "train images it draws from (those before the held-out end); raise the probe's train_examples or "
                "lower its labels_per_class"
            )
        chosen.append(rng.choice(members, per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def low_data(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    num_classes: int,
    *,
    per_class: int,
    draws: int,
    seed: int,
    heldout_fraction: float,
    l2_grid: tuple[float, ...] = L2_GRID,
    stop: base.StopCheck = base.never,
) -> list[dict]:
    """The paper's low-data probe, per layer: {'accuracies' [draws] (test, %), 'mean', 'std'}. Each draw is a
    class-balanced subset of `per_class` labelled images per class from the part of train before its held-out end
    (seeded by (seed, per_class, draw)); the probe fits on the subset alone, its L2 strength chosen on the held-out
    end. Features are standardised with all of train's moments, which need no labels."""
    train_x, test_x = standardize(train_x, test_x)
    n_fit = int(round(train_x.shape[1] * (1 - heldout_fraction)))
    per_draw = []
    for draw in range(draws):
        subset = balanced_subset(
            train_y[:n_fit], per_class, num_classes, np.random.default_rng([seed, per_class, draw])
        )
        _, best = choose_l2(train_x[:, subset], train_y[subset], train_x[:, n_fit:], train_y[n_fit:], num_classes,
                            l2_grid=l2_grid, progress=False, stop=stop)  # fmt: skip
        w, b = _fit_layers(train_x[:, subset], train_y[subset], jnp.asarray(best, jnp.float32), num_classes)
        per_draw.append(np.asarray(accuracy(w, b, test_x, test_y, num_classes=num_classes)))
    table = np.stack(per_draw)  # [draws, L]
    return [
        {
            "accuracies": [round(float(a), 3) for a in table[:, i]],
            "mean": round(float(table[:, i].mean()), 3),
            "std": round(float(table[:, i].std(ddof=1)) if draws > 1 else 0.0, 3),
        }
        for i in range(table.shape[1])
    ]
