"""Logical axis names -> mesh axes, as MaxText does it: model code names its axes, the config maps them to a mesh.

Rules are `config.logical_axis_rules`, a list of (logical name, mesh axis | tuple of mesh axes | None), installed
for a region of code with `axis_rules(rules)`. Activation constraints are no-ops when no mesh is set, so the same
model runs unsharded in tests and sharded under `jax.set_mesh`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence

import jax
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import NamedSharding, PartitionSpec

from igpt_jax import errors

Rules = Sequence[tuple[str, str | Sequence[str] | None]]

log = logging.getLogger(__name__)


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


def mesh_platform() -> str:
    """The platform ('cpu', 'gpu', 'tpu') of the current mesh's devices, else JAX's default backend. Kernels choose by
    it, so a CPU host compiling for TPU devices (the compile-only planner) picks the TPU kernels."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return jax.default_backend()
    return mesh.abstract_device.platform


def current_spec(names: Sequence[str | None]) -> PartitionSpec | None:
    """The PartitionSpec of logical `names` under the current mesh and rules; None without both."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = flax_spmd.get_logical_axis_rules()
    if mesh.empty or not rules:
        return None
    return logical_to_spec(names, rules, mesh.axis_names)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names under the current mesh and rules; identity without a mesh."""
    spec = current_spec(names)
    return x if spec is None else jax.lax.with_sharding_constraint(x, spec)


def variable_shardings(state: nnx.State, mesh: jax.sharding.Mesh, rules: Rules) -> nnx.State:
    """A NamedSharding per variable of `state` (real or abstract) from its logical names; unnamed: replicated.

    A dimension that its mesh axes do not divide (4 heads on tensor=8) is replicated rather than refused, with a
    warning naming the parameter (once per parameter and mesh in a process): it costs memory on every device.
    """

    def one(path, variable: nnx.Variable) -> NamedSharding:
        names = variable.get_metadata().get("out_sharding") or (None,) * len(variable.shape)
        spec = logical_to_spec(names, rules, mesh.axis_names)
        kept = _divisible(spec, variable.shape, mesh)
        if kept != spec:
            _warn_replicated(jax.tree_util.keystr(path, simple=True, separator="."), variable.shape, spec, mesh)
        return NamedSharding(mesh, kept)

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


_WARNED: set[tuple] = set()


def _warn_replicated(name: str, shape: Sequence[int], spec: PartitionSpec, mesh: jax.sharding.Mesh) -> None:
    key = (name, tuple(shape), tuple(mesh.shape.items()))
    if key in _WARNED:
        return
    _WARNED.add(key)
    for dim, axes in zip(shape, tuple(spec), strict=False):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        if dim % size:
            log.warning(
                "parameter %s %s: dimension %d is not divisible by mesh axes %s (size %d), so it is replicated "
                "there instead of sharded",
                name,
                list(shape),
                dim,
                "x".join(names),
                size,
            )


def _divisible(spec: PartitionSpec, shape: Sequence[int], mesh: jax.sharding.Mesh) -> PartitionSpec:
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        out.append(axes if dim % size == 0 else None)
    return PartitionSpec(*out)


# Outermost to innermost: `tensor` gets the closest devices (the most traffic, every layer), then `sequence` (ring
# attention's ppermute to the neighbour, every layer), then `fsdp` (all-gathers of weights), then `data` (gradients).
MESH_AXES = ("data", "fsdp", "sequence", "tensor")
SEQUENCE_AXIS = "sequence"


class MeshError(errors.UsageError, ValueError):
    """The mesh in the config does not fit the devices, or the batch does not fit the mesh."""


def _resolve(sizes: dict, total: int, key: str) -> dict[str, int]:
    """Axis sizes with the one -1 filled in so that their product is `total`; refused with the numbers otherwise."""
    sizes = {axis: int(sizes.get(axis, 1)) for axis in MESH_AXES}
    known = math.prod(v for v in sizes.values() if v != -1)
    if -1 in sizes.values():
        if total % known:
            raise MeshError(f"{key}={sizes}: {total} devices are not divisible by the fixed sizes' product {known}")
        sizes = {a: (total // known if v == -1 else v) for a, v in sizes.items()}
    if math.prod(sizes.values()) != total:
        raise MeshError(f"{key}={sizes}: product {math.prod(sizes.values())} != {total} devices available for it")
    return sizes


def _granules(devices: Sequence[jax.Device]) -> int:
    """Slices (TPU multislice) or, elsewhere, processes: the units that `mesh.dcn` spans."""
    slices = {getattr(d, "slice_index", None) for d in devices}
    if None not in slices:
        return len(slices)
    return len({d.process_index for d in devices})


def make_mesh(config, devices: Sequence[jax.Device] | None = None, *, granules: int | None = None) -> jax.sharding.Mesh:
    """The (data, fsdp, sequence, tensor) mesh of `config.mesh.ici` (within a slice/host) x `config.mesh.dcn` (across).

    `granules` (default: counted from the devices) is how many units `mesh.dcn` spans: a compile-only topology's
    abstract devices carry no slice index and one process index per host, so the planner says how many slices."""
    from jax.experimental import mesh_utils

    devices = list(devices if devices is not None else jax.devices())
    granules = granules or _granules(devices)
    dcn = _resolve(dict(config.mesh.dcn), granules, "config.mesh.dcn")
    ici = _resolve(dict(config.mesh.ici), len(devices) // granules, "config.mesh.ici")
    if math.prod(dcn.values()) > 1:
        array = mesh_utils.create_hybrid_device_mesh(
            [ici[a] for a in MESH_AXES],
            [dcn[a] for a in MESH_AXES],
            devices,
            process_is_granule=not hasattr(devices[0], "slice_index"),
        )
    else:
        array = mesh_utils.create_device_mesh([ici[a] for a in MESH_AXES], devices)
    return jax.sharding.Mesh(array, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def sequence_shards(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None) -> int:
    """How many devices `mesh` (default: the current one) splits each image's sequence over: its `sequence` axis,
    1 without one."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh.empty or SEQUENCE_AXIS not in mesh.axis_names:
        return 1
    return mesh.shape[SEQUENCE_AXIS]


def batch_axes(config, mesh: jax.sharding.Mesh) -> tuple[str, ...]:
    """The mesh axes the global batch is split over: the `act_batch` rule of config.logical_axis_rules (one fact in
    one place: the input arrays are laid out as the model's activations expect them)."""
    spec = logical_to_spec(("act_batch",), config.logical_axis_rules, mesh.axis_names)[0]
    return (spec,) if isinstance(spec, str) else tuple(spec or ())


def check_batch(config, mesh: jax.sharding.Mesh) -> None:
    """Each microbatch must split evenly over the batch axes of the mesh."""
    axes = batch_axes(config, mesh)
    shards = math.prod(mesh.shape[a] for a in axes)
    micro = config.batch_size // config.microbatches
    if micro % shards:
        raise MeshError(
            f"config.batch_size={config.batch_size} / config.microbatches={config.microbatches} = {micro} images "
            f"per microbatch, not divisible by the {shards} batch shards of the mesh "
            f"({' x '.join(f'{a}={mesh.shape[a]}' for a in axes) or 'none'})"
        )


def batch_sharding(config, mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) dimension over the batch axes (`batch_axes`), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(config, mesh) or None, *(None,) * (ndim - 1)))
