"""Orbax checkpoints of the train state, palette and config: saves that fail loudly, restores that never lose work.

Layout: workdir/checkpoints/<step>/ (Orbax's step folders; only finalized ones count) with items `state`, `config`
and `palette_fingerprint` (the SHA-256 of the workdir's palette.npy, the palette's one copy: restore checks it);
the workdir may be local or gs://
(Orbax goes through etils.epath and tensorstore). Restoring takes an abstract target that carries the *current*
shardings, so a run saved on 8 devices resumes on 4.

Restore tells three failures apart, newest checkpoint first:
- its own files are broken (missing, truncated or corrupt data or metadata): it is moved to
  workdir/unreadable_checkpoints/ with a warning naming it (kept for inspection, out of Orbax's sight, so this run
  can save that step again) and the one before is tried;
- it does not fit the config (`resume.plan`): the run stops with exit 2 naming the difference, nothing is moved;
- anything else (a storage error that outlives the retries, permissions): the run stops naming the checkpoint and
  the cause. It never starts from step 0 while a checkpoint it could not read exists.
Every process reaches the same verdict (they compare), so none goes on alone.

Saves are asynchronous. `check_saves()`, called every step, turns a failed background save into
`CheckpointSaveError` (naming the path and the cause) as soon as Orbax has given up on it, so the run stops within a
step of the failure instead of training on without checkpoints.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from igpt_jax import distributed, errors, palette
from igpt_jax.workdir import layout, resume, storage

log = logging.getLogger(__name__)

# Seconds to wait before each retry of a failed read (tensorstore already retries single HTTP requests).
RETRY_DELAYS = (1.0, 3.0)

# Errors that mean a checkpoint's own bytes are broken (missing, cut short, not what was written), as opposed to a
# storage system that failed to answer. Tensorstore reports both as ValueErrors with a status and a description,
# often as the cause of Orbax's own exception; a transient word anywhere in that chain wins, so a good checkpoint is
# never moved aside on an error that a retry or a relaunch would get past.
_CORRUPT_WORDS = re.compile(
    r"\b(DATA_LOSS|OUT_OF_RANGE|NOT_FOUND)\b|Invalid JSON|Error parsing|Error decoding|decompress|"
    r"Unknown frame descriptor|Unexpected end of|[Cc]orrupt|[Cc]hecksum"
)
_TRANSIENT_WORDS = re.compile(
    r"\b(UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED|ABORTED|CANCELLED)\b|Input/output error|"
    r"Connection (reset|refused|aborted)|[Tt]imed? ?out|HTTP response code: (429|5\d\d)|Service Unavailable|"
    r"Too Many Requests"
)
_CORRUPT_TYPES = (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, EOFError)


class CheckpointSaveError(errors.RunFailedError, RuntimeError):
    """A checkpoint could not be written. The run must stop: training on would only lose more work."""


class CheckpointReadError(errors.RunFailedError, RuntimeError):
    """A checkpoint could not be read for a reason other than its own files being broken."""


@dataclasses.dataclass
class Restored:
    step: int
    state: Any  # the full train state, or {'step', 'params'} when plan.params_only
    plan: resume.Plan
    palette_fingerprint: str | None = None  # palette.fingerprint of the colours its tokens were made with


def cause(error: BaseException) -> str:
    """A one-line description of an error, leading with the OS's words when there are some."""
    text = str(error)
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    found = storage.OS_FAILURES.search(text)
    if found and found.group(0) not in first[:80]:
        first = f"{found.group(0)} ({first[:200]})"
    return f"{type(error).__name__}: {first[:400]}"


def _intact(steps: list[int] | None) -> str:
    if steps is None:
        return "earlier checkpoints were not touched"
    if not steps:
        return "no earlier checkpoint exists"
    if len(steps) == 1:
        return f"checkpoint {steps[0]} is intact"
    return f"checkpoints {', '.join(map(str, steps))} are intact"


def _chain(error: BaseException) -> list[BaseException]:
    """The error and the ones it was raised from (__cause__, __context__), each once."""
    seen: list[BaseException] = []
    todo = [error]
    while todo and len(seen) < 20:
        e = todo.pop()
        if e is not None and all(e is not s for s in seen):
            seen.append(e)
            todo += [e.__cause__, e.__context__]
    return seen


def _is_corrupt(error: BaseException) -> bool:
    """True when the checkpoint's own files are broken; False for storage that failed to answer (EIO, an HTTP 5xx,
    a timeout), which keeps the retry-then-stop path."""
    chain = _chain(error)
    if any(isinstance(e, OSError) and e.errno == errno.EIO or _TRANSIENT_WORDS.search(str(e)) for e in chain):
        return False
    for e in chain:
        if isinstance(e, _CORRUPT_TYPES):
            return True
        if isinstance(e, KeyError) and "was not found in the checkpoint" in str(e):
            return True  # an item folder is missing
        if isinstance(e, ValueError) and _CORRUPT_WORDS.search(str(e)):
            return True
    return False


def _agree(ok: bool, corrupt: bool) -> tuple[bool, bool]:
    """Every process's verdict on a read, combined: ok only if all are, corrupt if any says so."""
    if jax.process_count() == 1:
        return ok, corrupt
    every = np.asarray(multihost_utils.process_allgather(np.array([ok, corrupt], np.int32))).reshape(-1, 2)
    return bool(every[:, 0].all()), bool(every[:, 1].any())


def saved_steps(workdir: epath.Path) -> list[int]:
    """The workdir's finalized checkpoint steps, oldest first, as Orbax counts them (a save still in flight is not
    one), read without opening a CheckpointManager: it creates folders and, with several processes, waits on all."""
    return sorted(ocp.utils.checkpoint_steps(workdir / layout.CHECKPOINTS))


class Checkpointer:
    def __init__(self, workdir: epath.Path, config: ml_collections.ConfigDict):
        self.directory = workdir / layout.CHECKPOINTS
        self.quarantine = workdir / layout.UNREADABLE_CHECKPOINTS
        self.config = config
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=config.checkpoint_every_steps,
            max_to_keep=config.keep_checkpoints,
            enable_async_checkpointing=True,
            create=True,
        )
        handlers = {
            "state": ocp.PyTreeCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
            "palette_fingerprint": ocp.JsonCheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._pending: int | None = None  # step of the save in flight, until check_saves has seen it land

    # --- saving

    def save(self, step: int, state: Any, clusters: np.ndarray | None) -> None:
        """Starts an async save of `step` (with the fingerprint of `clusters`, the run's palette); raises
        CheckpointSaveError if Orbax refuses it or an earlier one failed."""
        self.check_saves(block=True)
        items = {"state": ocp.args.PyTreeSave(state), "config": ocp.args.JsonSave(resume.as_saved(self.config))}
        if clusters is not None:
            items["palette_fingerprint"] = ocp.args.JsonSave({"sha256": palette.fingerprint(clusters)})
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # noqa: BLE001 - whatever stops a save stops the run, with its cause
            raise self._save_error(step, e) from e
        self._pending = step

    def check_saves(self, *, block: bool = False) -> None:
        """Raises CheckpointSaveError if the last save failed. Without `block`, a save still in flight is left alone."""
        if self._pending is None or (not block and self.manager.is_saving_in_progress()):
            return
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._save_error(step, e) from e
        self.manager.reload()  # the step folders as they are on storage now, not as Orbax remembers them
        if step not in self.manager.all_steps():
            raise self._save_error(step, None)

    def _save_error(self, step: int, error: BaseException | None) -> CheckpointSaveError:
        try:
            self.manager.reload()
            saved = [s for s in self.manager.all_steps() if s != step]
        except Exception:  # noqa: BLE001 - the storage may be what failed; the message does without the list
            saved = None
        kept = _intact(saved)
        why = cause(error) if error is not None else "Orbax did not finalize it (see its log above)"
        if error is not None and distributed.lost_a_process(" ".join(map(str, _chain(error)))):
            way_on = (
                "Another process of the run stopped during the save (its own log says why); relaunch every process "
                "with the same command to resume from the newest checkpoint."
            )
        else:
            way_on = "Fix the storage and relaunch the same command to resume from the newest one."
        return CheckpointSaveError(
            f"saving checkpoint {step} to {self.directory / str(step)} failed: {why}. Stopped; {kept}. {way_on}"
        )

    def close(self) -> None:
        """Waits for the save in flight; raises CheckpointSaveError if it failed (the manager is then left alone:
        its threads hold the failure and would raise it again; the process is about to exit)."""
        self.check_saves(block=True)
        self.manager.close()

    # --- restoring

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_latest(
        self, abstract_state: Any, *, step: int | None = None, params_only: bool | None = None, set_aside: bool = True
    ) -> Restored | None:
        """The newest checkpoint that fits the config and reads (or checkpoint `step` alone), or None when the
        workdir has none.

        `params_only` (default: config.restore == 'params'): only the parameters and the step must fit; the
        optimizer state is left out when it does not, or when `abstract_state` has none (modes that do not train).
        `set_aside=False`: a broken checkpoint is reported and left where it is, for modes that only read.
        Raises resume.CheckpointMismatchError (it does not fit; nothing moved) or CheckpointReadError (it could not be
        read, for a reason other than broken files, or `step` could not be read at all)."""
        expected = resume.leaves_by_path(abstract_state)
        if params_only is None:
            params_only = self.config.restore == "params"
        candidates = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
        for candidate in candidates:
            where = self.directory / str(candidate)
            if candidate not in self.manager.all_steps():
                raise CheckpointReadError(f"no checkpoint {where}: the workdir holds {self.manager.all_steps()}")
            metadata = self._read(candidate, "metadata", functools.partial(self._metadata, candidate), set_aside)
            if metadata is None:
                continue
            saved_tree, saved_config, saved_items = metadata
            plan = resume.plan(str(where), candidate, saved_config, self.config, saved_tree, expected, params_only)
            target = abstract_state
            if plan.params_only:
                target = {"step": abstract_state["step"], "params": abstract_state["params"]}
            items = {
                "state": ocp.args.PyTreeRestore(
                    item=target,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=plan.params_only,
                )
            }
            if "palette_fingerprint" in saved_items:
                items["palette_fingerprint"] = ocp.args.JsonRestore()
            args = ocp.args.Composite(**items)
            restored = self._read(
                candidate, "arrays", lambda s=candidate, a=args: self.manager.restore(s, args=a), set_aside
            )
            if restored is None:
                continue
            recorded = restored.get("palette_fingerprint")
            fingerprint = None if recorded is None else recorded["sha256"]
            return Restored(candidate, restored["state"], plan, fingerprint)
        if step is not None:
            raise CheckpointReadError(f"checkpoint {self.directory / str(step)} is broken (see the warning above)")
        return None

    def saved_config(self, step: int) -> dict | None:
        """The config checkpoint `step` was saved with (None for checkpoints that hold none)."""
        return self._read(step, "config", lambda: self._metadata(step)[1], set_aside=False)

    def _metadata(self, step: int) -> tuple[dict, dict | None, set[str]]:
        """(state tree's {path: (shape, dtype)}, saved config, the palette items it holds), from metadata only."""
        metadata = self.manager.item_metadata(step)
        state = metadata.get("state") if metadata is not None else None
        if state is None:
            raise FileNotFoundError(f"{self.directory / str(step)}: no readable metadata for the state")
        tree = state.tree if hasattr(state, "tree") else state
        names = set(metadata.keys())
        config = None
        if "config" in names:
            config = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        palette_items = {name for name in ("palette_fingerprint",) if (self.directory / str(step) / name).exists()}
        return resume.leaves_by_path(tree), config, palette_items

    def _read(self, step: int, what: str, read: Callable[[], Any], set_aside: bool = True) -> Any:
        """read() with retries; None for a broken checkpoint (moved aside when `set_aside`); CheckpointReadError for
        any other failure."""
        error: BaseException | None = None
        for delay in (*RETRY_DELAYS, None):
            try:
                result = read()
                error = None
            except Exception as e:  # noqa: BLE001 - classified below
                result, error = None, e
            ok, corrupt = _agree(error is None, error is not None and _is_corrupt(error))
            if ok:
                return result
            if delay is None or corrupt:
                break
            log.warning("reading checkpoint %d (%s) failed (%s); retrying in %.0fs", step, what, cause(error), delay)
            time.sleep(delay)
        where = self.directory / str(step)
        if not corrupt:
            raise CheckpointReadError(
                f"cannot read checkpoint {where} ({what}): {cause(error) if error else 'failed on another process'}. "
                "Stopped without training: nothing was moved, and no step was redone from scratch. Relaunch when "
                f"the storage answers again, or move {where} aside by hand to resume from the checkpoint before it."
            )
        why = cause(error) if error else "on another process"
        if not set_aside:
            log.warning("checkpoint %s is broken (%s); left in place, trying the one before", where, why)
            return None
        log.warning(
            "checkpoint %s is broken (%s); moving it to %s and trying the one before", where, why, self.quarantine
        )
        self._set_aside(step)
        return None

    def _set_aside(self, step: int) -> None:
        """Moves a broken step folder out of Orbax's sight, so this run can save that step again."""
        if jax.process_index() == 0:
            self.quarantine.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(self.quarantine / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"igpt_quarantine_{step}")
        self.manager.reload()
