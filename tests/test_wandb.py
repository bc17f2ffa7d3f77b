"""W&B, optional: with config.wandb.project set, the rows and pictures metrics.jsonl and TensorBoard get are logged to
the workdir's W&B run (wandb's offline mode here), which a relaunch resumes; without wandb installed it is refused."""

from __future__ import annotations

import importlib.util
import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_config

from igpt_jax import config_checks, metrics, plots, wandb_run

pytest.importorskip("wandb")

BLOCK, HEADER = 32768, 7  # W&B's run file: LevelDB's log format after a 7-byte ":W&B" header


def _records(path: Path) -> list:
    """The protobuf records of an offline run's .wandb file (LevelDB log records: crc, length, type, data)."""
    from wandb.proto import wandb_internal_pb2

    data, records, pending, at = path.read_bytes(), [], b"", HEADER
    assert data[:4] == b":W&B"
    while at + HEADER <= len(data):
        if BLOCK - at % BLOCK < HEADER:  # a block's tail too short for a header is padding
            at += BLOCK - at % BLOCK
            continue
        length, kind = struct.unpack("<HB", data[at + 4 : at + 7])
        pending += data[at + HEADER : at + HEADER + length]
        at += HEADER + length
        if kind in (1, 4):  # a whole record, or a record's last piece
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _history(run_dir: Path) -> list[dict]:
    (path,) = run_dir.glob("run-*.wandb")
    rows = [r.history for r in _records(path) if r.WhichOneof("record_type") == "history"]
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in row.item} for row in rows]


def test_rows_and_pictures_reach_the_workdirs_wandb_run_which_a_relaunch_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = tiny_config()
    config.wandb.project = "igpt-test"
    workdir = tmp_path / "run"
    writer = metrics.MetricsWriter(workdir, enabled=True, config=config)
    writer.write({"step": 1, "loss": 2.5, "mfu": 0.1})
    writer.write({"step": 2, "loss": 2.25, "mfu": 0.1})
    writer.write({"mode": "eval", "step": 2, "loss": 2.4})
    grid = np.zeros((1, 1, 4, 4, 3), np.uint8)
    writer.images(2, {"samples": plots.image_grid(grid, scale=1)})
    writer.close()
    again = metrics.MetricsWriter(workdir, resumed_step=2, enabled=True, config=config)
    again.write({"step": 3, "loss": 2.0})
    again.close()

    first, second = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert first.name.endswith(wandb_run.run_id(workdir)) and second.name.endswith(wandb_run.run_id(workdir))
    rows = _history(first)
    scalars = [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]
    assert scalars[:3] == [
        {"step": 1, "train/loss": 2.5, "train/mfu": 0.1},
        {"step": 2, "train/loss": 2.25, "train/mfu": 0.1},
        {"step": 2, "eval/loss": 2.4},
    ]
    (picture,) = [row for row in rows if "samples/_type" in row]  # W&B's image: a PNG under media/, described
    assert picture["step"] == 2 and picture["samples/_type"] == "image-file"
    assert picture["samples/width"] == picture["samples/height"] == 4 + 2 * plots.GRID_GAP
    assert (first / "files" / picture["samples/path"]).is_file()
    assert [{k: v for k, v in row.items() if not k.startswith("_")} for row in _settled_history(second)] == [
        {"step": 3, "train/loss": 2.0}
    ]


def _settled_history(run_dir: Path, seconds: float = 30) -> list[dict]:
    """The run file's history once wandb's service has written it: `finish()` can return before the service process
    flushed the last records of a resumed offline run (seen empty 1 time in 3 here, then complete)."""
    deadline = time.monotonic() + seconds
    while not (rows := _history(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return rows


def test_no_project_no_wandb_run_and_a_project_without_wandb_is_refused(monkeypatch):
    config = tiny_config()
    assert wandb_run.open_run(config, "/tmp/run") is None
    config.wandb.project = "p"
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else found(name, *a))
    with pytest.raises(config_checks.ConfigError, match=r"config.wandb.project='p' needs wandb: pip install wandb"):
        config_checks.check(config)
