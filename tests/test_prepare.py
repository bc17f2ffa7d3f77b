"""A folder of one's own images becomes a data set: prepared by TFDS's writer, read back by name, trained on and probed
with its folders' labels; a corrupt file is named and skipped, a killed preparation is not taken for a data set."""

from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, fashion_config, override
from PIL import Image

from igpt_jax.data import prepare

CLASSES = {"cat": (200, 40, 40), "dog": (40, 200, 40), "owl": (40, 40, 200)}  # a colour each: a probe can tell them
PER_CLASS = 100
CORRUPT = "dog/broken.jpg"  # one of the 300 files
NAME = "my_images"


def _image(rng: np.random.Generator, colour: tuple[int, ...], index: int, folder: Path) -> None:
    """Mixed sizes (20 to 60 px a side, not square) and formats: PNG, JPEG, WebP, grayscale PNG, RGBA PNG."""
    h, w = rng.integers(20, 61, size=2)
    pixels = np.clip(np.array(colour) + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    kind = index % 5
    suffix = ("png", "jpg", "webp", "png", "png")[kind]
    image = image.convert("L") if kind == 3 else image.convert("RGBA") if kind == 4 else image
    image.save(folder / f"{index:03d}.{suffix}")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, colour in CLASSES.items():
        (root / name).mkdir()
        for i in range(PER_CLASS - (name == CORRUPT.split("/")[0])):
            _image(rng, colour, i, root / name)
    whole = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(whole, format="JPEG")
    cut = whole.getvalue()[: len(whole.getvalue()) // 2]  # a JPEG cut short: it opens, its pixels do not decode
    (root / CORRUPT).write_bytes(cut)
    return root


def _prepare(images: Path, data_dir: str, *flags: str, wait: bool = True):
    argv = [sys.executable, "-m", "igpt_jax.data.prepare", f"--images={images}", f"--name={NAME}"]
    argv += [f"--data_dir={data_dir}", "--labels=folders", "--heldout_fraction=0.1", *flags]
    if not wait:
        return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def prepared(folder, tmp_path_factory) -> tuple[str, subprocess.CompletedProcess]:
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    return data_dir, _prepare(folder, data_dir)


def _records(data_dir: str) -> dict[str, list[tuple]]:
    """Every record of every split, in order: (file name, label, image bytes)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(NAME, data_dir=data_dir, file_format="array_record")
    out = {}
    for split in builder.info.splits:
        source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
        records = source.__getitems__(range(len(source)))
        out[split] = [(r["file_name"], int(r["label"]), bytes(r["image"])) for r in records]
    return out


def test_a_folder_is_prepared_with_its_corrupt_file_named_and_skipped(prepared, folder):
    data_dir, result = prepared
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"skipped {folder}/{CORRUPT} (" in result.stderr
    splits = prepare.plan(str(folder), "folders", 0.1).splits  # 30 of the 300 files drawn into heldout
    kept = {split: len(files) - (CORRUPT in files) for split, files in splits.items()}
    assert len(splits["heldout"]) == 30 and sum(kept.values()) == 3 * PER_CLASS - 1
    assert f"train {kept['train']}, heldout {kept['heldout']} images, 3 classes; 1 skipped" in result.stdout
    records = _records(data_dir)
    assert {split: len(r) for split, r in records.items()} == kept
    names = sorted(CLASSES)
    for file, label, data in (r for split in records.values() for r in split):
        assert names[label] == file.decode().split("/")[0]  # the label is the file's folder
        with Image.open(io.BytesIO(data)) as image:
            assert image.mode == "RGB"  # grayscale, RGBA and WebP stored as RGB


def test_the_same_folder_gives_the_same_records_and_a_rerun_leaves_them(prepared, folder, tmp_path):
    data_dir, _ = prepared
    again = _prepare(folder, str(tmp_path / "tfds"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert _records(str(tmp_path / "tfds")) == _records(data_dir)
    rerun = _prepare(folder, data_dir)
    assert rerun.returncode == 0 and "already prepared" in rerun.stdout, rerun.stderr[-2000:]


def test_a_preparation_killed_half_way_is_not_a_data_set_and_a_rerun_finishes_it(prepared, folder, tmp_path):
    """SIGKILL once TFDS has begun writing (its incomplete.* folder exists): nothing reads as a data set; the rerun
    removes the leftover and writes what an uninterrupted preparation writes."""
    data_dir = tmp_path / "tfds"
    proc = _prepare(folder, str(data_dir), wait=False)
    deadline = time.time() + 300
    while not list((data_dir / NAME).glob("incomplete.*/*")) and proc.poll() is None:
        assert time.time() < deadline, "TFDS never began writing"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the preparation finished before it could be killed"
    assert not prepare.prepared(str(data_dir), NAME)
    rerun = _prepare(folder, str(data_dir))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not list((data_dir / NAME).glob("incomplete.*"))
    assert _records(str(data_dir)) == _records(prepared[0])


def test_flags_that_cannot_work_are_one_line_and_exit_2(folder, tmp_path):
    (tmp_path / "loose").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "loose" / "a.png")
    for flags, says in [
        ([f"--images={tmp_path / 'absent'}"], "no such folder"),
        ([f"--images={tmp_path / 'loose'}"], "not in a class folder"),
        (["--name=My-Images"], "lower-case letters"),
        (["--name=mnist"], "TFDS data set's name"),
        (["--heldout_fraction=1.5"], "in [0, 1)"),
        (["--strict"], "cannot be decoded"),
    ]:
        result = _prepare(folder, str(tmp_path / "tfds"), *flags)
        assert result.returncode == 2 and says in result.stderr, (flags, result.stderr[-2000:])
        assert "Traceback" not in result.stderr and not prepare.prepared(str(tmp_path / "tfds"), NAME), flags


def _own_config(data_dir: str, **overrides):
    config = fashion_config(image_size=8, total_steps=2, checkpoint_every_steps=2)
    return override(
        config,
        data__dataset=NAME,
        data__data_dir=data_dir,
        data__eval_split="heldout",
        evals__eval__examples=0,
        **overrides,
    )


def test_a_prepared_folder_trains_its_labels_probe_and_its_files_are_completed(prepared, folder, tmp_path):
    from igpt_jax import evaluators, train

    data_dir, _ = prepared
    config = _own_config(data_dir)
    config.evals.probe = evaluators.probe(
        dataset=NAME, train_split="train", test_split="heldout", layers=(2,), concat=(), at_end=True
    )
    two = f"{folder}/cat/00[01].*"  # a PNG and a JPEG of the folder, completed 2 ways each
    config.evals.samples = evaluators.sample(at_end=True, num_images=0, prompts=two, completions_per_image=2)
    train.train_and_evaluate(config, str(tmp_path / "w"))
    probe = json.loads((tmp_path / "w" / "probe.json").read_text())
    assert (probe["dataset"], probe["train_examples"] + probe["test_examples"]) == (NAME, 3 * PER_CLASS - 1)
    grid = Image.open(tmp_path / "w" / "samples" / "step_00000002_completions.png")
    cell = (grid.size[0] - 2) // 4  # given | 2 completions | the file itself
    assert grid.size == (4 * cell + 2, 2 * cell + 2), grid.size  # one row a file
    # the labels are the folders' (each class has its colour): raw pixels tell them apart, shuffled labels would not
    assert probe["baselines"]["raw_pixels"] > 90, probe["baselines"]  # percent


def test_a_name_neither_in_the_registry_nor_prepared_is_refused_naming_both(tmp_path):
    from igpt_jax import config_checks

    with pytest.raises(config_checks.ConfigError) as refused:
        config_checks.check(_own_config(str(tmp_path)))
    said = str(refused.value)
    assert "config.data.dataset='my_images' is unknown" in said and "prepare --images" in said
    assert f"prepared in config.data.data_dir='{tmp_path}'" in said


def test_a_gs_data_dir_gives_the_same_batches_as_a_local_one(prepared, folder, gcs, gcs_here, monkeypatch):
    """Prepared straight into gs:// (written locally, copied up: ArrayRecord's writer opens local files only), then
    read by index from there: the same preprocessed batches as from the local data set."""
    from igpt_jax.data import get_source

    _, env, _ = gcs
    # ArrayRecord's reader is google-cloud-cpp's GCS client, which finds an emulator by this variable
    monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", env["STORAGE_EMULATOR_HOST"])
    argv = [sys.executable, "-m", "igpt_jax.data.prepare", f"--images={folder}", f"--name={NAME}"]
    argv += [f"--data_dir={gcs_here}", "--labels=folders", "--heldout_fraction=0.1"]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert prepare.prepared(gcs_here, NAME)
    indices = np.arange(0, 250, 7)
    local, remote = (get_source(_own_config(data_dir)) for data_dir in (prepared[0], gcs_here))
    for split in ("train", "heldout"):
        some = indices[indices < local.num_examples(split)]
        assert remote.num_examples(split) == local.num_examples(split)
        np.testing.assert_array_equal(remote.get(split, some, None), local.get(split, some, None))
        np.testing.assert_array_equal(remote.labels(split, some), local.labels(split, some))


def test_a_folder_prepared_without_labels_is_refused_by_what_needs_labels_before_training(tmp_path):
    from igpt_jax import config_checks

    (tmp_path / "loose").mkdir()
    for i in range(8):
        Image.new("RGB", (12, 10), (30 * i, 0, 0)).save(tmp_path / "loose" / f"{i}.png")
    argv = [sys.executable, "-m", "igpt_jax.data.prepare", f"--images={tmp_path / 'loose'}", f"--name={NAME}"]
    result = subprocess.run([*argv, f"--data_dir={tmp_path / 'tfds'}"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and "8 images, no labels" in result.stdout + result.stderr, result.stderr[-2000:]
    config = _own_config(str(tmp_path / "tfds"), finetune__dataset=NAME)
    config.data.eval_split = "train"  # no held-out split was made
    config_checks.check(config)  # training needs no labels
    config.evals.probe.dataset = NAME
    for mode, says in [("probe", "config.evals.probe (a linear probe) needs labels"), ("finetune", "finetune needs")]:
        with pytest.raises(config_checks.ConfigError, match=re.escape(says)):
            config_checks.check(config, mode)
