"""The linear probe: the on-device L-BFGS agrees with scikit-learn, features do not depend on the device count, the
mode writes probe.json and a probe.png with one point per layer."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import hf_reference
import jax
import numpy as np
import pytest
from helpers import TFDS_TEST_DIR, cli_flags, fashion_config, read_metrics
from PIL import Image
from scipy import ndimage
from tolerances import float32_chain

from igpt_jax import palette, plots, sharding, steps
from igpt_jax.data import get_source
from igpt_jax.probe import features, linear

ROOT = Path(__file__).resolve().parents[1]


def _clustered(n: int, d: int = 64, classes: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d))
    y = rng.integers(0, classes, n)
    return (0.3 * centres[y] + rng.normal(size=(n, d))).astype(np.float32), y.astype(np.int32)


@pytest.mark.parametrize("l2", [1e-4, 1e-2, 1e-1])
def test_lbfgs_probe_matches_scikit_learn(l2):
    from sklearn.linear_model import LogisticRegression

    x, y = _clustered(1500)
    train_x, test_x = linear.standardize(x[:1000], x[1000:])
    # scikit-learn minimises C * sum(cross-entropy) + |W|^2 / 2, the same as ours with C = 1 / (l2 * n)
    reference = LogisticRegression(C=1 / (l2 * 1000), max_iter=10_000, tol=1e-8).fit(train_x, y[:1000])
    # run close to the minimum, the same minimum: every weight agrees
    w, b = linear.fit(train_x, y[:1000], l2, num_classes=10, tol=1e-7)
    np.testing.assert_allclose(np.asarray(w), reference.coef_.T, atol=5e-3)
    # stopped where scikit-learn's own rule stops (largest gradient entry 1e-4), the probe's accuracy agrees
    w, b = linear.fit(train_x, y[:1000], l2, num_classes=10)
    ours = float(linear.accuracy(w[None], b[None], test_x[None], y[1000:])[0])
    assert abs(ours - 100 * reference.score(test_x, y[1000:])) <= 0.5


def test_the_sweep_picks_a_strength_on_held_out_train_images():
    x, y = _clustered(1200, seed=1)
    layers = np.stack([x, np.random.default_rng(2).normal(size=x.shape).astype(np.float32)])  # signal, noise
    result = linear.sweep(layers[:, :1000], y[:1000], layers[:, 1000:], y[1000:], 10, heldout_fraction=0.1)
    assert result[0]["accuracy"] > 60 > 25 > result[1]["accuracy"]  # chance is 10%
    assert all(r["l2"] in linear.L2_GRID for r in result)


def test_the_strength_is_the_one_that_scores_best_on_the_end_of_train():
    """The held-out end is the last heldout_fraction of the train rows, fitted on the rest. Here those 100 rows all
    say class 0 (the fit rows' most common class), whatever their features: only the grid's strongest L2, which
    shrinks the weights until the bias alone answers, scores them well. Clean labels there choose a weaker one."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(10, 64))
    y = np.where(rng.random(1200) < 0.4, 0, rng.integers(1, 10, 1200)).astype(np.int32)
    x = (0.5 * centres[y] + rng.normal(size=(1200, 64))).astype(np.float32)[None]
    mislabelled = y.copy()
    mislabelled[900:1000] = 0
    chosen = linear.sweep(x[:, :1000], mislabelled[:1000], x[:, 1000:], y[1000:], 10, heldout_fraction=0.1)[0]
    assert chosen["l2"] == max(linear.L2_GRID), chosen
    clean = linear.sweep(x[:, :1000], y[:1000], x[:, 1000:], y[1000:], 10, heldout_fraction=0.1)[0]
    assert clean["l2"] < max(linear.L2_GRID), clean


def test_features_are_the_same_on_1_and_8_devices():
    """BERT, so the masks' randomness is covered too."""
    outputs = []
    for devices in (jax.devices()[:1], jax.devices()):
        config = fashion_config(
            image_size=8, batch_size=16, objective="bert", mesh__ici={"data": 1, "fsdp": -1, "tensor": 1}
        )
        mesh = sharding.make_mesh(config, devices)
        setup = steps.make_setup(config, mesh, train=False)
        params = steps.init_params(setup)
        source = get_source(config)
        clusters = palette.fit(source.get("train", np.arange(256), None), k=16, seed=0)
        step = steps.make_feature_step(setup, (0, 1))
        with jax.set_mesh(mesh):
            batches = features.model_batches(config, source, "test", 40, step, params, clusters, mesh)
            outputs.append(features.gather(batches, 40))
    (one, labels_one), (eight, labels_eight) = outputs
    assert one.shape == (1, 2, 40, 32)
    np.testing.assert_allclose(one, eight, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(labels_one, labels_eight)


def _blobs(png: bytes, colour: tuple[int, int, int]) -> int:
    """Separate patches of exactly `colour` in a PNG read back with Pillow."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    _, count = ndimage.label(np.all(pixels == colour, axis=-1))
    return count


def test_the_png_has_one_point_per_layer():
    png = plots.accuracy_by_layer("t", [0, 1, 2, 3, 4], [50, 62, 70, 66, 60], {"raw_pixels": 55, "random_init": 40})
    assert Image.open(io.BytesIO(png)).format == "PNG"
    assert _blobs(png, plots.POINT) == 5 + 1  # and the legend's


@pytest.mark.slow  # a minute: training, then the mode in its own process
def test_mode_probe_writes_probe_json_png_and_a_metrics_row(tmp_path):
    workdir = tmp_path / "run"
    flags = cli_flags(image_size=8, embed_dim=32, total_steps=10, eval_every=10, checkpoint_every=10, warmup=3)
    sizes = ["--config.evals.probe.train_examples=300", "--config.evals.probe.test_examples=100"]
    trained = [
        sys.executable,
        "-m",
        "igpt_jax.main",
        f"--workdir={workdir}",
        *flags,
        "--config.evals.probe.at_end=True",
    ]
    subprocess.run([*trained, *sizes], cwd=ROOT, check=True)  # the train loop probes at its end
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "igpt_jax.main",
            f"--workdir={workdir}",
            "--mode=probe",
            "--config=configs/fashion_mnist.py:8",
            *sizes,
            f"--config.data.data_dir={TFDS_TEST_DIR}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    probe = json.loads((workdir / "probe.json").read_text())
    assert set(probe) >= {"dataset", "checkpoint_step", "train_examples", "test_examples", "layers", "best_layer"}
    assert set(probe) >= {"best_accuracy", "baselines"} and set(probe["baselines"]) == {"raw_pixels", "random_init"}
    assert (probe["dataset"], probe["checkpoint_step"], probe["train_examples"], probe["test_examples"]) == (
        "fashion_mnist",
        10,
        300,
        100,
    )
    assert sorted(probe["layers"]) == ["0", "1", "2"]  # the checkpoint's 2 blocks and ln_f, whatever the config says
    assert probe["forward_passes"] == 0  # the features of checkpoint 10 (and the step-0 model) the training run kept
    assert all(0 <= v["accuracy"] <= 100 and v["l2"] in linear.L2_GRID for v in probe["layers"].values())
    assert probe["best_accuracy"] == max(v["accuracy"] for v in probe["layers"].values())
    assert probe["baselines"]["raw_pixels"] > 30  # ten classes: chance is 10%
    assert f"probe step 10: best layer {probe['best_layer']} " in result.stdout
    for probed in ("step 10", "the random init", "raw pixels"):  # each bar names what it probes
        assert f"probe of {probed}: L2 sweep" in result.stderr
    assert _blobs((workdir / "probe.png").read_bytes(), plots.POINT) == 3 + 1
    assert json.loads((workdir / "probe" / "step_00000010.json").read_text()) == probe  # the history's record
    _, row = [r for r in read_metrics(workdir) if r.get("mode") == "probe"]  # the training run's, then the mode's
    assert row["best_accuracy"] == probe["best_accuracy"] and row["step"] == 10 and row["evaluator"] == "probe"
    assert [row[f"layer_{layer}"] for layer in "012"] == [probe["layers"][layer]["accuracy"] for layer in "012"]

    # Each layer's accuracy, from none of our code but the data and the palette: Hugging Face's float64 features of
    # the exported checkpoint, scikit-learn's logistic regression at the strength the probe chose. Our L-BFGS stops
    # at scikit-learn's gradient rule and runs on float32 features, so an image near a class boundary may go either
    # way: 2 of the 100 test images, 2 points.
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    hf = hf_reference.export(workdir, tmp_path / "hf")
    clusters = np.load(workdir / "palette.npy")
    source = get_source(fashion_config(image_size=8))
    x, y = {}, {}
    for split, n in (("train", 300), ("test", 100)):
        tokens = np.asarray(palette.quantize(source.get(split, np.arange(n), None), clusters))
        x[split], y[split] = hf_reference.probe_features(hf, tokens), source.labels(split, np.arange(n))
    for layer in range(3):
        scaler = StandardScaler().fit(x["train"][layer])
        C = 1 / (probe["layers"][str(layer)]["l2"] * 300)
        fitted = LogisticRegression(C=C, max_iter=10_000).fit(scaler.transform(x["train"][layer]), y["train"])
        reference = 100 * fitted.score(scaler.transform(x["test"][layer]), y["test"])
        assert abs(probe["layers"][str(layer)]["accuracy"] - reference) <= 2, (layer, probe["layers"], reference)


def test_features_are_standardised_with_trains_moments_and_a_constant_feature_stays_finite():
    rng = np.random.default_rng(4)
    train = rng.normal(loc=3.0, scale=2.0, size=(2, 50, 6)).astype(np.float32)
    train[:, :, 5] = 7.0  # the same in every image: its standard deviation is 0
    test = rng.normal(size=(2, 20, 6)).astype(np.float32)
    got_train, got_test = linear.standardize(train, test)
    varied = train[..., :5]
    mean, std = varied.mean(axis=1, keepdims=True), varied.std(axis=1, keepdims=True)
    # float32 moments over 50 images (values up to ~10, squares ~100): the variance within float32_chain(50, 100),
    # a relative error of that over std^2 in the standardised values, which reach about 3
    bound = 3 * float32_chain(50, 100.0) / varied.std(axis=1).min() ** 2
    np.testing.assert_allclose(got_train[..., :5], (varied - mean) / std, rtol=0, atol=bound)
    np.testing.assert_allclose(got_test[..., :5], (test[..., :5] - mean) / std, rtol=0, atol=bound)
    assert np.all(got_train[..., 5] == 0) and np.isfinite(got_test).all() and got_test.dtype == np.float32


def test_the_held_out_accuracy_is_scikit_learns_at_the_chosen_strength_and_ties_take_the_weakest():
    from sklearn.linear_model import LogisticRegression

    x, y = _clustered(1000, seed=6)
    (result,) = linear.sweep(x[None, :800], y[:800], x[None, 800:], y[800:], 10, heldout_fraction=0.25)
    fit_x, heldout_x = linear.standardize(x[:800], x[600:800])  # moments of all of train, as the sweep takes them
    reference = LogisticRegression(C=1 / (result["l2"] * 600), max_iter=10_000).fit(fit_x[:600], y[:600])
    assert abs(result["heldout_accuracy"] - 100 * reference.score(heldout_x, y[600:800])) <= 0.5
    flat = np.zeros((1, 100, 4), np.float32)  # features that say nothing: every strength scores the same
    labels = np.arange(100) % 2
    scores, best = linear.choose_l2(flat, labels, flat, labels, 2, l2_grid=(0.1, 1e-3, 1.0), progress=False,
                                    stop=lambda: False)  # fmt: skip
    assert best == [0.1] and scores.shape == (3, 1) and len(set(scores[:, 0])) == 1  # the first of equals


def test_a_class_too_small_for_its_draw_is_named_and_one_draw_has_no_spread():
    labels = np.array([0] * 5 + [1] * 3)
    with pytest.raises(
        linear.TooFewLabelsError, match="^a low-data probe of 4 labels per class: class 1 has 3 of the 8 "
    ):
        linear.balanced_subset(labels, 4, 2, np.random.default_rng(0))
    x, y = _clustered(200, d=8, classes=2, seed=7)
    (layer,) = linear.low_data(x[None], y, x[None], y, 2, per_class=10, draws=1, seed=0, heldout_fraction=0.2)
    assert layer["std"] == 0.0 and layer["mean"] == layer["accuracies"][0] > 50


def test_the_sweep_shows_its_progress_only_when_asked(capsys):
    x, y = _clustered(200, d=8, seed=8)
    linear.sweep(x[None, :150], y[:150], x[None, 150:], y[150:], 10, heldout_fraction=0.2, progress=False)
    assert capsys.readouterr().err == ""
    linear.sweep(x[None, :150], y[:150], x[None, 150:], y[150:], 10, heldout_fraction=0.2)
    err = capsys.readouterr().err
    assert "probe: L2 sweep" in err and f"{len(linear.L2_GRID)}/{len(linear.L2_GRID)}" in err
    linear.sweep(x[None, :150], y[:150], x[None, 150:], y[150:], 10, heldout_fraction=0.2, name="probe of raw pixels")
    assert "probe of raw pixels: L2 sweep" in capsys.readouterr().err  # which features: a probe runs three sweeps


def test_low_data_draws_come_from_before_the_held_out_end_are_seeded_and_reported_to_a_thousandth():
    """Class 9 lives only in the held-out end (the last 20% of train): a draw of every class cannot be made from
    the rows before it. Otherwise the same seed draws the same subsets, and two draws have their spread."""
    x, y = _clustered(300, d=8, classes=9, seed=9)
    labels = np.concatenate([y[:240], np.full(60, 9)]).astype(np.int32)
    with pytest.raises(
        linear.TooFewLabelsError, match="^a low-data probe of 4 labels per class: class 9 has 0 of the 240 "
    ):
        linear.low_data(x[None], labels, x[None], labels, 10, per_class=4, draws=1, seed=0, heldout_fraction=0.2)
    args = dict(per_class=5, draws=2, seed=3, heldout_fraction=0.2)
    first = linear.low_data(x[None], y, x[None, :30], y[:30], 9, **args)  # 30 test images: thirds of a point
    assert linear.low_data(x[None], y, x[None, :30], y[:30], 9, **args) == first
    (layer,) = first
    assert layer["std"] == round(float(np.std(layer["accuracies"], ddof=1)), 3) > 0
    assert all(round(a, 3) == a for a in layer["accuracies"] + [layer["mean"], layer["std"]])
    # 210 train images, the last 42 held out, and 90 test images: neither score is a round number
    (full,) = linear.sweep(x[None, :210], y[:210], x[None, 210:], y[210:], 9, heldout_fraction=0.2, progress=False)
    assert round(full["accuracy"], 3) == full["accuracy"] and round(full["heldout_accuracy"], 3) == full[
        "heldout_accuracy"
    ]  # fmt: skip
    exactly = np.array([0] * 4 + [1] * 4)
    assert sorted(linear.balanced_subset(exactly, 4, 2, np.random.default_rng(0))) == list(range(8))
