"""Probes at scale and in the paper's forms: features computed once (counted), streamed from the cache with flat
memory, ln_f and concatenated layers against scikit-learn, class-balanced low-data draws, and BERT's ensemble of
masks with the modal vote."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import fashion_config
from tolerances import float32_pair, transformer_terms

from igpt_jax import palette, sharding, steps
from igpt_jax.data import get_source
from igpt_jax.evaluators import base
from igpt_jax.probe import cache, features, linear, protocol, streamed
from igpt_jax.workdir import storage


def _probe(config, tmp_path, name="probe"):
    setup = steps.make_setup(config, sharding.make_mesh(config), train=False)
    source = get_source(config)
    clusters = palette.load_or_fit_palette(config, lambda: source, storage.path(tmp_path))
    directory = storage.path(tmp_path)
    return setup, protocol.LinearProbe(
        config, config.evals.probe, setup, jnp.asarray(clusters), setup.mesh, directory, name
    )


class _Counting:
    """A feature step that counts its calls (one per batch of a forward pass)."""

    def __init__(self, step):
        self.step, self.calls = step, 0

    def __call__(self, *args):
        self.calls += 1
        return self.step(*args)


def test_an_sgd_probe_runs_one_forward_pass_per_split_and_a_second_probe_none(tmp_path, monkeypatch):
    config = fashion_config(image_size=8, batch_size=16)
    config.evals.probe.update(solver="sgd", sgd_epochs=10, train_examples=160, test_examples=64, baselines=False)
    counted = []

    def counting_step(setup, layers):
        counted.append(_Counting(make(setup, layers)))
        return counted[-1]

    make = steps.make_feature_step
    monkeypatch.setattr(steps, "make_feature_step", counting_step)
    setup, probe = _probe(config, tmp_path)
    _, again = _probe(config, tmp_path)  # another probe of the same checkpoint (a new process would be the same)
    params = steps.init_params(setup, seed=7)
    with jax.set_mesh(setup.mesh):
        first = probe(params, 100)
        assert counted[0].calls == 160 // 16 + 64 // 16  # one pass over each split, for 10 epochs and the sweep
        assert first["forward_passes"] == 2

        second = again(params, 100)
        assert len(counted) == 1 or counted[1].calls == 0
        assert second["forward_passes"] == 0
        assert second["layers"] == first["layers"]

        other = again(steps.init_params(setup, seed=8), 100)  # other parameters at the same step: computed anew
        assert other["forward_passes"] == 2


def test_a_cache_left_half_written_is_computed_again(tmp_path):
    spec = {"split": "train", "shape": [1, 2, 40, 3], "dtype": "float32", "model": "m"}
    c = cache.Cache(storage.path(tmp_path) / "c", spec)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 2, 40, 3)).astype(np.float32)

    def batches(stop_after=None):
        for i in range(4):
            if stop_after is not None and i == stop_after:
                raise base.Abandoned
            index = features.batch_index(i, 10, 40)
            yield x[:, :, index], np.arange(10) + 10 * i, index

    with pytest.raises(base.Abandoned):
        c.fill(batches(stop_after=2), 10)
    assert not c.complete()  # the arrays are there, their spec.json is not
    c.fill(batches(), 10)
    assert c.complete()
    got, labels = c.gather()
    np.testing.assert_array_equal(got, x)
    np.testing.assert_array_equal(labels, np.arange(40))
    streamed_back = [np.asarray(b) for b, _, _ in c.passes(16)()]  # 16, 16, 8 + 8 rows of padding
    np.testing.assert_array_equal(np.concatenate(streamed_back, axis=2)[:, :, :40], x)


def _rss_growth_streaming_from_cache(tmp_path, n: int, layers: int = 4, dim: int = 256, batch: int = 256) -> float:
    """MiB by which the peak resident memory rises while a streamed sweep reads n cached examples."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, dim)).astype(np.float32)
    path = storage.path(tmp_path) / f"n{n}"
    c = cache.Cache(path, {"split": "train", "shape": [1, layers, n, dim], "dtype": "float32", "model": "m"})

    def generated():
        for i in range(n // batch):
            index = features.batch_index(i, batch, n)
            labels = (index % 10).astype(np.int32)
            yield centres[labels] + rng.normal(size=(1, layers, batch, dim)).astype(np.float32), labels, index

    c.fill(generated(), batch)
    settings = streamed.Settings(epochs=1)
    args = dict(layers=layers, dim=dim, batch_size=batch, heldout_fraction=0.1, settings=settings)
    streamed.sweep(c.passes(batch), batch * 4, c.passes(batch), 10, **args)  # compiled, warm
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current resident size
    before = _status("VmRSS")
    streamed.sweep(c.passes(batch), n, c.passes(batch), 10, **args)
    return (_status("VmHWM") - before) / 1024


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def test_streaming_from_the_cache_keeps_memory_flat(tmp_path):
    small = _rss_growth_streaming_from_cache(tmp_path, 2048)
    large = _rss_growth_streaming_from_cache(tmp_path, 2048 * 16)  # 128 MiB of cached features
    assert large < small + 32, (small, large)


def _sklearn_accuracy(train_x, train_y, test_x, test_y, l2):
    from sklearn.linear_model import LogisticRegression

    train_x, test_x = linear.standardize(train_x, test_x)
    fitted = LogisticRegression(C=1 / (l2 * len(train_x)), max_iter=10_000, tol=1e-8).fit(train_x, train_y)
    return 100 * fitted.score(test_x, test_y)


def test_ln_f_and_concatenated_layers_agree_with_scikit_learn(tmp_path):
    config = fashion_config(image_size=8, batch_size=16)
    config.evals.probe.update(train_examples=600, test_examples=300, baselines=False, concat=(0, 2))
    setup, probe = _probe(config, tmp_path)
    params = steps.init_params(setup, seed=3)
    with jax.set_mesh(setup.mesh):
        record = probe(params, 1)
        train, test = (
            probe.features("step_00000001", lambda: params, split, base.never) for split in ("train", "test")
        )
    (train_x, train_y), (test_x, test_y) = train.gather(), test.gather()
    assert sorted(record["layers"]) == ["0", "1", "2"] and probe.extracted == (0, 1, 2)

    ln_f = record["layers"]["2"]  # layer L: ln_f's output
    assert abs(ln_f["accuracy"] - _sklearn_accuracy(train_x[0, 2], train_y, test_x[0, 2], test_y, ln_f["l2"])) <= 0.5

    side_by_side = np.concatenate([train_x[0, 0], train_x[0, 2]], axis=-1)
    test_side = np.concatenate([test_x[0, 0], test_x[0, 2]], axis=-1)
    concat = record["concat"]
    assert concat["layers"] == [0, 2]
    assert abs(concat["accuracy"] - _sklearn_accuracy(side_by_side, train_y, test_side, test_y, concat["l2"])) <= 0.5


def test_ln_f_features_are_the_pooled_final_norm():
    config = fashion_config(image_size=8, batch_size=16)
    setup = steps.make_setup(config, sharding.make_mesh(config), train=False)
    params = steps.init_params(setup, seed=5)
    tokens = jax.random.randint(jax.random.key(0), (16, 64), 0, 16)
    from flax import nnx

    model = nnx.merge(setup.graphdef, nnx.State(params))
    step = steps.make_feature_step(setup, (2,))
    with jax.set_mesh(setup.mesh), sharding.axis_rules(config.logical_axis_rules):
        h, _ = model.run_blocks(model.embed(tokens))  # the residual stream after the last block
        expected = np.asarray(model.ln_f(h).mean(axis=1))
        got = step(params, {"tokens": tokens, "weights": jnp.ones(16)}, None, jax.random.key(0))
    # the feature step's program against the model called op by op: the blocks' sums, ln_f's and the mean over 64
    terms = transformer_terms(layers=2, width=32, head_dim=8, positions=64) + 32 + 64
    np.testing.assert_allclose(np.asarray(got)[0], expected, atol=float32_pair(terms, np.abs(h).max()), rtol=0)


def test_low_data_subsets_are_balanced_and_draws_differ():
    labels = np.repeat(np.arange(10), 30)[np.random.default_rng(0).permutation(300)]
    subsets = [linear.balanced_subset(labels, 4, 10, np.random.default_rng([0, 4, d])) for d in range(5)]
    for subset in subsets:
        assert np.bincount(labels[subset], minlength=10).tolist() == [4] * 10
        assert len(set(subset.tolist())) == 40
    assert len({tuple(s) for s in subsets}) == 5

    rng = np.random.default_rng(1)
    centres = rng.normal(size=(10, 16))
    x = (centres[labels] + rng.normal(size=(300, 16))).astype(np.float32)[None]
    results = linear.low_data(x, labels, x[None], labels, 10, per_class=4, draws=5, seed=0, heldout_fraction=0.2)
    (layer,) = results
    assert len(set(layer["accuracies"])) > 1  # different subsets, different probes
    assert layer["mean"] == pytest.approx(np.mean(layer["accuracies"]), abs=1e-3)
    assert layer["std"] == pytest.approx(np.std(layer["accuracies"], ddof=1), abs=1e-3)


def test_the_modal_vote_counts_masks_and_breaks_ties_at_random():
    predictions = jnp.asarray([[1, 2, 0], [1, 2, 1], [3, 0, 2]])  # 3 masks of 3 images
    voted = linear.modal(predictions, 4, jax.random.key(0))
    assert voted[:2].tolist() == [1, 2]  # two masks of three agree
    ties = [int(linear.modal(predictions, 4, jax.random.key(k))[2]) for k in range(40)]
    assert set(ties) == {0, 1, 2}  # one vote each: any of the three, never a class nobody voted for


def test_a_bert_ensemble_sees_other_masks_and_scores_the_modal_prediction(tmp_path):
    config = fashion_config(image_size=8, batch_size=16, objective="bert")
    config.evals.probe.update(train_examples=320, test_examples=160, baselines=False, masks=5, layers=(1,))
    setup, probe = _probe(config, tmp_path)
    params = steps.init_params(setup, seed=2)
    with jax.set_mesh(setup.mesh):
        record = probe(params, 1)
        test = probe.features("step_00000001", lambda: params, "test", base.never)
        train = probe.features("step_00000001", lambda: params, "train", base.never)
    test_x, test_y = test.gather()
    assert test_x.shape == (5, 1, 160, 32) and train.shape[0] == 1
    assert not np.allclose(test_x[0], test_x[1])  # the masks differ, so the features do

    train_x, train_y = train.gather()
    trained_x, held = linear.standardize(train_x[0], test_x)
    w, b = linear._fit_layers(trained_x, train_y, jnp.asarray([record["layers"]["1"]["l2"]]), 10)
    one_mask = float(linear.accuracy(w, b, held[0], test_y)[0])
    votes = jnp.argmax(jnp.einsum("mlnd,ldc->mlnc", held, w) + b[None, :, None], axis=-1)
    modal = np.asarray(linear.modal(votes, 10, jax.random.key(linear.VOTE_KEY)))[0]
    assert record["layers"]["1"]["accuracy"] == pytest.approx(100 * np.mean(modal == test_y), abs=1e-3)
    assert record["masks"] == 5
    assert record["layers"]["1"]["accuracy"] != pytest.approx(one_mask, abs=1e-6)  # the ensemble is scored


def _one_token_carries_the_class(tmp_path):
    """(train cache, test cache, x, labels): each image's class sits in one token at a random position (flagged in
    dimension 0) among 64 tokens of noise; 600 train and 200 test images."""
    rng = np.random.default_rng(0)
    n, tokens, dim, classes = 800, 64, 16, 3
    labels = rng.integers(0, classes, n).astype(np.int32)
    x = rng.normal(size=(n, tokens, dim)).astype(np.float32)
    x[:, :, 0] = 0.0
    where = rng.integers(0, tokens, n)
    x[np.arange(n), where, 0] = 4.0  # the flag
    x[np.arange(n), where, 1 + labels] += 3.0  # the class

    def cached(name, rows):
        c = cache.Cache(storage.path(tmp_path) / name, {"split": name, "shape": [1, 1, len(rows), tokens * dim],
                                                         "dtype": "float32", "model": "m"})  # fmt: skip

        def batches():
            for i in range(len(rows) // 50):
                index = features.batch_index(i, 50, len(rows))
                yield x[rows[index]].reshape(1, 1, 50, -1), labels[rows[index]], index

        c.fill(batches(), 50)
        return c

    return cached("train", np.arange(600)), cached("test", np.arange(600, 800)), x, labels


def _attentive(train, test, epochs: int = 20):
    from igpt_jax.probe import attentive

    settings = attentive.Settings(epochs=epochs, learning_rate=1e-2, heads=2)
    return attentive.probe(
        train.passes(50), 600, test.passes(50), 3, dim=16, batch_size=50, heldout_fraction=0.1, settings=settings
    )


def test_the_attentive_probe_reads_the_one_token_that_mean_pooling_drowns(tmp_path):
    """The mean over positions keeps 1/64 of the class token; the learned query finds it."""
    from igpt_jax.probe import attentive

    train, test, x, labels = _one_token_carries_the_class(tmp_path)
    result = _attentive(train, test)
    pooled = x.mean(axis=1)[None]
    (linear_result,) = linear.sweep(pooled[:, :600], labels[:600], pooled[:, 600:], labels[600:], 3,
                                    heldout_fraction=0.1, progress=False)  # fmt: skip
    assert result["accuracy"] > 90 and result["weight_decay"] in attentive.WEIGHT_DECAYS
    assert result["accuracy"] > linear_result["accuracy"] + 20, (result, linear_result)


def test_each_attentive_head_trains_with_its_own_weight_decay_and_the_held_out_best_is_scored(tmp_path, monkeypatch):
    """Heads of every weight decay train side by side; one whose decay crushes its weights scores chance on the
    held-out end and must not be the one scored on test, even listed first."""
    from igpt_jax.probe import attentive

    monkeypatch.setattr(attentive, "WEIGHT_DECAYS", (30.0, 1e-4))
    train, test, _, _ = _one_token_carries_the_class(tmp_path)
    result = _attentive(train, test)
    assert result["weight_decay"] == 1e-4 and result["accuracy"] > 90, result
