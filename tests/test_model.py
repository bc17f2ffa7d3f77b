"""Model properties: scan/unrolled/remat agree, AR is causal with the SOS shift, BERT masks, axes are named."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_config

from igpt_jax import model as model_lib
from igpt_jax import objectives


def _tokens(config, batch=3, seed=0):
    n = config.model.image_size**2
    return jax.random.randint(jax.random.key(seed), (batch, n), 0, config.model.vocab_size)


def _with_random_head(model):
    """OpenAI's zero-init head makes every logit 0; randomise it so tests see the whole network."""
    model.head[...] = 0.1 * jax.random.normal(jax.random.key(7), model.head.shape)
    return model


def _loss_and_grads(config, tokens):
    model = _with_random_head(model_lib.build(config))

    def loss_fn(m):
        return objectives.batch_loss(m, tokens, jax.random.key(1), config)[0]

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    return loss, nnx.to_pure_dict(grads)


@pytest.mark.parametrize(
    "objective, scan",
    [
        ("ar", True),  # the training default: scanned, under every policy
        pytest.param("ar", False, marks=pytest.mark.slow),  # unscanned blocks, each under the policy: 25 s more
        pytest.param("bert", True, marks=pytest.mark.slow),  # bert: the mask only
        pytest.param("bert", False, marks=pytest.mark.slow),
    ],
)
def test_scan_and_remat_variants_match_unscanned(objective, scan):
    """Same params (stacked either way). Tolerances (fp32, only summation order differs): loss rtol 1e-6; each
    gradient tensor within 1e-5 of its own largest entry."""
    base = tiny_config(objective=objective, scan_layers=False, remat="none")
    tokens = _tokens(base)
    ref_loss, ref_grads = _loss_and_grads(base, tokens)
    for remat in model_lib.REMAT_POLICIES:
        config = tiny_config(objective=objective, scan_layers=scan, remat=remat)
        loss, grads = jax.jit(lambda t, c=config: _loss_and_grads(c, t))(tokens)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, err_msg=f"scan={scan} remat={remat}")
        _assert_grads_close(grads, ref_grads, f"scan={scan} remat={remat}")


def _assert_grads_close(grads, ref_grads, label):
    flat, ref = jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)
    assert len(flat) == len(ref)
    for (path, a), b in zip(flat, ref, strict=True):
        scale = float(np.abs(b).max())
        assert float(np.abs(a - b).max()) <= 1e-5 * scale + 1e-9, (label, jax.tree_util.keystr(path))


def test_ar_logits_depend_only_on_earlier_tokens():
    config = tiny_config()
    model = _with_random_head(model_lib.build(config))
    tokens = _tokens(config, batch=1)
    j = 7
    changed = tokens.at[0, j].set((tokens[0, j] + 1) % config.model.vocab_size)
    a, b = model(tokens)[0], model(changed)[0]
    # position i predicts token i from tokens < i: positions <= j cannot see token j.
    np.testing.assert_array_equal(np.asarray(a[:, : j + 1]), np.asarray(b[:, : j + 1]))
    assert not np.allclose(a[:, j + 1 :], b[:, j + 1 :])


def test_ar_first_position_sees_only_the_sos():
    config = tiny_config()
    model = _with_random_head(model_lib.build(config))
    a = model(_tokens(config, seed=1))[0]
    b = model(_tokens(config, seed=2))[0]
    np.testing.assert_allclose(np.asarray(a[:, 0]), np.asarray(b[:, 0]), rtol=0, atol=0)
    np.testing.assert_allclose(np.asarray(a[0, 0]), np.asarray(a[1, 0]))


def test_initial_loss_is_uniform_over_the_palette():
    """The zero-initialised head (OpenAI) gives exactly log(vocab) nats at step 0."""
    config = tiny_config()
    loss, metrics = objectives.batch_loss(model_lib.build(config), _tokens(config), jax.random.key(0), config)
    np.testing.assert_allclose(loss, np.log(config.model.vocab_size), rtol=1e-6)
    np.testing.assert_allclose(metrics["bits_per_token"], np.log2(config.model.vocab_size), rtol=1e-6)


def test_bert_is_bidirectional_and_zeroes_masked_inputs():
    config = tiny_config(objective="bert")
    model = _with_random_head(model_lib.build(config))
    tokens = _tokens(config, batch=1)
    mask = jnp.zeros(tokens.shape, bool).at[0, 5].set(True)
    changed = tokens.at[0, 10].set((tokens[0, 10] + 1) % config.model.vocab_size)
    # bidirectional: a later token changes an earlier position's logits
    assert not np.allclose(model(tokens, mask=mask)[0][0, 2], model(changed, mask=mask)[0][0, 2])
    # a masked position's own token is invisible
    hidden = tokens.at[0, 5].set((tokens[0, 5] + 1) % config.model.vocab_size)
    np.testing.assert_array_equal(np.asarray(model(tokens, mask=mask)[0]), np.asarray(model(hidden, mask=mask)[0]))


def test_bert_loss_counts_masked_positions_only():
    config = tiny_config(objective="bert")
    model = _with_random_head(model_lib.build(config))
    tokens = _tokens(config, batch=2)
    key = jax.random.key(3)
    loss, metrics = objectives.batch_loss(model, tokens, key, config)
    mask = jax.random.bernoulli(key, config.bert_mask_prob, tokens.shape)
    logp = jax.nn.log_softmax(model(tokens, mask=mask)[0])
    ce = -jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    expected = np.mean([ce[b][mask[b]].mean() for b in range(2)])
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert 0 < metrics["masked_fraction"] < 0.5


def test_mask_is_refused_for_ar():
    config = tiny_config()
    model = model_lib.build(config)
    tokens = _tokens(config)
    with pytest.raises(ValueError, match="only meaningful for a bidirectional objective, not 'ar'"):
        model(tokens, mask=jnp.zeros(tokens.shape, bool))


def test_features_are_pooled_norm_outputs_per_layer():
    config = tiny_config(scan_layers=True)
    model = model_lib.build(config)
    tokens = _tokens(config)
    feats = model(tokens)[1]["probe_features"]
    assert feats.shape == (config.model.num_layers, 3, config.model.embed_dim) and feats.dtype == jnp.float32
    # layer 0's feature is mean over positions of ln_1(embeddings)
    block0 = nnx.merge(*_layer(model, 0))
    expected = block0.ln_1(model.embed(tokens)).mean(axis=1)
    np.testing.assert_allclose(feats[0], expected, rtol=1e-5, atol=1e-6)
    unscanned = model_lib.build(tiny_config(scan_layers=False))
    np.testing.assert_allclose(unscanned(tokens)[1]["probe_features"], feats, rtol=1e-5, atol=1e-6)


def _layer(model, i):
    graphdef, state = nnx.split(model.blocks)
    return graphdef, jax.tree.map(lambda x: x[i], state)


def test_every_parameter_has_logical_axis_names():
    model = model_lib.abstract(tiny_config())
    allowed = {"embed", "mlp", "heads", "kv", "vocab", "layers", None}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata()["out_sharding"]
        assert len(names) == len(var.shape), path
        assert set(names) <= allowed, (path, names)
        if path[0] == "blocks":
            assert names[0] == "layers", path


def test_openai_initialisation():
    config = tiny_config()
    config.model.embed_dim, config.model.num_layers = 256, 4
    m = model_lib.build(config)
    d, L = 256, 4
    assert np.all(np.asarray(m.head[...]) == 0)
    assert np.all(np.asarray(m.ln_f.scale[...]) == 1) and np.all(np.asarray(m.blocks.ln_1.scale[...]) == 1)
    for value, std in [
        (m.wte, 0.02),
        (m.wpe, 0.01),
        (m.blocks.attn.query, 1 / np.sqrt(d)),
        (m.blocks.attn.key, 1 / np.sqrt(d)),
        (m.blocks.attn.out, 1 / np.sqrt(d * L)),
        (m.blocks.mlp.fc, 0.02),
        (m.blocks.mlp.proj, 0.02),
    ]:
        np.testing.assert_allclose(np.std(np.asarray(value[...])), std, rtol=0.1)


def test_bfloat16_compute_keeps_fp32_params_and_logits():
    config = tiny_config(dtype="bfloat16")
    model = _with_random_head(model_lib.build(config))
    logits = model(_tokens(config))[0]
    assert logits.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    ref = _with_random_head(model_lib.build(tiny_config()))(_tokens(config))[0]
    np.testing.assert_allclose(logits, ref, atol=0.05)


def test_too_many_tokens_for_the_position_table():
    config = tiny_config()
    model = model_lib.build(config)
    with pytest.raises(ValueError, match="do not fit the 16-row position table"):
        model(jnp.zeros((1, 17), jnp.int32))
