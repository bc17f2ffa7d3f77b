"""config.compilation_cache_dir: a relaunch loads the train step JAX compiled before instead of compiling it again."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from helpers import ROOT, cli_flags


def _igpt(workdir, total_steps: int, *flags: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    tiny = cli_flags(image_size=8, embed_dim=16, total_steps=total_steps, eval_every=0, checkpoint_every=2, warmup=1)
    return subprocess.run(
        [sys.executable, "-m", "igpt_jax.main", *tiny, f"--workdir={workdir}", *flags],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def _environment(**extra: str) -> dict[str, str]:
    # JAX_LOG_COMPILES makes JAX say, for each program, whether the persistent cache had it
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    return env | {"JAX_PLATFORMS": "cpu", "JAX_LOG_COMPILES": "1"} | extra


def test_a_relaunch_loads_the_train_step_from_the_cache_beside_the_workdir(tmp_path):
    """As after a preemption: the same config relaunched, from the last checkpoint but one (the schedule's constants,
    total_steps among them, are part of the compiled step, so a relaunch to more steps compiles it again)."""
    first = _igpt(tmp_path / "run", 4, env=_environment())
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Persistent compilation cache hit for 'jit_train_step'" not in first.stderr
    entries = [p.name for p in (tmp_path / "compilation_cache").iterdir()]  # 'auto': beside the workdir
    assert any(name.startswith("jit_train_step-") for name in entries), entries
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "4")  # preempted after step 2's save
    again = _igpt(tmp_path / "run", 4, env=_environment())
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Persistent compilation cache hit for 'jit_train_step'" in again.stderr


@pytest.mark.slow  # 16 s: two runs
def test_an_empty_setting_turns_the_cache_off_even_where_the_environment_names_one(tmp_path):
    named = tmp_path / "named_by_the_environment"
    off = _igpt(
        tmp_path / "run", 2, "--config.compilation_cache_dir=", env=_environment(JAX_COMPILATION_CACHE_DIR=str(named))
    )
    assert off.returncode == 0, off.stderr[-3000:]
    assert not named.exists() and not (tmp_path / "compilation_cache").exists()
    assert "compilation cache: off" in off.stderr
