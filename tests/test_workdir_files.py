"""The workdir's files: whole-file writes, exclusive creation, TensorBoard events TensorBoard can read, metrics.jsonl
repaired on resume and config.json history (the workdir lock: test_run_lock.py)."""

from __future__ import annotations

import glob
import json
import os

from helpers import fashion_config

from igpt_jax import metrics, tensorboard
from igpt_jax.workdir import config_file, storage


def test_write_bytes_replaces_whole_and_leaves_no_temporary(tmp_path):
    target = storage.path(tmp_path / "sub" / "f.json")
    storage.write_text(target, "old")
    storage.write_text(target, "new")
    assert target.read_text() == "new"
    assert os.listdir(tmp_path / "sub") == ["f.json"]


def test_create_exclusive_refuses_an_existing_file(tmp_path):
    target = storage.path(tmp_path / "lock")
    assert storage.create_exclusive(target, b"first")
    assert not storage.create_exclusive(target, b"second")
    assert target.read_bytes() == b"first"


def test_paths_are_absolute_locally_and_untouched_for_gcs():
    assert os.fspath(storage.path("gs://bucket/run")) == "gs://bucket/run"
    assert os.path.isabs(os.fspath(storage.path("relative/run")))


def _read_events(path: str):
    import tensorflow as tf

    return list(tf.compat.v1.train.summary_iterator(path))  # checks every record's CRCs


def test_tensorboard_events_read_back_and_purge_the_steps_a_resumed_run_redoes(tmp_path):
    writer = tensorboard.EventWriter(storage.path(tmp_path), resumed_step=40)
    writer.scalars(41, {"train/loss": 1.5, "train/mfu": 0.25})
    writer.close()
    (path,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
    events = _read_events(path)
    assert events[0].file_version == "brain.Event:2"
    start = next(i for i, e in enumerate(events) if e.session_log.status == e.session_log.START)
    assert events[start].step == 41  # TensorBoard drops what an earlier file holds from step 41 on
    summaries = [e for e in events if e.summary.value]
    assert all(e.step == 41 for e in summaries) and events.index(summaries[0]) > start
    values = {v.tag: round(v.simple_value, 6) for e in summaries for v in e.summary.value}
    assert values == {"train/loss": 1.5, "train/mfu": 0.25}


def _rows(lines: list[str]) -> str:
    return "".join(line + "\n" for line in lines)


def test_metrics_rows_after_the_resumed_step_and_a_cut_line_are_set_aside(tmp_path):
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 8)]
    rows.insert(4, json.dumps({"mode": "eval", "step": 4, "loss": 0.3}))
    (tmp_path / "metrics.jsonl").write_text(_rows(rows) + '{"step": 8, "lo')  # kill -9 in the middle of a write
    moved = metrics.set_aside_superseded(storage.path(tmp_path), 5)
    assert moved == (2, 1)
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r.get("mode"), r["step"]) for r in kept] == [
        (None, 1),
        (None, 2),
        (None, 3),
        (None, 4),
        ("eval", 4),
        (None, 5),
    ]
    aside = (tmp_path / "metrics.superseded.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in aside[:2]] == [6, 7] and aside[2] == '{"step": 8, "lo'
    # a second resume at the same step finds nothing to move and leaves both files as they are
    assert metrics.set_aside_superseded(storage.path(tmp_path), 5) == (0, 0)
    assert len((tmp_path / "metrics.superseded.jsonl").read_text().splitlines()) == 3
    # a later resume from an earlier step adds its rows after the ones set aside before, which stay as they were
    assert metrics.set_aside_superseded(storage.path(tmp_path), 3) == (3, 0)
    again = (tmp_path / "metrics.superseded.jsonl").read_text().splitlines()
    assert again[:3] == aside and [(json.loads(line).get("mode"), json.loads(line)["step"]) for line in again[3:]] == [
        (None, 4),
        ("eval", 4),
        (None, 5),
    ]


def test_rows_that_name_no_step_are_set_aside_as_broken_and_the_resumed_steps_own_rows_stay(tmp_path):
    """Blank lines go; a row at the resumed step stays; rows without a usable step (none, null, not a number, not
    an object) cannot be placed on the curve and go aside with the later ones, in their order."""
    broken = [json.dumps({"loss": 3.0}), json.dumps({"step": None}), json.dumps({"step": "x"}), json.dumps([1])]
    lines = [json.dumps({"step": 1}), "", json.dumps({"step": 2}), *broken, json.dumps({"step": 3}), "  "]
    (tmp_path / "metrics.jsonl").write_text(_rows(lines))
    assert metrics.set_aside_superseded(storage.path(tmp_path), 2) == (1, 4)
    assert (tmp_path / "metrics.jsonl").read_text() == _rows([json.dumps({"step": 1}), json.dumps({"step": 2})])
    assert (tmp_path / "metrics.superseded.jsonl").read_text() == _rows([json.dumps({"step": 3}), *broken])
    assert metrics.set_aside_superseded(storage.path(tmp_path / "none"), 0) == (0, 0)  # no metrics.jsonl yet
    # a row cut inside a multi-byte character by kill -9 is set aside too, the rest read as UTF-8
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(
            json.dumps({"step": 2, "note": "é"}, ensure_ascii=False).encode() + b"\n" + b'{"step": 3, "note": "\xc3'
        )
    assert metrics.set_aside_superseded(storage.path(tmp_path), 2) == (0, 1)
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1]) == {"step": 2, "note": "é"}
    assert not (tmp_path / "none").exists()


def test_metrics_writer_appends_after_the_kept_rows(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(_rows([json.dumps({"step": 1, "loss": 2.0})]))
    writer = metrics.MetricsWriter(storage.path(tmp_path), resumed_step=1, enabled=True)
    writer.write({"step": 2, "loss": 1.0})
    writer.close()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))


def test_config_json_keeps_the_previous_recipe(tmp_path):
    directory = storage.path(tmp_path)
    config_file.write_config(directory, fashion_config(total_steps=10), 0)
    config_file.write_config(directory, fashion_config(total_steps=10), 0)  # unchanged: no history entry
    assert not (tmp_path / "config_history").exists()
    config_file.write_config(directory, fashion_config(total_steps=20), 10)
    assert json.loads((tmp_path / "config.json").read_text())["total_steps"] == 20
    (old,) = os.listdir(tmp_path / "config_history")
    assert old.endswith("-step10.json")
    assert json.loads((tmp_path / "config_history" / old).read_text())["total_steps"] == 10


# --- the workdir lock


def test_a_storage_failure_is_found_inside_other_libraries_errors():
    try:
        try:
            raise RuntimeError("/data/tfds/incomplete.abc; No space left on device")  # as TensorFlow words it
        except RuntimeError as inner:
            raise ValueError("Error while extracting") from inner
    except ValueError as e:
        found = storage.storage_failure(e)
    assert isinstance(found, OSError) and found.strerror == "No space left on device"
    assert storage.storage_failure(ValueError("shape mismatch")) is None
