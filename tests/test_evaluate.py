"""Held-out loss: exactly the chosen images (a padded last batch weighs nothing), each batch its own randomness,
and the paper's held-out splits kept out of training."""

from __future__ import annotations

import json

import hf_reference
import jax
import numpy as np
import optax
import pytest
from fake_ilsvrc import make_ilsvrc_manual_dir
from flax import nnx
from helpers import TFDS_TEST_DIR, cli_flags, fashion_config, read_metrics, run_main
from tolerances import float32_chain, transformer_terms

from igpt_jax import config_checks, palette, sampling, sharding, steps
from igpt_jax.data import get_source, splits
from igpt_jax.evaluators.kinds import loss


def _setup_with_random_head(config):
    mesh = sharding.make_mesh(config)
    setup = steps.make_setup(config, mesh)
    params = steps.init_state(setup)["params"]
    head = params["head"]  # zero-initialised: every image would score log(vocab) exactly
    params["head"] = jax.device_put(0.5 * jax.random.normal(jax.random.key(3), head.shape), head.sharding)
    return setup, mesh, params


def test_the_mean_is_over_exactly_the_chosen_images():
    config = fashion_config(image_size=8, batch_size=16)
    setup, mesh, params = _setup_with_random_head(config)
    source = get_source(config)
    clusters = palette.fit(source.get("train", np.arange(256), None), k=16, seed=0)
    eval_step = steps.make_eval_step(setup)
    with jax.set_mesh(mesh):  # 50 images: 4 batches, the last one 2/16 real
        result = loss.held_out_loss(config, source, "test", 50, eval_step, params, clusters, mesh)
    assert result["examples"] == 50

    images = source.get(config.data.eval_split, np.arange(50), None)
    tokens = palette.quantize(images, clusters)
    model = nnx.merge(setup.graphdef, nnx.State(jax.device_get(params)))
    per_image = optax.softmax_cross_entropy_with_integer_labels(model(tokens)[0], tokens).mean(axis=1)
    assert result["loss"] == pytest.approx(float(per_image.mean()), rel=1e-5)
    assert result["loss"] != pytest.approx(float(per_image[:48].mean()), rel=1e-5)  # the images differ enough


class _OneImageSource:
    """Every index is the same token image: batches can differ only by their randomness."""

    kind = "tokens"

    def __init__(self, config):
        self.tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, config.model.image_size**2)

    def num_examples(self, split: str) -> int:
        return 64

    def get(self, split, indices, rngs=None):
        return np.stack([self.tokens] * len(indices)).astype(np.int32)


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_each_batch_draws_its_own_randomness(objective):
    config = fashion_config(image_size=8, batch_size=16, objective=objective)
    setup, mesh, params = _setup_with_random_head(config)
    eval_step = steps.make_eval_step(setup)
    losses = []

    def recording_step(*args):
        sums = eval_step(*args)
        losses.append(float(sums["loss"]))
        return sums

    loss.held_out_loss(config, _OneImageSource(config), "test", 64, recording_step, params, None, mesh)
    assert len(losses) == 4
    if objective == "ar":  # no randomness: identical batches give identical sums
        assert len(set(losses)) == 1
    else:  # BERT: other masks in every batch
        assert len(set(losses)) == 4, losses


def test_heldout_presets_are_the_papers():
    def resolved(dataset):
        return splits(fashion_config(data__dataset=dataset, data__eval_split="heldout"))

    assert resolved("imagenet2012") == ("train[:96%]", "train[96%:]")
    assert resolved("downsampled_imagenet/64x64") == ("train[:96%]", "train[96%:]")
    assert resolved("cifar10") == ("train[:90%]", "train[90%:]")
    assert resolved("stl10") == ("train[:90%]", "train[90%:]")
    assert splits(fashion_config()) == ("train", "test")  # a named split is used as it is
    with pytest.raises(config_checks.ConfigError, match=r"eval_split='heldout' has no preset for .*'fashion_mnist'"):
        config_checks.check(fashion_config(data__eval_split="heldout"))


def test_the_heldout_images_are_kept_out_of_training(tmp_path):
    make_ilsvrc_manual_dir(tmp_path / "manual")
    config = fashion_config(image_size=8, data__dataset="imagenet2012", data__eval_split="heldout")
    config.data.manual_dir, config.data.data_dir = str(tmp_path / "manual"), str(tmp_path / "tfds")
    source = get_source(config)
    train_split, eval_split = splits(config)
    n_train, n_eval = source.num_examples(train_split), source.num_examples(eval_split)
    assert n_train + n_eval == source.num_examples("train") and n_eval >= 1
    held_out = source.get(eval_split, np.arange(n_eval), None)
    trained = source.get(train_split, np.arange(n_train), None)
    assert not any(np.array_equal(h, t) for h in held_out for t in trained)


# --- --mode=eval


@pytest.mark.slow  # 25 s: a run, then the mode in its own process
def test_mode_eval_gives_hugging_faces_loss_for_the_checkpoints_recipe(tmp_path):
    """--mode=eval on a trained checkpoint, the command line naming another model: the loss is Hugging Face's own,
    in float64, for the exported checkpoint on the same 64 held-out images."""
    workdir = tmp_path / "run"
    flags = cli_flags(image_size=8, embed_dim=32, total_steps=10, eval_every=10, checkpoint_every=10, warmup=3)
    trained = run_main(f"--workdir={workdir}", *flags)
    assert trained.returncode == 0, trained.stderr[-3000:]

    # the command line names the default model (4 layers of 128): the checkpoint's own recipe is used
    evaluated = run_main(
        f"--workdir={workdir}",
        "--mode=eval",
        "--config=configs/fashion_mnist.py:8",
        "--config.evals.eval.examples=64",
        f"--config.data.data_dir={TFDS_TEST_DIR}",
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "using checkpoint 10's recipe: model.embed_dim 128 -> 32" in evaluated.stderr
    row = [r for r in read_metrics(workdir) if r.get("mode") == "eval"][-1]
    assert (row["step"], row["examples"]) == (10, 64)
    assert f"eval step 10: {row['loss']:.4f} nats" in evaluated.stdout

    recipe = fashion_config(image_size=8)  # the run's data; the images are quantised with its saved palette
    tokens = sampling.held_out_tokens(recipe, get_source(recipe), np.load(workdir / "palette.npy"), 64)
    reference, scale = hf_reference.loss(hf_reference.export(workdir, tmp_path / "hf"), tokens)
    model = json.loads((workdir / "config.json").read_text())["model"]
    width, heads = model["embed_dim"], model["num_heads"]
    positions = 64
    terms = transformer_terms(layers=model["num_layers"], width=width, head_dim=width // heads, positions=positions)
    terms += model["vocab_size"] + 64 * positions  # the log-softmax's sum, then the mean over the images' tokens
    assert abs(row["loss"] - reference) <= float32_chain(terms, scale), (row["loss"], reference)


def test_mode_eval_without_a_checkpoint_is_one_line(tmp_path):
    result = run_main(f"--workdir={tmp_path / 'empty'}", "--mode=eval", "--config=configs/fashion_mnist.py:8")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"igpt: {tmp_path / 'empty'} holds no checkpoint: ")
    assert not (tmp_path / "empty").exists()  # a mistyped workdir is not created
