"""config.profile: a jax.profiler trace of the chosen training steps lands where TensorBoard's profile plugin reads,
through the storage layer (gs:// too), and a run that ends inside the window keeps the trace of what it ran."""

from __future__ import annotations

import jax
import pytest
from helpers import fashion_config

from igpt_jax import config_checks, train
from igpt_jax.workdir import storage


def _traces(workdir: str) -> list[storage.Path]:
    return sorted((storage.path(workdir) / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))


def _steps_traced(trace: storage.Path) -> set[int]:
    """The step numbers of the trace's step markers, read back by JAX's own reader of XProf's files."""
    data = jax.profiler.ProfileData.from_serialized_xspace(trace.read_bytes())
    return {
        int(dict(event.stats)["step_num"])
        for plane in data.planes
        for line in plane.lines
        for event in line.events
        if event.name == "train"
    }


@pytest.mark.parametrize("where", ["local", "gs"])
def test_the_profiled_steps_are_traced_into_the_tensorboard_folder(where, tmp_path, request):
    workdir = str(tmp_path / "run") if where == "local" else request.getfixturevalue("gcs_here")
    config = fashion_config(image_size=8, total_steps=4, checkpoint_every_steps=4)
    config.profile.start_step, config.profile.num_steps = 2, 2
    train.train_and_evaluate(config, workdir)
    (trace,) = _traces(workdir)  # one host, one run of the profiler
    assert _steps_traced(trace) == {2, 3}
    assert b"jit_train_step" in trace.read_bytes()  # the compiled step ran inside the trace


def test_no_profile_unless_asked_and_a_run_ending_inside_the_window_keeps_its_trace(tmp_path):
    config = fashion_config(image_size=8, total_steps=2, checkpoint_every_steps=2)
    train.train_and_evaluate(config, str(tmp_path / "plain"))
    assert not _traces(str(tmp_path / "plain"))
    config.profile.start_step, config.profile.num_steps = 2, 5  # steps 2 to 6 of a 2-step run
    train.train_and_evaluate(config, str(tmp_path / "short"))
    (trace,) = _traces(str(tmp_path / "short"))
    assert _steps_traced(trace) == {2}


def test_profile_keys_out_of_range_are_refused():
    config = fashion_config()
    config.profile.start_step, config.profile.num_steps = -1, 0
    with pytest.raises(config_checks.ConfigError) as refused:
        config_checks.check(config)
    assert "config.profile.start_step=-1" in str(refused.value) and "config.profile.num_steps=0" in str(refused.value)
