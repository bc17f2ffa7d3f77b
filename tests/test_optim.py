"""The optimizer: decoupled weight decay on the matrices only, never on norm gains or the SOS vector."""

from __future__ import annotations

import math

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import fashion_config

from igpt_jax import model as model_lib
from igpt_jax import optim

GAINS_AND_SOS = ("ln_1", "ln_2", "ln_f", "sos")  # named here from the model, not from optim's rule


def test_weight_decay_shrinks_every_matrix_and_no_gain():
    lr, decay = 0.1, 0.5
    config = fashion_config(
        optimizer__learning_rate=lr,
        optimizer__weight_decay=decay,
        optimizer__warmup_steps=1,
        optimizer__schedule="constant",
    )
    tx = optim.make(config)
    params = nnx.to_pure_dict(nnx.state(model_lib.build(config), nnx.Param))
    params["head"] = params["head"] + 1.0  # the zero-initialised head would hide a decay
    zeros = jax.tree.map(np.zeros_like, params)
    state = tx.init(params)
    updated = params
    for _ in range(2):  # the warmup's first step has learning rate 0; the second has lr
        updates, state = tx.update(zeros, state, updated)
        updated = jax.tree.map(lambda p, u: p + u, updated, updates)
    # zero gradients leave Adam's update at 0: what changes is the decay alone, p * (1 - lr * decay)
    checked = {"gains": 0, "matrices": 0}
    for (path, before), after in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(updated), strict=True
    ):
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        if any(part in GAINS_AND_SOS for part in name.split(".")):
            np.testing.assert_array_equal(after, before, err_msg=f"{name} was decayed")
            checked["gains"] += 1
        else:
            np.testing.assert_allclose(after, before * (1 - lr * decay), rtol=1e-6, err_msg=name)
            checked["matrices"] += 1
    assert checked == {"gains": 4, "matrices": 9}, checked


@pytest.mark.parametrize("scan_layers", [True, False])
def test_the_decay_rule_does_not_depend_on_scanning(scan_layers):
    config = fashion_config(model__scan_layers=scan_layers)
    params = nnx.to_pure_dict(nnx.state(model_lib.abstract(config), nnx.Param))
    decayed = {
        jax.tree_util.keystr(p, simple=True, separator=".")
        for p, d in jax.tree_util.tree_leaves_with_path(optim.decays(params))
        if d
    }
    assert "blocks.ln_1.scale" not in decayed and "blocks.attn.query" in decayed and "wpe" in decayed


def _adam_by_hand(grads, rates, b1: float, b2: float, clip: float = 0.0, w: float = 1.0, eps: float = 1e-8):
    """One weight through Adam written out (Kingma and Ba, algorithm 1), each gradient clipped to `clip` first."""
    m = v = 0.0
    for t, (g, rate) in enumerate(zip(grads, rates, strict=True), start=1):
        g = g * min(1.0, clip / abs(g)) if clip else g
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        w -= rate * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return w


def _run(tx, grads, w: float = 1.0) -> float:
    params = {"w": np.float32(w)}
    state = tx.init(params)
    for g in grads:
        update, state = tx.update({"w": np.float32(g)}, state, params)
        params = {"w": params["w"] + update["w"]}
    return float(params["w"])


def test_the_default_optimizer_is_the_papers_adam():
    """Two updates of one weight under the default config against Adam written out by hand with the paper's
    constants (Chen et al. 2020, section 3.3: b1 0.9, b2 0.95; eps 1e-8) and the schedule's first two rates; then
    the config's own b1, b2 and clipping norm (below 1, where a gradient of norm 4 is cut to 0.5)."""
    config = fashion_config(optimizer__weight_decay=0.0, optimizer__grad_clip_norm=0.0)
    rate = optim.schedule(config)
    grads = (0.5, -2.0)
    expected = _adam_by_hand(grads, [float(rate(t)) for t in range(2)], b1=0.9, b2=0.95)
    # float32 arithmetic on numbers of order 1: a few ulps, far below the 5% a wrong b2 moves the second step
    assert _run(optim.make(config), grads) == pytest.approx(expected, rel=1e-6)

    config = fashion_config(
        optimizer__b1=0.8, optimizer__b2=0.99, optimizer__grad_clip_norm=0.5, optimizer__weight_decay=0.0
    )
    grads = (4.0, 0.1, -3.0)
    rates = [float(optim.schedule(config)(t)) for t in range(3)]
    moved = _run(optim.make(config), grads, w=0.0)  # from 0: float32 resolves the two small steps fully
    assert moved == pytest.approx(_adam_by_hand(grads, rates, b1=0.8, b2=0.99, clip=0.5, w=0.0), rel=1e-5)
    assert moved != pytest.approx(_adam_by_hand(grads, rates, b1=0.8, b2=0.99, w=0.0), rel=0.02)  # 5% apart


def test_a_learning_rate_handed_in_replaces_the_configs_schedule():
    """Adam's first step moves a weight by the learning rate itself (m / sqrt(v) = sign g)."""
    config = fashion_config(optimizer__weight_decay=0.0, optimizer__grad_clip_norm=0.0)
    assert _run(optim.make(config, optax.constant_schedule(0.25)), (3.0,)) == pytest.approx(0.75, rel=1e-6)


@pytest.mark.parametrize(
    "name, after_warmup",
    [
        # the paper's: linear warmup from 0, then cosine to 0 at total_steps
        ("cosine", lambda t, w, n, lr: 0.5 * lr * (1 + math.cos(math.pi * (t - w) / (n - w)))),
        ("linear", lambda t, w, n, lr: lr * (n - t) / (n - w)),
        ("constant", lambda t, w, n, lr: lr),
    ],
)
def test_each_schedule_warms_up_from_0_then_follows_its_shape(name, after_warmup):
    lr, w, n = 0.004, 10, 50
    config = fashion_config(
        total_steps=n, optimizer__learning_rate=lr, optimizer__warmup_steps=w, optimizer__schedule=name
    )
    rate = optim.schedule(config)
    expected = [lr * t / w if t < w else after_warmup(t, w, n, lr) for t in range(n + 1)]
    # float32 rates of order 1e-3: a relative 1e-6 is a few ulps
    np.testing.assert_allclose([float(rate(t)) for t in range(n + 1)], expected, rtol=1e-5, atol=1e-9)


def test_an_unknown_schedule_names_those_there_are():
    config = fashion_config(optimizer__schedule="warm")
    with pytest.raises(ValueError, match=r"config\.optimizer\.schedule='warm' is unknown; allowed: \['cosine', "):
        optim.schedule(config)
