"""The Checkpointer on its own, in seconds (tests/test_recovery.py runs it inside real runs): what a restore returns,
which step it picks, how many it keeps, a failed save's message, reads retried before a verdict, the palette a step
was trained with, and the one-line causes it reports."""

from __future__ import annotations

import errno
import logging
import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import override, tiny_config

from igpt_jax import palette, sharding, steps
from igpt_jax.workdir import checkpoint, resume, storage

CLUSTERS = np.linspace(-1, 1, 48, dtype=np.float32).reshape(16, 3)


@pytest.fixture(scope="module")
def setup() -> steps.Setup:
    config = override(tiny_config(), checkpoint_every_steps=1, keep_checkpoints=2)
    return steps.make_setup(config, sharding.make_mesh(config, jax.devices()[:1]))


@pytest.fixture(scope="module")
def state(setup) -> steps.State:
    return jax.device_get(steps.init_state(setup))


def _at(state: steps.State, step: int, setup: steps.Setup) -> steps.State:
    """The state at `step`, its parameters marked by the step, in its shards."""
    marked = jax.tree.map(lambda x: x + step if x.dtype == np.float32 else x, state) | {"step": np.int32(step)}
    return jax.device_put(marked, setup.state_shardings)


def _saved(tmp_path, setup, state, at=(10, 20), config=None) -> checkpoint.Checkpointer:
    ckpt = checkpoint.Checkpointer(storage.path(tmp_path), config or setup.config)
    for step in at:
        ckpt.save(step, _at(state, step, setup), CLUSTERS)
    ckpt.check_saves(block=True)
    return ckpt


def _equal(a, b) -> bool:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(np.array_equal(x, y) for x, y in pairs)


def test_the_newest_step_comes_back_as_saved_with_its_palettes_fingerprint(tmp_path, setup, state):
    ckpt = _saved(tmp_path, setup, state)
    restored = ckpt.restore_latest(setup.abstract_state)
    older = ckpt.restore_latest(setup.abstract_state, step=10)
    ckpt.close()
    assert (restored.step, ckpt.latest_step()) == (20, 20) and _equal(restored.state, _at(state, 20, setup))
    assert older.step == 10 and _equal(older.state, _at(state, 10, setup))
    assert restored.plan == resume.Plan(params_only=False, accepted_changes=[])
    assert restored.palette_fingerprint == palette.fingerprint(CLUSTERS)
    leaf = restored.state["params"]["wte"]
    assert leaf.sharding == setup.abstract_state["params"]["wte"].sharding  # onto the current layout


def test_the_newest_keep_checkpoints_are_kept_and_each_holds_the_config_it_was_saved_with(tmp_path, setup, state):
    ckpt = _saved(tmp_path, setup, state, at=(10, 20, 30))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["20", "30"]  # keep_checkpoints=2
    assert ckpt.saved_config(30) == resume.as_saved(setup.config)
    with pytest.raises(checkpoint.CheckpointReadError) as absent:
        ckpt.restore_latest(setup.abstract_state, step=10)
    assert str(absent.value) == f"no checkpoint {tmp_path}/checkpoints/10: the workdir holds [20, 30]"
    ckpt.close()
    assert checkpoint.Checkpointer(storage.path(tmp_path / "empty"), setup.config).restore_latest(
        setup.abstract_state
    ) is None  # fmt: skip


def test_params_only_restores_the_step_and_parameters_and_a_mode_that_only_reads_does_the_same(tmp_path, setup, state):
    ckpt = _saved(tmp_path, setup, state)
    restored = ckpt.restore_latest(setup.abstract_state, params_only=True)
    assert restored.plan.params_only is False  # the optimizer state fits: restored too
    assert set(restored.state) == {"step", "params", "opt_state"}
    reader = steps.make_setup(setup.config, setup.mesh, train=False)  # no optimizer state to restore into
    read = ckpt.restore_latest(reader.abstract_state, params_only=True)
    ckpt.close()
    assert set(read.state) == {"step", "params"} and int(read.state["step"]) == 20
    assert _equal(read.state["params"], _at(state, 20, setup)["params"])
    clipped = override(setup.config.copy_and_resolve_references(), optimizer__grad_clip_norm=1.0, restore="params")
    other = steps.make_setup(clipped, setup.mesh)
    ckpt = checkpoint.Checkpointer(storage.path(tmp_path), clipped)
    restored = ckpt.restore_latest(other.abstract_state)  # params_only from config.restore
    ckpt.close()
    assert restored.plan.params_only and set(restored.state) == {"step", "params"}


def test_a_broken_step_is_left_in_place_for_a_mode_that_only_reads_and_a_step_asked_for_is_an_error(
    tmp_path, setup, state, caplog
):
    ckpt = _saved(tmp_path, setup, state)
    (tmp_path / "checkpoints" / "20" / "state" / "_METADATA").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="igpt_jax.workdir.checkpoint"):
        restored = ckpt.restore_latest(setup.abstract_state, set_aside=False)
    assert restored.step == 10 and sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "20"]
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"checkpoint {tmp_path}/checkpoints/20 is broken (")
    assert line.endswith("); left in place, trying the one before")
    with pytest.raises(checkpoint.CheckpointReadError) as error:
        ckpt.restore_latest(setup.abstract_state, step=20, set_aside=False)
    assert str(error.value) == f"checkpoint {tmp_path}/checkpoints/20 is broken (see the warning above)"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="igpt_jax.workdir.checkpoint"):
        assert ckpt.restore_latest(setup.abstract_state).step == 10  # a run sets it aside
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"checkpoint {tmp_path}/checkpoints/20 is broken (JSONDecodeError: ")
    assert line.endswith(f"); moving it to {tmp_path}/unreadable_checkpoints and trying the one before")
    ckpt.close()
    (aside,) = os.listdir(tmp_path / "unreadable_checkpoints")
    assert aside.startswith("20-") and sorted(os.listdir(tmp_path / "checkpoints")) == ["10"]


def test_the_config_of_a_broken_step_reads_as_none_and_leaves_it_in_place(tmp_path, setup, state, caplog):
    """saved_config serves relaunch checks, which only read: a broken step is never moved by them."""
    ckpt = _saved(tmp_path, setup, state)
    (tmp_path / "checkpoints" / "20" / "state" / "_METADATA").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="igpt_jax.workdir.checkpoint"):
        assert ckpt.saved_config(10) is not None and ckpt.saved_config(20) is None
    assert (
        sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "20"]
        and not (tmp_path / "unreadable_checkpoints").exists()
    )
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"checkpoint {tmp_path}/checkpoints/20 is broken (")
    ckpt.close()


def test_the_saved_config_is_read_with_retries_and_named_in_the_error(tmp_path, setup, state, monkeypatch):
    ckpt = _saved(tmp_path, setup, state, at=(10,))
    monkeypatch.setattr(checkpoint.time, "sleep", lambda s: None)
    monkeypatch.setattr(ckpt, "_metadata", lambda step: (_ for _ in ()).throw(ValueError("UNAVAILABLE: try later")))
    with pytest.raises(
        checkpoint.CheckpointReadError, match=f"^cannot read checkpoint {tmp_path}/checkpoints/10 \\(config\\): "
    ):
        ckpt.saved_config(10)
    ckpt.close()


def test_each_broken_step_set_aside_gets_its_own_folder_named_by_step_and_time(tmp_path, setup, state):
    ckpt = _saved(tmp_path, setup, state)
    found = []
    for step in (20, 10):  # two in one run: the second finds unreadable_checkpoints/ already there
        (tmp_path / "checkpoints" / str(step) / "state" / "_METADATA").write_text("{not json")
        found.append(getattr(ckpt.restore_latest(setup.abstract_state), "step", None))
    ckpt.close()
    assert found == [10, None]  # then nothing is left to resume from
    aside = sorted(os.listdir(tmp_path / "unreadable_checkpoints"))
    assert [a.split("-")[0] for a in aside] == ["10", "20"]
    assert all(re.fullmatch(r"\d+-\d{8}-\d{6}", a) for a in aside), aside  # step-YYYYmmdd-HHMMSS


def test_a_save_that_fails_without_an_error_or_a_listing_says_so(tmp_path, setup, state, monkeypatch):
    """Orbax may end a save unfinalized without an exception, and the storage may refuse to list what is left."""
    ckpt = _saved(tmp_path, setup, state, at=(10,))
    message = str(ckpt._save_error(20, None))
    assert "failed: Orbax did not finalize it (see its log above). Stopped; checkpoint 10 is intact." in message
    monkeypatch.setattr(ckpt.manager, "reload", lambda: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    message = str(ckpt._save_error(20, OSError(errno.ENOSPC, "No space left on device")))
    assert (
        "failed: OSError: [Errno 28] No space left on device. Stopped; earlier checkpoints were not touched." in message
    )
    monkeypatch.undo()
    ckpt.close()


def test_a_restore_places_every_array_in_the_states_shards_and_names_what_it_could_not_read(
    tmp_path, setup, state, monkeypatch
):
    ckpt = _saved(tmp_path, setup, state)
    restored = ckpt.restore_latest(setup.abstract_state)
    placed = jax.tree.map(lambda x, s: x.sharding == s, restored.state, setup.state_shardings)
    assert all(jax.tree.leaves(placed))
    monkeypatch.setattr(checkpoint.time, "sleep", lambda s: None)
    where = f"{tmp_path}/checkpoints/20"
    unavailable = ValueError("UNAVAILABLE: connection reset by peer")
    with monkeypatch.context() as m:
        metadata = ckpt._metadata(20)
        m.setattr(ckpt, "_metadata", lambda step: metadata)  # read before the storage stopped answering
        m.setattr(ckpt.manager, "restore", lambda *a, **k: (_ for _ in ()).throw(unavailable))
        with pytest.raises(checkpoint.CheckpointReadError, match=f"^cannot read checkpoint {where} \\(arrays\\): "):
            ckpt.restore_latest(setup.abstract_state)
    with monkeypatch.context() as m:
        m.setattr(ckpt, "_metadata", lambda step: (_ for _ in ()).throw(unavailable))
        with pytest.raises(checkpoint.CheckpointReadError, match=f"^cannot read checkpoint {where} \\(metadata\\): "):
            ckpt.restore_latest(setup.abstract_state)
    ckpt.close()


def test_a_checkpoint_that_does_not_fit_the_config_is_named_in_the_refusal(tmp_path, setup, state):
    _saved(tmp_path, setup, state).close()
    wider = override(tiny_config(embed_dim=64), checkpoint_every_steps=1, keep_checkpoints=2)
    other = steps.make_setup(wider, sharding.make_mesh(wider, jax.devices()[:1]))
    ckpt = checkpoint.Checkpointer(storage.path(tmp_path), wider)
    with pytest.raises(resume.CheckpointMismatchError, match=f"{tmp_path}/checkpoints/20"):
        ckpt.restore_latest(other.abstract_state)
    ckpt.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "20"]  # nothing moved


def test_a_read_is_retried_after_each_delay_then_stops_naming_the_checkpoint(
    tmp_path, setup, state, monkeypatch, caplog
):
    ckpt = _saved(tmp_path, setup, state, at=(10,))
    slept = []
    monkeypatch.setattr(checkpoint.time, "sleep", slept.append)

    def unavailable():
        raise ValueError("UNAVAILABLE: connection reset by peer")

    with pytest.raises(checkpoint.CheckpointReadError) as error, caplog.at_level(logging.WARNING):
        ckpt._read(10, "arrays", unavailable)
    assert slept == list(checkpoint.RETRY_DELAYS) == [1.0, 3.0]
    assert [r.getMessage() for r in caplog.records if r.name == "igpt_jax.workdir.checkpoint"] == [
        f"reading checkpoint 10 (arrays) failed (ValueError: UNAVAILABLE: connection reset by peer); retrying in {s}s"
        for s in (1, 3)
    ]
    where = f"{tmp_path}/checkpoints/10"
    assert str(error.value) == (
        f"cannot read checkpoint {where} (arrays): ValueError: UNAVAILABLE: connection reset by peer. Stopped without "
        "training: nothing was moved, and no step was redone from scratch. Relaunch when the storage answers again, "
        f"or move {where} aside by hand to resume from the checkpoint before it."
    )
    calls = []

    def second_time_lucky():
        calls.append(1)
        if len(calls) == 1:
            unavailable()
        return "read"

    slept.clear()
    assert ckpt._read(10, "arrays", second_time_lucky) == "read" and slept == [1.0]
    ckpt.close()


def test_a_step_saved_without_a_palette_has_no_fingerprint_and_one_without_state_metadata_is_broken(
    tmp_path, setup, state
):
    ckpt = checkpoint.Checkpointer(storage.path(tmp_path), setup.config)
    ckpt.save(7, _at(state, 7, setup), None)  # token data sets: no palette
    ckpt.close()
    ckpt = checkpoint.Checkpointer(storage.path(tmp_path), setup.config)
    restored = ckpt.restore_latest(setup.abstract_state)
    assert (restored.step, restored.palette_fingerprint) == (7, None)
    assert not (tmp_path / "checkpoints" / "7" / "palette_fingerprint").exists()
    os.remove(tmp_path / "checkpoints" / "7" / "state" / "_METADATA")
    with pytest.raises(FileNotFoundError, match="no readable metadata for the state"):
        ckpt._metadata(7)
    ckpt.close()


def _refuse_from(step: int, monkeypatch):
    original = ocp.PyTreeCheckpointHandler.async_save

    async def full_disk(self, directory, *args, **kwargs):
        if f"/checkpoints/{step}" in os.fspath(directory):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(directory))
        return await original(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "async_save", full_disk)


def test_a_failed_save_is_reported_by_the_next_check_naming_the_step_the_cause_and_what_is_intact(
    tmp_path, setup, state, monkeypatch
):
    ckpt = _saved(tmp_path, setup, state, at=(10,))
    _refuse_from(20, monkeypatch)
    with pytest.raises(checkpoint.CheckpointSaveError) as error:
        ckpt.save(20, _at(state, 20, setup), CLUSTERS)
        ckpt.check_saves(block=True)
    message = str(error.value)
    assert message.startswith(f"saving checkpoint 20 to {tmp_path}/checkpoints/20 failed: ")
    assert "No space left on device" in message
    assert message.endswith(
        ". Stopped; checkpoint 10 is intact. Fix the storage and relaunch the same command to resume from the "
        "newest one."
    )
    ckpt.check_saves(block=True)  # reported once: nothing pending any more
    assert sorted(s for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) == ["10"]  # 20 never finalized


def test_a_save_another_process_broke_off_says_so_instead_of_blaming_the_storage(tmp_path, setup, state, monkeypatch):
    """A peer killed during a multi-process save breaks Orbax's collective on the survivor; its way on is to relaunch
    every process, not to fix a storage that did nothing wrong."""
    ckpt = _saved(tmp_path, setup, state, at=(10,))

    def peer_gone(*args, **kwargs):
        raise RuntimeError(
            "UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:547] Connection closed by peer "
            "[127.0.0.1]:14730"
        )

    monkeypatch.setattr(ckpt.manager, "save", peer_gone)
    with pytest.raises(checkpoint.CheckpointSaveError) as error:
        ckpt.save(20, _at(state, 20, setup), CLUSTERS)
    message = str(error.value)
    assert "Gloo AllGather failed" in message and "storage" not in message
    assert message.endswith(
        ". Stopped; checkpoint 10 is intact. Another process of the run stopped during the save (its own log says "
        "why); relaunch every process with the same command to resume from the newest checkpoint."
    )


def test_nothing_is_pending_before_a_save_and_a_save_in_flight_is_left_alone(tmp_path, setup, state):
    ckpt = checkpoint.Checkpointer(storage.path(tmp_path), setup.config)
    ckpt.check_saves()  # nothing saved yet
    ckpt.save(10, _at(state, 10, setup), CLUSTERS)
    ckpt.check_saves()  # in flight or done: either way no error
    ckpt.close()  # waits for it
    assert ckpt.manager.all_steps() == [10]


@pytest.mark.parametrize(
    ("steps_left", "words"),
    [(None, "earlier checkpoints were not touched"), ([], "no earlier checkpoint exists"),
     ([10], "checkpoint 10 is intact"), ([10, 20], "checkpoints 10, 20 are intact")],
)  # fmt: skip
def test_what_a_failed_save_leaves_intact_is_said_plainly(steps_left, words):
    assert checkpoint._intact(steps_left) == words


def test_a_cause_is_one_line_that_leads_with_the_oss_words():
    assert checkpoint.cause(OSError(errno.ENOSPC, "No space left on device")) == (
        "OSError: [Errno 28] No space left on device"
    )
    wrapped = ValueError("Error writing tensorstore array\nunderneath: No space left on device")
    assert checkpoint.cause(wrapped) == "ValueError: No space left on device (Error writing tensorstore array)"
    assert checkpoint.cause(RuntimeError("")) == "RuntimeError: RuntimeError"
    assert checkpoint.cause(KeyError("x" * 1000)) == "KeyError: " + ("'" + "x" * 1000)[:400]
    late = RuntimeError("y" * 100 + " Permission denied")  # the words past the first 80 characters: brought forward
    assert checkpoint.cause(late) == f"RuntimeError: Permission denied ({'y' * 100} Permission denied)"
    near = RuntimeError("y" * 63 + " Permission denied")  # the words end at character 81: brought forward
    assert checkpoint.cause(near) == f"RuntimeError: Permission denied ({near})"
    within = RuntimeError("y" * 62 + " Permission denied")  # they end at character 80: the line already leads with them
    assert checkpoint.cause(within) == f"RuntimeError: {within}"
    long = RuntimeError("z" * 300 + " Permission denied")  # what they came from: its first 200 characters
    assert checkpoint.cause(long) == f"RuntimeError: Permission denied ({'z' * 200})"


def test_a_chain_of_causes_is_walked_once_each():
    inner = OSError(errno.EIO, "Input/output error")
    outer = ValueError("reading failed")
    outer.__cause__ = inner
    outer.__context__ = inner
    inner.__context__ = outer  # a cycle, as a re-raise inside a handler can make
    assert checkpoint._chain(outer) == [outer, inner]
    assert checkpoint._agree(True, False) == (True, False) and checkpoint._agree(False, True) == (False, True)
    missing_item = KeyError("Item 'state' was not found in the checkpoint")
    assert checkpoint._is_corrupt(missing_item) and not checkpoint._is_corrupt(KeyError("other"))
    assert not checkpoint._is_corrupt(ValueError("shape mismatch"))  # neither broken files nor storage: a bug


def _raised(error: BaseException, cause: BaseException | None, context: BaseException | None) -> BaseException:
    error.__cause__, error.__context__ = cause, context
    return error


def test_broken_files_and_a_storage_that_fails_are_told_apart_through_every_link_of_the_chain():
    broken = ValueError("Error decoding the checkpoint's index")
    for chain in ((broken, RuntimeError("cleanup")), (RuntimeError("cleanup"), broken)):  # `from`, or while handling
        error = _raised(RuntimeError("restore failed"), *chain)
        assert set(map(id, checkpoint._chain(error))) == {id(error), *map(id, chain)}
        assert checkpoint._is_corrupt(error)
    assert checkpoint._is_corrupt(ValueError("DATA_LOSS: checksum mismatch in chunk 3"))
    # the storage failing wins over words about data: reading again may succeed
    assert not checkpoint._is_corrupt(OSError(errno.EIO, "I/O failed"))  # EIO, without the usual words
    assert not checkpoint._is_corrupt(ValueError("UNAVAILABLE: Unexpected end of stream from the server"))
    deep = ValueError("level 0")
    for level in range(1, 30):  # a pathological chain: walked to a bound, not to its end
        deep = _raised(ValueError(f"level {level}"), deep, None)
    assert len(checkpoint._chain(deep)) == 20
