"""Our model equals Hugging Face's ImageGPT (PyTorch) on the same weights: the architecture is pinned."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from tolerances import float32_pair, transformer_terms
from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

from igpt_jax import convert
from igpt_jax import model as model_lib

SIDE, WIDTH, HEADS, LAYERS, VOCAB = 4, 32, 4, 3, 16
# Ours (XLA) and Hugging Face's (PyTorch) float32 logits: the blocks' chain of sums and the head's (WIDTH terms)
TERMS = transformer_terms(layers=LAYERS, width=WIDTH, head_dim=WIDTH // HEADS, positions=SIDE * SIDE) + WIDTH


def _random_hf_model(seed: int) -> ImageGPTForCausalImageModeling:
    torch.manual_seed(seed)
    hf_config = ImageGPTConfig(
        vocab_size=VOCAB + 1,
        n_positions=SIDE * SIDE,
        n_embd=WIDTH,
        n_layer=LAYERS,
        n_head=HEADS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = ImageGPTForCausalImageModeling(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.copy_(1.0 + 0.5 * torch.randn_like(p))  # gains away from 1, so a missing gain is caught
            elif name == "lm_head.weight":
                p.copy_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_logits_equal_huggingface(tmp_path, fmt):
    hf = _random_hf_model(seed=0)
    hf.save_pretrained(tmp_path, safe_serialization=(fmt == "safetensors"))
    model, config = convert.from_huggingface(tmp_path)
    assert (config.model.num_layers, config.model.embed_dim, config.model.num_heads) == (LAYERS, WIDTH, HEADS)
    assert config.model.vocab_size == VOCAB and config.model.image_size == SIDE

    tokens = np.random.default_rng(0).integers(0, VOCAB, (3, SIDE * SIDE))
    sos = np.full((3, 1), VOCAB)  # HF's SOS is the last vocabulary row
    hf_input = torch.tensor(np.concatenate([sos, tokens[:, :-1]], axis=1))
    with torch.no_grad():
        expected = hf(hf_input).logits.numpy()  # [B, N, VOCAB]: position i predicts token i
    ours = np.asarray(model(jnp.asarray(tokens))[0])
    assert ours.shape == expected.shape == (3, SIDE * SIDE, VOCAB)
    assert np.abs(expected).max() > 0.1  # logits of a size where rounding is a real bound
    np.testing.assert_allclose(ours, expected, atol=float32_pair(TERMS, np.abs(expected).max()), rtol=0)


def test_bert_logits_equal_huggingface_without_its_causal_mask(tmp_path):
    """OpenAI's BERT variant is the same network with bidirectional attention, no SOS and the masked positions'
    input embeddings zeroed. Hugging Face has no BERT ImageGPT; its model with the causal mask lifted (the `bias`
    buffer of every attention layer) and the masked embeddings given directly is that network."""
    hf = _random_hf_model(seed=3)
    hf.save_pretrained(tmp_path)
    ar, config = convert.from_huggingface(tmp_path)
    config.objective = "bert"
    model = model_lib.build(config)
    nnx.update(model, nnx.state(ar, nnx.Param))
    for block in hf.transformer.h:
        block.attn.bias.fill_(True)

    rng = np.random.default_rng(1)
    tokens = rng.integers(0, VOCAB, (3, SIDE * SIDE))
    mask = rng.random(tokens.shape) < 0.3
    with torch.no_grad():
        embeds = hf.transformer.wte(torch.tensor(tokens)) * torch.tensor(~mask)[..., None]
        expected = hf(inputs_embeds=embeds).logits.numpy()
    ours = np.asarray(model(jnp.asarray(tokens), mask=jnp.asarray(mask))[0])
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(ours, expected, atol=float32_pair(TERMS, np.abs(expected).max()), rtol=0)


def test_nonzero_biases_are_refused(tmp_path):
    hf = _random_hf_model(seed=1)
    with torch.no_grad():
        hf.transformer.h[1].mlp.c_fc.bias.fill_(0.25)
    hf.save_pretrained(tmp_path)
    with pytest.raises(convert.ConversionError, match=r"h\.1\.mlp\.c_fc\.bias.*no biases"):
        convert.from_huggingface(tmp_path)


def test_other_activation_is_refused(tmp_path):
    hf = _random_hf_model(seed=2)
    hf.config.activation_function = "gelu_new"
    hf.save_pretrained(tmp_path)
    with pytest.raises(convert.ConversionError, match="activation_function='gelu_new'"):
        convert.from_huggingface(tmp_path)


@pytest.mark.parametrize("given", [0, 2 * SIDE])
def test_greedy_sampling_equals_huggingface_generate(tmp_path, given):
    """Our KV-cached greedy decoding and Hugging Face's `generate` (its own cache, greedy) on the same weights choose
    the same token at every position: unconditional (given=0) and completing the top half of an image."""
    import jax

    from igpt_jax import sampling, sharding, steps

    hf = _random_hf_model(seed=4)
    hf.save_pretrained(tmp_path)
    model, config = convert.from_huggingface(tmp_path)
    n, batch = SIDE * SIDE, 8
    prompt = np.random.default_rng(2).integers(0, VOCAB, (batch, n)).astype(np.int32)
    with torch.no_grad():
        start = torch.tensor(np.concatenate([np.full((batch, 1), VOCAB), prompt[:, :given]], axis=1))
        expected = hf.generate(  # the SOS doubles as the pad id: the explicit mask keeps generate from hiding it
            start,
            attention_mask=torch.ones_like(start),
            max_new_tokens=n - given,
            do_sample=False,
            use_cache=True,
            pad_token_id=VOCAB,
        )[:, 1:].numpy()

    mesh = sharding.make_mesh(config, jax.devices()[:1])
    setup = steps.make_setup(config, mesh, train=False)
    params = jax.device_put(nnx.to_pure_dict(nnx.state(model, nnx.Param)), setup.state_shardings["params"])
    sampler = sampling.make_sampler(setup, batch, top_k=0, num_colours=VOCAB)
    with jax.set_mesh(mesh):
        ours = np.asarray(sampler(params, prompt, given, np.arange(batch), 0, 0.0))
    np.testing.assert_array_equal(ours[:, :given], prompt[:, :given])
    assert len(np.unique(expected[:, given:])) > 2  # a model that says something
    np.testing.assert_array_equal(ours, expected)
