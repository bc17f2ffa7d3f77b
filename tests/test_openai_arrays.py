"""OpenAI's pre-quantized arrays as a data set: the same tokens give the same loss as the images they came from, the
rows read by index are the file's wherever it is, and arrays made with another palette are refused."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers import fashion_config, override

from igpt_jax import config_checks, palette, train
from igpt_jax.data import get_source
from igpt_jax.data.openai_arrays import SPECS, NpyRows, OpenAIArrays
from igpt_jax.evaluators import runner

EXAMPLES = 40  # not a multiple of the batch (16): the padded last batch is read through both paths


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[str, np.ndarray]:
    """A 2-step model on 8x8 Fashion-MNIST, and the tokens of its first test images under its own palette."""
    workdir = str(tmp_path_factory.mktemp("run"))
    config = fashion_config(image_size=8, total_steps=2, checkpoint_every_steps=2)
    train.train_and_evaluate(config, workdir)
    clusters = palette.load(f"{workdir}/palette.npy")
    images = get_source(config).get("test", np.arange(EXAMPLES), None)
    tokens = np.asarray(jax.device_get(palette.quantize(images, clusters))).reshape(EXAMPLES, -1)
    return workdir, tokens


def _openai_folder(folder, tokens: np.ndarray, clusters: np.ndarray) -> str:
    """What OpenAI's download.py leaves: cifar10_teX.npy (narrow ints), cifar10_teY.npy (one-hot), the clusters."""
    folder.mkdir(exist_ok=True)
    np.save(folder / "cifar10_teX.npy", tokens.astype(np.uint16))
    np.save(folder / "cifar10_teY.npy", np.eye(10, dtype=np.float32)[np.arange(len(tokens)) % 10])
    np.save(folder / "kmeans_centers.npy", clusters)
    return str(folder)


def _eval(workdir: str, **overrides) -> dict:
    config = override(fashion_config(image_size=8), evals__eval__examples=EXAMPLES, **overrides)
    (row,) = runner.eval_mode(config, workdir)
    return row


def test_openai_arrays_of_the_same_tokens_give_the_loss_of_the_images_they_came_from(trained, tmp_path):
    workdir, tokens = trained
    ordinary = _eval(workdir, data__eval_split="test")
    data_dir = _openai_folder(tmp_path, tokens, palette.load(f"{workdir}/palette.npy"))
    arrays = _eval(workdir, data__data_dir=data_dir, evals__eval__dataset="openai_cifar10", evals__eval__split="test")
    assert arrays["examples"] == ordinary["examples"] == EXAMPLES
    assert arrays["loss"] == ordinary["loss"], (arrays, ordinary)  # the same tokens through the same program
    flipped = _openai_folder(tmp_path / "flipped", tokens[:, ::-1], palette.load(f"{workdir}/palette.npy"))
    other = _eval(workdir, data__data_dir=flipped, evals__eval__dataset="openai_cifar10", evals__eval__split="test")
    assert other["loss"] != ordinary["loss"]  # the arrays are what was read: each image's tokens reversed score else


def test_arrays_quantized_with_another_palette_are_refused_before_any_batch(trained, tmp_path):
    workdir, tokens = trained
    other = palette.load(f"{workdir}/palette.npy")[::-1].copy()
    data_dir = _openai_folder(tmp_path, tokens, other)
    with pytest.raises(config_checks.ConfigError, match="index the .* colours of .*kmeans_centers.npy"):
        _eval(workdir, data__data_dir=data_dir, evals__eval__dataset="openai_cifar10", evals__eval__split="test")


def test_a_missing_array_says_how_openai_fetches_it(trained, tmp_path):
    workdir, _ = trained
    with pytest.raises(config_checks.ConfigError, match="cifar10_teX.npy is missing: .*download.py --dataset cifar10"):
        _eval(workdir, data__data_dir=str(tmp_path), evals__eval__dataset="openai_cifar10")


@pytest.mark.parametrize("where", ["local", "gs"])
def test_rows_read_by_index_are_the_files_rows_locally_and_on_gs(where, tmp_path, request):
    from igpt_jax.workdir import storage

    rng = np.random.default_rng(0)
    tokens, labels = rng.integers(0, 16, (30, 64)).astype(np.int64), rng.integers(0, 10, 30)  # the config's 16 colours
    np.save(tmp_path / "cifar10_trX.npy", tokens)
    np.save(tmp_path / "cifar10_trY.npy", np.eye(10, dtype=np.uint8)[labels])
    folder = str(tmp_path)
    if where == "gs":
        folder = request.getfixturevalue("gcs_here")
        for name in ("cifar10_trX.npy", "cifar10_trY.npy"):
            storage.write_bytes(storage.path(f"{folder}/{name}"), (tmp_path / name).read_bytes())
    config = fashion_config(image_size=8, data__dataset="openai_cifar10", data__data_dir=folder)
    source = get_source(config)
    assert isinstance(source, OpenAIArrays) and source.spec == SPECS["openai_cifar10"]
    some = np.array([29, 0, 7, 7, 13])
    assert source.num_examples("train") == 30
    np.testing.assert_array_equal(source.get("train", some), tokens[some])
    np.testing.assert_array_equal(source.labels("train", some), labels[some])
    assert NpyRows(storage.path(f"{folder}/cifar10_trX.npy")).rows([]).shape == (0, 64)
    config.model.vocab_size = 8  # a model of fewer colours than the tokens use
    with pytest.raises(ValueError, match=r"cifar10_trX.npy: tokens outside 0 .. 7 \(config.model.vocab_size\)"):
        get_source(config).get("train", some)


def test_a_run_on_the_arrays_takes_the_palette_they_index(tmp_path):
    """Training on OpenAI's arrays fits no palette: the run's palette.npy is the kmeans_centers.npy beside them, so its
    samples and probes of images use OpenAI's colours."""
    rng = np.random.default_rng(1)
    clusters = rng.uniform(-1, 1, (16, 3)).astype(np.float32)
    for split in ("tr", "te"):
        np.save(tmp_path / f"cifar10_{split}X.npy", rng.integers(0, 16, (32, 64)).astype(np.uint16))
    np.save(tmp_path / "kmeans_centers.npy", clusters)
    config = fashion_config(image_size=8, total_steps=1, data__dataset="openai_cifar10", data__data_dir=str(tmp_path))
    train.train_and_evaluate(config, str(tmp_path / "run"))
    np.testing.assert_array_equal(palette.load(tmp_path / "run" / "palette.npy"), clusters)
