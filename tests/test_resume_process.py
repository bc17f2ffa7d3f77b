"""Real processes: kill -9 after a checkpoint and relaunch the same command; SIGTERM and Ctrl-C save and exit."""

from __future__ import annotations

import json
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


@pytest.mark.parametrize(
    "sig, code",
    [(signal.SIGTERM, 0), pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)],  # Ctrl-C: 25 s more
)
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


# --- stop signals and kills while evaluators run: the step is saved before any evaluator starts

# long enough to be stopped in the middle (a pass over the train images is over 100 batches), short enough for a test
PROBE = [
    "--config.evals.probe.train_examples=1600",
    "--config.evals.probe.test_examples=400",
    "--config.evals.probe.baselines=False",
]


def _wait_for_log(workdir: Path, text: str, proc: subprocess.Popen, after: str = "", timeout: float = 300) -> None:
    """Until `text` appears in the run's log (after `after`, when given)."""
    deadline = time.time() + timeout
    while text not in (_log(workdir).partition(after)[2] if after else _log(workdir)):
        assert proc.poll() is None, f"run ended (rc={proc.returncode}) before {text!r}: {_log(workdir)[-3000:]}"
        assert time.time() < deadline, f"no {text!r} after {timeout}s"
        time.sleep(0.05)


def test_sigterm_during_an_in_training_probe_saves_its_step_and_the_relaunch_probes_then_continues(tmp_path, reference):
    """Step 20 is no checkpoint step (every 15): the stop must save it. The relaunch probes step 20 first."""
    extra = [*PROBE, "--config.evals.probe.every_steps=20", "--config.checkpoint_every_steps=15"]
    workdir = tmp_path / "run"
    proc = _launch(workdir, *extra)
    _wait_for_log(workdir, "features: ", proc)  # the probe of step 20 has started
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, _log(workdir)
    assert time.time() - sent < 30, f"took {time.time() - sent:.0f}s to stop"
    assert sorted(int(s) for s in os.listdir(workdir / "checkpoints")) == [15, 20]
    assert max(_losses(workdir)) == 20
    assert not (workdir / "probe").exists() and not (workdir / "probe.json").exists()  # nothing half-written
    assert not [r for r in read_metrics(workdir) if r.get("evaluator") == "probe"]

    # the relaunch probes fewer images (evaluator settings may change on resume): what is asserted is which steps
    smaller = ["--config.evals.probe.train_examples=200", "--config.evals.probe.test_examples=100"]
    assert _launch(workdir, *extra, *smaller).wait(timeout=600) == 0, _log(workdir)
    assert f"resumed from {workdir / 'checkpoints'}/20" in _log(workdir)
    probes = [r["step"] for r in read_metrics(workdir) if r.get("evaluator") == "probe"]
    assert probes == [20, 40]  # the abandoned probe ran again first
    assert sorted(p.name for p in (workdir / "probe").glob("*.json")) == ["step_00000020.json", "step_00000040.json"]
    assert _losses(workdir) == _losses(reference)  # the same curve, bit for bit


@pytest.mark.slow  # a minute: a run killed in its probe, then relaunched
def test_sigkill_during_the_probe_at_the_end_loses_no_step(tmp_path, reference):
    """The last step is no checkpoint step (every 15): it is saved because it is the last, before the probe."""
    extra = [*PROBE, "--config.evals.probe.at_end=True", "--config.checkpoint_every_steps=15"]
    workdir = tmp_path / "run"
    proc = _launch(workdir, *extra)
    _wait_for_log(workdir, "features: ", proc, after="step 40/40")
    proc.kill()
    proc.wait(timeout=60)
    assert 40 in [int(s) for s in os.listdir(workdir / "checkpoints")]  # finalized: only those get their step name

    smaller = ["--config.evals.probe.train_examples=200", "--config.evals.probe.test_examples=100"]  # which step
    assert _launch(workdir, *extra, *smaller).wait(timeout=600) == 0, _log(workdir)
    assert f"resumed from {workdir / 'checkpoints'}/40" in _log(workdir)
    assert json.loads((workdir / "probe.json").read_text())["checkpoint_step"] == 40
    assert [r["step"] for r in read_metrics(workdir) if "mode" not in r] == list(range(1, 41))  # no step redone
    assert _losses(workdir) == _losses(reference)
