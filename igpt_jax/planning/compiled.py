"""The train step compiled for a target's abstract devices: the config as compiled there, its memory, its cost.

XLA counts a scanned layer stack's body once (and the microbatch loop's), so the costs come from two small unscanned
compiles of the same step, 1 and 2 layers on one microbatch: cost = c1 + (L - 1) (c2 - c1), times the microbatches.
"""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import ml_collections

from igpt_jax import attention, defaults, sharding, steps
from igpt_jax.data import pipeline, sources

# Training FLOPs with recomputation over those without: full remat runs the forward pass twice (8/6); the policies
# that keep the matmuls recompute only elementwise work.
RECOMPUTE = {"full": 4 / 3}

# "... HLO temporaries (502.18G) exceeds available HBM (15.75G)": libtpu's sizes are binary (G = GiB)
_OUT_OF_MEMORY = re.compile(r"required for [^(]*\(([\d.]+)([KMGT])\) exceeds available HBM")
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclasses.dataclass(frozen=True)
class Target:
    """A config as compiled for a target (`auto` attention resolved) with its mesh over the target's devices."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh


def target(config: ml_collections.ConfigDict, devices: list, num_slices: int, mesh=None, **changes) -> Target:
    """The config as compiled for the target, `changes` applied (dotted keys): `auto` attention resolved for the
    target's platform (not the host's) and its mesh (ring where the mesh splits the sequence). The mesh is built
    here, once, unless `mesh` (one the changes do not alter) is given."""
    c = config.copy_and_resolve_references()
    for dotted, value in changes.items():
        defaults.put(c, dotted, value)
    mesh = mesh or sharding.make_mesh(c, devices, granules=num_slices)
    platform, sequence = devices[0].platform, sharding.sequence_shards(mesh)
    c.model.attention = attention.resolve(
        c.model.attention, platform, sequence, defaults.tokens_per_image(c), c.model.dtype
    )
    return Target(c, mesh)


def compile_step(t: Target):
    """The train step lowered and compiled for the target's mesh, on abstract state and batch."""
    config, mesh = t.config, t.mesh
    setup = steps.make_setup(config, mesh)
    kind = sources.kind(config.data.dataset, config.data.data_dir)
    batch = pipeline.abstract_batch(kind, config, mesh)
    clusters = None
    if kind == "images":
        clusters = jax.ShapeDtypeStruct((config.model.vocab_size, 3), jnp.float32, sharding=setup.replicated)
    with jax.set_mesh(mesh):
        return steps.make_train_step(setup).lower(setup.abstract_state, batch, clusters).compile()


def cost(compiled) -> tuple[float, float]:
    """(FLOPs, bytes accessed) of one device, as XLA's cost analysis counts them."""
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return float(analysis.get("flops", 0.0)), float(analysis.get("bytes accessed", 0.0))


def same_program(a: Target, b: Target) -> bool:
    """Whether two targets compile to the same program: the same config over the same mesh of the same devices."""
    return _program(a) == _program(b)


def _program(t: Target) -> str:
    mesh = {"axes": dict(t.mesh.shape), "devices": [str(d) for d in t.mesh.devices.flat]}
    return json.dumps({"config": t.config.to_dict(), "mesh": mesh}, sort_keys=True, default=str)


def memory(t: Target):
    """(compiled or None, per-device bytes {argument, output, temp, alias, generated_code, total}, the compiler's
    out-of-memory line or None): when libtpu refuses a program that cannot fit, the temporaries it asked for are the
    total."""
    try:
        compiled = compile_step(t)
    except jax.errors.JaxRuntimeError as e:
        needed = _OUT_OF_MEMORY.search(str(e))
        if needed is None:
            raise
        temp = float(needed.group(1)) * _UNITS[needed.group(2)]
        return None, {"temp": temp, "total": temp}, str(e).splitlines()[0][:300]
    analysis = compiled.memory_analysis()
    parts = {
        "argument": analysis.argument_size_in_bytes,
        "output": analysis.output_size_in_bytes,
        "temp": analysis.temp_size_in_bytes,
        "alias": analysis.alias_size_in_bytes,
        "generated_code": analysis.generated_code_size_in_bytes,
    }
    parts["total"] = parts["argument"] + parts["output"] - parts["alias"] + parts["temp"] + parts["generated_code"]
    return compiled, parts, None


def per_device_cost(t: Target, devices: list, num_slices: int) -> tuple[float, float]:
    """(FLOPs, bytes accessed) of one device's step, every layer and microbatch counted (module docstring); the 1-
    and 2-layer compiles keep the target's mesh."""
    config = t.config
    micro = config.microbatches
    one_micro = {"batch_size": config.batch_size // micro, "microbatches": 1, "model.scan_layers": False}
    c1, c2 = (
        cost(compile_step(target(config, devices, num_slices, t.mesh, **one_micro, **{"model.num_layers": n})))
        for n in (1, 2)
    )
    layers = config.model.num_layers
    return tuple(micro * (a + (layers - 1) * (b - a)) for a, b in zip(c1, c2, strict=True))


def xla_counts_attention(config: ml_collections.ConfigDict) -> bool:
    """Whether XLA's cost analysis sees the attention FLOPs of a target's config (its kernel resolved)."""
    return attention.KERNELS[config.model.attention].costed_by_xla
