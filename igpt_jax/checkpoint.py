"""Orbax checkpoints of the train state, palette and config, saved asynchronously and restored onto the current mesh.

Layout: workdir/checkpoints/<step>/ (Orbax's step folders, only finalized ones count). Restoring takes an abstract
target that carries the *current* shardings, so a run saved on 8 devices resumes on 4. A checkpoint that fails to
restore (a truncated or missing file) is skipped with a warning naming it, moved to workdir/unreadable_checkpoints/
(kept for inspection, out of Orbax's sight), and the one before is tried. `Preemption` turns a SIGTERM on any
process into one step at which every process saves and stops (an allgather of a flag per step).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, workdir: str, config: ml_collections.ConfigDict):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.quarantine = os.path.join(os.path.abspath(workdir), "unreadable_checkpoints")
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=config.checkpoint_every_steps,
            max_to_keep=config.keep_checkpoints,
            enable_async_checkpointing=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._config = config.to_dict()

    def save(self, step: int, state: Any, palette: np.ndarray | None, *, force: bool = False) -> bool:
        """Starts an async save if `step` is on the interval (or `force`); returns whether it saved."""
        items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(self._config)}
        if palette is not None:
            items["palette"] = ocp.args.StandardSave({"clusters": np.asarray(palette)})
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, np.ndarray | None] | None:
        """(step, state, palette) of the newest checkpoint that restores, or None when there is none."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            path = os.path.join(self.directory, str(step))
            try:
                items = {"state": ocp.args.StandardRestore(abstract_state)}
                if os.path.isdir(os.path.join(path, "palette")):
                    items["palette"] = ocp.args.StandardRestore()
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped the same way
                log.warning(
                    "checkpoint %s cannot be restored (%s: %s); moving it to %s and trying the one before",
                    path,
                    type(e).__name__,
                    str(e).splitlines()[0][:300] if str(e) else "",
                    self.quarantine,
                )
                self._quarantine(step)
                continue
            palette = restored.get("palette")
            return step, restored["state"], (None if palette is None else np.asarray(palette["clusters"]))
        return None

    def _quarantine(self, step: int) -> None:
        """Moves an unreadable step folder out of Orbax's sight, so this run can save that step again."""
        if jax.process_index() == 0:
            os.makedirs(self.quarantine, exist_ok=True)
            os.replace(
                os.path.join(self.directory, str(step)),
                os.path.join(self.quarantine, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"),
            )
        multihost_utils.sync_global_devices(f"igpt_quarantine_{step}")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


class Preemption:
    """Remembers a SIGTERM; `agreed()` is true on every process once any process has received one."""

    def __init__(self):
        self.received = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving at the next step, then exiting")
        self.received = True

    def agreed(self) -> bool:
        if jax.process_count() == 1:
            return self.received
        return bool(multihost_utils.process_allgather(np.int32(self.received)).max())

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)
