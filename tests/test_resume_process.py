"""Real processes: kill -9 after a checkpoint and relaunch the same command; SIGTERM saves and exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import cli_flags, read_metrics

ROOT = Path(__file__).resolve().parents[1]
FLAGS = cli_flags(image_size=16, embed_dim=64, total_steps=40, eval_every=20, checkpoint_every=10, warmup=5)


def _launch(workdir: Path) -> subprocess.Popen:
    log = open(workdir.parent / f"{workdir.name}.log", "a")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(
        [sys.executable, "-m", "igpt_jax.main", f"--workdir={workdir}", *FLAGS],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ),
    )


def _wait_for_checkpoint(workdir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not (workdir / "checkpoints" / str(step)).is_dir():  # finalized folders only: tmp ones have a suffix
        assert proc.poll() is None, f"run ended (rc={proc.returncode}) before checkpoint {step}"
        assert time.time() < deadline, f"no checkpoint {step} after {timeout}s"
        time.sleep(0.02)


def _losses(workdir: Path) -> dict[int, float]:
    """Last logged loss per step (a resumed run logs the steps after its checkpoint again)."""
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "mode" not in r}


def _log(workdir: Path) -> str:
    return (workdir.parent / f"{workdir.name}.log").read_text()


def _reference_and_interrupted(tmp_path: Path, sig: int) -> tuple[Path, Path, int]:
    """Runs the reference to the end, then a second run that gets `sig` once its step-10 checkpoint exists."""
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    assert _launch(reference).wait(timeout=600) == 0, _log(reference)
    proc = _launch(interrupted)
    _wait_for_checkpoint(interrupted, 10, proc)
    proc.send_signal(sig)
    return reference, interrupted, proc.wait(timeout=120)


def test_kill_9_then_relaunch_gives_the_same_loss_bitwise(tmp_path):
    reference, killed, _ = _reference_and_interrupted(tmp_path, signal.SIGKILL)
    steps_before_kill = max(_losses(killed))
    assert steps_before_kill < 40, "the run finished before it could be killed"

    assert _launch(killed).wait(timeout=600) == 0, _log(killed)
    assert "resumed from" in _log(killed)
    assert _losses(killed)[40] == _losses(reference)[40]  # bitwise: floats from the same float32
    assert _losses(killed) == _losses(reference)


def test_sigterm_saves_exits_0_and_relaunch_resumes(tmp_path):
    reference, stopped, returncode = _reference_and_interrupted(tmp_path, signal.SIGTERM)
    assert returncode == 0, _log(stopped)
    saved = sorted(int(s) for s in os.listdir(stopped / "checkpoints"))
    last_logged = max(_losses(stopped))
    assert saved[-1] == last_logged < 40, (saved, last_logged)  # saved exactly the step it stopped at

    assert _launch(stopped).wait(timeout=600) == 0, _log(stopped)
    assert f"resumed from {stopped / 'checkpoints'}/{saved[-1]}" in _log(stopped)
    assert _losses(stopped)[40] == _losses(reference)[40]
