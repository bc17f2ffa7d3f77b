"""The workdir's layout: the name of every file and folder a run keeps there, in one place, for every module that
reads or writes one (through the storage layer, so a gs:// workdir has the same layout).

An evaluator's own files are named after it instead (`<name>.json`, `<name>.png`, `<name>/`: `record` and `folder`
below), so no evaluator may be named after one of these (`RESERVED_NAMES`).
"""

from __future__ import annotations

import os

CHECKPOINTS = "checkpoints"  # Orbax's step folders, checkpoints/<step>/
UNREADABLE_CHECKPOINTS = "unreadable_checkpoints"  # checkpoints found broken, set aside whole
CONFIG = "config.json"  # the newest launch's config
CONFIG_HISTORY = "config_history"  # the configs a relaunch replaced, config_history/<time>-step<step>.json
METRICS = "metrics.jsonl"  # one JSON object per logged step and per evaluation
METRICS_SUPERSEDED = "metrics.superseded.jsonl"  # rows of steps a resumed run trained again
PALETTE = "palette.npy"  # the colours the run's tokens index, (K, 3) like OpenAI's kmeans_centers.npy
LOCK = "lock.json"  # one run per workdir, with its heartbeat
TENSORBOARD = "tensorboard"  # event files
PROFILES = os.path.join(TENSORBOARD, "plugins", "profile")  # config.profile's traces, where TensorBoard reads them
PROBE_FEATURES = "probe_features"  # the probes' cached features, probe_features/<evaluator>/
FINETUNE = "finetune"  # --mode=finetune's own workdir, inside the pretrained one
COMPILE_REPORT = "compile.json"  # --mode=compile's report
COMPILATION_CACHE = "compilation_cache"  # beside the workdir (in the same bucket), not in it: shared by its runs

# The stems of the names above: no evaluator may take one.
RESERVED_NAMES = frozenset(
    name.split(".")[0].split(os.sep)[0]
    for name in (
        CHECKPOINTS,
        UNREADABLE_CHECKPOINTS,
        CONFIG,
        CONFIG_HISTORY,
        METRICS,
        PALETTE,
        LOCK,
        TENSORBOARD,
        PROBE_FEATURES,
        FINETUNE,
        COMPILE_REPORT,
    )
)


def record(evaluator: str) -> str:
    """An evaluator's newest record (probe.json for the default probe, read by other tools)."""
    return f"{evaluator}.json"


def plot(evaluator: str) -> str:
    return f"{evaluator}.png"
