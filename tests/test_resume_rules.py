"""What a relaunch may change: config keys by class, state trees compared, and the message when they do not fit.
All from abstract states (jax.eval_shape): nothing is trained here; tests/test_recovery.py runs the real thing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import fashion_config

from igpt_jax import sharding, steps
from igpt_jax.configs import base
from igpt_jax.workdir import resume


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
        "data.preprocess",
    }


def test_a_changed_recipe_key_is_refused_in_one_message_with_every_way_on():
    with pytest.raises(resume.CheckpointMismatchError) as error:
        _plan(fashion_config(), fashion_config(seed=3, log_every_steps=5))
    assert str(error.value) == (
        "checkpoint W/checkpoints/20 does not fit this config: config changed since it was saved: seed 0 -> 3, "
        "log_every_steps 1 -> 5. Nothing was moved or deleted. Ways on: --config.restore=params (keeps the parameters "
        "and step 20, accepts the changed keys), or the saved values of the changed keys, or another --workdir."
    )


def test_a_checkpoint_without_a_config_is_judged_by_its_tree_alone():
    config = fashion_config()
    assert resume.plan("W", 20, None, config, _tree(config), _tree(config), False) == resume.Plan(False, [])
    wider = fashion_config(model__embed_dim=64)
    with pytest.raises(resume.CheckpointMismatchError) as error:
        resume.plan("W", 20, None, wider, _tree(config), _tree(wider), False)
    assert "; it holds no config to compare with. Nothing was moved or deleted. Ways on: another --workdir." in str(
        error.value
    )


def test_tree_differences_count_and_name_an_example_of_each_kind():
    saved = {"params.a": ((2, 3), "float32"), "params.b": ((4,), "float32"), "params.old": ((1,), "int32")}
    saved |= {"step": ((), "int32"), "opt_state.0.mu.a": ((2, 3), "float32")}
    expected = {"params.a": ((2, 3), "bfloat16"), "params.b": ((5,), "float32"), "params.new": ((1,), "int32")}
    expected |= {"params.newer": ((1,), "int32"), "step": ((), "int32"), "opt_state.0.mu.a": ((2, 3), "float32")}
    assert resume.tree_differences(saved, expected, "params") == (
        "params: 2 arrays differ in shape or dtype (e.g. params.a: saved float32[2, 3], this config bfloat16[2, 3]); "
        "1 arrays only in the checkpoint and 2 only in this config (e.g. saved params.old, this config params.new)"
    )
    assert resume.tree_differences(saved, expected, "step") is None
    assert resume.tree_differences(saved, expected, "opt_state") is None
    only_new = resume.tree_differences({}, expected, "params")
    assert only_new == "params: 0 arrays only in the checkpoint and 4 only in this config (e.g. this config params.a)"
    only_old = resume.tree_differences(saved, {}, "step")
    assert only_old == "step: 1 arrays only in the checkpoint and 0 only in this config (e.g. saved step)"


def test_config_changes_list_differing_keys_in_order_and_ignore_keys_one_side_lacks():
    saved = {"seed": 0, "model": {"embed_dim": 32, "retired": 1}, "total_steps": 10, "mesh": {"ici": [1, 2]}}
    current = {"seed": 1, "model": {"embed_dim": 32, "added": 2}, "total_steps": 20, "mesh": {"ici": [1, 2]}}
    changes = resume.config_changes(saved, current)
    assert changes == resume.ConfigChanges(stopping=["seed 0 -> 1"], accepted=["total_steps 10 -> 20"])
    assert changes.all == ["seed 0 -> 1", "total_steps 10 -> 20"]
    assert resume.flatten({"a": {"b": {"c": 1}, "d": [1, {"e": 2}]}}) == {"a.b.c": 1, "a.d": [1, {"e": 2}]}


def test_the_checkpoints_recipe_replaces_the_command_lines_and_the_steering_keys_stay():
    """What --mode=eval, probe and sample run on: the checkpoint's model, seed and data set (a 2-layer model stays
    2 layers whatever the config file says), the command line's mesh, evaluation settings and data paths."""
    saved = resume.as_saved(fashion_config(seed=7, model__embed_dim=64, data__train_split="train[:50%]"))
    saved["model"]["retired_key"] = 1  # a key of another version: not carried over
    saved["data"]["sizes"] = [3, 4]
    current = fashion_config(data__data_dir="/elsewhere", evals__eval__examples=8, mesh__ici={"data": 8})
    current.data.sizes = (1, 2)
    config, taken = resume.with_recipe_of(saved, current)
    assert sorted(taken) == [
        "data.sizes [1, 2] -> [3, 4]",
        "data.train_split 'train' -> 'train[:50%]'",
        "model.embed_dim 32 -> 64",
        "seed 0 -> 7",
    ]
    assert (config.seed, config.model.embed_dim, config.data.train_split) == (7, 64, "train[:50%]")
    assert config.data.sizes == (3, 4) and isinstance(config.data.sizes, tuple)  # the config's own type
    assert (config.data.data_dir, config.evals.eval.examples, dict(config.mesh.ici)) == ("/elsewhere", 8, {"data": 8})
    assert "retired_key" not in config.model and current.seed == 0  # the command line's config is left as it was


def test_a_step_counter_of_another_type_is_named_and_params_only_cannot_help():
    config = fashion_config()
    saved = _tree(config) | {"step": ((), "int64")}
    with pytest.raises(resume.CheckpointMismatchError) as error:
        resume.plan("W", 20, resume.as_saved(config), config, saved, _tree(config), False)
    assert str(error.value) == (
        "checkpoint W does not fit this config: its state differs from what this config builds: step: 1 arrays "
        "differ in shape or dtype (e.g. step: saved int64[], this config int32[]). Nothing was moved or deleted. "
        "Ways on: another --workdir."
    )


def test_a_value_json_cannot_hold_is_saved_as_its_text():
    config = fashion_config()
    config.data.mix = np.float32(0.5)  # a key a config file of the user's computed with NumPy
    saved = resume.as_saved(config)
    assert saved["data"]["mix"] == "0.5" and json.loads(json.dumps(saved)) == saved
