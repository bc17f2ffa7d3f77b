"""Training on 8 fake devices: meshes, state sharding, microbatching, resume on fewer devices, bad checkpoints, NaNs."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil

import jax
import numpy as np
import pytest
from helpers import fashion_config, read_metrics

from igpt_jax import sharding, steps, train
from igpt_jax.configs import igpt_l
from igpt_jax.data import get_source, order, pipeline
from igpt_jax.workdir import checkpoint, storage


def _train_losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "mode" not in r}


@pytest.mark.parametrize(
    "ici",
    [
        {"data": 2, "fsdp": 2, "tensor": 2},  # every axis at once; each alone in the slow run (20 s each)
        pytest.param({"data": 8, "fsdp": 1, "tensor": 1}, marks=pytest.mark.slow),
        pytest.param({"data": 2, "fsdp": 4, "tensor": 1}, marks=pytest.mark.slow),
    ],
)
def test_meshes_train_and_loss_falls_on_fashion_mnist(tmp_path, ici):
    config = fashion_config(total_steps=30, mesh__ici=ici)
    train.train_and_evaluate(config, str(tmp_path))
    losses = _train_losses(tmp_path)
    assert sorted(losses) == list(range(1, 31))
    first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in (28, 29, 30)])
    assert first == pytest.approx(math.log(16), rel=0.02)  # zero-initialised head: uniform over 16 colours
    assert last < first - 0.5, (first, last)
    evals = [r for r in read_metrics(tmp_path) if r.get("mode") == "eval"]
    assert evals and evals[-1]["step"] == 30 and evals[-1]["loss"] < first - 0.5
    for key in ("step", "loss", "tokens_per_sec", "mfu", "seconds", "bits_per_token"):
        assert key in read_metrics(tmp_path)[0]
    assert os.path.exists(tmp_path / "palette.npy") and os.path.exists(tmp_path / "config.json")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "20", "30"]
    assert os.listdir(tmp_path / "tensorboard")


def test_igpt_l_state_is_evenly_sharded_over_fsdp8():
    config = igpt_l.get_config()
    config.mesh.ici = {"data": 1, "fsdp": 8, "tensor": 1}
    config.batch_size = 8
    setup = steps.make_setup(config, sharding.make_mesh(config))
    leaves = jax.tree.leaves(setup.abstract_state)
    total = sum(x.size * x.dtype.itemsize for x in leaves)
    per_device = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves)
    assert total / 1e9 == pytest.approx(3 * 4 * 1362.25e6 / 1e9, rel=1e-3)  # params + 2 Adam moments, fp32
    assert per_device == pytest.approx(total / 8, rel=0.02)


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_microbatches_give_the_same_gradients(objective):
    """BERT too: the batch's masks are drawn once, so microbatching changes memory, not the masks."""
    results = []
    for k in (1, 4):
        config = fashion_config(objective=objective, microbatches=k, mesh__ici={"data": 2, "fsdp": 2, "tensor": 1})
        mesh = sharding.make_mesh(config, jax.devices()[:4])
        setup = steps.make_setup(config, mesh)
        params = steps.init_state(setup)["params"]
        head = params["head"]  # zero-initialised (OpenAI): it would zero every gradient but its own
        params["head"] = jax.device_put(0.1 * jax.random.normal(jax.random.key(2), head.shape), head.sharding)
        tokens = jax.random.randint(jax.random.key(0), (16, 64), 0, 16)
        with jax.set_mesh(mesh):
            grads, metrics = jax.jit(steps.make_grad_fn(setup))(params, tokens, jax.random.key(1))
        results.append((jax.device_get(grads), float(metrics["loss"])))
    (g1, l1), (g4, l4) = results
    assert l1 == pytest.approx(l4, rel=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g4), strict=True):
        unused = objective == "bert" and jax.tree_util.keystr(path) == "['sos']"  # BERT has no SOS
        assert unused or np.abs(a).max() > 0, path
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max(), path


def test_save_on_8_devices_resume_on_4(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    config = fashion_config(total_steps=12, mesh__ici={"data": 2, "fsdp": 4, "tensor": 1})
    train.train_and_evaluate(config, str(full))
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "12")  # as if the 8-device run had stopped after step 10
    config4 = fashion_config(total_steps=12, mesh__ici={"data": 2, "fsdp": -1, "tensor": 1})
    train.train_and_evaluate(config4, str(resumed), devices=jax.devices()[:4])
    records = [r for r in read_metrics(resumed) if "mode" not in r]
    assert [r["step"] for r in records] == list(range(1, 13))  # each step once: the resumed run rewrote 11 and 12
    superseded = [json.loads(line) for line in (resumed / "metrics.superseded.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in superseded if "mode" not in r) == [11, 12]  # the 8-device rows, set aside
    after, expected = _train_losses(resumed), _train_losses(full)
    assert abs(after[11] - expected[11]) < 1e-5 and abs(after[12] - expected[12]) < 1e-5


def test_truncated_latest_checkpoint_is_skipped(tmp_path, caplog):
    config = fashion_config(total_steps=20)
    train.train_and_evaluate(config, str(tmp_path))
    expected = _train_losses(tmp_path)
    state_dir = tmp_path / "checkpoints" / "20" / "state"
    # Truncate the array data (OCDBT keeps it in files under d/ folders; which of them the manifest references
    # depends on whether per-process files were merged, so cut them all).
    data_files = [os.path.join(d, f) for d, _, fs in os.walk(state_dir) for f in fs if os.path.basename(d) == "d"]
    assert data_files
    for path in data_files:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    with caplog.at_level(logging.INFO):
        train.train_and_evaluate(config, str(tmp_path))
    warning = [r.getMessage() for r in caplog.records if "is broken" in r.getMessage()]
    assert warning and str(tmp_path / "checkpoints" / "20") in warning[0]
    assert "resumed from" in caplog.text and f"{tmp_path / 'checkpoints'}/10" in caplog.text
    assert [r["step"] for r in read_metrics(tmp_path) if "mode" not in r] == list(range(1, 21))  # each step once
    assert _train_losses(tmp_path)[20] == expected[20]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "20"]
    assert len(os.listdir(tmp_path / "unreadable_checkpoints")) == 1


def _saved(workdir, config):
    ckpt = checkpoint.Checkpointer(storage.path(workdir), config)
    steps_saved = sorted(ckpt.manager.all_steps())
    restored = ckpt.restore_latest(steps.make_setup(config, sharding.make_mesh(config)).abstract_state)
    ckpt.close()
    return steps_saved, restored


def test_a_non_finite_loss_stops_the_run_before_the_bad_state_is_saved(tmp_path):
    # lr 1e38 (finite in float32): the first real update throws the parameters to ~1e38; a later loss overflows
    config = fashion_config(total_steps=30, optimizer__learning_rate=1e38, optimizer__warmup_steps=1)
    config.checkpoint_every_steps = 1
    diverged = r"(loss is (nan|inf|-inf)|the gradient norm is inf .*|loss is \S+, above \S+ .*: diverged)"
    with pytest.raises(FloatingPointError, match=rf"{diverged} at step (\d+): stopping") as error:
        train.train_and_evaluate(config, str(tmp_path))
    failed = int(error.value.args[0].split(" at step ")[1].split(":")[0])
    saved, restored = _saved(tmp_path, config)
    assert saved and saved[-1] == failed - 1  # every step before it was saved; the failing one was not
    assert bool(train.all_finite(restored.state["params"]))


def test_a_diverged_run_that_stays_finite_stops_before_its_first_save(tmp_path):
    """lr 1e30 from scratch: the loss climbs to about 1e30 and the gradient norm overflows, yet nothing is NaN; such
    a run used to save checkpoint after checkpoint (pushing good ones out with keep_checkpoints)."""
    # checkpoints every 10; no log step comes first (logs every 1000): the guard before the save must see it
    config = fashion_config(total_steps=40, optimizer__learning_rate=1e30, log_every_steps=1000)
    with pytest.raises(FloatingPointError) as error:
        train.train_and_evaluate(config, str(tmp_path))
    message = str(error.value)
    assert re.search(r"at step 10: stopping\. No checkpoint of this state was written", message), message
    assert "the gradient norm is inf" in message or "a uniform prediction's): diverged" in message, message
    assert "\n" not in message
    saved, restored = _saved(tmp_path, config)
    assert saved == [] and restored is None


def test_the_divergence_ceiling_is_a_multiple_of_a_uniform_prediction():
    """The loss at initialisation sits near log(vocab) (log 16 = 2.77 nats for the tiny model); the ceiling is
    5x that, with a head 5x (log vocab + log classes)."""
    config = fashion_config()
    assert train.loss_ceiling(config) == pytest.approx(5 * np.log(16))
    config.model.num_classes = 10
    assert train.loss_ceiling(config) == pytest.approx(5 * (np.log(16) + np.log(10)))
    with pytest.raises(FloatingPointError, match=r"loss is 14, above 13.86 .* at step 7"):
        train._check_healthy(14.0, 1.0, 7, train.loss_ceiling(fashion_config()))
    train._check_healthy(13.0, 1.0, 7, train.loss_ceiling(fashion_config()))  # a bad start, not a divergence
    with pytest.raises(FloatingPointError, match=r"the gradient norm is inf \(loss 2\) at step 3"):
        train._check_healthy(2.0, float("inf"), 3, train.loss_ceiling(fashion_config()))


def test_non_finite_parameters_with_a_finite_loss_are_not_saved(tmp_path):
    # lr 1e39 is inf in float32: the update makes the parameters non-finite while the step's loss (computed before
    # the update) is still log(16); no log step comes first to notice, the save guard must
    config = fashion_config(total_steps=30, optimizer__learning_rate=1e39, log_every_steps=1000)
    config.checkpoint_every_steps = 1
    with pytest.raises(FloatingPointError, match=r"parameters became non-finite at step 1: stopping without saving"):
        train.train_and_evaluate(config, str(tmp_path))
    saved, restored = _saved(tmp_path, config)
    assert saved == [] and restored is None
    assert (tmp_path / "checkpoints").is_dir()  # the run got as far as its checkpoint folder


@pytest.mark.parametrize(
    "ici, message",
    [
        ({"data": 3, "fsdp": -1, "tensor": 1}, r"8 devices are not divisible by the fixed sizes' product 3"),
        ({"data": 2, "fsdp": 2, "tensor": 1}, r"product 4 != 8 devices"),
    ],
)
def test_mesh_that_does_not_fit_is_refused_before_the_workdir_is_created(tmp_path, ici, message):
    config = fashion_config(mesh__ici=ici)
    with pytest.raises(sharding.MeshError, match=message):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_batch_that_does_not_split_is_refused():
    config = fashion_config(batch_size=12, mesh__ici={"data": 8, "fsdp": 1, "tensor": 1})
    with pytest.raises(sharding.MeshError, match=r"12 images per microbatch, not divisible by the 8 batch shards"):
        steps.make_setup(config, sharding.make_mesh(config))


def test_synthetic_data_trains_without_a_palette(tmp_path, capsys, caplog):
    config = fashion_config(total_steps=3, data__dataset="synthetic")
    with caplog.at_level(logging.INFO):
        last = train.train_and_evaluate(config, str(tmp_path))
    assert last["step"] == 3 and math.isfinite(last["loss"])
    assert not os.path.exists(tmp_path / "palette.npy")
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == f"igpt: workdir {tmp_path}: checkpoints/, config.json, metrics.jsonl, tensorboard/"
    # the progress line names the attention kernel `auto` chose for these (CPU) devices
    assert any(line.startswith("step 3/3 ") and line.endswith("attention blockwise") for line in printed), printed
    (took,) = [r.args[0] for r in caplog.records if r.getMessage().startswith("first step (with compilation)")]
    assert took > 0.05  # compilation included, though log_every_steps=1 resets the interval clock at that step


def test_a_dimension_the_mesh_cannot_split_is_named(caplog, monkeypatch):
    config = fashion_config(mesh__ici={"data": 1, "fsdp": 1, "tensor": 8})  # 4 heads over tensor=8
    monkeypatch.setattr(sharding, "_WARNED", set())  # warned once per process: as if none had been before
    with caplog.at_level(logging.WARNING):
        steps.make_setup(config, sharding.make_mesh(config))
    warned = [r.getMessage() for r in caplog.records if "replicated there instead of sharded" in r.getMessage()]
    assert any(m.startswith("parameter blocks.attn.query [2, 32, 4, 8]: dimension 4 ") for m in warned), warned


def test_batches_are_a_pure_function_of_seed_and_step():
    config = fashion_config()
    mesh = sharding.make_mesh(config)
    source = get_source(config)
    a = np.asarray(pipeline.global_batch(source, "train", config, 7, mesh)["images"])
    b = np.asarray(pipeline.global_batch(source, "train", config, 7, mesh)["images"])
    c = np.asarray(pipeline.global_batch(source, "train", config, 8, mesh)["images"])
    assert a.shape == (16, 8, 8, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # one epoch visits every example once
    n = source.num_examples("train")
    seen = np.concatenate([order.global_indices(0, s, 1000, n) for s in range(n // 1000)])
    assert len(np.unique(seen)) == n
