"""What a relaunch may change: config keys by class, state trees compared, and the message when they do not fit.
All from abstract states (jax.eval_shape): nothing is trained here; tests/test_recovery.py runs the real thing."""

from __future__ import annotations

import pytest
from helpers import fashion_config

from configs import base
from igpt_jax import resume, sharding, steps


def _tree(config) -> dict:
    return resume.leaves_by_path(steps.make_setup(config, sharding.make_mesh(config)).abstract_state)


def _plan(saved_config, config) -> resume.Plan:
    saved = resume.as_saved(saved_config)
    return resume.plan(
        "W/checkpoints/20", 20, saved, config, _tree(saved_config), _tree(config), config.restore == "params"
    )


def test_the_same_config_resumes_everything():
    config = fashion_config()
    assert _plan(config, fashion_config()) == resume.Plan(params_only=False, accepted_changes=[])


@pytest.mark.parametrize(
    "key, value",
    [
        ("total_steps", 500),
        ("checkpoint_every_steps", 7),
        ("data__prefetch", 5),
        ("watchdog_seconds", 60),
        ("mesh__ici", {"data": 2, "fsdp": 4, "tensor": 1}),
        ("model__remat", "full"),
        ("optimizer__learning_rate", 1e-4),
    ],
)
def test_keys_that_steer_the_run_are_accepted_and_named(key, value):
    changed = fashion_config(**{key: value})
    plan = _plan(fashion_config(), changed)
    assert not plan.params_only
    assert any(c.startswith(key.replace("__", ".")) for c in plan.accepted_changes), plan


@pytest.mark.parametrize(
    "key, value", [("seed", 3), ("batch_size", 32), ("objective", "bert"), ("data__dataset", "cifar10")]
)
def test_keys_that_change_the_meaning_stop_the_run_unless_restore_is_params(key, value):
    dotted = key.replace("__", ".")
    with pytest.raises(resume.CheckpointMismatchError, match=rf"config changed since it was saved: {dotted} "):
        _plan(fashion_config(), fashion_config(**{key: value}))
    plan = _plan(fashion_config(), fashion_config(restore="params", **{key: value}))
    assert not plan.params_only  # the optimizer state still fits: it is restored too
    assert any(c.startswith(dotted) for c in plan.accepted_changes)


def test_clipping_changes_the_optimizer_tree_and_the_message_says_so():
    with pytest.raises(resume.CheckpointMismatchError) as error:
        _plan(fashion_config(), fashion_config(optimizer__grad_clip_norm=1.0))
    message = str(error.value)
    assert "checkpoint W/checkpoints/20 does not fit this config" in message
    assert "opt_state: " in message and "params:" not in message
    assert "optimizer.grad_clip_norm 0.0 -> 1.0" in message
    assert "Nothing was moved or deleted" in message
    assert "--config.restore=params (keeps the parameters and step 20, re-creates the optimizer state)" in message
    plan = _plan(fashion_config(), fashion_config(optimizer__grad_clip_norm=1.0, restore="params"))
    assert plan.params_only


def test_a_different_model_shape_cannot_be_restored_even_params_only():
    for restore in ("all", "params"):
        with pytest.raises(resume.CheckpointMismatchError) as error:
            _plan(fashion_config(), fashion_config(model__embed_dim=64, restore=restore))
        message = str(error.value)
        assert "params: " in message and "saved float32[2, 32, 4, 8], this config float32[2, 64, 4, 16]" in message
        assert "model.embed_dim 32 -> 64" in message
        assert "--config.restore=params" not in message  # it would not help


def test_paths_from_orbax_metadata_and_from_the_state_agree():
    config = fashion_config()
    abstract = steps.make_setup(config, sharding.make_mesh(config)).abstract_state
    adam = abstract["opt_state"][0][0]  # optax's namedtuple; Orbax's metadata has a dict of its fields
    as_orbax_stores_it = {"opt_state": {"0": {"0": {"count": adam.count, "mu": adam.mu, "nu": adam.nu}}}}
    mine = {k: v for k, v in resume.leaves_by_path(abstract).items() if k.startswith("opt_state.0.0.")}
    assert len(mine) > 10 and mine == resume.leaves_by_path(as_orbax_stores_it)


def test_every_key_of_the_base_config_is_classified_on_purpose():
    keys = resume.flatten(resume.as_saved(base.get_config()))
    accepted = {k for k in keys if resume._accepted(k)}
    stopping = set(keys) - accepted
    # the recipe: what a checkpoint means. A new key lands in one of the two sets by a decision, not by default.
    assert stopping == {
        "seed",
        "batch_size",
        "objective",
        "bert_mask_prob",
        *(f"model.{k}" for k in ("num_layers", "embed_dim", "num_heads", "mlp_ratio", "image_size")),
        *(f"model.{k}" for k in ("num_positions", "vocab_size", "norm_eps", "param_dtype", "num_classes")),
        "data.dataset",
        "data.train_split",
        "data.flip",
        "data.augment",
    }
