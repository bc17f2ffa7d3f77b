"""Palette: OpenAI's quantisation (checked against Hugging Face's processor), decoding, k-means fit, file format."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from transformers.models.imagegpt.image_processing_pil_imagegpt import ImageGPTImageProcessorPil

from igpt_jax import palette


def _random_clusters(k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (k, 3)).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quantize_equals_huggingface_processor(seed):
    rng = np.random.default_rng(seed)
    clusters = _random_clusters(512, seed)
    images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    processor = ImageGPTImageProcessorPil(clusters=clusters, do_resize=False)
    expected = np.stack(processor(list(images), return_tensors="np")["input_ids"])
    ours = np.asarray(palette.quantize(jnp.asarray(images), clusters))
    assert ours.shape == (4, 32 * 32) and ours.dtype == np.int32
    np.testing.assert_array_equal(ours, expected)


def test_quantize_is_raster_order():
    clusters = np.array([[-1, -1, -1], [1, 1, 1]], np.float32)  # black, white
    image = np.zeros((2, 3, 3), np.uint8)
    image[0, 2] = 255  # top-right pixel white
    assert palette.quantize(image, clusters).tolist() == [0, 0, 1, 0, 0, 0]


def test_dequantize_is_openai_rounding_and_idempotent():
    clusters = _random_clusters(512, 3)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 512, (2, 64)))
    images = palette.dequantize(tokens, clusters)
    assert images.shape == (2, 8, 8, 3) and images.dtype == jnp.uint8
    expected = np.rint(127.5 * (clusters[np.asarray(tokens)] + 1)).astype(np.uint8).reshape(2, 8, 8, 3)
    np.testing.assert_array_equal(np.asarray(images), expected)
    again = palette.dequantize(palette.quantize(images, clusters), clusters)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(images))


def test_fit_is_deterministic_and_recovers_clusters():
    rng = np.random.default_rng(0)
    true_colours = rng.integers(0, 256, (8, 3))
    pixels = np.clip(true_colours[rng.integers(0, 8, 20_000)] + rng.integers(-3, 4, (20_000, 3)), 0, 255)
    pixels = pixels.astype(np.uint8).reshape(200, 10, 10, 3)
    a = palette.fit(pixels, k=8, seed=0)
    b = palette.fit(pixels, k=8, seed=0)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (8, 3) and a.dtype == np.float32 and np.all(np.abs(a) <= 1)
    found = np.rint(127.5 * (a + 1))
    # every true colour has a centre within the noise (+-3 per channel)
    distance = np.abs(found[:, None, :] - true_colours[None, :, :]).max(-1).min(0)
    assert distance.max() <= 2, distance


def test_fit_full_k_has_no_empty_or_nan_clusters():
    images = np.random.default_rng(1).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    clusters = palette.fit(images, k=512, seed=0, num_pixels=8192, iterations=10)
    assert clusters.shape == (512, 3) and np.all(np.isfinite(clusters))
    counts = np.bincount(np.asarray(palette.quantize(images, clusters)).ravel(), minlength=512)
    assert counts.min() > 0


def test_fit_on_grayscale_gives_only_real_colours():
    gray = np.random.default_rng(2).integers(0, 256, (50, 28, 28), dtype=np.uint8)
    images = np.repeat(gray[..., None], 3, axis=-1)
    clusters = palette.fit(images, k=512, seed=0)
    assert clusters.shape == (256, 3)  # 256 gray levels: one centre each, none empty
    assert np.all(np.isfinite(clusters)) and np.all(clusters[:, 0] == clusters[:, 2])
    counts = np.bincount(np.asarray(palette.quantize(images, clusters)).ravel(), minlength=len(clusters))
    assert counts.min() > 0
    small = palette.fit(images, k=16, seed=0)
    counts = np.bincount(np.asarray(palette.quantize(images, small)).ravel(), minlength=16)
    assert small.shape == (16, 3) and counts.min() > 0 and np.all(np.isfinite(small))


def test_save_load_openai_format(tmp_path):
    clusters = _random_clusters(512, 4)
    path = tmp_path / "kmeans_centers.npy"
    palette.save(path, clusters)
    raw = np.load(path)  # the plain .npy OpenAI ships
    assert raw.shape == (512, 3) and raw.dtype == np.float32
    np.testing.assert_array_equal(palette.load(path), clusters)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((512, 4)), r"expected shape \(K, 3\)"),
        (np.full((4, 3), 2.0), r"within \[-1, 1\]"),
        (np.full((4, 3), np.nan), "finite"),
    ],
)
def test_load_refuses_bad_palettes(tmp_path, array, message):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(ValueError, match=message):
        palette.load(path)
