"""Logical axis names resolve to mesh axes through config rules; a sharded forward equals the unsharded one."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from helpers import tiny_config
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from igpt_jax import model as model_lib
from igpt_jax import sharding


def test_logical_to_spec_uses_each_mesh_axis_once():
    rules = [("act_batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("kv", None)]
    axes = ("data", "fsdp", "tensor")
    assert sharding.logical_to_spec(("embed", "mlp"), rules, axes) == PartitionSpec("fsdp", "tensor")
    assert sharding.logical_to_spec(("act_batch", "embed"), rules, axes) == PartitionSpec(("data", "fsdp"), None)
    assert sharding.logical_to_spec(("layers", "kv"), rules, axes) == PartitionSpec(None, None)
    assert sharding.logical_to_spec(("embed",), rules, ("data",)) == PartitionSpec(None)


def test_sharded_forward_equals_unsharded():
    config = tiny_config()
    config.batch_size = 4
    model = model_lib.build(config)
    model.head[...] = 0.1 * jax.random.normal(jax.random.key(0), model.head.shape)
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, 16)
    expected = model(tokens)[0]

    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    rules = config.logical_axis_rules
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, sharding.variable_shardings(state, mesh, rules))
    assert state["blocks"]["mlp"]["fc"][...].sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    assert state["wte"][...].sharding.spec == PartitionSpec("tensor", "fsdp")

    @jax.jit
    def forward(state, tokens):
        with sharding.axis_rules(rules):
            return nnx.merge(graphdef, state)(tokens)[0]

    with jax.set_mesh(mesh):
        tokens = jax.device_put(tokens, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
        logits = forward(state, tokens)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=1e-5, atol=1e-6)


def test_the_batch_is_split_as_the_act_batch_rule_says():
    """Input batches are laid out as the model's activations expect: one rule, no second list of batch axes."""
    config = tiny_config()
    config.mesh.ici = {"data": 2, "fsdp": 4, "tensor": 1}
    mesh = sharding.make_mesh(config)
    assert sharding.batch_sharding(config, mesh, 2).spec == PartitionSpec(("data", "fsdp"), None)
    config.logical_axis_rules = [(n, "data" if n == "act_batch" else a) for n, a in config.logical_axis_rules]
    assert sharding.batch_sharding(config, mesh, 3).spec == PartitionSpec("data", None, None)
    config.batch_size, config.microbatches = 2, 1
    sharding.check_batch(config, mesh)  # 2 images fit the 2 data shards: fsdp no longer splits the batch
