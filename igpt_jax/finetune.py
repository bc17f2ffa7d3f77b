"""--mode=finetune: the paper's fine-tuning, as its own resumable run in workdir/finetune/.

The workdir's newest checkpoint (or config.checkpoint_step) gets a classification head on the mean-pooled ln_f output,
zero-initialised as OpenAI's `wclf`, and the whole model trains on config.finetune.generative_weight * generative
loss + classification loss (the paper's 1:1 beat the classification loss alone) over the labelled images of
config.finetune.dataset. It is the training loop itself (train.loop) on a derived config (`run_config`): same
checkpoints, metrics, evaluation, stop requests and exact resume, in workdir/finetune/ with its own lock, config.json,
palette.npy (the pretrained one), checkpoints and metrics.jsonl. The pretrained checkpoint is only read.

Each evaluation adds the head's test accuracy to the held-out loss; the last one is written to
workdir/finetune/finetune.json next to the linear probe's best accuracy of the same checkpoint when probe.json has it.
"""

from __future__ import annotations

import functools
import json
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from igpt_jax import checkpoint, evaluators, metrics, runtime, steps, storage, train
from igpt_jax.data import get_source

log = logging.getLogger(__name__)

FINETUNE_DIR = "finetune"
FINETUNE_JSON = "finetune.json"


def run_config(pretrained: ml_collections.ConfigDict, num_classes: int) -> ml_collections.ConfigDict:
    """The fine-tuning run's config: the pretrained recipe (model, objective, seed, batch size) with a head of
    `num_classes`, config.finetune's data set, steps and optimizer, and the test split's loss and accuracy as its only
    evaluator."""
    c = pretrained.copy_and_resolve_references()
    f = c.finetune
    c.model.num_classes = num_classes
    c.data.dataset = f.dataset
    c.data.train_split = f.train_split
    c.data.eval_split = f.test_split
    c.data.palette = ""  # the pretrained palette comes with the pretrained parameters
    c.total_steps = f.steps
    c.checkpoint_every_steps = f.checkpoint_every_steps
    c.checkpoint_step = 0
    c.optimizer.learning_rate = f.learning_rate or pretrained.optimizer.learning_rate / 10
    c.optimizer.warmup_steps = f.warmup_steps
    c.optimizer.schedule = f.schedule
    # one evaluator: the head's accuracy (and the losses) on the test split
    c.evals = ml_collections.ConfigDict(
        {"eval": evaluators.loss(every_steps=f.eval_every_steps, at_end=True, examples=f.test_examples)}
    )
    return c


def start_from_pretrained(
    pretrained_ckpt: checkpoint.Checkpointer, pretrained: ml_collections.ConfigDict, setup: steps.Setup
) -> tuple[steps.State, np.ndarray | None]:
    """runtime.StartFn for a fine-tuning run without checkpoints: the pretrained parameters, a zero head, step 0 and
    a new optimizer state; the pretrained run's palette."""
    pretrained_setup = steps.make_setup(pretrained, setup.mesh, train=False)
    restored = runtime.read_params(pretrained_ckpt, pretrained_setup)
    head_sharding = setup.state_shardings["params"]["classifier"]
    head = setup.abstract_state["params"]["classifier"]
    params = dict(restored.state["params"])
    params["classifier"] = jax.jit(lambda: jnp.zeros(head.shape, head.dtype), out_shardings=head_sharding)()
    state = steps.with_fresh_optimizer(setup, jnp.zeros((), jnp.int32), params)
    clusters = runtime.load_or_fit_palette(  # the pretrained run's palette, checked against its checkpoint
        pretrained,
        lambda: get_source(pretrained),
        pretrained_ckpt.directory.parent,
        restored.palette,
        restored.palette_fingerprint,
        write=False,
    )
    log.info(
        "fine-tuning checkpoint %s/%d with a new %d-class head",
        pretrained_ckpt.directory,
        restored.step,
        head.shape[-1],
    )
    return state, clusters


def run(config: ml_collections.ConfigDict, workdir: str, *, devices: list[jax.Device] | None = None) -> dict:
    """Fine-tunes the workdir's checkpoint to config.finetune.steps (resuming workdir/finetune/); returns
    finetune.json's content."""
    directory = storage.path(workdir)
    pretrained, pretrained_ckpt = runtime.checkpoint_recipe(config, directory)
    try:
        labelled = pretrained.copy_and_resolve_references()  # the fine-tuning data set, for its number of classes
        labelled.data.dataset = pretrained.finetune.dataset
        ft_config = run_config(pretrained, get_source(labelled).num_classes())
        start = functools.partial(start_from_pretrained, pretrained_ckpt, pretrained)
        with runtime.for_training(ft_config, directory / FINETUNE_DIR, devices, start=start) as rt:
            train.loop(rt)
            result = _result(rt.directory, directory, ft_config)
    finally:
        pretrained_ckpt.close()
    if result and jax.process_index() == 0:
        storage.write_text(rt.directory / FINETUNE_JSON, json.dumps(result, indent=2) + "\n")
        print(summary(result), flush=True)
    return result


def _result(finetune_dir: epath.Path, parent: epath.Path, config: ml_collections.ConfigDict) -> dict:
    """finetune.json: the last evaluation of the run (test accuracy in percent), with the pretrained checkpoint's
    linear probe beside it when probe.json holds one for the same data set."""
    evals = [row for row in metrics.read_rows(finetune_dir) if row.get("mode") == "eval" and "accuracy" in row]
    if not evals:
        return {}
    last = evals[-1]
    result = {
        "dataset": config.data.dataset,
        "step": last["step"],
        "test_split": config.data.eval_split,
        "test_examples": last["examples"],
        "test_accuracy": round(100 * last["accuracy"], 3),
        "test_classification_loss": last["classification_loss"],
        "test_generative_loss": last["generative_loss"],
    }
    probe_json = parent / "probe.json"
    if probe_json.exists():
        probe = json.loads(probe_json.read_text())
        if probe.get("dataset") == config.data.dataset:
            result["linear_probe"] = {
                "checkpoint_step": probe["checkpoint_step"],
                "best_accuracy": probe["best_accuracy"],
                "best_layer": probe["best_layer"],
                "test_examples": probe["test_examples"],
            }
    return result


def summary(result: dict) -> str:
    line = (
        f"finetune step {result['step']}: test accuracy {result['test_accuracy']:.1f}% on "
        f"{result['test_examples']} {result['dataset']} {result['test_split']} images"
    )
    probe = result.get("linear_probe")
    if probe:
        line += (
            f" (linear probe of checkpoint {probe['checkpoint_step']}: {probe['best_accuracy']:.1f}% on "
            f"{probe['test_examples']} images, layer {probe['best_layer']})"
        )
    return line
