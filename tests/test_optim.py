"""The optimizer: decoupled weight decay on the matrices only, never on norm gains or the SOS vector."""

from __future__ import annotations

import jax
import numpy as np
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


def test_the_default_optimizer_is_the_papers_adam():
    """Two updates of one weight under the default config against Adam written out by hand with the paper's
    constants (Chen et al. 2020, section 3.3: b1 0.9, b2 0.95; eps 1e-8) and the schedule's first two rates."""
    config = fashion_config(optimizer__weight_decay=0.0, optimizer__grad_clip_norm=0.0)
    rate = optim.schedule(config)
    tx = optim.make(config)
    w = {"w": np.float32(1.0)}
    state = tx.init(w)
    m = v = 0.0
    expected = 1.0
    for t, g in enumerate((0.5, -2.0), start=1):
        update, state = tx.update({"w": np.float32(g)}, state, w)
        w = {"w": w["w"] + update["w"]}
        m, v = 0.9 * m + 0.1 * g, 0.95 * v + 0.05 * g * g
        expected -= float(rate(t - 1)) * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.95**t)) + 1e-8)
    # float32 arithmetic on numbers of order 1: a few ulps, far below the 5% a wrong b2 moves the second step
    assert float(w["w"]) == pytest.approx(expected, rel=1e-6)
