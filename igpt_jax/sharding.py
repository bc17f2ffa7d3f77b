"""Logical axis names -> mesh axes, as MaxText does it: model code names its axes, the config maps them to a mesh.

Rules are `config.logical_axis_rules`, a list of (logical name, mesh axis | tuple of mesh axes | None), installed
for a region of code with `axis_rules(rules)`. Activation constraints are no-ops when no mesh is set, so the same
model runs unsharded in tests and sharded under `jax.set_mesh`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import jax
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, str | Sequence[str] | None]]


@contextlib.contextmanager
def axis_rules(rules: Rules) -> Iterator[None]:
    """Makes `rules` the active logical axis rules inside the block."""
    with flax_spmd.logical_axis_rules([(name, _as_tuple(axes)) for name, axes in rules]):
        yield


def _as_tuple(axes):
    if axes is None or isinstance(axes, str):
        return axes
    return tuple(axes)


def logical_to_spec(names: Sequence[str | None], rules: Rules, mesh_axes: Sequence[str]) -> PartitionSpec:
    """PartitionSpec for logical `names`: each name takes its rule's mesh axes not already used by another dim."""
    table = {name: _as_tuple(axes) for name, axes in rules}
    used: set[str] = set()
    spec = []
    for name in names:
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else (axes or ())
        kept = tuple(a for a in axes if a in mesh_axes and a not in used)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return PartitionSpec(*spec)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names under the current mesh and rules; identity without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = flax_spmd.get_logical_axis_rules()
    if mesh.empty or not rules:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, rules, mesh.axis_names))


def variable_shardings(state: nnx.State, mesh: jax.sharding.Mesh, rules: Rules) -> nnx.State:
    """A NamedSharding per variable of `state` (real or abstract) from its logical names; unnamed: replicated."""

    def one(variable: nnx.Variable) -> NamedSharding:
        names = variable.get_metadata().get("out_sharding") or (None,) * len(variable.shape)
        return NamedSharding(mesh, logical_to_spec(names, rules, mesh.axis_names))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
