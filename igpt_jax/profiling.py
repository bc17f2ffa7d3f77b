"""`config.profile`: a jax.profiler trace of a few training steps, where TensorBoard's profile plugin and XProf look.

The trace covers steps start_step .. start_step + num_steps - 1 (the step numbers of metrics.jsonl), each marked as a
step for XProf's step-time view. JAX's profiler writes to a local folder only, so each process traces into a
temporary folder and copies what it wrote through the storage layer into the workdir's TensorBoard folder, under
`plugins/profile/<run>/` as `tensorboard --logdir` expects: a gs:// workdir gets its traces like a local one. Every
process writes its own host's files (their names carry the host), so a pod's profile shows every worker.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

import jax
import ml_collections

from igpt_jax.workdir import layout, storage

log = logging.getLogger(__name__)


class StepProfiler:
    """Starts the trace before step `start_step` runs and stops it once step `start_step + num_steps - 1` is done."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: storage.Path):
        self.first = config.profile.start_step
        self.last = self.first + config.profile.num_steps - 1
        self.destination = workdir / layout.PROFILES
        self._local: str | None = None

    @property
    def on(self) -> bool:
        return self.first > 0 and self.last >= self.first

    def annotation(self, step: int):
        """Marks step `step` (the number it will have once done) as one step of the trace."""
        return jax.profiler.StepTraceAnnotation("train", step_num=step)

    def before(self, step: int) -> None:
        """Called before step `step` runs."""
        if self.on and step == self.first and self._local is None:
            self._local = tempfile.mkdtemp(prefix="igpt_profile_")
            jax.profiler.start_trace(self._local)
            log.info("profiling steps %d to %d", self.first, self.last)

    def after(self, step: int, state) -> None:
        """Called once step `step` is dispatched: at the last profiled step, waits for it, then writes the trace."""
        if self._local is not None and step >= self.last:
            jax.block_until_ready(state)
            self.close()

    def close(self) -> None:
        """Stops a trace still running (a run that ended or stopped inside the window) and copies it out."""
        if self._local is None:
            return
        local, self._local = self._local, None
        jax.profiler.stop_trace()
        try:
            written = _copy_tree(local, self.destination)
        finally:
            shutil.rmtree(local, ignore_errors=True)
        log.info("profile of steps %d to %d: %s", self.first, self.last, ", ".join(map(str, written)))


def _copy_tree(local: str, destination: storage.Path) -> list[storage.Path]:
    """Every file under `local`'s plugins/profile/ to the same relative path under `destination`."""
    source = os.path.join(local, "plugins", "profile")  # where jax.profiler writes under the folder it is given
    written = []
    for folder, _, files in os.walk(source):
        for name in files:
            relative = os.path.relpath(os.path.join(folder, name), source)
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(os.path.join(folder, name), "rb") as f:
                storage.write_bytes(target, f.read())
            written.append(target)
    return written
