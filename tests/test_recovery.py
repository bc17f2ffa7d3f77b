"""A user's work survives mistakes and faults: relaunching with another recipe, read-only or full storage, two runs on
one workdir, storage that answers late. Real processes where the exit itself is the point."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import cli_flags, fashion_config, read_metrics

from igpt_jax import checkpoint, palette, runtime, sharding, steps, storage, train

ROOT = Path(__file__).resolve().parents[1]
FLAGS = cli_flags(image_size=8, embed_dim=32, total_steps=20, eval_every=20, checkpoint_every=10, warmup=3)


def _command(workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "igpt_jax.main", f"--workdir={workdir}", *FLAGS, *extra]


def _run(workdir: Path, *extra: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, *_command(workdir, *extra)], cwd=ROOT, capture_output=True, text=True, timeout=600)


def _start(workdir: Path, *extra: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    return subprocess.Popen(
        [*prefix, *_command(workdir, *extra)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"ended (rc={proc.returncode}) before {path} appeared: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, f"no {path} after {timeout}s"
        time.sleep(0.02)


def _snapshot(workdir: Path) -> dict[str, tuple[int, int]]:
    """Every file under the workdir with its size and modification time."""
    out = {}
    for folder, _, files in os.walk(workdir):
        for name in files:
            stat = os.stat(os.path.join(folder, name))
            out[os.path.relpath(os.path.join(folder, name), workdir)] = (stat.st_size, stat.st_mtime_ns)
    return out


def _last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def _train_steps(workdir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(workdir) if "mode" not in r]


def test_a_relaunch_with_another_recipe_stops_naming_it_and_moves_nothing(tmp_path):
    workdir = tmp_path / "run"
    first = _run(workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    before = _snapshot(workdir)
    assert {"checkpoints/10/_CHECKPOINT_METADATA", "checkpoints/20/_CHECKPOINT_METADATA"} <= set(before)

    same = _run(workdir)
    assert same.returncode == 0, same.stderr[-3000:]
    assert "holds step 20 >= config.total_steps=20: nothing to do" in same.stdout
    assert _snapshot(workdir) == before

    clipped = _run(workdir, "--config.total_steps=30", "--config.optimizer.grad_clip_norm=1.0")
    assert clipped.returncode == 2, clipped.stderr[-3000:]
    line = _last_line(clipped.stderr)
    assert line.startswith(f"igpt: checkpoint {workdir}/checkpoints/20 does not fit this config:")
    assert "opt_state:" in line and "optimizer.grad_clip_norm 0.0 -> 1.0" in line and "--config.restore=params" in line
    assert _snapshot(workdir) == before

    wider = _run(workdir, "--config.total_steps=30", "--config.model.embed_dim=64")
    assert wider.returncode == 2, wider.stderr[-3000:]
    line = _last_line(wider.stderr)
    assert "params:" in line and "model.embed_dim 32 -> 64" in line and "Nothing was moved or deleted" in line
    assert _snapshot(workdir) == before

    params_only = _run(
        workdir, "--config.total_steps=30", "--config.optimizer.grad_clip_norm=1.0", "--config.restore=params"
    )
    assert params_only.returncode == 0, params_only.stderr[-3000:]
    assert f"resumed from {workdir}/checkpoints/20" in params_only.stderr
    assert "restored the parameters and step 20, new optimizer state" in params_only.stderr
    assert _train_steps(workdir) == list(range(1, 31))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "20", "30"]
    assert len(os.listdir(workdir / "config_history")) == 1  # the 20-step recipe, kept


def _can_drop_root_privileges() -> bool:
    return os.geteuid() != 0 or shutil.which("setpriv") is not None


def _unprivileged() -> tuple[str, ...]:
    """As root, a prefix that drops the capability to write where permissions say no; nothing otherwise."""
    if os.geteuid() != 0:
        return ()
    caps = "-dac_override,-dac_read_search"
    return ("setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}")


def _assert_intact(workdir: Path, step: int) -> None:
    """A relaunch would resume from checkpoint `step`: it is the newest, and it restores (same code as a relaunch)."""
    config = fashion_config(image_size=8, total_steps=10_000)
    setup = steps.make_setup(config, sharding.make_mesh(config))
    ckpt = checkpoint.Checkpointer(storage.path(workdir), config)
    restored = ckpt.restore_latest(setup.abstract_state)
    ckpt.close()
    assert restored is not None and restored.step == step and int(restored.state["step"]) == step
    assert not (workdir / "unreadable_checkpoints").exists()


def _assert_stops_with_one_line(proc: subprocess.Popen, workdir: Path, words: str) -> str:
    """The run exits 1 on its own, its last line says why, and no traceback went through igpt_jax's code."""
    try:
        _, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the run did not exit after its storage failed: it hangs")
    assert proc.returncode == 1, stderr[-3000:]
    line = _last_line(stderr)
    assert line.startswith("igpt: ") and words in line, line
    assert "igpt_jax/" not in stderr, stderr[-3000:]
    if line.startswith("igpt: saving checkpoint "):
        assert "intact" in line
        failed = int(line.split()[3])
        assert max(_train_steps(workdir)) < failed + 10  # stopped within one checkpoint interval of the failure
    return line


@pytest.mark.skipif(not _can_drop_root_privileges(), reason="running as root without setpriv to drop privileges")
def test_read_only_checkpoints_stop_the_run_with_one_line(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    proc = _start(workdir, "--config.total_steps=100000", prefix=_unprivileged())
    _wait_for(workdir / "checkpoints" / "10", proc)
    os.chmod(workdir / "checkpoints", 0o555)
    try:
        _assert_stops_with_one_line(proc, workdir, "Permission denied")
    finally:
        os.chmod(workdir / "checkpoints", 0o755)
    _assert_intact(workdir, 10)


@pytest.fixture
def small_tmpfs(tmp_path, request):
    """A small tmpfs (2 MiB unless the test asks for another size): room for a few checkpoints of the tiny model,
    then a full disk."""
    size = getattr(request, "param", "2m")
    mount = tmp_path / "small_disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip()}); the injected fault test covers it")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_the_run_with_one_line(small_tmpfs):
    workdir = small_tmpfs / "run"
    proc = _start(workdir, "--config.total_steps=100000", "--config.keep_checkpoints=100")
    _assert_stops_with_one_line(proc, workdir, "No space left on device")  # while saving, or appending metrics
    saved = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    assert saved
    _assert_intact(workdir, saved[-1])


@pytest.mark.parametrize("small_tmpfs", ["36m"], indirect=True)  # the raw files fit, the prepared data set does not
def test_a_full_disk_while_the_data_set_is_prepared_ends_with_one_line(small_tmpfs, tmp_path):
    result = _run(tmp_path / "run", f"--config.data.data_dir={small_tmpfs / 'tfds'}")
    assert result.returncode == 1, result.stderr[-3000:]
    line = _last_line(result.stderr)
    assert (
        line.startswith(f"igpt: cannot read or write {small_tmpfs / 'tfds'}") and "No space left on device" in line
    ), line
    assert "igpt_jax/" not in result.stderr


def test_a_save_the_storage_refuses_stops_training_at_once(tmp_path, monkeypatch):
    """The same fault injected into Orbax's writer, for machines that cannot mount a small disk."""
    original = ocp.PyTreeCheckpointHandler.async_save

    async def full_disk_from_step_20(self, directory, *args, **kwargs):
        if "/checkpoints/20" in os.fspath(directory):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(directory))
        return await original(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "async_save", full_disk_from_step_20)
    config = fashion_config(image_size=8, total_steps=40)
    with pytest.raises(checkpoint.CheckpointSaveError) as error:
        train.train_and_evaluate(config, str(tmp_path))
    monkeypatch.undo()
    message = str(error.value)
    assert f"saving checkpoint 20 to {tmp_path}/checkpoints/20 failed" in message
    assert "No space left on device" in message and "checkpoint 10 is intact" in message
    assert max(_train_steps(tmp_path)) == 20
    assert not (tmp_path / "lock.json").exists()
    _assert_intact(tmp_path, 10)


def test_a_second_run_on_the_same_workdir_is_refused_and_the_first_finishes(tmp_path):
    workdir = tmp_path / "run"
    first = _start(workdir, "--config.total_steps=100000")
    _wait_for(workdir / "checkpoints" / "10", first)
    second = _run(workdir, "--config.total_steps=100000")
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"is in use by another run: host {socket.gethostname()} pid {first.pid} " in _last_line(second.stderr)
    assert first.poll() is None  # unharmed, still training
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr[-3000:]
    stopped_at = max(_train_steps(workdir))
    assert str(stopped_at) in os.listdir(workdir / "checkpoints")
    _assert_intact(workdir, stopped_at)
    assert not (workdir / "lock.json").exists()


def _flaky(original, failures: int) -> tuple[object, list[int]]:
    """Stands in for CheckpointManager.restore: fails `failures` times with a storage error, then reads. Returns it
    and a one-element call counter."""
    calls = [0]

    def restore(manager, step, *args, **kwargs):
        calls[0] += 1
        if calls[0] <= failures:
            raise ValueError("UNAVAILABLE: connection reset by peer")
        return original(manager, step, *args, **kwargs)

    return restore, calls


def test_a_storage_error_is_retried_then_stops_without_moving_or_restarting(tmp_path, monkeypatch):
    config = fashion_config(image_size=8, total_steps=10)
    train.train_and_evaluate(config, str(tmp_path))
    before = _snapshot(tmp_path)
    monkeypatch.setattr(checkpoint, "RETRY_DELAYS", (0.0, 0.0))
    setup = steps.make_setup(config, sharding.make_mesh(config))

    original = ocp.CheckpointManager.restore
    flaky, _ = _flaky(original, failures=1)
    monkeypatch.setattr(ocp.CheckpointManager, "restore", flaky)
    ckpt = checkpoint.Checkpointer(storage.path(tmp_path), config)
    assert ckpt.restore_latest(setup.abstract_state).step == 10  # a hiccup: the retry read it
    ckpt.close()

    down, calls = _flaky(original, failures=1000)
    monkeypatch.setattr(ocp.CheckpointManager, "restore", down)
    ckpt = checkpoint.Checkpointer(storage.path(tmp_path), config)
    with pytest.raises(checkpoint.CheckpointReadError, match=r"cannot read checkpoint .*/10 .*UNAVAILABLE"):
        ckpt.restore_latest(setup.abstract_state)
    assert calls == [3]  # the first try and both retries
    assert _snapshot(tmp_path) == before  # nothing moved aside, nothing written


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> Path:
    """A workdir with checkpoints 10 and 20 of the tiny model."""
    workdir = tmp_path_factory.mktemp("two_checkpoints")
    train.train_and_evaluate(fashion_config(image_size=8, total_steps=20), str(workdir))
    return workdir


def _state_files(step_dir: Path, pattern: str) -> list[Path]:
    return sorted((step_dir / "state").rglob(pattern))


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


BREAKAGES = {
    "corrupt data": lambda d: [_flip_a_byte(f) for f in _state_files(d, "d/*")],
    "missing data": lambda d: [shutil.rmtree(f) for f in _state_files(d, "d")],
    "missing manifest": lambda d: [f.unlink() for f in _state_files(d, "manifest.ocdbt")],
    "garbage metadata": lambda d: (d / "state" / "_METADATA").write_text("{not json"),
    "missing metadata": lambda d: (d / "state" / "_METADATA").unlink(),
    "missing state": lambda d: shutil.rmtree(d / "state"),
}


# tensorstore's callbacks for a failed read land on an event loop Orbax has closed: harmless, reported as unraisable
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_a_checkpoint_with_broken_files_is_set_aside_and_the_one_before_used(tmp_path, two_checkpoints, breakage):
    shutil.copytree(two_checkpoints / "checkpoints", tmp_path / "checkpoints")
    BREAKAGES[breakage](tmp_path / "checkpoints" / "20")
    config = fashion_config(image_size=8, total_steps=20)
    setup = steps.make_setup(config, sharding.make_mesh(config))
    ckpt = checkpoint.Checkpointer(storage.path(tmp_path), config)
    restored = ckpt.restore_latest(setup.abstract_state)
    ckpt.close()
    assert restored.step == 10 and int(restored.state["step"]) == 10
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10"]
    (aside,) = os.listdir(tmp_path / "unreadable_checkpoints")  # moved, not deleted
    assert aside.startswith("20-")


def test_a_config_palette_that_differs_from_the_runs_stops_it(tmp_path):
    workdir = tmp_path / "run"
    config = fashion_config(image_size=8, total_steps=10)
    train.train_and_evaluate(config, str(workdir))
    before = _snapshot(workdir)
    other = tmp_path / "other.npy"
    palette.save(other, np.linspace(-1, 1, 48, dtype=np.float32).reshape(16, 3))
    with pytest.raises(runtime.PaletteMismatchError) as error:
        train.train_and_evaluate(fashion_config(image_size=8, total_steps=20, data__palette=str(other)), str(workdir))
    message = str(error.value)
    assert f"config.data.palette={other} (16 colours) differs from {workdir / 'palette.npy'}" in message
    assert _snapshot(workdir) == before
    same = tmp_path / "same.npy"
    shutil.copy(workdir / "palette.npy", same)  # the run's own colours, from another path: accepted
    last = train.train_and_evaluate(fashion_config(image_size=8, total_steps=20, data__palette=str(same)), str(workdir))
    assert last["step"] == 20


def test_the_palette_has_one_copy_that_every_checkpoint_checks(tmp_path):
    """palette.npy is the palette; checkpoints record its fingerprint, not a second copy. Colours swapped under a
    run, or gone, stop it naming what differs; a copy of the run's own palette named in the config brings it back."""
    workdir = tmp_path / "run"
    train.train_and_evaluate(fashion_config(image_size=8, total_steps=10), str(workdir))
    saved = sorted(os.listdir(workdir / "checkpoints" / "10"))
    assert "palette_fingerprint" in saved and "palette" not in saved
    own = tmp_path / "own.npy"
    shutil.move(workdir / "palette.npy", own)
    palette.save(workdir / "palette.npy", np.linspace(-1, 1, 48, dtype=np.float32).reshape(16, 3))
    before = _snapshot(workdir)
    with pytest.raises(runtime.PaletteMismatchError, match="is not the palette the checkpoint's tokens were made"):
        train.train_and_evaluate(fashion_config(image_size=8, total_steps=20), str(workdir))
    assert _snapshot(workdir) == before
    os.remove(workdir / "palette.npy")
    with pytest.raises(runtime.PaletteMismatchError, match="palette.npy is missing"):
        train.train_and_evaluate(fashion_config(image_size=8, total_steps=20), str(workdir))
    last = train.train_and_evaluate(fashion_config(image_size=8, total_steps=20, data__palette=str(own)), str(workdir))
    assert last["step"] == 20
    assert (workdir / "palette.npy").read_bytes() == own.read_bytes()  # written back from the checked copy
