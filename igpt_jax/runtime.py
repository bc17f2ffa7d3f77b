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
import time
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from igpt_jax import checkpoint, errors, layout, palette, resume, run_lock, sharding, steps, storage
from igpt_jax.data import get_source, order, splits
from igpt_jax.data.sources import Source
from igpt_jax.workdir import DamagedFileError

log = logging.getLogger(__name__)

PALETTE_SAMPLE_IMAGES = 2048


class NoCheckpointError(errors.UsageError, ValueError):
    """A mode that needs a trained model found no checkpoint in the workdir."""


class PaletteMismatchError(errors.UsageError, ValueError):
    """The palette the run's tokens were made with differs from the one config.data.palette names."""


@dataclasses.dataclass
class Runtime:
    config: ml_collections.ConfigDict  # for modes that read a checkpoint: with the checkpoint's recipe
    directory: epath.Path
    mesh: jax.sharding.Mesh
    setup: steps.Setup
    checkpointer: checkpoint.Checkpointer
    state: steps.State  # {'step', 'params', 'opt_state'} for training, {'step', 'params'} otherwise
    lock: run_lock.RunLock
    saved_palette: np.ndarray | None = None  # a palette handed over: an earlier version's checkpoint copy, a start's
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
        return load_or_fit_palette(
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
    """(state, a palette copy, the palette's fingerprint) from the newest checkpoint that fits and reads, or from
    `start`."""
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
    return state, restored.palette, restored.palette_fingerprint


@contextlib.contextmanager
def for_checkpoint(
    config: ml_collections.ConfigDict, workdir: str, devices: list[jax.Device] | None = None
) -> Iterator[Runtime]:
    """A trained model's parameters, under its checkpoint's own recipe; raises NoCheckpointError without one."""
    directory = storage.path(workdir)
    if not (directory / layout.CHECKPOINTS).exists():
        raise _no_checkpoint(directory)  # before the lock: a mistyped workdir is not created
    lock = run_lock.acquire_everywhere(directory)
    try:
        config, ckpt = checkpoint_recipe(config, directory)
        mesh = sharding.make_mesh(config, devices)
        setup = steps.make_setup(config, mesh, train=False)
        restored = read_params(ckpt, setup)
        with jax.set_mesh(mesh):  # once, around everything the mode runs
            state = restored.state
            yield Runtime(
                config, directory, mesh, setup, ckpt, state, lock, restored.palette, restored.palette_fingerprint
            )
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
    if not (directory / layout.CHECKPOINTS).exists():
        raise _no_checkpoint(directory)
    ckpt = checkpoint.Checkpointer(directory, config)
    step = config.checkpoint_step or ckpt.latest_step()
    if step is None:
        raise _no_checkpoint(directory)
    if step not in ckpt.manager.all_steps():  # only a chosen step can be absent
        ckpt.close()
        raise NoCheckpointError(
            f"config.checkpoint_step={step}: {directory / layout.CHECKPOINTS} holds no step {step}; it holds "
            f"{sorted(ckpt.manager.all_steps())} (0 or left out: the newest)"
        )
    saved = ckpt.saved_config(step)
    if saved is not None:
        config, taken = resume.with_recipe_of(saved, config)
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


def load_or_fit_palette(
    config,
    source: Callable[[], Source],
    directory: epath.Path,
    saved: np.ndarray | None = None,
    fingerprint: str | None = None,
    *,
    write: bool = True,
) -> np.ndarray | None:
    """The run's palette. Its one copy is the workdir's palette.npy, written once, before the first checkpoint;
    checkpoints record its fingerprint. Read from palette.npy, else from `saved` (a palette handed over: an earlier
    version's checkpoint copy, or a pretrained run's), else config.data.palette, else fitted by k-means on a sample of
    the train split (a data set of tokens: the palette its tokens index, when it carries one, else none); palette.npy is
    written when missing (`write`). The data source (`source()`) is only opened when there is no palette yet. Stops
    (PaletteMismatchError, naming both) when the colours differ from the restored checkpoint's `fingerprint` or from
    config.data.palette, and when a checkpoint exists but no palette does."""
    path = directory / layout.PALETTE
    missing = (
        f"{path} is missing, and the checkpoint's tokens were made with the palette whose SHA-256 is "
        f"{(fingerprint or '')[:16]}...: put the run's palette.npy back, or name a copy of it with "
        "--config.data.palette=PATH (checked against the checkpoint before use)"
    )
    if path.exists():
        clusters, origin = _workdir_palette(path, fingerprint), str(path)
    elif saved is not None:
        clusters, origin = saved, "the palette handed over with the checkpoint"
    elif config.data.palette:
        clusters, origin = palette.load(config.data.palette), None
    elif source().kind == "tokens":
        clusters, origin = tokens_palette(source()), None
        if clusters is None:
            if fingerprint is not None:
                raise PaletteMismatchError(missing)
            return None
    else:
        clusters, origin = _fit_palette(config, source()), None
        if fingerprint is not None:  # a checkpoint whose palette.npy is gone: the same fit gives the same colours
            if palette.fingerprint(clusters) != fingerprint:
                raise PaletteMismatchError(
                    f"{missing}; refitting on the train split gave other colours (SHA-256 "
                    f"{palette.fingerprint(clusters)[:16]}...)"
                )
            log.warning(
                "%s was missing: refitted on the train split, the palette the checkpoint's tokens were made with "
                "(SHA-256 %s...)",
                path,
                fingerprint[:16],
            )
    if fingerprint is not None and palette.fingerprint(clusters) != fingerprint:
        where = origin or f"config.data.palette={config.data.palette}"
        raise PaletteMismatchError(
            f"{where} ({len(clusters)} colours, SHA-256 {palette.fingerprint(clusters)[:16]}...) is not the palette "
            f"the checkpoint's tokens were made with (SHA-256 {fingerprint[:16]}...). Nothing was changed. Ways on: "
            f"put the run's own palette.npy back in {directory}, or use another --workdir."
        )
    if origin is not None and config.data.palette:
        wanted = palette.load(config.data.palette)
        if wanted.shape != clusters.shape or not np.array_equal(wanted, clusters):
            raise PaletteMismatchError(
                f"config.data.palette={config.data.palette} ({len(wanted)} colours) differs from {origin} "
                f"({len(clusters)} colours) that this workdir's tokens were made with. Nothing was changed. Ways on: "
                "leave config.data.palette empty to keep the workdir's palette, or use another --workdir."
            )
    if len(clusters) > config.model.vocab_size:
        raise ValueError(
            f"the palette has {len(clusters)} colours but config.model.vocab_size={config.model.vocab_size}"
        )
    if write and jax.process_index() == 0 and not path.exists():
        palette.save(path, clusters)
    return clusters


def tokens_palette(source: Source) -> np.ndarray | None:
    """The colours a data set of tokens indexes (OpenAI's arrays carry theirs), or None (synthetic tokens)."""
    colours = getattr(source, "palette", None)
    return None if colours is None else colours()


def _fit_palette(config: ml_collections.ConfigDict, source: Source) -> np.ndarray:
    """k-means on a random sample of the train split (the first n positions of epoch 0's permutation): a pure
    function of the config and the data, so a refit gives the same colours."""
    train_split = splits(config)[0]
    total = source.num_examples(train_split)
    n = min(PALETTE_SAMPLE_IMAGES, total)
    sample = source.get(train_split, order.global_indices(config.seed, 0, n, total), None)
    start = time.perf_counter()
    clusters = palette.fit(sample, k=config.model.vocab_size, seed=config.seed)
    log.info("palette: %d colours fitted on %d images in %.1fs", len(clusters), n, time.perf_counter() - start)
    return clusters


def _workdir_palette(path: epath.Path, fingerprint: str | None) -> np.ndarray:
    """The workdir's palette.npy; a damaged one stops the run naming the file and the ways on."""
    try:
        return palette.load(path)
    except ValueError as e:
        needed = (
            f"the checkpoint's tokens were made with the palette whose SHA-256 is {fingerprint[:16]}..."
            if fingerprint
            else "no checkpoint depends on it yet"
        )
        raise DamagedFileError(
            f"{path} is damaged ({str(e).removeprefix(f'palette {path}: ')}); {needed}. Nothing was moved. Ways on: "
            "put the run's palette.npy back, or move it away and relaunch: the palette is fitted "
            "again on the train split, and used only if it has the colours the checkpoint records"
        ) from e
