"""launch/tpu_pod.sh with gcloud's ssh replaced by bash on this machine: `run` returns at once while training goes
on detached, `status` reports it, a second `run` is refused, and `stop` makes it save and exit 0."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from helpers import cli_flags

ROOT = Path(__file__).resolve().parents[1]
FLAGS = cli_flags(image_size=8, embed_dim=32, total_steps=100_000, eval_every=100_000, checkpoint_every=10, warmup=3)
FAKE_GCLOUD = """#!/usr/bin/env bash
# `gcloud compute tpus tpu-vm ssh NODE ... --command=CMD`: run CMD here, in $HOME, as a TPU worker would.
for arg in "$@"; do
  case "$arg" in --command=*) cd "$HOME" && exec bash -c "${arg#--command=}" ;; esac
done
echo "fake gcloud: no --command in $*" >&2
exit 3
"""


def _pod(env: dict, action: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "launch/tpu_pod.sh", action, "igpt-test", "zone-a", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_run_returns_at_once_training_goes_on_and_stop_saves_and_exits_0(tmp_path):
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    bin_dir.mkdir()
    home.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    (home / "igpt_jax").symlink_to(ROOT)  # `setup` would have copied the checkout to ~/igpt_jax
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(home),
        "PYTHON": sys.executable,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    }
    workdir = tmp_path / "run"

    started = time.time()
    run = _pod(env, "run", "--", f"--workdir={workdir}", *FLAGS)
    took = time.time() - started
    assert run.returncode == 0, run.stderr
    assert "started igpt (pid " in run.stdout and took < 20, (run.stdout, took)
    pid = int((home / "igpt_logs" / "igpt.pid").read_text())
    log = home / "igpt_logs" / f"{os.uname().nodename}.log"
    try:
        deadline = time.time() + 300
        while not (workdir / "checkpoints" / "10").is_dir():  # training goes on after the shell returned
            assert time.time() < deadline, log.read_text()[-3000:]
            os.kill(pid, 0)  # raises if the job died
            time.sleep(0.1)

        status = _pod(env, "status")
        assert status.returncode == 0 and f"running (pid {pid}); step " in status.stdout, status.stdout

        again = _pod(env, "run", "--", f"--workdir={workdir}", *FLAGS)
        assert again.returncode != 0 and f"igpt already runs (pid {pid}); stop it first" in again.stderr

        stop = _pod(env, "stop")
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert "igpt exited with status 0" in stop.stdout
        saved = int(stop.stdout.split("stopped on request: saved step ")[1].split(";")[0])
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    assert (workdir / "checkpoints" / str(saved)).is_dir()
    assert not (workdir / "lock.json").exists()
    assert "not running" in _pod(env, "status").stdout


def test_setup_copies_the_tracked_source_only(tmp_path):
    """`setup` sends the files git tracks, as they are here, not the checkout's .venv, workdirs or logs."""
    result = subprocess.run(
        ["bash", "launch/tpu_pod.sh", "--dry-run", "setup", "igpt-l", "us-east5-a"],
        cwd=ROOT, env=dict(os.environ, TMPDIR=str(tmp_path)), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    scp, ssh = result.stdout.splitlines()
    assert f"{tmp_path}/igpt_jax_source.tar.gz" in scp and str(ROOT) not in scp
    assert "tar\\ -xzf" in ssh and "-c\\ constraints.txt\\ -e\\ \\'.\\[tpu\\]\\'" in ssh
    import tarfile

    with tarfile.open(tmp_path / "igpt_jax_source.tar.gz") as sent:
        names = set(sent.getnames())
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert names == set(tracked.split())
