"""Real processes: kill -9 after a checkpoint and relaunch the same command; SIGTERM and Ctrl-C save and exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import cli_flags, read_metrics

ROOT = Path(__file__).resolve().parents[1]
FLAGS = cli_flags(image_size=16, embed_dim=64, total_steps=40, eval_every=20, checkpoint_every=10, warmup=5)


def _launch(workdir: Path, *extra: str) -> subprocess.Popen:
    log = open(workdir.parent / f"{workdir.name}.log", "a")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(
        [sys.executable, "-m", "igpt_jax.main", f"--workdir={workdir}", *FLAGS, *extra],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ),
        # a run of pytest in the background of a script ignores SIGINT, and its children would inherit that (the run
        # then rightly keeps going on Ctrl-C): give the child the default, as a terminal would
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for_checkpoint(workdir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not (workdir / "checkpoints" / str(step)).is_dir():  # finalized folders only: tmp ones have a suffix
        assert proc.poll() is None, f"run ended (rc={proc.returncode}) before checkpoint {step}"
        assert time.time() < deadline, f"no checkpoint {step} after {timeout}s"
        time.sleep(0.02)


def _losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "mode" not in r}


def _log(workdir: Path) -> str:
    return (workdir.parent / f"{workdir.name}.log").read_text()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must match, bit for bit."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    workdir.parent.mkdir(exist_ok=True)
    assert _launch(workdir).wait(timeout=600) == 0, _log(workdir)
    return workdir


def _interrupted(tmp_path: Path, sig: int, *extra: str) -> tuple[Path, int]:
    """A run that gets `sig` once its step-10 checkpoint exists; its exit status."""
    workdir = tmp_path / "interrupted"
    proc = _launch(workdir, *extra)
    _wait_for_checkpoint(workdir, 10, proc)
    proc.send_signal(sig)
    return workdir, proc.wait(timeout=120)


def test_kill_9_then_relaunch_gives_the_same_curve_bitwise(tmp_path, reference):
    killed, _ = _interrupted(tmp_path, signal.SIGKILL)
    steps_before_kill = max(_losses(killed))
    assert steps_before_kill < 40, "the run finished before it could be killed"
    with open(killed / "metrics.jsonl", "a") as f:  # as if the kill had come in the middle of writing a row
        f.write('{"step": 99, "loss": 2.7')

    assert _launch(killed).wait(timeout=600) == 0, _log(killed)
    assert "resumed from" in _log(killed)
    rows = read_metrics(killed)  # every line parses
    assert [r["step"] for r in rows if "mode" not in r] == list(range(1, 41))  # each step once
    assert _losses(killed)[40] == _losses(reference)[40]  # bitwise: floats from the same float32
    assert _losses(killed) == _losses(reference)
    assert '{"step": 99, "loss": 2.7' in (killed / "metrics.superseded.jsonl").read_text()


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_stop_signal_saves_exits_and_relaunch_resumes(tmp_path, reference, sig, code):
    stopped, returncode = _interrupted(tmp_path, sig)
    assert returncode == code, _log(stopped)
    saved = sorted(int(s) for s in os.listdir(stopped / "checkpoints"))
    last_logged = max(_losses(stopped))
    assert saved[-1] == last_logged < 40, (saved, last_logged)  # saved exactly the step it stopped at
    assert f"stopped on request: saved step {saved[-1]}; relaunch the same command to continue" in _log(stopped)

    assert _launch(stopped).wait(timeout=600) == 0, _log(stopped)
    assert f"resumed from {stopped / 'checkpoints'}/{saved[-1]}" in _log(stopped)
    assert _losses(stopped) == _losses(reference)


@pytest.mark.slow  # three runs of its own, about 2 minutes
def test_kill_9_with_the_sequence_split_then_relaunch_gives_the_same_curve_bitwise(tmp_path):
    """The same with each image's 256 tokens split over 4 of the 8 devices (ring attention, fsdp=2)."""
    split = "--config.mesh.ici.sequence=4"
    reference = tmp_path / "reference"
    assert _launch(reference, split).wait(timeout=600) == 0, _log(reference)
    assert "attention ring" in _log(reference)
    killed, _ = _interrupted(tmp_path, signal.SIGKILL, split)
    assert max(_losses(killed)) < 40, "the run finished before it could be killed"
    assert _launch(killed, split).wait(timeout=600) == 0, _log(killed)
    assert "resumed from" in _log(killed)
    assert _losses(killed) == _losses(reference)
