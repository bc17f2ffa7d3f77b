"""Evaluators from config.evals: two probes keep their own histories, TensorBoard (read back by tensorboard's own
reader) holds their scalars and the sample grids at their training steps, the schedule is big_vision's, a config
that cannot be evaluated is refused before step 1, and a workdir written before evaluators resumes and probes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import TFDS_TEST_DIR, fashion_config, read_metrics, run_main

from igpt_jax import config_checks, evaluators, train

FIXTURE = Path(__file__).parent / "fixtures" / "before_evaluators"


def _tensorboard(workdir: Path):
    from tensorboard.backend.event_processing import event_accumulator

    accumulator = event_accumulator.EventAccumulator(
        str(workdir / "tensorboard"), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0}
    )
    accumulator.Reload()
    return accumulator


def test_two_probes_keep_their_histories_and_tensorboard_has_them_at_their_steps(tmp_path):
    config = fashion_config(image_size=8, total_steps=20, checkpoint_every_steps=10)
    config.evals.eval.every_steps = 10
    config.evals.fashion = evaluators.probe(
        dataset="fashion_mnist", every_steps=10, train_examples=200, test_examples=100
    )
    config.evals.second = evaluators.probe(  # a second data set's stand-in: other images of another split, at the end
        dataset="fashion_mnist",
        at_end=True,
        train_split="train[50%:]",
        test_split="train[:1%]",
        train_examples=150,
        test_examples=60,
        baselines=False,
        layers=(1,),
    )
    config.evals.samples = evaluators.sample(every_steps=10, num_images=2, completion_images=1, completions_per_image=1)
    del config.evals["probe"]
    train.train_and_evaluate(config, str(tmp_path))

    fashion = {s: json.loads((tmp_path / "fashion" / f"step_{s:08d}.json").read_text()) for s in (10, 20)}
    assert [r["checkpoint_step"] for r in fashion.values()] == [10, 20]
    assert json.loads((tmp_path / "fashion.json").read_text()) == fashion[20]  # the newest, where tools read it
    assert (tmp_path / "fashion" / "curve.png").exists() and (tmp_path / "fashion" / "step_00000010.png").exists()
    assert fashion[10]["baselines"] == fashion[20]["baselines"]  # computed once: they do not train
    assert sorted(p.name for p in (tmp_path / "second").glob("*.json")) == ["step_00000020.json"]
    second = json.loads((tmp_path / "second.json").read_text())
    assert (second["train_examples"], second["test_examples"], list(second["layers"])) == (150, 60, ["1"])
    assert not (tmp_path / "probe").exists() and not (tmp_path / "probe.json").exists()

    rows = [(r["evaluator"], r["step"]) for r in read_metrics(tmp_path) if "mode" in r]
    in_order = list(config.evals)  # each step runs them in the config's order
    assert sorted(in_order) == ["eval", "fashion", "samples", "second"]
    in_order.remove("second")
    in_order.append("second")  # due at the end only
    assert rows == [(name, 10) for name in in_order[:3]] + [(name, 20) for name in list(config.evals)]

    board = _tensorboard(tmp_path)
    layer_0 = board.Scalars("fashion/layer_0")
    assert [(e.step, e.value) for e in layer_0] == [
        (s, pytest.approx(fashion[s]["layers"]["0"]["accuracy"])) for s in (10, 20)
    ]
    assert [e.step for e in board.Scalars("second/layer_1")] == [20]
    assert [e.step for e in board.Scalars("fashion/raw_pixels")] == [10, 20]
    for tag in ("samples/unconditional", "samples/completions", "fashion/curve", "fashion/by_layer"):
        images = board.Images(tag)
        assert [e.step for e in images] == [10, 20], tag
        assert all(e.encoded_image_string.startswith(b"\x89PNG") and e.width > 0 for e in images)
    assert [e.step for e in board.Images("second/curve")] == [20]


@pytest.mark.parametrize(
    "every, at_end, due_at",
    [(0, False, []), (10, False, [10, 20, 30]), (0, True, [35]), (10, True, [10, 20, 30, 35]), (35, True, [35])],
)
def test_an_evaluator_is_due_every_n_steps_and_at_the_end(every, at_end, due_at):
    entry = evaluators.loss(every_steps=every, at_end=at_end)
    assert [s for s in range(0, 36) if evaluators.due(entry, s, 35)] == due_at
    assert evaluators.scheduled(entry) == bool(due_at)


def test_an_evaluator_needs_what_its_kind_needs_before_anything_runs():
    config = fashion_config(evals__probe__at_end=True, data__dataset="synthetic")
    with pytest.raises(config_checks.ConfigError, match=r"config\.evals\.probe \(a linear probe\) needs a palette"):
        config_checks.check(config)
    config.data.palette = "/somewhere/kmeans_centers.npy"  # a palette of its own makes the tokens' images possible
    config_checks.check(config)
    config.evals.probe.at_end = False  # a probe training never runs needs nothing ...
    config.data.palette = ""
    config_checks.check(config)
    with pytest.raises(config_checks.ConfigError, match=r"config\.evals\.probe \(a linear probe\) needs a palette"):
        config_checks.check(config, "probe")  # ... until a mode runs it
    del config.evals["probe"]
    with pytest.raises(config_checks.ConfigError, match=r"--mode=probe runs the config's evaluators of kind 'probe'"):
        config_checks.check(config, "probe")


@pytest.mark.parametrize("name", ["checkpoints", "lock", "Probe", "two words"])
def test_an_evaluator_may_not_take_a_name_its_files_cannot_have(name):
    config = fashion_config()
    config.evals[name] = evaluators.loss()
    with pytest.raises(config_checks.ConfigError, match=rf"config\.evals\.{name}: an evaluator's name must be"):
        config_checks.check(config)


@pytest.mark.slow  # 40 s: a resume and a probe of the fixture workdir
def test_a_workdir_written_before_evaluators_resumes_and_probes(tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(FIXTURE, workdir)
    old_probe = json.loads((workdir / "probe.json").read_text())
    flags = [
        "--config=configs/fashion_mnist.py:8",
        f"--workdir={workdir}",
        "--config.model.num_layers=2",
        "--config.model.embed_dim=32",
        "--config.batch_size=16",
        "--config.log_every_steps=5",
        "--config.checkpoint_every_steps=10",
        "--config.optimizer.warmup_steps=2",
        f"--config.data.data_dir={TFDS_TEST_DIR}",
        "--config.evals.eval.examples=64",
        "--config.evals.probe.train_examples=200",
        "--config.evals.probe.test_examples=100",
    ]
    at_end = ["--config.evals.probe.at_end=False", "--config.evals.samples.at_end=False"]
    resumed = run_main(*flags, "--config.total_steps=20", *at_end)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {workdir / 'checkpoints'}/10" in resumed.stderr
    assert [r["step"] for r in read_metrics(workdir) if "mode" not in r] == [5, 10, 15, 20]

    probed = run_main(*flags, "--config.total_steps=20", "--mode=probe")
    assert probed.returncode == 0, probed.stderr[-3000:]
    assert "probe step 20: best layer" in probed.stdout
    history = {p.name: json.loads(p.read_text()) for p in sorted((workdir / "probe").glob("*.json"))}
    assert list(history) == ["step_00000010.json", "step_00000020.json"]
    assert history["step_00000010.json"] == old_probe  # the old newest-only record joined the history
    assert json.loads((workdir / "probe.json").read_text()) == history["step_00000020.json"]
    assert (workdir / "probe" / "curve.png").exists()
    modes = [(r.get("evaluator", r["mode"]), r["step"]) for r in read_metrics(workdir) if "mode" in r]
    assert modes == [("eval", 10), ("probe", 10), ("sample", 10), ("eval", 20), ("probe", 20)]


class _StopAfter:
    """A stop check that says stop at its n-th question."""

    def __init__(self, n: int):
        self.n, self.asked = n, 0

    def __call__(self) -> bool:
        self.asked += 1
        return self.asked >= self.n


def test_every_evaluator_loop_asks_to_stop_before_each_batch():
    import jax
    import numpy as np

    from igpt_jax import palette, sampling, sharding, steps
    from igpt_jax.data import get_source
    from igpt_jax.evaluators import base
    from igpt_jax.evaluators.kinds import loss
    from igpt_jax.probe import features, linear

    config = fashion_config(image_size=8, batch_size=16)
    mesh = sharding.make_mesh(config)
    setup = steps.make_setup(config, mesh, train=False)
    params = steps.init_params(setup)
    source = get_source(config)
    clusters = palette.fit(source.get("train", np.arange(256), None), k=16, seed=0)
    with jax.set_mesh(mesh):
        done = []
        feature_step = steps.make_feature_step(setup, (0,))
        batches = features.model_batches(
            config, source, "test", 64, feature_step, params, clusters, mesh, stop=_StopAfter(3)
        )
        with pytest.raises(base.Abandoned):
            done.extend(batches)
        assert len(done) == 2  # four batches of 16: stopped before the third

        counting = _StopAfter(3)
        eval_step = steps.make_eval_step(setup)
        with pytest.raises(base.Abandoned):
            loss.held_out_loss(config, source, "test", 64, eval_step, params, clusters, mesh, counting)
        assert counting.asked == 3

        counting = _StopAfter(2)
        x = np.random.default_rng(0).normal(size=(1, 80, 4)).astype(np.float32)
        y = np.arange(80) % 2
        with pytest.raises(base.Abandoned):
            linear.sweep(x, y, x, y, 2, heldout_fraction=0.1, progress=False, stop=counting)
        assert counting.asked == 2  # one fit of the L2 sweep, then the stop

        counting = _StopAfter(2)
        sampler = sampling.make_sampler(setup, 8, top_k=0, num_colours=16)
        prompts = np.zeros((24, 64), np.int32)
        with pytest.raises(base.Abandoned):
            sampling.generate(sampler, params, prompts, 0, np.arange(24), 0, 1.0, None, counting)
        assert counting.asked == 2  # three batches of 8: one drawn, then the stop
