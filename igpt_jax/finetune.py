"""--mode=finetune: the paper's fine-tuning, as its own resumable run in workdir/finetune/.

The workdir's newest checkpoint (or config.checkpoint_step) gets a classification head on the mean-pooled ln_f output,
zero-initialised as OpenAI's `wclf`, and the whole model trains on config.finetune.generative_weight * generative
loss + classification loss (the paper's 1:1 beat the classification loss alone) over the labelled images of
config.finetune.dataset. It is the training loop itself (train.loop) on a derived config (`run_config`): same
checkpoints, metrics, evaluation, stop requests and exact resume, in workdir/finetune/ with its own lock, config.json,
palette.npy (the pretrained one), checkpoints and metrics.jsonl. The pretrained checkpoint is only read.

The paper's protocol (section 4.5: early stopping on validation accuracy): the run trains on the train split less its
held-out end; every finetune.eval_every_steps and at the end the held-out end is scored (accuracy, classification and
generative loss) and the parameters of the best accuracy so far are kept in workdir/finetune/heldout_best/; after the
last step the test split is scored once, with those parameters, and workdir/finetune/finetune.json gives that score
next to the linear probe's best accuracy of the same checkpoint when probe.json has one. `finetune.augment='cifar'`
is the paper's CIFAR augmentation; `finetune.masks` > 1 scores a BERT model's modal prediction over that many masks.
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

from igpt_jax import evaluators, metrics, palette, runtime, steps, train
from igpt_jax.data import get_source
from igpt_jax.data.sources import HELDOUT_PERCENT
from igpt_jax.evaluators import runner
from igpt_jax.evaluators.kinds import loss
from igpt_jax.workdir import checkpoint, layout, storage

log = logging.getLogger(__name__)

FINETUNE_JSON = "finetune.json"


HELDOUT = "heldout"  # the evaluator that chooses the step; its best parameters are kept in <workdir>/heldout_best/
TEST = "test"  # the name of the one test evaluation's metrics row


def splits(pretrained: ml_collections.ConfigDict) -> tuple[str, str]:
    """(train, held-out end) of config.finetune.train_split: the data set's held-out preset (CIFAR and STL-10 10%,
    ImageNet 4%), else 10%."""
    f = pretrained.finetune
    kept = 100 - HELDOUT_PERCENT.get(f.dataset, 10)
    return f"{f.train_split}[:{kept}%]", f"{f.train_split}[{kept}%:]"


def run_config(pretrained: ml_collections.ConfigDict, num_classes: int) -> ml_collections.ConfigDict:
    """The fine-tuning run's config: the pretrained recipe (model, objective, seed, batch size) with a head of
    `num_classes`, config.finetune's data set (its train split less the held-out end), augmentation, steps and
    optimizer, and one evaluator: the held-out end's accuracy, which keeps the best step's parameters."""
    c = pretrained.copy_and_resolve_references()
    f = c.finetune
    c.model.num_classes = num_classes
    c.data.dataset = f.dataset
    c.data.train_split, heldout = splits(pretrained)
    c.data.eval_split = heldout
    c.data.augment = f.augment
    c.data.palette = ""  # the pretrained palette comes with the pretrained parameters
    c.total_steps = f.steps
    c.checkpoint_every_steps = f.checkpoint_every_steps
    c.checkpoint_step = 0
    c.optimizer.learning_rate = f.learning_rate or pretrained.optimizer.learning_rate / 10
    c.optimizer.warmup_steps = f.warmup_steps
    c.optimizer.schedule = f.schedule
    selection = evaluators.loss(
        every_steps=f.eval_every_steps, at_end=True, examples=f.heldout_examples, masks=f.masks, keep_best=True
    )
    c.evals = ml_collections.ConfigDict({HELDOUT: selection})
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
    clusters = palette.load_or_fit_palette(  # the pretrained run's palette, checked against its checkpoint
        pretrained,
        lambda: get_source(pretrained),
        pretrained_ckpt.directory.parent,
        None,
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
    """Fine-tunes the workdir's checkpoint to config.finetune.steps (resuming workdir/finetune/), then scores the
    test split once with the best held-out step's parameters; returns finetune.json's content."""
    directory = storage.path(workdir)
    pretrained, pretrained_ckpt = runtime.checkpoint_recipe(config, directory)
    try:
        labelled = pretrained.copy_and_resolve_references()  # the fine-tuning data set, for its number of classes
        labelled.data.dataset = pretrained.finetune.dataset
        ft_config = run_config(pretrained, get_source(labelled).num_classes())
        start = functools.partial(start_from_pretrained, pretrained_ckpt, pretrained)
        with runtime.for_training(ft_config, directory / layout.FINETUNE, devices, start=start) as rt:
            runner.check_data(rt, [], {"config.finetune.test_split": pretrained.finetune.test_split})
            train.loop(rt)
            test = test_once(rt, pretrained.finetune)
            result = _result(test, directory, ft_config)
    finally:
        pretrained_ckpt.close()
    if jax.process_index() == 0:
        storage.write_text(rt.directory / FINETUNE_JSON, json.dumps(result, indent=2) + "\n")
        print(summary(result), flush=True)
    return result


def test_once(rt: runtime.Runtime, f: ml_collections.ConfigDict) -> dict:
    """The test split scored with the best held-out step's parameters: once, its metrics row ({"evaluator":
    "test"}) kept; a relaunch of a finished run reads that row again."""
    best = loss.BestParams(rt.directory / f"{HELDOUT}_best")
    try:
        step, heldout_accuracy, params = best.restore(rt.setup.abstract_state["params"])
    finally:
        best.close()
    done = [r for r in metrics.read_rows(rt.directory) if r.get("evaluator") == TEST and r.get("step") == step]
    if done:
        return done[-1]
    predict = steps.make_predict_step(rt.setup) if f.masks > 1 else None
    result = loss.held_out_loss(
        rt.config, rt.source, f.test_split, f.test_examples, steps.make_eval_step(rt.setup), params,
        rt.clusters_device, rt.mesh, predict_step=predict, masks=f.masks,
    )  # fmt: skip
    row = {"mode": "eval", "evaluator": TEST, "step": step, "heldout_accuracy": heldout_accuracy, **result}
    metrics.append_row(rt.directory, row, rt.config)
    return row


def _result(test: dict, parent: epath.Path, config: ml_collections.ConfigDict) -> dict:
    """finetune.json: the test score of the step chosen on the held-out end (accuracies in percent), with the
    pretrained checkpoint's linear probe beside it when probe.json holds one for the same data set."""
    result = {
        "dataset": config.data.dataset,
        "step": test["step"],
        "heldout_split": config.data.eval_split,
        "heldout_accuracy": round(100 * test["heldout_accuracy"], 3),
        "test_split": config.finetune.test_split,
        "test_examples": test["examples"],
        "test_accuracy": round(100 * test["accuracy"], 3),
        "test_classification_loss": test["classification_loss"],
        "test_generative_loss": test["generative_loss"],
    }
    if config.finetune.masks > 1:
        result["masks"] = config.finetune.masks
    probe_json = parent / layout.record("probe")  # the default probe's
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
        f"finetune: test accuracy {result['test_accuracy']:.1f}% on {result['test_examples']} {result['dataset']} "
        f"{result['test_split']} images with step {result['step']}, the best on the held-out end "
        f"({result['heldout_accuracy']:.1f}%)"
    )
    probe = result.get("linear_probe")
    if probe:
        line += (
            f" (linear probe of checkpoint {probe['checkpoint_step']}: {probe['best_accuracy']:.1f}% on "
            f"{probe['test_examples']} images, layer {probe['best_layer']})"
        )
    return line
