"""The defaults every config starts from (igpt_jax/defaults.py) against the paper they claim to follow, the checks
they must pass, the layout their sharding rules give iGPT-L, and the `:ARG` part of --config."""

from __future__ import annotations

import math

import jax
import pytest

from igpt_jax import config_checks, defaults, sharding, steps
from igpt_jax.configs import base


def test_the_defaults_are_the_papers_igpt_s_recipe():
    """Chen et al. 2020: iGPT-S is 24 layers of width 512 (8 heads, OpenAI's code), a 4x MLP, 32x32 images over a
    512-colour palette, RMS norm eps 1e-5 (section 2, OpenAI's model.py); Adam b1 0.9, b2 0.95 (0.999 caused
    spikes), batch 128 for 1M steps, a warmup of about one ImageNet epoch then cosine decay to 0, no weight decay
    (section 3.4, appendix A); BERT masks 15% of the positions (section 2.2); float32 (appendix A); fine-tuning
    weighs L_GEN + L_CLF 1:1 at about a tenth of the learning rate, without cosine decay (sections 2.3, 3.4)."""
    c = defaults.make_config()
    m = c.model
    assert (m.num_layers, m.embed_dim, m.num_heads, m.mlp_ratio) == (24, 512, 8, 4)
    assert (m.image_size, m.num_positions, m.vocab_size, m.norm_eps) == (32, 1024, 512, 1e-5)
    assert (m.dtype, m.param_dtype, m.num_classes) == ("float32", "float32", 0)
    o = c.optimizer
    assert (o.b1, o.b2, o.weight_decay, o.grad_clip_norm, o.schedule) == (0.9, 0.95, 0.0, 0.0, "cosine")
    assert (c.batch_size, c.total_steps, c.objective, c.bert_mask_prob) == (128, 1_000_000, "ar", 0.15)
    epoch = 1_281_167 / 128  # ImageNet's train split at batch 128
    assert 0.75 * epoch <= o.warmup_steps <= 1.25 * epoch
    assert o.learning_rate == 0.003  # the rate iGPT-S trained at
    assert (c.data.dataset, c.data.flip, c.data.augment) == ("imagenet2012", False, "none")  # no pretraining flips
    f = c.finetune
    assert (f.generative_weight, f.learning_rate, f.schedule, f.augment) == (1.0, 0.0, "constant", "none")
    assert (c.microbatches, c.restore, c.checkpoint_step, c.seed) == (1, "all", 0, 0)  # the plain, whole run


def test_make_configs_arguments_are_the_model_it_describes():
    c = defaults.make_config(image_size=48, num_layers=48, embed_dim=1536, num_heads=16, learning_rate=0.001)
    assert (c.model.image_size, c.model.num_positions, c.model.num_layers) == (48, 2304, 48)
    assert (c.model.embed_dim, c.model.num_heads, c.optimizer.learning_rate) == (1536, 16, 0.001)


def test_the_defaults_pass_the_checks_and_shard_fully_within_hosts_and_by_data_across_them():
    config = defaults.make_config()
    config_checks.check(config)
    assert config.to_dict() == base.get_config().to_dict()  # configs/base.py is the defaults as a config file
    assert dict(config.mesh.ici) == {"data": 1, "fsdp": -1, "sequence": 1, "tensor": 1}  # FSDP over every device
    assert dict(config.mesh.dcn) == {"data": -1, "fsdp": 1, "sequence": 1, "tensor": 1}  # data parallel across


def test_the_default_rules_split_every_parameter_over_fsdp_and_the_batch_over_data_and_fsdp():
    """iGPT-L on 8 devices with the default mesh (FSDP over all of them): each device holds an eighth of every
    parameter, all of which have a dimension of the model's width, and the batch is split as the activations' rule
    says, over (data, fsdp)."""
    config = base.make_config(num_layers=48, embed_dim=1536, num_heads=16)
    mesh = sharding.make_mesh(config)
    setup = steps.make_setup(config, mesh, train=False)
    for path, leaf in jax.tree_util.tree_leaves_with_path(setup.abstract_state["params"]):
        held = math.prod(leaf.sharding.shard_shape(leaf.shape))
        assert held * 8 == math.prod(leaf.shape), (jax.tree_util.keystr(path), leaf.sharding.spec)
    assert sharding.batch_sharding(config, mesh, 2).spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)


def test_the_default_rules_place_each_logical_axis_on_the_mesh_axes_the_readme_names():
    """Tensor parallelism splits the MLP, the heads and the vocabulary; the sequence axis splits positions and holds
    weight shards with fsdp; activations' width and the layer stack are never split."""
    rules, axes = defaults.make_config().logical_axis_rules, ("data", "fsdp", "sequence", "tensor")
    expected = {"act_batch": ("data", "fsdp"), "act_len": "sequence", "act_embed": None, "embed": ("fsdp", "sequence"),
                "mlp": "tensor", "heads": "tensor", "kv": None, "vocab": "tensor", "layers": None}  # fmt: skip
    placed = {name: sharding.logical_to_spec((name,), rules, axes)[0] for name in expected}
    assert placed == expected
    assert {name for name, _ in rules} == set(expected)


@pytest.mark.parametrize(
    ("arg", "parsed"),
    [(None, {}), ("", {}), ("48", {"image_size": 48}), ("image_size=64", {"image_size": 64}),
     (" image_size = 96", {"image_size": 96}), ("32,image_size=48", {"image_size": 48})],  # parts: the last wins
)  # fmt: skip
def test_the_config_argument_sets_the_image_side(arg, parsed):
    assert defaults.parse_arg(arg, image_size=32, num_layers=4) == {"image_size": 32, "num_layers": 4} | parsed


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("layers=4", "config argument 'layers' is unknown; allowed: ['image_size']"),
        ("image_size=big", "config argument image_size='big' is not of type int"),
        ("4.5", "config argument image_size='4.5' is not of type int"),
    ],
)
def test_a_bad_config_argument_names_the_key_and_what_is_allowed(arg, message):
    with pytest.raises(ValueError) as refused:
        defaults.parse_arg(arg)
    assert str(refused.value) == message
