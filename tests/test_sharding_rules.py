"""Logical axis names resolve to mesh axes through config rules; a sharded forward equals the unsharded one."""

from __future__ import annotations

import jax
import numpy as np
import pytest
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


def _mesh(**ici) -> jax.sharding.Mesh:
    config = tiny_config()
    config.mesh.ici = ici
    return sharding.make_mesh(config)


def test_one_minus_one_takes_the_devices_left_and_tensor_gets_the_closest_devices():
    mesh = _mesh(fsdp=-1, tensor=2)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "sequence": 1, "tensor": 2}
    assert mesh.axis_types == (AxisType.Auto,) * 4  # GSPMD propagates what the constraints leave open
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    np.testing.assert_array_equal(ids[0, :, 0, :], np.arange(8).reshape(4, 2))  # a tensor pair: neighbours
    assert dict(_mesh(data=2, sequence=2, tensor=2).shape) == {"data": 2, "fsdp": 1, "sequence": 2, "tensor": 2}


@pytest.mark.parametrize(
    ("ici", "message"),
    [
        ({"fsdp": -1, "tensor": 3}, "8 devices are not divisible by the fixed sizes' product 3"),
        ({"data": 2, "fsdp": 2}, "product 4 != 8 devices available for it"),
        ({"data": 4, "fsdp": 4}, "product 16 != 8 devices available for it"),
    ],
)
def test_a_mesh_that_does_not_fit_the_devices_is_refused_with_the_numbers(ici, message):
    expected = {"data": 1, "fsdp": 1, "sequence": 1, "tensor": 1} | ici
    with pytest.raises(sharding.MeshError) as refused:
        _mesh(**ici)
    assert str(refused.value) == f"config.mesh.ici={expected}: {message}"


def test_dcn_spans_slices_where_devices_have_them_else_processes():
    from types import SimpleNamespace

    slices = [SimpleNamespace(slice_index=i // 4, process_index=i // 2) for i in range(8)]
    assert sharding._granules(slices) == 2
    hosts = [SimpleNamespace(process_index=i // 2) for i in range(8)]
    assert sharding._granules(hosts) == 4
    assert sharding._granules(jax.devices()) == 1


def test_the_sequence_axis_size_is_read_from_the_mesh_in_use():
    assert sharding.sequence_shards() == 1  # no mesh
    mesh = _mesh(fsdp=-1, sequence=2)
    assert sharding.sequence_shards(mesh) == 2
    with jax.set_mesh(mesh):
        assert sharding.sequence_shards() == 2
    flat = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    assert sharding.sequence_shards(flat) == 1  # a mesh without the axis


def test_a_batch_that_does_not_split_names_the_numbers_and_the_axes():
    config = tiny_config()
    config.batch_size, config.microbatches = 12, 2
    with pytest.raises(sharding.MeshError) as refused:
        sharding.check_batch(config, _mesh(fsdp=-1))
    assert str(refused.value) == (
        "config.batch_size=12 / config.microbatches=2 = 6 images per microbatch, not divisible by the 8 batch "
        "shards of the mesh (data=1 x fsdp=8)"
    )
    config.batch_size = 16
    sharding.check_batch(config, _mesh(fsdp=-1))  # 8 per microbatch: one a shard
    config.logical_axis_rules = [(n, None if n == "act_batch" else a) for n, a in config.logical_axis_rules]
    config.batch_size = 3
    sharding.check_batch(config, _mesh(fsdp=-1))  # nothing splits the batch: any size fits
    assert sharding.batch_sharding(config, _mesh(fsdp=-1), 2).spec == PartitionSpec(None, None)


def test_a_dimension_the_mesh_cannot_divide_is_replicated_with_one_warning(caplog, monkeypatch):
    """4 heads over tensor=8: the heads dimension is replicated (memory on every device, said once per parameter
    and mesh), while the MLP's 128 hidden units stay split 8 ways."""
    mesh = _mesh(fsdp=1, tensor=8)
    rules = [("heads", "tensor"), ("mlp", "tensor")]
    state = nnx.state(model_lib.abstract(tiny_config()), nnx.Param)  # 2 layers, width 32, 4 heads of 8
    monkeypatch.setattr(sharding, "_WARNED", set())  # warned once per process: as if none had been before
    with caplog.at_level("WARNING", logger="igpt_jax.sharding"):
        shardings = sharding.variable_shardings(state, mesh, rules)
        sharding.variable_shardings(state, mesh, rules)  # the same parameters again: no second warning
    assert sorted(r.getMessage() for r in caplog.records) == [
        f"parameter blocks.attn.{name} {shape}: dimension 4 is not divisible by mesh axes tensor (size 8), so it is "
        "replicated there instead of sharded"
        for name, shape in [("key", [2, 32, 4, 8]), ("out", [2, 4, 8, 32]), ("query", [2, 32, 4, 8]),
                            ("value", [2, 32, 4, 8])]
    ]  # fmt: skip
    assert shardings["blocks"]["attn"]["query"].spec == PartitionSpec(None, None, None, None)
    assert shardings["blocks"]["mlp"]["fc"].spec == PartitionSpec(None, None, "tensor")
    assert shardings["blocks"]["mlp"]["proj"].spec == PartitionSpec(None, "tensor", None)
    assert shardings["wte"].spec == PartitionSpec(None, None)  # no rule for its names: replicated


def test_activations_are_constrained_only_under_a_mesh_and_rules():
    x = jax.numpy.ones((8, 4))
    assert sharding.constrain(x, ("act_batch", None)) is x  # no mesh: the same array
    assert sharding.mesh_platform() == "cpu"  # no mesh: JAX's default backend
    config = tiny_config()
    mesh = _mesh(fsdp=-1)
    with jax.set_mesh(mesh):
        assert sharding.current_spec(("act_batch", None)) is None  # a mesh but no rules
        plain = jax.jit(lambda a: sharding.constrain(a * 2, ("act_batch", None)))(x)
        with sharding.axis_rules(config.logical_axis_rules):
            out = jax.jit(lambda a: sharding.constrain(a * 2, ("act_batch", None)))(x)
        assert sharding.mesh_platform() == "cpu"
    split = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
    assert out.sharding.is_equivalent_to(split, 2) and not plain.sharding.is_equivalent_to(split, 2)
