"""Hugging Face's ImageGPT, in float64, as the independent reference a workdir's results are checked against.

A workdir's checkpoint is exported with `igpt_jax.convert.to_huggingface` (itself checked against Hugging Face's
logits in test_convert.py) and run by transformers' own PyTorch code: its loss, its next-token logits along a
sequence and its mean-pooled features are computed without any of igpt_jax's forward pass.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import ImageGPTForCausalImageModeling


def export(workdir, out) -> ImageGPTForCausalImageModeling:
    """The workdir's newest checkpoint as a float64 Hugging Face model."""
    from igpt_jax import convert

    convert.to_huggingface(str(workdir), str(out))
    return ImageGPTForCausalImageModeling.from_pretrained(out).double().eval()


def _with_sos(hf, tokens: np.ndarray) -> torch.Tensor:
    sos = np.full((len(tokens), 1), hf.config.vocab_size - 1)  # Hugging Face's SOS is the last vocabulary row
    return torch.tensor(np.concatenate([sos, tokens[:, :-1]], axis=1))


def next_token_logits(hf, tokens: np.ndarray) -> np.ndarray:
    """float64 logits [n, N, colours] for each position of tokens [n, N] given the tokens before it (SOS first);
    Hugging Face's head has no row for SOS, which is never drawn."""
    with torch.no_grad():
        return hf(_with_sos(hf, tokens)).logits.numpy()


def loss(hf, tokens: np.ndarray) -> tuple[float, float]:
    """(the mean next-token loss over tokens [n, N] in float64, the largest |logit| or loss: the scale of the sums
    behind it)."""
    logits = torch.tensor(next_token_logits(hf, tokens))
    targets = torch.tensor(tokens).reshape(-1).long()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets)
    return float(nll), max(float(logits.abs().max()), float(nll))


def probe_features(hf, tokens: np.ndarray) -> np.ndarray:
    """float64 [L + 1, n, d]: the paper's probe features from Hugging Face's forward pass, the mean over positions of
    block l's ln_1 output (its input stream normed) for l < L, and of ln_f's output for l = L. Hugging Face's hidden
    states are the blocks' inputs and, last, ln_f's output."""
    with torch.no_grad():
        hidden = hf(_with_sos(hf, tokens), output_hidden_states=True).hidden_states
        blocks = hf.transformer.h
        normed = [blocks[i].ln_1(hidden[i]) for i in range(len(blocks))] + [hidden[-1]]
        return np.stack([h.mean(dim=1).numpy() for h in normed])
