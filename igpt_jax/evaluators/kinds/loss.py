"""Held-out loss: the first `examples` images of a split (0: all of it), each once, in a fixed order and with fixed
randomness, so numbers from different checkpoints, runs and process counts compare.

The split is read in global batches of config.batch_size; the last one is padded and its padding weighs nothing, so
the mean is over exactly the chosen images. Batch i draws its randomness (BERT's masks) from a key folded from the
seed and i alone, never from the training step: every evaluation of a run masks the same positions. A model with a
classification head (fine-tuning) adds the head's accuracy and both parts of its loss.
"""

from __future__ import annotations

import math

import jax
import ml_collections

from igpt_jax import objectives, runtime, steps
from igpt_jax.data import pipeline, splits
from igpt_jax.data.sources import Source
from igpt_jax.evaluators import base

EVAL_KEY = 0x65_76_61_6C  # folded into the seed's key: no training step's key is the same


def split_of(config: ml_collections.ConfigDict, entry: ml_collections.ConfigDict) -> str:
    """The split an entry reads: its own, or the run's eval split (config.data.eval_split, 'heldout' resolved)."""
    return entry.split or splits(config)[1]


def num_examples(source: Source, split: str, wanted: int) -> int:
    """How many images of `split` an evaluation reads: `wanted`, or all of them for 0."""
    available = source.num_examples(split)
    return available if wanted == 0 else min(wanted, available)


def held_out_loss(
    config: ml_collections.ConfigDict,
    source: Source,
    split: str,
    examples: int,
    eval_step,
    params,
    clusters,
    mesh,
    stop: base.StopCheck = base.never,
) -> dict:
    """{'loss', 'bits_per_token', ..., 'examples'}: means over the first `examples` images of `split` (0: all).
    eval_step comes from steps.make_eval_step."""
    n = num_examples(source, split, examples)
    key = jax.random.fold_in(jax.random.key(config.seed), EVAL_KEY)
    totals: dict[str, float] = {}
    for i in range(math.ceil(n / config.batch_size)):
        base.check(stop)
        batch = pipeline.eval_batch(source, split, config, i, n, mesh)
        sums = jax.device_get(eval_step(params, batch, clusters, jax.random.fold_in(key, i)))
        for name, value in sums.items():
            totals[name] = totals.get(name, 0.0) + float(value)
    weight = totals.pop("weight")
    return objectives.with_bits({name: value / weight for name, value in totals.items()}) | {"examples": int(weight)}


def summary(what: str, result: dict, split: str) -> str:
    """One line: the loss in nats and bits, and the classification head's accuracy when there is one."""
    line = f"{what}: {result['loss']:.4f} nats ({result['bits_per_token']:.3f} bits/token)"
    if "accuracy" in result:
        line = (
            f"{what}: accuracy {100 * result['accuracy']:.2f}%, classification loss "
            f"{result['classification_loss']:.4f}, generative {result['generative_loss']:.4f} nats "
            f"({result['bits_per_token']:.3f} bits/token)"
        )
    return f"{line} on {result['examples']} images of {split}"


class Evaluator:
    """config.evals.<name> of kind 'loss'."""

    def __init__(self, name: str, entry: ml_collections.ConfigDict, rt: runtime.Runtime):
        self.name, self.entry, self.rt = name, entry, rt
        self.split = split_of(rt.config, entry)
        self.eval_step = steps.make_eval_step(rt.setup)

    def run(self, params, step: int, stop: base.StopCheck) -> base.Result:
        rt = self.rt
        result = held_out_loss(
            rt.config, rt.source, self.split, self.entry.examples, self.eval_step, params, rt.clusters_device,
            rt.mesh, stop,
        )  # fmt: skip
        row = {"mode": "eval", "evaluator": self.name, "step": step, **result}
        return base.Result(row, summary(f"{self.name} step {step}", result, self.split))
