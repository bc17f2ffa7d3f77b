"""The streamed SGD probe: it agrees with the full-batch L-BFGS probe, separates signal from noise, keeps memory flat in
the number of examples, and a probe's `solver` setting picks it for feature sets too large to hold."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import fashion_config
from tolerances import float32_chain

from igpt_jax import sharding, steps
from igpt_jax.probe import linear, protocol, streamed
from igpt_jax.workdir import storage


def _clustered(n: int, d: int = 64, classes: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d))
    y = rng.integers(0, classes, n)
    return (0.3 * centres[y] + rng.normal(size=(n, d))).astype(np.float32), y.astype(np.int32)


def _passes(x: np.ndarray, y: np.ndarray, batch: int):
    """A pass over arrays held here, as the feature cache streams them: x [L, n, d] -> batches [1, L, B, d]."""
    n = x.shape[1]

    def one_pass():
        for start in range(0, n, batch):
            index = start + np.arange(batch)
            index[index >= n] = -1
            yield jnp.asarray(x[None, :, index % n]), y[index % n], index

    return one_pass


def test_sgd_agrees_with_lbfgs_and_separates_signal_from_noise():
    x, y = _clustered(2400, seed=3)
    layers = np.stack([x, np.random.default_rng(4).normal(size=x.shape).astype(np.float32)])  # signal, noise
    layers = 4 * layers + np.linspace(-3, 3, 64, dtype=np.float32)  # off-centre, wide: standardising matters
    train, test = (layers[:, :2000], y[:2000]), (layers[:, 2000:], y[2000:])
    full = linear.sweep(*train, *test, 10, heldout_fraction=0.1, progress=False)
    sgd = streamed.sweep(
        _passes(*train, 64), 2000, _passes(*test, 64), 10, layers=2, dim=64, batch_size=64, heldout_fraction=0.1
    )
    assert abs(sgd[0]["accuracy"] - full[0]["accuracy"]) <= 2.0, (sgd, full)
    assert sgd[0]["accuracy"] > 60 > 25 > sgd[1]["accuracy"]  # chance is 10%
    assert all(r["l2"] in linear.L2_GRID for r in sgd)


def _peak_rss_growth(n: int, layers: int = 4, dim: int = 256, batch: int = 256) -> float:
    """MiB by which the process's peak resident memory rises during a streamed sweep over n generated examples."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, dim)).astype(np.float32)

    def one_pass():  # features made batch by batch, as the model makes them: none is kept by the source
        for start in range(0, n, batch):
            index = start + np.arange(batch)
            labels = (index % 10).astype(np.int32)
            x = centres[labels] + rng.normal(size=(1, layers, batch, dim)).astype(np.float32)
            yield jnp.asarray(x), labels, index

    settings = streamed.Settings(epochs=1)
    args = dict(layers=layers, dim=dim, batch_size=batch, heldout_fraction=0.1, settings=settings)
    streamed.sweep(one_pass, batch * 4, one_pass, 10, **args)  # compiled, warm
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current resident size
    before = _status("VmRSS")
    streamed.sweep(one_pass, n, one_pass, 10, **args)
    return (_status("VmHWM") - before) / 1024


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def test_streamed_memory_is_flat_in_the_number_of_examples():
    small, large = _peak_rss_growth(2048), _peak_rss_growth(2048 * 16)  # 128 MiB of features in the large pass
    assert large < small + 32, (small, large)


def test_auto_streams_feature_sets_too_large_to_hold():
    entry = fashion_config().evals.probe
    assert protocol.solver(entry, 50_000, 4, 128) == "lbfgs"
    assert protocol.solver(entry, 1_281_167, 48, 1536) == "sgd"  # ImageNet through every iGPT-L layer
    entry.solver = "sgd"
    assert protocol.solver(entry, 100, 1, 8) == "sgd"


def test_the_probe_runs_streamed_end_to_end(tmp_path):
    config = fashion_config(evals__probe__solver="sgd", evals__probe__sgd_epochs=3, evals__probe__train_examples=400)
    config.evals.probe.test_examples = 100
    setup = steps.make_setup(config, sharding.make_mesh(config), train=False)
    from igpt_jax import palette
    from igpt_jax.data import get_source

    source = get_source(config)
    clusters = palette.load_or_fit_palette(config, lambda: source, storage.path(tmp_path))
    params = steps.init_params(setup)
    probe = protocol.LinearProbe(
        config, config.evals.probe, setup, jnp.asarray(clusters), setup.mesh, storage.path(tmp_path), "probe"
    )
    result = probe(params, 0)
    assert result["solver"] == "sgd" and sorted(result["layers"]) == ["0", "1", "2"]  # 2: ln_f's output
    assert result["baselines"]["raw_pixels"] > 40  # ten classes: chance is 10%
    json.dumps(result)  # probe.json can hold it


def test_moments_are_numpys_over_the_real_rows_and_the_padding_is_left_out():
    x, y = _clustered(100, d=8, seed=5)
    layers = np.stack([x, 3 * x + 1])  # [2, 100, 8]
    mean, std = streamed.moments(_passes(layers, y, 32), 2, 8)  # 4 batches, the last with 28 padding rows
    # float32 sums of 100 rows of values up to |x| ~ 12 (mean) and x^2 ~ 150 (the variance, whose square root halves
    # the relative error): float32_chain(100, 150) = 5e-6 absolute on the mean of squares
    bound = float32_chain(100, 150.0)
    np.testing.assert_allclose(np.asarray(mean), layers.mean(axis=1), rtol=0, atol=float32_chain(100, 12.0))
    np.testing.assert_allclose(np.asarray(std) ** 2, (layers.std(axis=1) + 1e-6) ** 2, rtol=0, atol=2 * bound)


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_two_sgd_epochs_are_momentum_steps_on_the_penalised_cross_entropy_along_a_cosine():
    """One batch a pass and two epochs: two steps of SGD with momentum 0.9 (the paper's) at learning rates 0.1 and
    0.05 (a cosine from 0.1 to 0 over the 2 steps), on standardised features, from zero weights, of mean
    cross-entropy over the rows in the fit + l2/2 |W|^2 (the bias not penalised): written out in NumPy here."""
    rng = np.random.default_rng(6)
    n, d, c, l2 = 40, 5, 3, 0.3
    x = (rng.normal(size=(1, n, d)) * 2 + 1).astype(np.float32)
    y = rng.integers(0, c, n).astype(np.int32)
    mean, std = x.mean(axis=1), x.std(axis=1) + 1e-6
    in_fit = lambda index: (index >= 0) & (index < 30)  # noqa: E731 - the rows before a held-out end
    settings = streamed.Settings(epochs=2)
    assert (settings.learning_rate, settings.momentum) == (0.1, 0.9)
    w, b = streamed.fit(_passes(x, y, n), in_fit, np.array([[l2]]), jnp.asarray(mean), jnp.asarray(std), c, 1,
                        settings, "test")  # fmt: skip

    xs, onehot = ((x[0] - mean) / std)[:30].astype(np.float64), np.eye(c)[y[:30]]

    def grad(w, b):
        p = _softmax(xs @ w + b) - onehot
        return xs.T @ p / 30 + l2 * w, p.mean(0)

    w1, b1 = np.zeros((d, c)), np.zeros(c)
    g0 = grad(w1, b1)
    w1, b1 = w1 - 0.1 * g0[0], b1 - 0.1 * g0[1]
    g1 = grad(w1, b1)
    w2, b2 = w1 - 0.05 * (g1[0] + 0.9 * g0[0]), b1 - 0.05 * (g1[1] + 0.9 * g0[1])
    # two float32 steps of weights ~0.1 through sums over 30 rows of 5 standardised features and 3 classes
    bound = float32_chain(2 * (30 + 5 + 3), 1.0)
    np.testing.assert_allclose(np.asarray(w)[0, 0], w2, atol=bound)
    np.testing.assert_allclose(np.asarray(b)[0, 0], b2, atol=bound)


def test_scores_count_the_chosen_rows_only_and_the_l2_is_chosen_on_the_end_of_train():
    """The held-out end (the last 10% of train's rows) says class 0 whatever the features: only the strongest L2,
    which leaves the bias alone to answer, scores it well, as with the full-batch probe."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(10, 64))
    y = np.where(rng.random(1200) < 0.4, 0, rng.integers(1, 10, 1200)).astype(np.int32)
    x = (0.5 * centres[y] + rng.normal(size=(1200, 64))).astype(np.float32)[None]
    mislabelled = y.copy()
    mislabelled[900:1000] = 0
    args = dict(layers=1, dim=64, batch_size=100, heldout_fraction=0.1)
    chosen = streamed.sweep(_passes(x[:, :1000], mislabelled[:1000], 100), 1000, _passes(x[:, 1000:], y[1000:], 100),
                            10, **args)[0]  # fmt: skip
    assert chosen["l2"] == max(linear.L2_GRID), chosen
    clean = streamed.sweep(_passes(x[:, :1000], y[:1000], 100), 1000, _passes(x[:, 1000:], y[1000:], 100), 10, **args)
    assert clean[0]["l2"] < max(linear.L2_GRID), clean
    # a score is over the real rows the predicate picks: 200 test rows in batches of 128 (56 of padding), a
    # classifier that always answers class 0
    always_0 = (jnp.zeros((1, 1, 64, 10)), jnp.zeros((1, 1, 10)).at[..., 0].set(1.0))
    mean, std = jnp.zeros((1, 64)), jnp.ones((1, 64))
    scored = streamed.score(_passes(x[:, 1000:], y[1000:], 128), always_0, lambda i: i >= 0, mean, std)
    np.testing.assert_allclose(scored, [[100 * np.mean(y[1000:] == 0)]], rtol=1e-6)  # a count over 200: exact
    scored = streamed.score(_passes(x[:, 1000:], y[1000:], 128), always_0, lambda i: i >= 150, mean, std)
    np.testing.assert_allclose(scored, [[100 * np.mean(y[1150:] == 0)]], rtol=1e-6)  # a count over 50: exact


def test_each_stage_of_the_sweep_uses_the_rows_the_protocol_names(monkeypatch, capsys):
    """The grid of strengths trains on train's rows before its held-out end and is scored on that end; the chosen
    strength is trained again on every train row and scored on every test row; padding (-1) is never used. Scores
    are counts over exactly those rows, and each stage's progress bar says what it is."""
    x, y = _clustered(130, d=8, seed=11)
    rows = {}
    fit, score = streamed.fit, streamed.score

    def recording_fit(passes, in_fit, l2, *args):
        rows.setdefault("fit", []).append(np.flatnonzero(in_fit(np.arange(-1, 120))) - 1)
        return fit(passes, in_fit, l2, *args)

    def recording_score(passes, params, in_score, mean, std):
        rows.setdefault("score", []).append(np.flatnonzero(in_score(np.arange(-1, 120))) - 1)
        scores = score(passes, params, in_score, mean, std)
        rows.setdefault("scores", []).append(scores)
        return scores

    monkeypatch.setattr(streamed, "fit", recording_fit)
    monkeypatch.setattr(streamed, "score", recording_score)
    args = dict(layers=1, dim=8, batch_size=32, heldout_fraction=0.2, settings=streamed.Settings(epochs=2))
    (result,) = streamed.sweep(_passes(x[None, :100], y[:100], 32), 100, _passes(x[None, 100:], y[100:], 32), 10,
                               **args)  # fmt: skip
    grid_rows, refit_rows = rows["fit"]
    heldout_rows, test_rows = rows["score"]
    np.testing.assert_array_equal(grid_rows, np.arange(80))
    np.testing.assert_array_equal(heldout_rows, np.arange(80, 120))  # the held-out end: rows 80 .. 99 of train
    np.testing.assert_array_equal(refit_rows, np.arange(120))
    np.testing.assert_array_equal(test_rows, np.arange(120))
    heldout_scores, test_scores = rows["scores"]
    assert result["heldout_accuracy"] == round(float(heldout_scores.max(axis=0)[0]), 3)  # the best strength's
    assert result["l2"] == linear.L2_GRID[int(np.argmax(heldout_scores[:, 0]))]
    assert result["accuracy"] == round(float(test_scores[0, 0]), 3)
    assert set(result) == {"accuracy", "l2", "heldout_accuracy"}
    # 20 held-out and 30 test rows: counts over exactly those, to a thousandth of a point (30 gives thirds)
    assert (result["heldout_accuracy"] * 20 / 100).is_integer()
    assert abs(result["accuracy"] * 30 / 100 - round(result["accuracy"] * 30 / 100)) < 1e-4
    assert round(result["accuracy"], 3) == result["accuracy"]
    err = capsys.readouterr().err
    assert "probe: SGD, L2 grid" in err and "probe: SGD, refit" in err


def test_a_score_over_one_row_is_all_or_nothing():
    x, _ = _clustered(10, d=8, seed=12)
    y = np.arange(10, dtype=np.int32) % 3  # row 3 is class 0, row 4 class 1
    always_0 = (jnp.zeros((1, 1, 8, 10)), jnp.zeros((1, 1, 10)).at[..., 0].set(1.0))
    mean, std = jnp.zeros((1, 8)), jnp.ones((1, 8))
    assert streamed.score(_passes(x[None], y, 4), always_0, lambda i: i == 3, mean, std)[0, 0] == 100.0
    assert streamed.score(_passes(x[None], y, 4), always_0, lambda i: i == 4, mean, std)[0, 0] == 0.0


def test_moments_of_one_row_and_of_a_constant_feature():
    """One real row (the rest padding): its features are the mean; a feature that never varies gets the 1e-6 floor,
    so standardising divides by a positive number."""
    x = np.array([[[1.0, 2.0], [5.0, 2.0], [9.0, 2.0]]], np.float32)  # [1 layer, 3 rows, 2 features]
    y = np.zeros(3, np.int32)

    def one_real_row():
        yield jnp.asarray(x[None]), y, np.array([0, -1, -1])

    mean, std = streamed.moments(one_real_row, 1, 2)
    np.testing.assert_array_equal(np.asarray(mean), [[1.0, 2.0]])
    np.testing.assert_allclose(np.asarray(std), [[1e-6, 1e-6]], rtol=1e-6)
    mean, std = streamed.moments(_passes(x, y, 2), 1, 2)
    assert float(std[0, 1]) == pytest.approx(1e-6, rel=1e-6)  # 4 - 4: exact in float32
    # a float32 mean of 3 squares up to 81, then a square root (which halves the relative error)
    assert float(std[0, 0]) == pytest.approx(np.std([1, 5, 9]) + 1e-6, abs=float32_chain(3, 81.0))
