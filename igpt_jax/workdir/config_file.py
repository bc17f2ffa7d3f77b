"""The workdir's own small files: config.json and its history, and the summary line a run ends with.

config.json is the config of the newest launch, written by process 0 only after the checkpoint it resumes from has
been accepted (an incompatible relaunch never overwrites it). When a relaunch changes keys, the previous file is
kept under config_history/ first, so the workdir records every recipe it was trained with.
"""

from __future__ import annotations

import json
import time

import jax
import ml_collections
from etils import epath

from igpt_jax import errors
from igpt_jax.workdir import layout, resume, storage


class DamagedFileError(errors.UsageError, ValueError):
    """A workdir file the run reads holds bytes it cannot have written (bit rot, a bad copy, a partial write of other
    data). The run stops naming it and the way on; nothing is moved."""


def config_text(config: ml_collections.ConfigDict) -> str:
    """config.json's content: the config as the checkpoint's recipe records it."""
    return json.dumps(resume.as_saved(config), indent=2) + "\n"


def write_config(workdir: epath.Path, config: ml_collections.ConfigDict, step: int) -> None:
    """Writes config.json (process 0), keeping a differing previous one as config_history/<time>-step<step>.json."""
    if jax.process_index() != 0:
        return
    text = config_text(config)
    current = workdir / layout.CONFIG
    if current.exists():
        previous = current.read_bytes()
        if previous == text.encode():
            return
        _check_json(current, previous)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        storage.write_bytes(workdir / layout.CONFIG_HISTORY / f"{stamp}-step{step}.json", previous)
    storage.write_text(current, text)


def _check_json(path: epath.Path, data: bytes) -> None:
    """Refuses a config.json that is not the JSON object this module writes, rather than keeping it as history."""
    try:
        if not isinstance(json.loads(data.decode("utf-8")), dict):
            raise ValueError("not a JSON object")
    except ValueError as e:  # UnicodeDecodeError and json.JSONDecodeError are ValueErrors
        raise DamagedFileError(
            f"{path} is damaged ({type(e).__name__}: {str(e)[:120]}). It only records the config of the workdir's "
            "last launch (every checkpoint keeps its own), so nothing depends on it: move it away and relaunch, "
            "and it is written again from this launch's config. Nothing was moved."
        ) from e


def summary(workdir: epath.Path) -> str:
    """'igpt: workdir W: checkpoints/, metrics.jsonl, ...' listing what the workdir holds now."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in workdir.iterdir() if p.name != layout.LOCK)
    return f"igpt: workdir {workdir}: {', '.join(names)}"
