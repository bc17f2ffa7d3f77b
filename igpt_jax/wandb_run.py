"""Weights & Biases, optional: the rows and pictures that metrics.jsonl and TensorBoard get, sent to a W&B run too.

Off unless config.wandb.project is set, and wandb is imported only then (`pip install wandb`; its own settings, such
as WANDB_MODE=offline, WANDB_DIR or WANDB_API_KEY, apply). A workdir is one W&B run, its id derived from the workdir's
path, which every relaunch and mode resumes, so its curves go on. The x-axis is the training step, logged as `step`
(W&B's define_metric), since a relaunch or a mode logs steps W&B's own counter has passed.
"""

from __future__ import annotations

import hashlib
import io
import os

import ml_collections
import numpy as np
from PIL import Image

from igpt_jax.workdir import storage


def run_id(workdir: str | os.PathLike) -> str:
    """The W&B run of a workdir: the same on every relaunch and host (W&B ids: letters and digits, at most 64)."""
    return hashlib.sha256(os.fspath(storage.path(workdir)).encode()).hexdigest()[:16]


class Run:
    """A W&B run that metrics.MetricsWriter writes to beside its files (process 0)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | os.PathLike):
        import wandb  # only when asked for

        settings = config.wandb
        self._wandb = wandb
        self._run = wandb.init(
            project=settings.project,
            entity=settings.entity or None,
            name=settings.name or storage.path(workdir).name,
            id=run_id(workdir),
            resume="allow",
            config=config.to_dict(),
        )
        self._run.define_metric("step")
        self._run.define_metric("*", step_metric="step")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self._run.log({"step": step, **scalars})

    def images(self, step: int, pngs: dict[str, bytes]) -> None:
        pictures = {}
        for tag, png in pngs.items():
            with Image.open(io.BytesIO(png)) as image:
                pictures[tag] = self._wandb.Image(np.asarray(image))
        self._run.log({"step": step, **pictures})

    def close(self) -> None:
        self._run.finish()


def open_run(config: ml_collections.ConfigDict | None, workdir: str | os.PathLike) -> Run | None:
    """The workdir's W&B run when the config asks for one, else None."""
    if config is None or not config.get("wandb") or not config.wandb.project:
        return None
    return Run(config, workdir)
