"""What a relaunch may change, and the message when a checkpoint does not fit the config that resumes it.

Two comparisons, both before any array is read:
- the config saved with the checkpoint against the new one, key by key. Keys that only steer the run (how long,
  how often to log or save, the mesh, remat, attention kernel, where data lives, the optimizer's settings) may
  change: they are accepted and logged. Every other key changes what the checkpoint means (model shape, objective,
  seed, batch, data set): a change stops the run naming it. `config.restore='params'` accepts those too (logged),
  for a user who means to continue the parameters under a new recipe.
- the checkpoint's state tree (paths, shapes, dtypes, from Orbax's metadata) against the one this config builds.
  A difference stops the run with exit 2 naming the differing parts and the config changes that explain them,
  and nothing in the workdir is moved or deleted: the checkpoint is intact, it just belongs to another recipe.
  With `config.restore='params'` only the parameters must match; the optimizer state is then re-created.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

from igpt_jax import defaults, errors

RESTORE_MODES = ("all", "params")


class CheckpointMismatchError(errors.UsageError, ValueError):
    """The newest checkpoint belongs to another recipe than the config resuming it. Nothing was moved."""


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """{'model': {'embed_dim': 64}} -> {'model.embed_dim': 64}; lists and scalars are leaves."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def as_saved(config: ml_collections.ConfigDict) -> dict:
    """The config as a checkpoint stores it (JSON), so saved and new compare like for like."""
    return json.loads(json.dumps(config.to_dict(), default=str))


def _accepted(key: str) -> bool:
    """Whether a relaunch may change `key`: its schema entry's rule (defaults.SCHEMA). A key the schema does not
    know (one a later version dropped) stops the run, as a recipe key does."""
    entry = defaults.key_of(key)
    return entry is not None and entry.resume == defaults.STEERS


@dataclasses.dataclass(frozen=True)
class ConfigChanges:
    stopping: list[str]  # "model.embed_dim 64 -> 128"
    accepted: list[str]

    @property
    def all(self) -> list[str]:
        return self.stopping + self.accepted


def config_changes(saved: Mapping, current: Mapping) -> ConfigChanges:
    """Keys whose values differ between the saved and the current config (keys only one side has are new or
    retired keys of another igpt_jax version, not changes by the user)."""
    old, new = flatten(saved), flatten(current)
    stopping, accepted = [], []
    for key in sorted(old.keys() & new.keys()):
        if old[key] != new[key]:
            (accepted if _accepted(key) else stopping).append(f"{key} {old[key]!r} -> {new[key]!r}")
    return ConfigChanges(stopping, accepted)


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def leaves_by_path(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    """{'params.wte': ((16, 64), 'float32'), ...} for a tree of arrays, ShapeDtypeStructs or Orbax metadata; dict
    keys, sequence indices and namedtuple fields all become plain names, as Orbax stores them."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(_key_name(k) for k in path): (tuple(leaf.shape), str(leaf.dtype)) for path, leaf in flat}


def tree_differences(saved: dict, expected: dict, section: str) -> str | None:
    """One phrase on how `section` (params, opt_state, step) of the saved tree differs, or None if it does not."""
    saved = {k: v for k, v in saved.items() if k == section or k.startswith(section + ".")}
    expected = {k: v for k, v in expected.items() if k == section or k.startswith(section + ".")}
    only_saved = sorted(saved.keys() - expected.keys())
    only_here = sorted(expected.keys() - saved.keys())
    reshaped = sorted(k for k in saved.keys() & expected.keys() if saved[k] != expected[k])
    parts = []
    if reshaped:
        k = reshaped[0]
        parts.append(
            f"{len(reshaped)} arrays differ in shape or dtype (e.g. {k}: saved {_shape(saved[k])}, "
            f"this config {_shape(expected[k])})"
        )
    if only_saved or only_here:
        example = f"saved {only_saved[0]}" if only_saved else ""
        example += (", " if example and only_here else "") + (f"this config {only_here[0]}" if only_here else "")
        parts.append(
            f"{len(only_saved)} arrays only in the checkpoint and {len(only_here)} only in this config (e.g. {example})"
        )
    return f"{section}: {'; '.join(parts)}" if parts else None


def _shape(shape_dtype: tuple) -> str:
    shape, dtype = shape_dtype
    return f"{dtype}{list(shape)}"


@dataclasses.dataclass(frozen=True)
class Plan:
    """How to restore a checkpoint that fits: everything, or the parameters and step with a fresh optimizer."""

    params_only: bool
    accepted_changes: list[str]


def plan(
    where: str,
    step: int,
    saved_config: Mapping | None,
    current: ml_collections.ConfigDict,
    saved_tree: dict,
    expected_tree: dict,
    params_only: bool,
) -> Plan:
    """Decides whether checkpoint `step` at `where` can resume `current`; raises CheckpointMismatchError otherwise.
    `params_only`: only the parameters and step must fit, and changed recipe keys are accepted (logged)."""
    changes = config_changes(saved_config or {}, as_saved(current))
    differing = {s: tree_differences(saved_tree, expected_tree, s) for s in ("params", "step", "opt_state")}
    differing = {s: d for s, d in differing.items() if d}
    blocking_tree = [d for s, d in differing.items() if not (params_only and s == "opt_state")]
    blocking_keys = [] if params_only else changes.stopping
    if not blocking_tree and not blocking_keys:
        return Plan(params_only=params_only and "opt_state" in differing, accepted_changes=changes.all)

    why = []
    if blocking_tree:
        why.append("its state differs from what this config builds: " + " | ".join(blocking_tree))
    if changes.all:
        why.append("config changed since it was saved: " + ", ".join(changes.all))
    elif saved_config is None:
        why.append("it holds no config to compare with")
    ways = []
    if not params_only and "params" not in differing and "step" not in differing:
        effect = "re-creates the optimizer state" if "opt_state" in differing else "accepts the changed keys"
        ways.append(f"--config.restore=params (keeps the parameters and step {step}, {effect})")
    if changes.all:
        ways.append("the saved values of the changed keys")
    ways.append("another --workdir")
    raise CheckpointMismatchError(
        f"checkpoint {where} does not fit this config: {'; '.join(why)}. Nothing was moved or deleted. "
        f"Ways on: {', or '.join(ways)}."
    )


def with_recipe_of(saved: Mapping, current: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, list[str]]:
    """`current` with the recipe of a checkpoint's saved config: every key a relaunch may not change (model shape,
    objective, seed, batch size, data set) takes the saved value; the keys that steer a run (mesh, data paths,
    evaluation, probe and sampling settings) keep the command line's. Returns it and the keys taken from the
    checkpoint that differed ("model.embed_dim 32 -> 64")."""
    config = current.copy_and_resolve_references()
    mine = flatten(as_saved(current))
    taken = []
    for key, value in flatten(saved).items():
        if _accepted(key) or key not in mine or mine[key] == value:
            continue
        defaults.put(config, key, value)
        taken.append(f"{key} {mine[key]!r} -> {value!r}")
    return config, taken
