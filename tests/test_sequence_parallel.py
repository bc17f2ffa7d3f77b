"""Sequence parallelism: the `sequence` mesh axis splits every image's tokens over devices, with ring attention.

Trained on the 8 fake devices with sequence=4 (x fsdp=2), the losses are sequence=1's, and a run stopped after a
checkpoint resumes bit for bit.
"""

from __future__ import annotations

import shutil

import jax
import pytest
from helpers import fashion_config, read_metrics

from igpt_jax import attention, sharding, steps, train

SEQUENCE_4 = {"data": 1, "fsdp": 2, "sequence": 4, "tensor": 1}


def _losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "mode" not in r}


@pytest.fixture(scope="module")
def sequence_4_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sequence4")
    train.train_and_evaluate(fashion_config(total_steps=12, mesh__ici=SEQUENCE_4), str(workdir))
    return workdir


def test_auto_attention_is_ring_when_the_mesh_splits_the_sequence():
    mesh = sharding.make_mesh(fashion_config(mesh__ici=SEQUENCE_4))
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "sequence": 4, "tensor": 1}
    with jax.set_mesh(mesh):
        assert attention.resolve("auto") == "ring"
    with jax.set_mesh(sharding.make_mesh(fashion_config())):
        assert attention.resolve("auto") == "blockwise"
    assert attention.resolve("auto", "tpu", sequence=4) == "ring"  # the planner's call: a target's mesh, not set
    assert attention.resolve("auto", "tpu", sequence=1) == "splash"
    assert attention.resolve("xla", "tpu", sequence=4) == "xla"  # a named kernel is kept (XLA gathers the sequence)


def test_weights_are_sharded_over_the_sequence_axis_too():
    """The sequence axis's devices are not left holding whole weights: `embed` goes over fsdp x sequence."""
    config = fashion_config(mesh__ici=SEQUENCE_4)
    setup = steps.make_setup(config, sharding.make_mesh(config))
    specs = [s.spec for s in jax.tree.leaves(setup.state_shardings) if hasattr(s, "spec")]
    assert any(("fsdp", "sequence") in tuple(spec) for spec in specs), specs


def test_sequence_4_gives_the_losses_of_sequence_1(tmp_path, sequence_4_run):
    train.train_and_evaluate(fashion_config(total_steps=12), str(tmp_path))  # FSDP over all 8: no sequence split
    split, whole = _losses(sequence_4_run), _losses(tmp_path)
    assert sorted(split) == list(range(1, 13))
    for step in split:
        assert split[step] == pytest.approx(whole[step], abs=1e-5), step
    evals = [[r["loss"] for r in read_metrics(w) if r.get("mode") == "eval"] for w in (sequence_4_run, tmp_path)]
    assert evals[0] == pytest.approx(evals[1], abs=1e-5)


def test_sequence_4_resumes_bitwise_after_a_stop(tmp_path, sequence_4_run):
    resumed = tmp_path / "resumed"
    shutil.copytree(sequence_4_run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "12")  # as if the run had been killed after its step-10 checkpoint
    train.train_and_evaluate(fashion_config(total_steps=12, mesh__ici=SEQUENCE_4), str(resumed))
    assert _losses(resumed) == _losses(sequence_4_run)  # floats from the same float32: bit for bit


def test_a_sequence_split_that_cuts_images_unevenly_is_refused():
    from igpt_jax import config_checks

    config = fashion_config(image_size=6, mesh__ici={"data": 1, "fsdp": 2, "sequence": 4, "tensor": 1})
    with pytest.raises(config_checks.ConfigError, match="36 tokens into 8 equal chunks"):
        config_checks.check(config)
