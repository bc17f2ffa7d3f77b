"""What every mode starts from, in one place: workdir lock -> config -> mesh -> state layout -> restored state ->
data source and palette.

`for_training` builds the full train state (with its optimizer), resumed from the newest checkpoint that fits the
config (resume.plan) or fresh. `for_checkpoint` serves the modes that read a trained model (eval, probe, sample,
...): the newest checkpoint or `config.checkpoint_step`, its own recipe (model shape, objective, seed, batch size,
data set) over the command line's, which still steers the run (mesh, data paths, evaluation and probe settings), the
parameters only, and nothing moved if a checkpoint is broken. Both hold the workdir's lock while the mode runs: every
mode appends to metrics.jsonl, which two writers on an object store would overwrite.

The data source and the palette are built on first use: a run with nothing to do never prepares a data set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from igpt_jax import errors, palette, sharding, steps
from igpt_jax.data import get_source
from igpt_jax.data.sources import Source
from igpt_jax.workdir import checkpoint, layout, resume, run_lock, storage

log = logging.getLogger(__name__)


class NoCheckpointError(errors.UsageError, ValueError):
    """A mode that needs a trained model found no checkpoint in the workdir."""


@dataclasses.dataclass
class Runtime:
    config: ml_collections.ConfigDict  # for modes that read a checkpoint: with the checkpoint's recipe
    directory: epath.Path
    mesh: jax.sharding.Mesh
    setup: steps.Setup
    checkpointer: checkpoint.Checkpointer
    state: steps.State  # {'step', 'params', 'opt_state'} for training, {'step', 'params'} otherwise
    lock: run_lock.RunLock
    saved_palette: np.ndarray | None = None  # a palette handed over by the start (a pretrained run's)
    saved_fingerprint: str | None = None  # the restored checkpoint's record of its palette (palette.fingerprint)

    @property
    def step(self) -> int:
        return int(jax.device_get(self.state["step"]))

    @property
    def params(self) -> dict:
        return self.state["params"]

    @functools.cached_property
    def source(self) -> Source:
        return get_source(self.config)

    @functools.cached_property
    def clusters(self) -> np.ndarray | None:
        """The run's palette (None for token data sets); see `load_or_fit_palette`."""
        return palette.load_or_fit_palette(
            self.config, lambda: self.source, self.directory, self.saved_palette, self.saved_fingerprint
        )

    @functools.cached_property
    def clusters_device(self) -> jax.Array | None:
        clusters = self.clusters
        return None if clusters is None else jax.device_put(clusters, NamedSharding(self.mesh, PartitionSpec()))


# How a run without a checkpoint starts: setup -> (state, palette or None). Training starts from config.seed's
# initialisation; fine-tuning from a pretrained checkpoint and its palette.
StartFn = Callable[[steps.Setup], tuple[steps.State, "np.ndarray | None"]]


def fresh_start(setup: steps.Setup) -> tuple[steps.State, None]:
    state = steps.init_state(setup)
    log.info("fresh start: %s parameters", f"{sum(x.size for x in jax.tree.leaves(state['params'])):,}")
    return state, None


@contextlib.contextmanager
def for_training(
    config: ml_collections.ConfigDict,
    workdir: str | epath.Path,
    devices: list[jax.Device] | None = None,
    start: StartFn = fresh_start,
) -> Iterator[Runtime]:
    """The train state, resumed or (`start`) new; a checkpoint that does not fit stops here, before anything is
    written."""
    directory = storage.path(workdir)
    mesh = sharding.make_mesh(config, devices)  # a mesh that cannot be built stops the run before the workdir exists
    setup = steps.make_setup(config, mesh)
    lock = run_lock.acquire_everywhere(directory)  # before anything in the workdir is read or written
    try:
        log.info("mesh %s on %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())
        ckpt = checkpoint.Checkpointer(directory, config)
        state, saved_palette, fingerprint = _restore_or_start(ckpt, setup, start)
        with jax.set_mesh(mesh):  # once, around everything the mode runs
            yield Runtime(config, directory, mesh, setup, ckpt, state, lock, saved_palette, fingerprint)
    finally:
        lock.release()


def _restore_or_start(
    ckpt: checkpoint.Checkpointer, setup: steps.Setup, start: StartFn
) -> tuple[steps.State, np.ndarray | None, str | None]:
    """(state, the palette `start` hands over, the palette's fingerprint): from the newest checkpoint that fits and
    reads (whose palette is the workdir's palette.npy), or from `start`."""
    restored = ckpt.restore_latest(setup.abstract_state)
    if restored is None:
        return (*start(setup), None)
    for change in restored.plan.accepted_changes:
        log.warning("config changed since checkpoint %d: %s", restored.step, change)
    state = restored.state
    if restored.plan.params_only:
        state = steps.with_fresh_optimizer(setup, state["step"], state["params"])
        log.warning("config.restore='params': restored the parameters and step %d, new optimizer state", restored.step)
    log.info("resumed from %s/%d", ckpt.directory, restored.step)
    return state, None, restored.palette_fingerprint


@contextlib.contextmanager
def for_checkpoint(
    config: ml_collections.ConfigDict, workdir: str, devices: list[jax.Device] | None = None
) -> Iterator[Runtime]:
    """A trained model's parameters, under its checkpoint's own recipe; raises NoCheckpointError without one."""
    directory = storage.path(workdir)
    if not checkpoint.saved_steps(directory):
        raise _no_checkpoint(directory)  # before the lock: a mistyped workdir is not created
    lock = run_lock.acquire_everywhere(directory)
    try:
        config, ckpt = checkpoint_recipe(config, directory)
        mesh = sharding.make_mesh(config, devices)
        setup = steps.make_setup(config, mesh, train=False)
        restored = read_params(ckpt, setup)
        with jax.set_mesh(mesh):  # once, around everything the mode runs
            state = restored.state
            yield Runtime(config, directory, mesh, setup, ckpt, state, lock, None, restored.palette_fingerprint)
        ckpt.close()
    finally:
        lock.release()


def _no_checkpoint(directory: epath.Path) -> NoCheckpointError:
    return NoCheckpointError(
        f"{directory} holds no checkpoint: train first (--mode=train), or import weights (python -m "
        "igpt_jax.convert), or point --workdir at a trained run"
    )


def checkpoint_recipe(
    config: ml_collections.ConfigDict, directory: epath.Path
) -> tuple[ml_collections.ConfigDict, checkpoint.Checkpointer]:
    """`config` under the recipe of the workdir's newest checkpoint (or config.checkpoint_step's), and a Checkpointer
    that reads it. Raises NoCheckpointError without one."""
    saved = checkpoint.saved_steps(directory)
    if not saved:
        raise _no_checkpoint(directory)
    step = config.checkpoint_step or saved[-1]
    if step not in saved:  # only a chosen step can be absent
        raise NoCheckpointError(
            f"config.checkpoint_step={step}: {directory / layout.CHECKPOINTS} holds no step {step}; it holds "
            f"{saved} (0 or left out: the newest)"
        )
    ckpt = checkpoint.Checkpointer(directory, config)
    recipe = ckpt.saved_config(step)
    if recipe is not None:
        config, taken = resume.with_recipe_of(recipe, config)
        for change in taken:
            log.warning("using checkpoint %d's recipe: %s", step, change)
    ckpt.config = config  # compared with what the checkpoint holds: the recipe now agrees
    return config, ckpt


def read_params(ckpt: checkpoint.Checkpointer, setup: steps.Setup) -> checkpoint.Restored:
    """{'step', 'params'} and palette of checkpoint config.checkpoint_step, or of the newest one that reads; nothing
    is moved if one is broken."""
    restored = ckpt.restore_latest(
        setup.abstract_state, step=setup.config.checkpoint_step or None, params_only=True, set_aside=False
    )
    if restored is None:
        raise NoCheckpointError(f"{ckpt.directory} holds no checkpoint that reads (see the warnings above)")
    log.info("%s: checkpoint %d", ckpt.directory, restored.step)
    return restored
