"""Refuses a bad config before anything is built or compiled, naming the key, its value and what is allowed.

Unknown keys and wrong types are already refused by ml_collections (configs are locked and typed); each key's values
are checked against its entry in the schema (defaults.SCHEMA), and this module checks the relations between keys.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable

import ml_collections

from igpt_jax import attention, defaults, errors, evaluators
from igpt_jax.sharding import MESH_AXES


class ConfigError(errors.UsageError, ValueError):
    """A config value that cannot work. The message names every offending key, one a line."""

    def line(self) -> str:
        return "bad config: " + super().line()


def _schema(c) -> list[str]:
    """Every key's value is one its schema entry allows (defaults.SCHEMA: positive integers, ranges, registries)."""
    return [
        problem
        for dotted, key in defaults.SCHEMA.items()
        if (problem := key.allowed.problem(f"config.{dotted}", defaults.get(c, dotted)))
    ]


def _model_shape(c) -> list[str]:
    m = c.model
    out = []
    if _all_positive(m.embed_dim, m.num_heads) and m.embed_dim % m.num_heads:
        out.append(
            f"config.model.embed_dim={m.embed_dim} must be a multiple of config.model.num_heads={m.num_heads} "
            f"(head_dim = embed_dim / num_heads)"
        )
    if _all_positive(m.image_size, m.num_positions) and m.image_size**2 > m.num_positions:
        out.append(
            f"config.model.image_size={m.image_size} needs {m.image_size**2} positions but "
            f"config.model.num_positions={m.num_positions}; allowed: image_size**2 <= num_positions "
            f"(set --config.model.num_positions={m.image_size**2}, or pass the size as the config "
            f"argument, e.g. --config=igpt_l:{m.image_size})"
        )
    return out


def _training(c) -> list[str]:
    out = []
    if _all_positive(c.batch_size, c.microbatches) and c.batch_size % c.microbatches:
        out.append(f"config.batch_size={c.batch_size} must be a multiple of config.microbatches={c.microbatches}")
    return out


def _data(c) -> list[str]:
    """The data sets exist (in the registry or prepared in data_dir), a 'heldout' eval split has a preset or a split
    for it, and the preprocessing is one there is."""
    from igpt_jax.data import preprocess, sources  # no TensorFlow import: the registry only names the builders

    for key, dataset in (("config.data.dataset", c.data.dataset), ("config.finetune.dataset", c.finetune.dataset)):
        problem = sources.unknown(key, dataset, c.data.data_dir)
        if problem:
            return [problem]
    if c.data.preprocess and c.data.preprocess not in preprocess.FAMILIES:
        allowed = sorted(preprocess.FAMILIES)
        return [f"config.data.preprocess={c.data.preprocess!r}: allowed '' (the data set's own) or one of {allowed}"]
    try:
        sources.splits(c)
    except ValueError as e:
        return [str(e)]
    return []


def _mesh(c) -> list[str]:
    out = []
    for part in ("ici", "dcn"):
        sizes = dict(c.mesh[part])
        unknown = sorted(set(sizes) - set(MESH_AXES))
        if unknown:
            out.append(f"config.mesh.{part} has unknown axes {unknown}; allowed: {list(MESH_AXES)}")
        bad = {k: v for k, v in sizes.items() if not isinstance(v, int) or (v < 1 and v != -1)}
        if bad:
            out.append(f"config.mesh.{part}={sizes}: sizes must be positive integers or -1, got {bad}")
        if list(sizes.values()).count(-1) > 1:
            out.append(f"config.mesh.{part}={sizes}: at most one axis may be -1")
    return out + _sequence_split(c)


def _sequence_split(c) -> list[str]:
    """A kernel that splits the sequence over the mesh (ring attention, and `auto` where the mesh splits it) must be
    able to cut each image's tokens that way (ring: 2 x sequence zigzag chunks that come out whole)."""
    sizes = [int(dict(c.mesh[part]).get("sequence", 1)) for part in ("ici", "dcn")]
    name = attention.sequence_kernel() if c.model.attention == "auto" else c.model.attention
    kernel = attention.KERNELS.get(name)
    if -1 in sizes or kernel is None or not kernel.splits_sequence:
        return []
    shards = math.prod(sizes)
    reason = kernel.split_refusal(defaults.tokens_per_image(c), shards)
    return [] if reason is None else [f"config.mesh ici.sequence x dcn.sequence = {shards}: {reason}"]


def _wandb(c) -> list[str]:
    if c.wandb.project and importlib.util.find_spec("wandb") is None:
        return [f"config.wandb.project={c.wandb.project!r} needs wandb: pip install wandb (or 'igpt_jax[wandb]')"]
    return []


CHECKS: tuple[Callable[[ml_collections.ConfigDict], list[str]], ...] = (
    _schema,
    _model_shape,
    _training,
    _data,
    _mesh,
    _wandb,
)


def _finetune_labels(c) -> list[str]:
    from igpt_jax.data import sources

    if sources.labelled(c.finetune.dataset, c.data.data_dir):
        return []
    return [f"--mode=finetune needs labels, and config.finetune.dataset={c.finetune.dataset!r} has none"]


# What a mode needs beyond the config's own checks and its evaluators'.
MODE_CHECKS = {"finetune": (_finetune_labels,)}


def check(config: ml_collections.ConfigDict, mode: str = "train") -> None:
    """Raises ConfigError listing every problem, one per line; returns None for a usable config. The evaluators are
    checked for what `mode` runs of them (evaluators.problems)."""
    problems = [p for fn in CHECKS for p in fn(config)]
    if not problems:  # the evaluators' and the mode's needs read the rest of the config
        problems = evaluators.problems(config, mode) + [p for fn in MODE_CHECKS.get(mode, ()) for p in fn(config)]
    if problems:
        raise ConfigError("\n".join(problems))


def _all_positive(*values) -> bool:
    return all(isinstance(v, int) and v > 0 for v in values)
