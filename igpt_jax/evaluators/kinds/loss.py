"""Held-out loss: the first `examples` images of a split (0: all of it), each once, in a fixed order and with fixed
randomness, so numbers from different checkpoints, runs and process counts compare.

The split is read in global batches of config.batch_size; the last one is padded and its padding weighs nothing, so
the mean is over exactly the chosen images. Batch i draws its randomness (BERT's masks) from a key folded from the
seed and i alone, never from the training step: every evaluation of a run masks the same positions. A model with a
classification head (fine-tuning) adds the head's accuracy and both parts of its loss.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections

from igpt_jax import objectives, palette, runtime, steps
from igpt_jax.data import pipeline, sources, splits
from igpt_jax.data.sources import Source
from igpt_jax.evaluators import base
from igpt_jax.probe import linear

EVAL_KEY = 0x65_76_61_6C  # folded into the seed's key: no training step's key is the same


def split_of(config: ml_collections.ConfigDict, entry: ml_collections.ConfigDict) -> str:
    """The split an entry reads: its own, or the run's eval split (config.data.eval_split, 'heldout' resolved)."""
    return entry.split or splits(config)[1]


def data_config(config: ml_collections.ConfigDict, entry: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config an entry's data is read under: the run's, with the entry's own data set when it names one."""
    if not entry.dataset or entry.dataset == config.data.dataset:
        return config  # the run's own source serves it
    return sources.with_dataset(config, entry.dataset)


def palette_problem(where: str, source: Source, colours, clusters) -> str | None:
    """A line when a data set of tokens carries the palette they index (`colours`) and the run's palette is another:
    the loss would score the model's colours against other colours."""
    if clusters is None or palette.fingerprint(colours) == palette.fingerprint(clusters):
        return None
    return (
        f"{where}: its tokens index the {len(colours)} colours of {source.palette_file}, and this run's "
        f"palette ({len(clusters)} colours) is another, so its loss would compare other colours; evaluate a model "
        "whose palette is that file (igpt-convert --clusters=...)"
    )


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
    *,
    predict_step=None,
    masks: int = 1,
) -> dict:
    """{'loss', 'bits_per_token', ..., 'examples'}: means over the first `examples` images of `split` (0: all).
    eval_step comes from steps.make_eval_step. With `masks` > 1 and a predict_step (steps.make_predict_step) a
    classifying BERT model's 'accuracy' is the paper's ensemble: the modal prediction over that many masks per image
    (mask 0 is the one the losses use; its accuracy alone stays as 'accuracy_one_mask')."""
    n = num_examples(source, split, examples)
    key = jax.random.fold_in(jax.random.key(config.seed), EVAL_KEY)
    totals: dict[str, float] = {}
    for i in range(math.ceil(n / config.batch_size)):
        base.check(stop)
        batch = pipeline.eval_batch(source, split, config, i, n, mesh)
        batch_key = jax.random.fold_in(key, i)
        sums = dict(jax.device_get(eval_step(params, batch, clusters, batch_key)))
        if masks > 1 and predict_step is not None:
            keys = [batch_key] + [jax.random.fold_in(batch_key, m) for m in range(1, masks)]
            votes = jnp.stack([predict_step(params, batch, clusters, k) for k in keys])
            voted = linear.modal(votes, config.model.num_classes, jax.random.fold_in(batch_key, linear.VOTE_KEY))
            sums["accuracy_one_mask"] = sums["accuracy"]
            sums["accuracy"] = jax.device_get(jnp.sum((voted == batch["labels"]) * batch["weights"]))
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
    """config.evals.<name> of kind 'loss'. With `keep_best` (fine-tuning's selection on the held-out end), the
    parameters of the step with the best accuracy so far are kept in `<name>_best/` (BestParams)."""

    def __init__(self, name: str, entry: ml_collections.ConfigDict, rt: runtime.Runtime):
        self.name, self.entry, self.rt = name, entry, rt
        self.config = data_config(rt.config, entry)
        self.split = split_of(self.config, entry)
        self.eval_step = steps.make_eval_step(rt.setup)
        classifies = bool(rt.config.model.num_classes)
        self.predict_step = steps.make_predict_step(rt.setup) if classifies and entry.masks > 1 else None
        self.best = BestParams(rt.directory / f"{name}_best") if entry.keep_best else None

    @functools.cached_property
    def source(self) -> Source:
        return self.rt.source if self.config is self.rt.config else sources.get_source(self.config)

    def data_problems(self) -> list[str]:
        key = f"config.evals.{self.name}.split" if self.entry.split else "config.data.eval_split"
        where = f"config.evals.{self.name}.dataset={self.entry.dataset!r}" if self.entry.dataset else (
            f"config.data.dataset={self.config.data.dataset!r}"
        )  # fmt: skip
        problems = [sources.split_problem(self.source, key, self.split)]
        colours = palette.tokens_palette(self.source)  # only a data set of tokens that carries its palette has one
        if problems[0] is None and colours is not None:  # the run's palette is read (or fitted) for that one only
            problems.append(palette_problem(where, self.source, colours, self.rt.clusters))
        return [problem for problem in problems if problem]

    def run(self, params, step: int, stop: base.StopCheck) -> base.Result:
        rt = self.rt
        result = held_out_loss(
            self.config, self.source, self.split, self.entry.examples, self.eval_step, params, rt.clusters_device,
            rt.mesh, stop, predict_step=self.predict_step, masks=self.entry.masks,
        )  # fmt: skip
        if self.best is not None and "accuracy" in result:
            self.best.offer(step, result["accuracy"], params)
        row = {"mode": "eval", "evaluator": self.name, "step": step, **result}
        split = f"{self.entry.dataset} {self.split}" if self.entry.dataset else self.split
        return base.Result(row, summary(f"{self.name} step {step}", result, split))


class BestParams:
    """The parameters of the best step so far by accuracy, kept whole in one Orbax step folder under `directory`
    (the previous best is deleted only once the new one is saved), with the accuracy in Orbax's metrics."""

    def __init__(self, directory):
        import orbax.checkpoint as ocp

        options = ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda m: m["accuracy"], best_mode="max", enable_async_checkpointing=False
        )
        self.manager = ocp.CheckpointManager(directory, options=options)

    def accuracy(self) -> float | None:
        step = self.manager.best_step()
        return None if step is None else float(self.manager.metrics(step)["accuracy"])

    def offer(self, step: int, accuracy: float, params) -> bool:
        """Keeps `params` if `accuracy` beats the kept one (ties keep the earlier step); True if it did."""
        import orbax.checkpoint as ocp

        kept = self.accuracy()
        if kept is not None and accuracy <= kept:
            return False
        self.manager.save(step, args=ocp.args.StandardSave(params), metrics={"accuracy": accuracy}, force=True)
        self.manager.wait_until_finished()
        return True

    def restore(self, abstract_params) -> tuple[int, float, dict]:
        """(step, accuracy, parameters placed like `abstract_params`) of the best step."""
        import orbax.checkpoint as ocp

        step = self.manager.best_step()
        if step is None:
            raise FileNotFoundError(f"{self.manager.directory} holds no parameters: no evaluation has run")
        params = self.manager.restore(step, args=ocp.args.StandardRestore(abstract_params))
        return step, self.accuracy(), params

    def close(self) -> None:
        self.manager.close()
