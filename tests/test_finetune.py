"""Fine-tuning: it starts from the pretrained parameters with a zero head, its loss is weighted generative +
classification on the mean-pooled ln_f output, it learns the classes, leaves the pretrained run untouched, and resumes
exactly after a stop."""

from __future__ import annotations

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

from igpt_jax import finetune, objectives, palette, runtime, sharding, steps, storage
from igpt_jax import model as model_lib

ROOT = Path(__file__).resolve().parents[1]


def _config(**overrides):
    """The user's config for fine-tuning the pretrained fixture: 40 steps on Fashion-MNIST, evaluated every 20."""
    config = fashion_config(total_steps=20)
    config.finetune.dataset = "fashion_mnist"
    config.finetune.steps = 40
    config.finetune.eval_every_steps = 20
    config.finetune.checkpoint_every_steps = 20
    config.finetune.test_examples = 64
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


def test_finetune_learns_the_classes_leaves_the_pretrained_run_alone_and_resumes_exactly(pretrained, tmp_path):
    full = tmp_path / "full"
    shutil.copytree(pretrained, full)
    before = {p.relative_to(full): p.read_bytes() for p in full.rglob("*") if p.is_file()}
    result = finetune.run(_config(), str(full))

    rows = _rows(full / "finetune")
    assert sorted(rows) == list(range(1, 41))
    assert rows[1]["classification_loss"] == pytest.approx(math.log(10), rel=1e-4)  # the zero head: uniform
    assert rows[1]["generative_loss"] < math.log(16) - 0.2  # a fresh model's zero head would give log(16)
    assert np.mean([rows[s]["classification_loss"] for s in (38, 39, 40)]) < math.log(10) - 0.5
    evals = [r for r in read_metrics(full / "finetune") if r.get("mode") == "eval"]
    assert [r["step"] for r in evals] == [20, 40] and evals[-1]["examples"] == 64
    assert result["test_accuracy"] == pytest.approx(100 * evals[-1]["accuracy"], abs=1e-3)
    assert evals[-1]["classification_loss"] < math.log(10) - 0.5  # on test images: the head generalises
    assert result["test_accuracy"] > 20  # ten classes: chance is 10%
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
