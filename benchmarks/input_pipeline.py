"""Host input pipeline throughput (images/s on this host), ours against a tf.data pipeline doing the same work.

Both read the same TFDS imagenet2012 examples, built offline from real photos (tests/fake_ilsvrc.py): ours
from ArrayRecord files by index, tf.data from TFRecord files (the format it streams). Both decode the JPEGs and apply
the paper's training crop (random short side in [256, 384], random 224 crop, area downsample to 32x32), producing
uint8 [batch, 32, 32, 3]. Ours: PIL in a thread pool (igpt_jax.data.pipeline.load_rows); peer: tf.data with a
parallel map and AUTOTUNE prefetch. Fashion-MNIST (28x28 PNGs, no resize) is timed for ours too.

Usage: python benchmarks/input_pipeline.py [--batches 30] [--batch_size 64] [--out results.json]
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny ILSVRC the tests build too


import report  # noqa: E402
from fake_ilsvrc import make_ilsvrc_manual_dir  # noqa: E402

from igpt_jax.configs import fashion_mnist  # noqa: E402
from igpt_jax.data import get_source, pipeline  # noqa: E402


def _config(dataset: str, data_dir: str, manual_dir: str, batch_size: int, size: int):
    config = fashion_mnist.get_config(str(size))
    config.data.dataset = dataset
    config.data.data_dir = data_dir
    config.data.manual_dir = manual_dir
    config.batch_size = batch_size
    return config


def time_ours(config, batches: int) -> float:
    source = get_source(config)
    rows = slice(0, config.batch_size)
    pipeline.load_rows(source, "train", config, 0, rows, train=True)  # warm-up: open files, start threads
    start = time.perf_counter()
    for step in range(1, batches + 1):
        batch = pipeline.load_rows(source, "train", config, step, rows, train=True)["images"]
    elapsed = time.perf_counter() - start
    assert batch.shape == (config.batch_size, config.model.image_size, config.model.image_size, 3)
    return batches * config.batch_size / elapsed


def time_tf_data(config, batches: int) -> float:
    import tensorflow as tf
    import tensorflow_datasets as tfds

    # tf.data reads TFRecord (TFDS cannot stream ArrayRecord into tf.data): the same examples, prepared again.
    builder = tfds.builder("imagenet2012", data_dir=config.data.data_dir + "_tfrecord", file_format="tfrecord")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=config.data.manual_dir))
    ds = builder.as_dataset(split="train", decoders={"image": tfds.decode.SkipDecoding()}, shuffle_files=False)
    size = config.model.image_size

    def crop(example):
        image = tf.io.decode_jpeg(example["image"], channels=3)
        short = tf.random.uniform((), 256, 385, dtype=tf.int32)
        hw = tf.cast(tf.shape(image)[:2], tf.float32)
        scale = tf.cast(short, tf.float32) / tf.reduce_min(hw)
        new = tf.maximum(tf.cast(tf.round(hw * scale), tf.int32), short)
        image = tf.image.resize(image, new, method="bicubic")
        image = tf.image.random_crop(image, (224, 224, 3))
        image = tf.image.resize(image, (size, size), method="area")
        return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)

    ds = ds.repeat().shuffle(256).map(crop, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(config.batch_size).prefetch(tf.data.AUTOTUNE)
    it = iter(ds)
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
    elapsed = time.perf_counter() - start
    assert tuple(batch.shape) == (config.batch_size, size, size, 3)
    return batches * config.batch_size / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="igpt_bench_"))
    make_ilsvrc_manual_dir(work / "manual", per_class=40, max_side=512, num_val=10)
    imagenet = _config("imagenet2012", str(work / "tfds"), str(work / "manual"), args.batch_size, 32)
    ours = time_ours(imagenet, args.batches)
    peer = time_tf_data(imagenet, args.batches)
    fashion = _config("fashion_mnist", str(work / "tfds"), "", args.batch_size, 28)
    result = {
        "benchmark": "input_pipeline",
        "host": {"cpus": os.cpu_count(), "machine": platform.machine()},
        "batch_size": args.batch_size,
        "batches": args.batches,
        "imagenet2012_train_32px_images_per_sec": {"igpt_jax": round(ours, 1), "tf_data": round(peer, 1)},
        "ratio_igpt_jax_over_tf_data": round(ours / peer, 3),
        "fashion_mnist_train_28px_images_per_sec": {"igpt_jax": round(time_ours(fashion, args.batches), 1)},
        "photos": "200 JPEG crops of scikit-image photos, 128..512 px a side (ImageNet's average is ~400x350)",
    }
    report.emit(result, args.out)


if __name__ == "__main__":
    main()
