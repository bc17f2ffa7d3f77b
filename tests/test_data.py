"""The data pipeline: real TFDS builders offline, the paper's preprocessing, byte-identical batches across process
counts and resumes, clear errors for bad data."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from fake_ilsvrc import make_ilsvrc_manual_dir
from helpers import fashion_config, read_metrics
from PIL import Image

from igpt_jax import train
from igpt_jax.data import get_source, pipeline, preprocess

HERE = Path(__file__).resolve().parent


# --- Fashion-MNIST through TFDS's real builder, fed offline from Debian's files


def test_fashion_mnist_builder_runs_offline_from_debian_files():
    config = fashion_config(image_size=28)
    source = get_source(config)
    assert source.builder.is_prepared()
    assert source.num_examples("train") == 60_000 and source.num_examples("test") == 10_000
    rng = np.random.default_rng(0)
    images = source.get("train", rng.choice(60_000, 500, replace=False), None)
    assert images.shape == (500, 28, 28, 3) and images.dtype == np.uint8
    assert np.array_equal(images[..., 0], images[..., 2])  # gray became RGB
    assert abs(images.mean() - 72.94) < 3  # Fashion-MNIST's pixel mean


# --- preprocessing


def _photo(w=500, h=375, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
    return Image.fromarray(np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))


def _coordinates(w: int, h: int) -> Image.Image:
    """Red = x, green = y, each scaled to 0..255: a crop's output tells where in the image it came from."""
    x = np.linspace(0, 255, w)[None, :] * np.ones((h, 1))
    y = np.linspace(0, 255, h)[:, None] * np.ones((1, w))
    return Image.fromarray(np.round(np.stack([x, y, np.zeros_like(x)], -1)).astype(np.uint8))


def _source_box(out: np.ndarray, w: int, h: int) -> tuple[float, float, float, float]:
    """(left, top, width, height) in source pixels of the region an area-downsampled output came from: each output
    pixel is the mean over its footprint, so the first and last columns sit half a footprint inside the edges."""
    size = out.shape[0]
    red, green = out[..., 0].astype(float).mean(0), out[..., 1].astype(float).mean(1)
    width = (red[-1] - red[0]) * size / (size - 1) * (w - 1) / 255
    height = (green[-1] - green[0]) * size / (size - 1) * (h - 1) / 255
    return red[0] * (w - 1) / 255 - width / (2 * size), green[0] * (h - 1) / 255 - height / (2 * size), width, height


def test_imagenet_train_crop_is_a_random_224_crop_of_a_256_to_384_short_side():
    """The paper: shorter side resized to U[256, 384], then a random 224x224 crop (here read back from where the
    output's pixels came from in a coordinate image; +-12 covers uint8 rounding)."""
    w, h, size = 640, 480, 16
    image = _coordinates(w, h)
    short_sides, centres = [], []
    for seed in range(300):
        out = preprocess.imagenet_train(image.copy(), "photo", size, np.random.default_rng([0, seed]), flip=False)
        left, top, width, height = _source_box(out, w, h)
        assert abs(width - height) < 6, (seed, width, height)  # square in the resized image, so in the source
        assert left > -3 and top > -3 and left + width < w + 3 and top + height < h + 3, (seed, left, top)
        short_sides.append(224 * min(w, h) / width)  # the crop is 224 resized pixels wide
        centres.append(left + width / 2)
    assert 256 - 12 < min(short_sides) < 256 + 12 and 384 - 12 < max(short_sides) < 384 + 12
    assert np.std(centres) > 20  # the position is random too (a centred crop would keep the centre at w / 2)
    a = preprocess.imagenet_train(image.copy(), "photo", size, np.random.default_rng([0, 5]), flip=False)
    b = preprocess.imagenet_train(image.copy(), "photo", size, np.random.default_rng([0, 5]), flip=False)
    np.testing.assert_array_equal(a, b)  # reproducible from the example's generator


def _thirds(long: int, short: int, landscape: bool) -> Image.Image:
    """Red, green and blue bands along the long side, the green one exactly the centre crop's source region."""
    edge = (long - short) // 2  # shorter side to 224 then a centred 224 crop: the middle `short` pixels
    bands = np.zeros((long, 3), np.uint8)
    bands[:edge, 0], bands[edge : edge + short, 1], bands[edge + short :, 2] = 255, 255, 255
    image = np.broadcast_to(
        bands[None] if landscape else bands[:, None], (short, long, 3) if landscape else (long, short, 3)
    )
    return Image.fromarray(np.ascontiguousarray(image))


@pytest.mark.parametrize("landscape", [True, False])
def test_imagenet_eval_is_the_centre_crop(landscape):
    """All green: a top-left crop would show red, no crop at all red and blue."""
    out = preprocess.imagenet_eval(_thirds(600, 300, landscape), "bands", 28, None, flip=False)
    assert out.shape == (28, 28, 3)
    assert out[..., 1].min() >= 250 and out[..., 0].max() <= 5 and out[..., 2].max() <= 5, out[..., :].max((0, 1))


def test_downsampling_is_anti_aliased():
    checker = (np.indices((224, 224)).sum(0) % 2 * 255).astype(np.uint8)
    out = preprocess.resize_only(Image.fromarray(np.stack([checker] * 3, -1)), "checker", 32, None, flip=False)
    block_means = checker.reshape(32, 7, 32, 7).mean(axis=(1, 3))  # 224 = 32 x 7: each output pixel's footprint
    assert np.abs(out[..., 0] - block_means).max() <= 1  # area average (24 or 25 of 49 white), no aliasing pattern


# --- ImageNet: the real imagenet2012 builder, offline, on a manual_dir of real photos


def _imagenet_config(tmp_path: Path, **overrides):
    config = fashion_config(image_size=8, total_steps=4, batch_size=8, **overrides)
    config.data.dataset = "imagenet2012"
    config.data.eval_split = "validation"
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.manual_dir = str(tmp_path / "manual")
    config.checkpoint_every_steps = 2
    return config


def test_imagenet2012_builder_feeds_training_end_to_end(tmp_path):
    make_ilsvrc_manual_dir(tmp_path / "manual")
    config = _imagenet_config(tmp_path)
    last = train.train_and_evaluate(config, str(tmp_path / "work"))
    assert last["step"] == 4 and np.isfinite(last["loss"])
    source = get_source(config)
    assert source.num_examples("train") == 20 and source.num_examples("validation") == 10
    assert any(r.get("mode") == "eval" for r in read_metrics(tmp_path / "work"))


def test_missing_manual_files_are_named(tmp_path):
    (tmp_path / "manual").mkdir()
    config = _imagenet_config(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"expected ILSVRC2012_img_train\.tar and/or ILSVRC2012_img_val\.tar"):
        get_source(config)


def test_a_preparation_that_fails_part_way_leaves_nothing_a_later_run_would_read(tmp_path, monkeypatch):
    make_ilsvrc_manual_dir(tmp_path / "manual")
    config = _imagenet_config(tmp_path)
    builder_class = type(tfds.builder("imagenet2012"))
    original = builder_class._generate_examples

    def five_then_fail(self, *args, **kwargs):
        for i, example in enumerate(original(self, *args, **kwargs)):
            if i == 5:
                raise RuntimeError("the disk went away")
            yield example

    monkeypatch.setattr(builder_class, "_generate_examples", five_then_fail)
    with pytest.raises(RuntimeError, match="the disk went away"):
        get_source(config)
    written = [p for p in (tmp_path / "tfds").rglob("*") if p.is_file() and "downloads" not in p.parts]
    assert written == []  # no dataset files: nothing for a later run to mistake for a prepared split
    monkeypatch.undo()
    source = get_source(config)  # the next run prepares it whole
    assert source.num_examples("train") == 20 and source.num_examples("validation") == 10


def test_undecodable_image_is_named(tmp_path):
    make_ilsvrc_manual_dir(tmp_path / "manual", corrupt="n03063599_2.JPEG")
    config = _imagenet_config(tmp_path)
    try:
        source = get_source(config)
    except Exception as e:  # TFDS refused it while preparing: its message must name the file
        assert "n03063599_2.JPEG" in str(e), e
        return
    with pytest.raises(preprocess.DecodeError, match=r"n03063599_2\.JPEG.*cannot decode image"):
        source.get("train", np.arange(source.num_examples("train")), None)


def test_wrong_shaped_preprocessing_output_is_refused(monkeypatch):
    config = fashion_config(image_size=8)
    source = get_source(config)
    monkeypatch.setattr(source, "eval_fn", lambda image, name, size, rng, flip: np.zeros((size, size + 1, 3), np.uint8))
    with pytest.raises(ValueError, match=r"fashion_mnist train\[3\].*expected uint8 \(8, 8, 3\)"):
        source.get("train", np.array([3]), None)


# --- the same bytes whatever the number of processes, and after a resume


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digests(tmp_path: Path, num_processes: int, start: int) -> dict:
    out = tmp_path / f"digests_{num_processes}_{start}.json"
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "batch_digests.py"), str(num_processes), str(i), port, str(start), str(out)],
            env=env,
            cwd=HERE.parent,
        )
        for i in range(num_processes)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0] * num_processes
    result = json.loads(out.read_text())
    assert result["devices"] == 8 and result["processes"] == num_processes
    return {int(k): v for k, v in result["digests"].items()}


def test_global_batches_identical_across_processes_and_resume(tmp_path):
    get_source(fashion_config())  # prepare once before the processes start
    one = _digests(tmp_path, 1, 0)
    two = _digests(tmp_path, 2, 0)
    resumed = _digests(tmp_path, 1, 10)
    assert sorted(one) == list(range(21))
    assert one == two
    assert resumed == {s: d for s, d in one.items() if s >= 10}
    assert len(set(one.values())) == 21  # and every step differs


# --- prefetching


def test_prefetcher_keeps_order_and_passes_errors_on():
    def load(step):
        if step == 5:
            raise ValueError("bad step 5")
        return step * 10

    prefetch = pipeline.Prefetcher(load, start=2, depth=2)
    assert [prefetch.get(s) for s in (2, 3, 4)] == [20, 30, 40]
    with pytest.raises(ValueError, match="bad step 5"):
        prefetch.get(5)
    prefetch.close()


def test_reduced_jpeg_decoding_matches_full_decoding():
    """The DCT-scaled decode of a large JPEG gives (nearly) the pixels of the full decode: only a shortcut."""
    from skimage import data

    photo = np.asarray(Image.fromarray(data.astronaut()).resize((1024, 1024), Image.BICUBIC))
    jpeg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(photo).save(jpeg, format="JPEG", quality=95)
    Image.fromarray(photo).save(png, format="PNG")
    fast = preprocess.imagenet_eval(preprocess.open_image(jpeg.getvalue(), "a"), "a", 32, None, False)
    full = preprocess.imagenet_eval(preprocess.open_image(png.getvalue(), "b"), "b", 32, None, False)
    assert np.abs(fast.astype(int) - full.astype(int)).mean() < 3


# Runs igpt with TensorFlow unimportable, as where only the package's own requirements are installed.
WITHOUT_TENSORFLOW = """
import sys

class NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "tensorflow":
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, NoTensorFlow())
from igpt_jax import main
sys.argv = ["igpt", *sys.argv[1:]]
main.run()
"""


def test_a_data_set_to_prepare_without_tensorflow_is_refused_in_one_line_naming_the_ways_on(tmp_path):
    data_dir = tmp_path / "tfds"
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TENSORFLOW, "--config=fashion_mnist:8", f"--workdir={tmp_path / 'run'}",
         f"--config.data.data_dir={data_dir}"],
        env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if line.startswith("igpt: ")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert lines == [
        f"igpt: fashion_mnist is not prepared in {data_dir}/fashion_mnist/3.0.1 and preparing it needs TensorFlow: "
        "pip install 'igpt_jax[data]' here, or prepare it where TensorFlow is (`tfds build fashion_mnist "
        f"--file_format=array_record --data_dir=DIR`) and set config.data.data_dir=DIR"
    ]
    assert not (data_dir / "fashion_mnist" / "3.0.1").exists()  # nothing that looks prepared
