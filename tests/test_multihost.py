"""Multi-process runs with real processes on 127.0.0.1 (gloo): same losses as one process, checkpoints that move
between process counts, no silent hang when a process dies, one program everywhere, and the launch scripts."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from docs_commands import checkout_like, command, run_doc
from helpers import cli_flags, read_metrics
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FLAGS = cli_flags(image_size=8, embed_dim=32, total_steps=10, eval_every=10, checkpoint_every=5, warmup=3)


def _env(devices: int | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _one_process(workdir: Path, devices: int, *extra: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "igpt_jax.main", f"--workdir={workdir}", *FLAGS, *extra],
        cwd=ROOT,
        env=_env(devices),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def _local_sh(n: int, devices_each: int, workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = _env() | {
        "DEVICES_PER_PROCESS": str(devices_each),
        "LOG_DIR": str(workdir) + "_logs",
        "PYTHON": sys.executable,
    }
    return subprocess.run(
        ["bash", "launch/local.sh", str(n), f"--workdir={workdir}", *FLAGS, *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "mode" not in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """1 process x 4 devices, 10 steps, checkpoints at 5 and 10."""
    workdir = tmp_path_factory.mktemp("reference") / "work"
    _one_process(workdir, 4)
    return workdir


def test_two_processes_match_one(tmp_path, reference):
    result = _local_sh(2, 2, tmp_path / "two")
    assert result.returncode == 0, result.stderr
    two, one = _losses(tmp_path / "two"), _losses(reference)
    assert sorted(two) == list(range(1, 11))
    assert all(abs(two[s] - one[s]) < 1e-5 for s in one), (two, one)
    assert len(os.listdir(str(tmp_path / "two") + "_logs")) == 2  # one log per process


@pytest.mark.slow  # 45 s; test_train's save-on-8-devices-resume-on-4 covers the mesh change in one process
def test_checkpoint_moves_between_process_counts(tmp_path, reference):
    # written by 2 processes, resumed by 1
    assert _local_sh(2, 2, tmp_path / "a").returncode == 0
    shutil.rmtree(tmp_path / "a" / "checkpoints" / "10")
    _one_process(tmp_path / "a", 4)
    # written by 1 process (the reference), resumed by 2
    shutil.copytree(reference, tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "10")
    result = _local_sh(2, 2, tmp_path / "b")
    assert result.returncode == 0, result.stderr
    expected = _losses(reference)
    for workdir in (tmp_path / "a", tmp_path / "b"):
        records = [r for r in read_metrics(workdir) if "mode" not in r]
        assert [r["step"] for r in records] == list(range(1, 11))  # the first run's 6..10 were set aside
        assert all(abs(r["loss"] - expected[r["step"]]) < 1e-5 for r in records)


def test_a_dead_process_stops_the_other_within_the_timeout(tmp_path):
    port = _free_port()
    heartbeat = 10
    procs, logs = [], []
    for i in range(2):
        logs.append(open(tmp_path / f"p{i}.log", "w"))  # noqa: SIM115 - closed below
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "igpt_jax.main",
                    f"--workdir={tmp_path / 'w'}",
                    *FLAGS,
                    "--config.total_steps=100000",
                    "--config.log_every_steps=5",
                    f"--coordinator_address=127.0.0.1:{port}",
                    "--num_processes=2",
                    f"--process_id={i}",
                    f"--heartbeat_timeout={heartbeat}",
                ],
                cwd=ROOT,
                env=_env(2),
                stdout=logs[-1],
                stderr=subprocess.STDOUT,
            )
        )
    deadline = time.time() + 300
    while "step 5/" not in (tmp_path / "p0.log").read_text():
        assert time.time() < deadline and procs[0].poll() is None, (tmp_path / "p0.log").read_text()[-2000:]
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    returncode = procs[0].wait(timeout=heartbeat + 60)
    took = time.time() - killed_at
    for f in logs:
        f.close()
    print(f"survivor exited with {returncode} {took:.1f}s after its peer was killed (heartbeat {heartbeat}s)")
    assert returncode != 0
    assert took < heartbeat + 15
    # the heartbeat's report, or the checkpoint save the peer broke off (when it was killed during one) saying so
    log = (tmp_path / "p0.log").read_text()
    assert "another task died" in log or "Another process of the run stopped during the save" in log, log[-2000:]


def test_processes_running_different_programs_stop_with_a_message(tmp_path):
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "igpt_jax.main",
                f"--workdir={tmp_path / 'w'}",
                *FLAGS,
                f"--config.model.num_layers={2 + i}",
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            cwd=ROOT,
            env=_env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err[-2000:]
        assert "processes lowered different train steps (fingerprints by process:" in err


@pytest.mark.slow  # about a minute: the default run's probe and samples on two processes (CI runs the slow tests)
def test_local_sh_runs_the_default_config(tmp_path):
    """The docs' command (docs/clusters.md) as on a fresh machine: the data set is prepared by process 0 while process
    1 waits (then reads its splits), and both write their batches of the probe's feature cache into the one shared
    workdir. The test's sizes follow the command."""
    here = checkout_like(tmp_path / "checkout")
    env = _env() | {"LOG_DIR": str(tmp_path / "logs"), "PYTHON": sys.executable}
    result = run_doc(
        command("launch/local.sh 2"),
        here,
        "--config.model.image_size=8",  # the default model at a test's size: 8x8 images, width 32
        "--config.model.num_positions=64",
        "--config.model.embed_dim=32",
        "--config.total_steps=2",
        "--config.log_every_steps=1",
        "--config.evals.eval.examples=64",
        "--config.evals.probe.train_examples=64",  # the default's probe at the end, on 2 processes, kept small
        "--config.evals.probe.test_examples=32",
        "--config.evals.samples.num_images=2",  # and its samples at the end, gathered from both processes
        "--config.evals.samples.completion_images=1",
        "--config.evals.samples.completions_per_image=2",
        f"--config.data.data_dir={tmp_path / 'tfds'}",  # not prepared yet
        env=env,
    )
    assert result.returncode == 0, result.stderr
    workdir = here / "workdir" / "two_processes"
    assert [r["step"] for r in read_metrics(workdir) if "mode" not in r] == [1, 2]
    _assert_every_batch_cached(workdir / "probe_features" / "probe", tmp_path / "tfds", examples=64)
    assert "step 2/2" in (tmp_path / "logs" / "process_0.log").read_text()
    assert [r["mode"] for r in read_metrics(workdir) if "mode" in r] == ["eval", "probe", "sample"]
    grid = Image.open(workdir / "samples" / "step_00000002_completions.png")
    cell = grid.size[1] - 2  # one row of square cells, each with its border, then the grid's own
    assert grid.size[0] == 4 * cell + 2  # given | 2 completions | original


def test_local_sh_fails_when_a_process_fails(tmp_path):
    result = _local_sh(2, 1, tmp_path / "bad", "--config.model.embed_dim=30")  # refused by every process
    assert result.returncode == 2
    assert "exited with status 2" in result.stderr


def test_local_sh_reports_processes_that_fail_at_once(tmp_path):
    """Eight processes exiting together: bash may reap some before `wait -n` asks for them, which once ended the
    script on an unset variable (exit 1) instead of the processes' status."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 3\n")
    fake.chmod(0o755)
    env = _env() | {"PYTHON": str(fake), "PORT": "1", "LOG_DIR": str(tmp_path / "logs")}
    for _ in range(20):  # the old script failed about one run in three
        result = subprocess.run(["bash", "launch/local.sh", "8"], cwd=ROOT, env=env, capture_output=True, text=True)
        assert (result.returncode, "unbound" in result.stderr) == (3, False), result.stderr


SCRIPTS = [
    "launch/local.sh",
    "launch/tpu_pod.sh",
    "launch/tpu_worker.sh",
    "launch/slurm_gpu.sbatch",
    "launch/setup_local.sh",
    ".ci/run",
]


def _assert_every_batch_cached(root: Path, data_dir: Path, examples: int) -> None:
    """The trained model's train-split cache holds the data set's labels and a feature row for every example: no
    process's batches lost (each batch of 32 is written by one of the two processes)."""
    import numpy as np
    import tensorflow_datasets as tfds
    import tensorstore as ts

    (folder,) = [p for p in root.glob("step_*/train-*") if (p / "spec.json").exists()]

    def read(name):
        return ts.open({"driver": "zarr3", "kvstore": f"file://{folder / name}"}).result().read().result()

    source = tfds.data_source("fashion_mnist", split="train", data_dir=str(data_dir))
    assert np.asarray(read("labels")).tolist() == [int(source[i]["label"]) for i in range(examples)]
    features = np.asarray(read("features"), np.float32)
    assert features.shape[2] == examples and np.all(np.abs(features).sum(axis=(0, 1, 3)) > 0)


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_pass_bash_n_and_shellcheck(script):
    assert subprocess.run(["bash", "-n", script], cwd=ROOT).returncode == 0
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    result = subprocess.run([shellcheck, script], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_dry_runs_print_the_commands():
    local = subprocess.run(
        ["bash", "launch/local.sh", "--dry-run", "2", "--config=configs/igpt_s.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert len(local) == 2 and "--num_processes=2 --process_id=1 --config=configs/igpt_s.py" in local[1]
    tpu = subprocess.run(
        [
            "bash",
            "launch/tpu_pod.sh",
            "--dry-run",
            "--slices",
            "2",
            "run",
            "igpt-l",
            "us-east5-a",
            "--",
            "--config=configs/igpt_l.py:48",
            "--workdir=gs://bucket/run",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert tpu.count("gcloud compute tpus tpu-vm ssh") == 2 and "--worker=all" in tpu and "igpt_l.py:48" in tpu
    assert "ssh igpt-l-0 " in tpu and "ssh igpt-l-1 " in tpu  # one queued resource, two slices
    slurm = subprocess.run(
        ["bash", "launch/slurm_gpu.sbatch", "--dry-run", "--config=configs/igpt_l.py"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "srun --kill-on-bad-exit=1" in slurm and "igpt_jax.main --config=configs/igpt_l.py" in slurm


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
