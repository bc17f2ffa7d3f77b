"""The jitted steps against Hugging Face's ImageGPT in float64 (PyTorch's autograd, none of our forward or backward
pass): a train step's loss, gradient norm and Adam update, an evaluation step's weighted sums; images quantised
inside the step as on the host; the randomness of a step drawn from the seed and the step alone; a fresh
optimizer state at a restored step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import override, tiny_config
from tolerances import float32_chain, transformer_terms
from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

from igpt_jax import palette, sharding, steps
from igpt_jax.convert import huggingface

LR = 1e-3


def _setup(config) -> steps.Setup:
    return steps.make_setup(config, sharding.make_mesh(config, jax.devices()[:1]))


def _config(**overrides):
    config = override(tiny_config(image_size=4), batch_size=8, optimizer__learning_rate=LR, **overrides)
    config.optimizer.warmup_steps, config.optimizer.schedule = 1, "constant"  # the full rate from step 1 on
    return config


def _state(setup: steps.Setup, step: int = 5) -> steps.State:
    """config.seed's model with a random head (OpenAI's starts at zero, and no gradient reaches the trunk through a
    zero head), at `step` with a fresh Adam."""
    params = jax.device_get(steps.init_params(setup))
    params["head"] = np.asarray(0.3 * jax.random.normal(jax.random.key(7), params["head"].shape), np.float32)
    return steps.with_fresh_optimizer(setup, jnp.int32(step), jax.device_put(params, setup.state_shardings["params"]))


def _hugging_face(params: dict, config) -> ImageGPTForCausalImageModeling:
    hf = ImageGPTForCausalImageModeling(ImageGPTConfig(**huggingface.huggingface_config(config))).double().eval()
    tensors = huggingface.to_huggingface_tensors(jax.device_get(params), config)
    hf.load_state_dict({k: torch.tensor(v, dtype=torch.float64) for k, v in tensors.items()}, strict=False)
    return hf


def _per_image_loss(hf, tokens: np.ndarray) -> torch.Tensor:
    """float64 next-token loss per image [n], SOS first (Hugging Face's last vocabulary row)."""
    sos = np.full((len(tokens), 1), hf.config.vocab_size - 1)
    logits = hf(torch.tensor(np.concatenate([sos, tokens[:, :-1]], axis=1))).logits
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), torch.tensor(tokens).long(), reduction="none")
    return ce.mean(dim=1)


def _tolerance(config, scale: float, last_sum: int | None = None) -> float:
    """float32's bound on the network's chain of sums, and a last sum of `last_sum` terms after it (default: the
    softmax's over the vocabulary)."""
    m = config.model
    terms = transformer_terms(layers=m.num_layers, width=m.embed_dim, head_dim=m.embed_dim // m.num_heads,
                              positions=m.image_size**2)  # fmt: skip
    return float32_chain(terms + (m.vocab_size if last_sum is None else last_sum), scale)


def _sum_error(grads: dict, norm: float) -> float:
    """The float32 error of a global norm over every gradient entry: one sum of n squares, at the norm's scale."""
    n = sum(np.size(g) for g in jax.tree.leaves(grads))
    return float32_chain(n, norm)


def test_a_train_step_is_adam_on_hugging_faces_gradient():
    """Hugging Face's float64 loss and gradient of the same parameters on the same tokens: the step reports that
    loss and the gradient's global norm, and Adam (the paper's b1 0.9, b2 0.95) moves every parameter from zero
    moments by -lr m^ / (sqrt(v^) + eps), bias-corrected as at step 6: a fresh optimizer at restored step 5 goes on
    from there (about 0.49 of a full-size first step)."""
    config = _config()
    setup = _setup(config)
    state = _state(setup)
    before = jax.device_get(state["params"])
    tokens = np.asarray(jax.random.randint(jax.random.key(3), (8, 16), 0, 16), np.int32)

    hf = _hugging_face(before, config)
    loss = _per_image_loss(hf, tokens).mean()
    loss.backward()
    loss = loss.item()
    grads = {name: p.grad.numpy() for name, p in hf.named_parameters()}
    grads = {name: (np.zeros_like(g) if name.endswith(".bias") else g) for name, g in grads.items()}  # none of ours
    grads = huggingface.params_from_huggingface(grads, config)

    with jax.set_mesh(setup.mesh):
        after, metrics = steps.make_train_step(setup)(state, {"tokens": jnp.asarray(tokens)}, None)
    after, metrics = jax.device_get((after, metrics))
    assert int(after["step"]) == 6 and float(metrics["learning_rate"]) == pytest.approx(LR)
    assert float(metrics["loss"]) == pytest.approx(loss, abs=_tolerance(config, loss))
    assert float(metrics["bits_per_token"]) == pytest.approx(loss / np.log(2), abs=_tolerance(config, loss) / np.log(2))
    norm = np.sqrt(sum(np.sum(g**2) for g in jax.tree.leaves(grads)))
    # the backward pass runs the forward chain's sums again, transposed, then the norm sums every gradient's square
    assert float(metrics["grad_norm"]) == pytest.approx(
        norm, abs=2 * _tolerance(config, norm) + _sum_error(grads, norm)
    )
    moved = jax.tree.map(lambda new, old: np.asarray(new, np.float64) - old, after["params"], before)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        step = moved
        for key in path:
            step = step[key.key]
        # where float32's gradient has float64's sign; there the update, c * g / (|g| + eps'), moves by at most
        # eps' / |g| < 3e-4 of itself with g's rounding (eps' = 1e-8 / 0.43 against |g| > 1e-4 * max|g| ~ 1e-4):
        # rtol 1e-3 holds that and the few roundings of Adam's own float32 arithmetic
        clear = np.abs(g) > 1e-4 * np.abs(g).max()
        assert clear.any(), jax.tree_util.keystr(path)
        m, v = 0.1 * g / (1 - 0.9**6), 0.05 * g**2 / (1 - 0.95**6)
        np.testing.assert_allclose(step[clear], (-LR * m / (np.sqrt(v) + 1e-8))[clear], rtol=1e-3, atol=1e-7,
                                   err_msg=jax.tree_util.keystr(path))  # fmt: skip


def test_an_eval_step_sums_hugging_faces_per_image_losses_over_the_real_images():
    config = _config()
    setup = _setup(config)
    params = _state(setup)["params"]
    tokens = np.asarray(jax.random.randint(jax.random.key(4), (8, 16), 0, 16), np.int32)
    weights = np.array([1, 1, 0, 1, 1, 0, 1, 1], np.float32)  # the zeros: a last batch's padding
    with jax.set_mesh(setup.mesh):
        sums = steps.make_eval_step(setup)(params, {"tokens": tokens, "weights": weights}, None, jax.random.key(0))
    with torch.no_grad():
        per_image = _per_image_loss(_hugging_face(params, config), tokens).numpy()
    assert float(sums["weight"]) == 6.0
    expected = float(np.sum(per_image * weights))
    # six per-image losses, each within its own bound, summed
    assert float(sums["loss"]) == pytest.approx(expected, abs=6 * _tolerance(config, per_image.max()))


def test_images_are_quantised_inside_the_step_as_on_the_host():
    config = _config()
    setup = _setup(config)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 4, 4, 3), dtype=np.uint8)
    clusters = palette.fit(images.reshape(-1, 1, 1, 3), k=16, seed=0)
    tokens = np.asarray(palette.quantize(images, clusters))
    step = steps.make_train_step(setup)
    with jax.set_mesh(setup.mesh):
        from_images, m_images = step(_state(setup), {"images": jnp.asarray(images)}, jnp.asarray(clusters))
        from_tokens, m_tokens = step(_state(setup), {"tokens": jnp.asarray(tokens)}, jnp.asarray(clusters))
    assert float(m_images["loss"]) == float(m_tokens["loss"])
    for a, b in zip(jax.tree.leaves(from_images["params"]), jax.tree.leaves(from_tokens["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_steps_randomness_comes_from_the_seed_and_the_step_alone():
    """BERT's mask at a step: the same for the same (seed, step), another at the next step or with another seed."""
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 16, (8, 16)), jnp.int32)

    def losses(seed: int, at: tuple[int, ...]) -> list[float]:
        setup = _setup(_config(objective="bert", seed=seed))
        step = steps.make_train_step(setup)
        with jax.set_mesh(setup.mesh):
            return [float(step(_state(setup, step=s), {"tokens": tokens}, None)[1]["loss"]) for s in at]

    first, again, later = losses(0, (5, 5, 6))
    (other_seed,) = losses(1, (5,))
    assert again == first and later != first and other_seed != first


def test_a_fresh_optimizer_at_a_restored_step_counts_from_that_step_with_zero_moments():
    config = _config()
    setup = _setup(config)
    params = steps.init_params(setup)
    state = steps.with_fresh_optimizer(setup, jnp.int32(30), params)
    assert int(state["step"]) == 30
    for path, leaf in jax.tree_util.tree_leaves_with_path(state["opt_state"]):
        name = jax.tree_util.keystr(path)
        expected = 30 if name.endswith(".count") or "count" in name else 0
        assert (np.asarray(leaf) == expected).all(), name
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(state) == jax.tree.structure(setup.abstract_state)


def test_parameters_are_the_seeds_and_the_state_layout_is_the_setups():
    config = _config()
    setup = _setup(config)
    state = steps.init_state(setup)
    assert int(state["step"]) == 0
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(steps.init_params(setup)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # config.seed's model both ways
    other = jax.tree.leaves(steps.init_params(setup, seed=1))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state["params"]), other, strict=True))
    for leaf, abstract in zip(jax.tree.leaves(state), jax.tree.leaves(setup.abstract_state), strict=True):
        assert leaf.shape == abstract.shape and leaf.dtype == abstract.dtype and leaf.sharding == abstract.sharding
    evaluation = steps.make_setup(config, setup.mesh, train=False)
    assert set(evaluation.abstract_state) == {"step", "params"}
    assert evaluation.replicated.spec == jax.sharding.PartitionSpec()


def _normed_inputs(hf, tokens: np.ndarray) -> np.ndarray:
    """Hugging Face's float64 n^l [L + 1, n, N, d] on the shifted sequence (SOS first): block l's ln_1 output for
    l < L, ln_f's output for l = L (its hidden_states hold each block's input, then ln_f's output)."""
    sos = np.full((len(tokens), 1), hf.config.vocab_size - 1)
    with torch.no_grad():
        hidden = hf(
            torch.tensor(np.concatenate([sos, tokens[:, :-1]], axis=1)), output_hidden_states=True
        ).hidden_states
        blocks = hf.transformer.h
        return np.stack([blocks[i].ln_1(hidden[i]).numpy() for i in range(len(blocks))] + [hidden[-1].numpy()])


def test_the_feature_and_token_steps_are_hugging_faces_normed_block_inputs():
    """The probe's features f^l (n^l averaged over positions) for the layers asked, in their order, and the attentive
    probe's n^l at every position, against Hugging Face's float64 forward pass on the same tokens."""
    config = _config()
    setup = _setup(config)
    params = jax.device_get(steps.init_params(setup))
    tokens = np.asarray(jax.random.randint(jax.random.key(4), (8, 16), 0, 16), np.int32)
    normed = _normed_inputs(_hugging_face(params, config), tokens)
    batch, key = {"tokens": jnp.asarray(tokens)}, jax.random.key(0)
    with jax.set_mesh(setup.mesh):
        features = np.asarray(steps.make_feature_step(setup, (2, 0, 1))(params, batch, None, key))
        layer_1 = np.asarray(steps.make_token_step(setup, 1)(params, batch, None, key))
    pooled = normed.mean(axis=2)  # [L + 1, n, d]
    assert features.shape == (3, 8, 32) and features.dtype == np.float32
    # the chain up to ln_f (at most the whole network's), then the mean over the 16 positions
    atol = _tolerance(config, np.abs(pooled).max(), last_sum=16)
    np.testing.assert_allclose(features, pooled[[2, 0, 1]], atol=atol, rtol=0)
    assert layer_1.shape == (8, 16, 32)
    np.testing.assert_allclose(layer_1, normed[1], atol=_tolerance(config, np.abs(normed).max(), last_sum=0), rtol=0)


def test_the_predict_step_is_the_argmax_of_the_class_head_on_hugging_faces_pooled_ln_f():
    config = _config(model__num_classes=5)
    setup = _setup(config)
    params = jax.device_get(steps.init_params(setup))
    params["classifier"] = np.asarray(jax.random.normal(jax.random.key(9), params["classifier"].shape), np.float32)
    tokens = np.asarray(jax.random.randint(jax.random.key(5), (8, 16), 0, 16), np.int32)
    logits = _normed_inputs(_hugging_face(params, config), tokens)[-1].mean(axis=1) @ params["classifier"]
    with jax.set_mesh(setup.mesh):
        predicted = np.asarray(steps.make_predict_step(setup)(params, {"tokens": jnp.asarray(tokens)}, None, None))
    top_two = np.sort(logits, axis=1)[:, -2:]
    # no near-tie that rounding could flip: the chain, the mean over 16 positions, then the head's sum over d = 32
    clear = top_two[:, 1] - top_two[:, 0] > 2 * _tolerance(config, np.abs(logits).max(), last_sum=16 + 32)
    assert clear.sum() >= 6 and predicted.dtype == np.int32
    np.testing.assert_array_equal(predicted[clear], logits.argmax(axis=1)[clear])
    assert len(set(logits.argmax(axis=1))) > 1  # a head that predicts one class would not tell the argmax's axis


def test_a_train_step_updates_the_state_in_place():
    """The step donates the state it is given (its buffers are reused for the new one): without it a step would
    hold two copies of the parameters and of Adam's moments at its peak."""
    config = _config()
    setup = _setup(config)
    state = _state(setup)
    tokens = jnp.zeros((8, 16), jnp.int32)
    with jax.set_mesh(setup.mesh):
        after, _ = steps.make_train_step(setup)(state, {"tokens": tokens}, None)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state))
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(after))


def test_a_bert_models_features_tokens_and_predictions_see_the_mask_its_key_draws():
    """BERT's probe and fine-tuning protocol: the inputs are masked, by a mask drawn from the step's key, so two keys
    give two views of the same images (the same key, the same view); a left-to-right model has no mask to draw."""
    config = _config(model__num_classes=5)
    config.objective = "bert"
    setup = _setup(config)
    params = jax.device_get(steps.init_params(setup))
    params["classifier"] = np.asarray(jax.random.normal(jax.random.key(9), params["classifier"].shape), np.float32)
    batch = {"tokens": jax.random.randint(jax.random.key(6), (64, 16), 0, 16)}
    made = {"features": steps.make_feature_step(setup, (0, 2)), "tokens": steps.make_token_step(setup, 1),
            "predictions": steps.make_predict_step(setup)}  # fmt: skip
    with jax.set_mesh(setup.mesh):
        for name, step in made.items():
            one, again, two = (np.asarray(step(params, batch, None, jax.random.key(k))) for k in (1, 1, 2))
            np.testing.assert_array_equal(one, again, err_msg=name)
            assert (one != two).any(), name
