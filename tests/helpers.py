"""Small configs shared by tests (a module of its own, not a grab bag: only test configs live here)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import ml_collections

from igpt_jax.configs import base


def tiny_config(*, image_size: int = 4, objective: str = "ar", **model) -> ml_collections.ConfigDict:
    """A 2-layer, width-32 model over image_size**2 tokens: compiles in a second, exercises every code path."""
    config = base.make_config(image_size=image_size, num_layers=2, embed_dim=32, num_heads=4)
    config.model.vocab_size = 16
    config.objective = objective
    for key, value in model.items():
        config.model[key] = value
    return config


ROOT = Path(__file__).resolve().parents[1]


def run_main(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m igpt_jax.main ARGS` from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "igpt_jax.main", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


# TFDS prepares Fashion-MNIST (from Debian's files) once per machine here, not in the user's ~/tensorflow_datasets.
TFDS_TEST_DIR = os.path.join(tempfile.gettempdir(), "igpt_jax_test_tfds")


def fashion_config(*, image_size: int = 8, total_steps: int = 30, **overrides) -> ml_collections.ConfigDict:
    """A tiny model on real Fashion-MNIST (Debian's files), resized to image_size: trains in seconds on CPU."""
    from igpt_jax.configs import fashion_mnist

    config = fashion_mnist.get_config(str(image_size))
    config.model.num_layers, config.model.embed_dim, config.model.num_heads = 2, 32, 4
    config.batch_size = 16
    config.total_steps = total_steps
    config.log_every_steps = 1
    config.evals.eval.every_steps = total_steps
    config.evals.eval.examples = 64
    config.evals.probe.at_end = False  # tests that probe or sample say so
    config.evals.samples.at_end = False
    config.checkpoint_every_steps = 10
    config.keep_checkpoints = 10
    config.optimizer.warmup_steps = 5
    config.optimizer.learning_rate = 3e-3
    config.data.data_dir = TFDS_TEST_DIR
    return override(config, **overrides)


def override(config: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
    """Sets nested keys written with double underscores: override(c, model__num_layers=2)."""
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def read_metrics(workdir) -> list[dict]:
    import json

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def cli_flags(
    *, image_size: int, embed_dim: int, total_steps: int, eval_every: int, checkpoint_every: int, warmup: int
) -> list[str]:
    """Command-line flags for a tiny 2-layer Fashion-MNIST run of `python -m igpt_jax.main` (batch 16)."""
    return [
        f"--config=configs/fashion_mnist.py:{image_size}",
        "--config.model.num_layers=2",
        f"--config.model.embed_dim={embed_dim}",
        "--config.batch_size=16",
        f"--config.total_steps={total_steps}",
        "--config.log_every_steps=1",
        f"--config.evals.eval.every_steps={eval_every}",
        "--config.evals.eval.examples=64",
        "--config.evals.probe.at_end=False",
        "--config.evals.samples.at_end=False",
        f"--config.checkpoint_every_steps={checkpoint_every}",
        "--config.keep_checkpoints=10",
        f"--config.optimizer.warmup_steps={warmup}",
        f"--config.data.data_dir={TFDS_TEST_DIR}",
    ]
