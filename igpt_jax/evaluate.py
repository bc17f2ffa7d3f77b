"""Held-out loss: the first `config.eval_examples` images of the eval split (0: all of it), each once, in a fixed order
and with fixed randomness, so numbers from different checkpoints, runs and process counts compare.

The split is read in global batches of config.batch_size; the last one is padded and its padding weighs nothing, so
the mean is over exactly the chosen images. Batch i draws its randomness (BERT's masks) from a key folded from the
seed and i alone, never from the training step: every evaluation of a run masks the same positions.
"""

from __future__ import annotations

import math

import jax
import ml_collections

from igpt_jax import objectives
from igpt_jax.data import pipeline, splits
from igpt_jax.data.sources import Source

EVAL_KEY = 0x65_76_61_6C  # folded into the seed's key: no training step's key is the same


def num_examples(config: ml_collections.ConfigDict, source: Source) -> int:
    """How many images of the eval split an evaluation reads."""
    available = source.num_examples(splits(config)[1])
    return available if config.eval_examples == 0 else min(config.eval_examples, available)


def held_out_loss(config: ml_collections.ConfigDict, source: Source, eval_step, params, clusters, mesh) -> dict:
    """{'loss', 'bits_per_token', ..., 'examples'}: means over the evaluated images. eval_step comes from
    steps.make_eval_step."""
    split = splits(config)[1]
    n = num_examples(config, source)
    key = jax.random.fold_in(jax.random.key(config.seed), EVAL_KEY)
    totals: dict[str, float] = {}
    for i in range(math.ceil(n / config.batch_size)):
        batch = pipeline.eval_batch(source, split, config, i, n, mesh)
        sums = jax.device_get(eval_step(params, batch, clusters, jax.random.fold_in(key, i)))
        for name, value in sums.items():
            totals[name] = totals.get(name, 0.0) + float(value)
    weight = totals.pop("weight")
    return objectives.with_bits({name: value / weight for name, value in totals.items()}) | {"examples": int(weight)}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """--mode=eval: the held-out loss of the newest checkpoint (or config.checkpoint_step), printed and appended to
    metrics.jsonl as {"mode": "eval", "step", "loss", "bits_per_token", "examples", ...}."""
    from igpt_jax import metrics, runtime, steps

    with runtime.for_checkpoint(config, workdir) as rt:
        result = held_out_loss(
            rt.config, rt.source, steps.make_eval_step(rt.setup), rt.params, rt.clusters_device, rt.mesh
        )
        record = {"mode": "eval", "step": rt.step, **result}
        metrics.append_row(rt.directory, record)
        if jax.process_index() == 0:
            print(summary(f"eval checkpoint {rt.step}", result, splits(rt.config)[1]), flush=True)
        return record


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
