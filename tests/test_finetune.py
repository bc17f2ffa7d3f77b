"""Fine-tuning: it starts from the pretrained parameters with a zero head, its loss is weighted generative +
classification on the mean-pooled ln_f output, it learns the classes, leaves the pretrained run untouched, and resumes
exactly after a stop."""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import fashion_config, read_metrics, tiny_config

from igpt_jax import finetune, objectives, palette, runtime, sharding, steps
from igpt_jax import model as model_lib
from igpt_jax.workdir import storage

ROOT = Path(__file__).resolve().parents[1]


def _config(**overrides):
    """The user's config for fine-tuning the pretrained fixture: 40 steps on Fashion-MNIST, evaluated every 20."""
    config = fashion_config(total_steps=20)
    config.finetune.dataset = "fashion_mnist"
    config.finetune.steps = 40
    config.finetune.eval_every_steps = 20
    config.finetune.checkpoint_every_steps = 20
    config.finetune.heldout_examples = 64
    config.finetune.test_examples = 80
    config.finetune.warmup_steps = 2
    config.finetune.learning_rate = 1e-2
    for key, value in overrides.items():
        config.finetune[key] = value
    return config


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    from igpt_jax import train

    workdir = tmp_path_factory.mktemp("pretrained") / "run"
    train.train_and_evaluate(fashion_config(total_steps=20), str(workdir))
    return workdir


def _rows(workdir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(workdir) if "mode" not in r}


def test_the_loss_is_weighted_generative_plus_classification_on_pooled_ln_f():
    config = tiny_config(num_classes=3)
    model = model_lib.build(config)
    model.head[...] = 0.1 * jax.random.normal(jax.random.key(0), model.head.shape)
    model.classifier[...] = jax.random.normal(jax.random.key(1), model.classifier.shape)
    tokens = jax.random.randint(jax.random.key(2), (5, 16), 0, 16)
    labels = jnp.array([0, 1, 2, 1, 0])
    h, _ = model.run_blocks(model.embed(tokens))
    pooled = model.ln_f(h).mean(axis=1)  # the ln_f output averaged over positions (OpenAI's clf_h)
    expected_ce = optax.softmax_cross_entropy_with_integer_labels(pooled @ model.classifier[...], labels)
    expected_gen = objectives.per_example(model, tokens, {}, config)["loss"]
    for weight in (1.0, 0.0, 0.5):
        config.finetune.generative_weight = weight
        m = objectives.per_example(model, tokens, {}, config, labels)
        np.testing.assert_allclose(m["classification_loss"], expected_ce, rtol=1e-5)
        np.testing.assert_allclose(m["generative_loss"], expected_gen, rtol=1e-6)
        np.testing.assert_allclose(m["loss"], weight * expected_gen + expected_ce, rtol=1e-5)
    assert set(np.asarray(m["accuracy"]).tolist()) <= {0.0, 1.0}


def test_finetuning_starts_from_the_pretrained_parameters_and_a_zero_head(pretrained):
    pre, ckpt = runtime.checkpoint_recipe(_config(), storage.path(pretrained))
    config = finetune.run_config(pre, num_classes=10)
    setup = steps.make_setup(config, sharding.make_mesh(config))
    state, clusters = finetune.start_from_pretrained(ckpt, pre, setup)
    saved = runtime.read_params(ckpt, steps.make_setup(pre, setup.mesh, train=False)).state["params"]
    ckpt.close()
    assert int(state["step"]) == 0 and saved.keys() == state["params"].keys() - {"classifier"}
    for name in saved:
        for (path, a), b in zip(
            *(jax.tree_util.tree_leaves_with_path(t[name]) for t in (saved, state["params"])), strict=True
        ):
            np.testing.assert_array_equal(
                np.asarray(a), np.asarray(b[1]), err_msg=f"{name}{jax.tree_util.keystr(path)}"
            )
    assert state["params"]["classifier"].shape == (32, 10) and not np.asarray(state["params"]["classifier"]).any()
    counts = [x for path, x in jax.tree_util.tree_leaves_with_path(state["opt_state"]) if "count" in str(path)]
    assert counts and all(int(c) == 0 for c in counts)
    np.testing.assert_array_equal(clusters, palette.load(pretrained / "palette.npy"))


def test_finetune_learns_the_classes_leaves_the_pretrained_run_alone_and_resumes_exactly(
    pretrained, tmp_path, caplog, capsys
):
    full = tmp_path / "full"
    shutil.copytree(pretrained, full)
    before = {p.relative_to(full): p.read_bytes() for p in full.rglob("*") if p.is_file()}
    with caplog.at_level(logging.INFO, logger="igpt_jax.finetune"):
        result = finetune.run(_config(), str(full))
    saved = max(int(p.name) for p in (full / "checkpoints").iterdir() if p.name.isdigit())
    assert f"fine-tuning checkpoint {full / 'checkpoints'}/{saved} with a new 10-class head" in caplog.messages
    assert capsys.readouterr().out.splitlines()[-1] == finetune.summary(result)

    rows = _rows(full / "finetune")
    assert sorted(rows) == list(range(1, 41))
    assert rows[1]["classification_loss"] == pytest.approx(math.log(10), rel=1e-4)  # the zero head: uniform
    assert rows[1]["generative_loss"] < math.log(16) - 0.2  # a fresh model's zero head would give log(16)
    assert np.mean([rows[s]["classification_loss"] for s in (38, 39, 40)]) < math.log(10) - 0.5
    heldout = [r for r in read_metrics(full / "finetune") if r.get("evaluator") == "heldout"]
    assert [r["step"] for r in heldout] == [20, 40] and heldout[-1]["examples"] == 64
    assert heldout[-1]["classification_loss"] < math.log(10) - 0.5  # on held-out images: the head generalises
    (test,) = [r for r in read_metrics(full / "finetune") if r.get("evaluator") == "test"]  # scored once
    best = max(heldout, key=lambda r: r["accuracy"])  # ties: the earlier step
    assert test["step"] == result["step"] == best["step"] and test["heldout_accuracy"] == best["accuracy"]
    assert result["test_accuracy"] == pytest.approx(100 * test["accuracy"], abs=1e-3)
    assert test["examples"] == 80 and result["test_accuracy"] > 20  # ten classes: chance is 10%
    assert (full / "finetune" / "finetune.json").exists() and (full / "finetune" / "palette.npy").exists()
    after = {p.relative_to(full): p.read_bytes() for p in full.rglob("*") if p.is_file() and "finetune" not in p.parts}
    assert after.keys() == before.keys() and all(after[k] == before[k] for k in before)  # only read

    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "finetune" / "checkpoints" / "40")  # as if the run had been killed after step 20's save
    finetune.run(_config(), str(resumed))
    again = _rows(resumed / "finetune")
    assert sorted(again) == list(range(1, 41))
    assert all(again[s]["loss"] == rows[s]["loss"] for s in range(21, 41))  # bitwise: the same float32 steps
    finetune.run(_config(), str(resumed))  # finished: nothing trains, and the test is not scored again
    assert len([r for r in read_metrics(resumed / "finetune") if r.get("evaluator") == "test"]) == 1


def test_a_test_split_that_does_not_exist_is_refused_before_fine_tuning_starts(pretrained, tmp_path):
    from igpt_jax import config_checks

    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    with pytest.raises(config_checks.ConfigError, match=r"config.finetune.test_split='tset': fashion_mnist has no"):
        finetune.run(_config(test_split="tset"), str(run))
    assert not list((run / "finetune").glob("checkpoints/*")) and not (run / "finetune" / "metrics.jsonl").exists()


def test_mode_finetune_without_a_checkpoint_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "igpt_jax.main", f"--workdir={tmp_path / 'empty'}", "--mode=finetune"]
        + ["--config=configs/fashion_mnist.py:8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"igpt: {tmp_path / 'empty'} holds no checkpoint: ")
    assert not (tmp_path / "empty").exists()


def test_a_head_is_part_of_the_parameters_only_when_asked():
    assert "classifier" not in nnx.to_pure_dict(nnx.state(model_lib.build(tiny_config()), nnx.Param))
    model = model_lib.build(tiny_config(num_classes=7))
    logits, out = model(jnp.zeros((2, 16), jnp.int32))
    assert out["class_logits"].shape == (2, 7) and logits.shape == (2, 16, 16)


def test_the_cifar_augmentation_is_a_reflect_padded_crop_back_to_size_and_a_flip():
    from igpt_jax.data import preprocess

    side = 8
    image = np.arange(side * side * 3, dtype=np.uint8).reshape(side, side, 3)  # every pixel different

    def window(top: int, left: int, flip: bool) -> np.ndarray:
        """Written out pixel by pixel: rows and columns 4 beyond the edge mirror back without repeating it."""

        def mirror(i: int) -> int:
            i -= 4
            return -i if i < 0 else 2 * (side - 1) - i if i >= side else i

        out = np.empty_like(image)
        for y in range(side):
            for x in range(side):
                source_x = left + (side - 1 - x if flip else x)
                out[y, x] = image[mirror(top + y), mirror(source_x)]
        return out

    # 162 (offset, flip) draws; mirrored edges make some of them the same picture (a flipped window at the left edge
    # is the unflipped one a column in), 128 different ones
    windows = {w.tobytes() for w in (window(t, left, f) for t in range(9) for left in range(9) for f in (0, 1))}
    seen = [preprocess.cifar_augment(image, np.random.default_rng(seed)).tobytes() for seed in range(2000)]
    assert set(seen) <= windows  # every output is one of the windows, pixel for pixel
    assert len(set(seen)) == len(windows)  # and every window is drawn


def test_training_images_are_augmented_and_evaluation_images_are_not():
    from igpt_jax.data import get_source

    plain = get_source(fashion_config(image_size=16))
    augmented = get_source(fashion_config(image_size=16, data__augment="cifar"))
    index = np.arange(8)

    def rngs():
        return [np.random.default_rng([0, i]) for i in index]

    assert not np.array_equal(plain.get("train", index, rngs()), augmented.get("train", index, rngs()))
    np.testing.assert_array_equal(plain.get("test", index, None), augmented.get("test", index, None))


def test_a_bert_fine_tune_scores_the_modal_prediction_over_its_masks():
    from igpt_jax.data import get_source
    from igpt_jax.evaluators.kinds import loss
    from igpt_jax.probe import linear

    config = fashion_config(image_size=8, batch_size=16, objective="bert", model__num_classes=10)
    mesh = sharding.make_mesh(config)
    setup = steps.make_setup(config, mesh, train=False)
    params = steps.init_params(setup, seed=1)
    params["classifier"] = jax.device_put(
        jax.random.normal(jax.random.key(2), params["classifier"].shape), params["classifier"].sharding
    )
    source = get_source(config)
    clusters = palette.fit(source.get("train", np.arange(256), None), k=16, seed=0)
    eval_step, predict_step = steps.make_eval_step(setup), steps.make_predict_step(setup)
    with jax.set_mesh(mesh):
        result = loss.held_out_loss(
            config, source, "test", 192, eval_step, params, clusters, mesh, predict_step=predict_step, masks=5
        )
        single = loss.held_out_loss(config, source, "test", 192, eval_step, params, clusters, mesh)
        key = jax.random.fold_in(jax.random.key(config.seed), loss.EVAL_KEY)
        from igpt_jax.data import pipeline

        correct, differ = 0, 0
        for i in range(12):
            batch = pipeline.eval_batch(source, "test", config, i, 192, mesh)
            k = jax.random.fold_in(key, i)
            votes = jnp.stack(
                [
                    predict_step(params, batch, clusters, m)
                    for m in [k] + [jax.random.fold_in(k, j) for j in range(1, 5)]
                ]
            )
            differ += int(jnp.sum(jnp.any(votes != votes[0], axis=0)))
            voted = linear.modal(votes, 10, jax.random.fold_in(k, linear.VOTE_KEY))
            correct += int(jnp.sum(voted == batch["labels"]))
    assert differ > 0  # the masks change some predictions
    assert result["accuracy"] == pytest.approx(correct / 192, abs=1e-6)
    assert result["accuracy_one_mask"] == pytest.approx(single["accuracy"], abs=1e-6)
    assert result["accuracy"] != pytest.approx(single["accuracy"], abs=1e-6)  # the ensemble is what is scored
    assert result["loss"] == pytest.approx(single["loss"], rel=1e-6)  # the losses stay mask 0's


def test_the_best_parameters_are_kept_by_held_out_accuracy(tmp_path):
    from igpt_jax.evaluators.kinds import loss

    best = loss.BestParams(storage.path(tmp_path) / "heldout_best")

    def params(value: float) -> dict:
        return {"w": jnp.full((3,), value)}

    assert best.offer(10, 0.50, params(1.0))
    assert not best.offer(20, 0.40, params(2.0))  # worse: the step-10 parameters stay
    assert not best.offer(25, 0.50, params(2.5))  # a tie keeps the earlier step
    assert best.offer(30, 0.60, params(3.0))
    step, accuracy, kept = best.restore({"w": jax.ShapeDtypeStruct((3,), jnp.float32)})
    assert (step, accuracy) == (30, 0.60) and np.asarray(kept["w"]).tolist() == [3.0] * 3
    best.close()
    reopened = loss.BestParams(storage.path(tmp_path) / "heldout_best")  # a relaunch knows the best so far
    assert reopened.accuracy() == 0.60 and not reopened.offer(40, 0.55, params(4.0))
    assert sorted(p.name for p in (tmp_path / "heldout_best").iterdir() if p.name.isdigit()) == ["30"]


def test_the_default_fine_tuning_learning_rate_is_a_tenth_of_pretrainings():
    """The paper's fine-tuning rate (section 3.4): the pretraining one / 10, when config.finetune leaves it 0."""
    pretrained = fashion_config(optimizer__learning_rate=0.003, finetune__learning_rate=0.0)
    assert finetune.run_config(pretrained, 10).optimizer.learning_rate == pytest.approx(0.0003)
    pretrained.finetune.learning_rate = 0.002
    assert finetune.run_config(pretrained, 10).optimizer.learning_rate == 0.002


@pytest.mark.parametrize(
    ("dataset", "kept"), [("cifar10", 90), ("stl10", 90), ("imagenet2012", 96), ("fashion_mnist", 90)]
)
def test_the_run_trains_on_train_less_the_papers_held_out_share(dataset, kept):
    """The paper holds out 10% of CIFAR's and STL-10's train split and 4% of ImageNet's; other sets 10%."""
    pretrained = fashion_config(finetune__dataset=dataset, finetune__train_split="train")
    assert finetune.splits(pretrained) == (f"train[:{kept}%]", f"train[{kept}%:]")


def test_the_run_config_is_the_pretrained_recipe_with_the_finetune_settings():
    pretrained = fashion_config(seed=5, data__palette="/somewhere/palette.npy", data__augment="none")
    pretrained.checkpoint_step, pretrained.checkpoint_every_steps = 20, 10
    f = pretrained.finetune
    f.dataset, f.train_split, f.augment, f.steps, f.checkpoint_every_steps = "cifar10", "train", "cifar", 300, 50
    f.warmup_steps, f.schedule, f.eval_every_steps, f.heldout_examples, f.masks = 7, "linear", 30, 200, 5
    c = finetune.run_config(pretrained, 10)
    assert (c.seed, c.model.embed_dim, c.objective, c.batch_size) == (5, 32, "ar", 16)  # the pretrained recipe
    assert (c.model.num_classes, c.data.dataset, c.data.augment) == (10, "cifar10", "cifar")
    assert (c.data.train_split, c.data.eval_split) == ("train[:90%]", "train[90%:]")
    assert c.data.palette == ""  # the pretrained palette comes with the parameters, not from the user's path
    assert (c.total_steps, c.checkpoint_every_steps, c.checkpoint_step) == (300, 50, 0)
    assert (c.optimizer.warmup_steps, c.optimizer.schedule) == (7, "linear")
    assert list(c.evals) == [finetune.HELDOUT]
    heldout = c.evals[finetune.HELDOUT]
    assert (heldout.kind, heldout.every_steps, heldout.at_end) == ("loss", 30, True)
    assert (heldout.examples, heldout.masks, heldout.keep_best) == (200, 5, True)
    assert pretrained.model.num_classes == 0 and pretrained.data.dataset == "fashion_mnist"  # left as it was


def _test_row(**extra) -> dict:
    row = {"step": 40, "heldout_accuracy": 0.61234, "accuracy": 0.5875, "examples": 80}
    return row | {"classification_loss": 1.25, "generative_loss": 2.5} | extra


def test_finetune_json_gives_the_test_score_beside_the_same_data_sets_linear_probe(tmp_path):
    config = finetune.run_config(fashion_config(finetune__dataset="fashion_mnist", finetune__masks=3), 10)
    probe = {"dataset": "fashion_mnist", "checkpoint_step": 20, "best_accuracy": 71.25, "best_layer": 1}
    (tmp_path / "probe.json").write_text(json.dumps(probe | {"test_examples": 2000, "layers": {}}))
    result = finetune._result(_test_row(), storage.path(tmp_path), config)
    assert result == {
        "dataset": "fashion_mnist",
        "step": 40,
        "heldout_split": "train[90%:]",
        "heldout_accuracy": 61.234,
        "test_split": "test",
        "test_examples": 80,
        "test_accuracy": 58.75,
        "test_classification_loss": 1.25,
        "test_generative_loss": 2.5,
        "masks": 3,
        "linear_probe": {"checkpoint_step": 20, "best_accuracy": 71.25, "best_layer": 1, "test_examples": 2000},
    }
    assert finetune.summary(result) == (
        "finetune: test accuracy 58.8% on 80 fashion_mnist test images with step 40, the best on the held-out end "
        "(61.2%) (linear probe of checkpoint 20: 71.2% on 2000 images, layer 1)"
    )
    (tmp_path / "probe.json").write_text(json.dumps(probe | {"dataset": "cifar10", "test_examples": 2000}))
    single = finetune.run_config(fashion_config(finetune__dataset="fashion_mnist"), 10)
    other = finetune._result(_test_row(), storage.path(tmp_path), single)
    assert "linear_probe" not in other and "masks" not in other  # another data set's probe; one mask
    assert finetune.summary(other).endswith("the best on the held-out end (61.2%)")
