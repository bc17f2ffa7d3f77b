"""Import released iGPT weights into the NNX model.

Hugging Face's `ImageGPTForCausalImageModeling` (openai/imagegpt-{small,medium,large}, or any `save_pretrained`
folder) holds the same network in GPT-2 layout: Conv1D weights stored (in, out), q|k|v fused in `c_attn`, the SOS as
row 512 of a 513-row `wte`, and zero biases that OpenAI's model never had. Nonzero biases cannot be represented by
this bias-free model, so they are refused by name rather than dropped.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from configs import base
from igpt_jax import model as model_lib

_BIASES = ("attn.c_attn.bias", "attn.c_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias")


class ConversionError(ValueError):
    """The checkpoint cannot be represented exactly by this model; the message says which part and why."""


def config_from_huggingface(hf: dict) -> ml_collections.ConfigDict:
    """Our config for a Hugging Face ImageGPTConfig dict; refuses settings OpenAI's model never had."""
    if hf.get("model_type") != "imagegpt":
        raise ConversionError(f"model_type={hf.get('model_type')!r}; expected 'imagegpt'")
    d = hf["n_embd"]
    refusals = {
        "activation_function": (hf.get("activation_function", "quick_gelu"), "quick_gelu"),
        "n_inner": (hf.get("n_inner") or 4 * d, 4 * d),
        "scale_attn_weights": (hf.get("scale_attn_weights", True), True),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False), False),
        "add_cross_attention": (hf.get("add_cross_attention", False), False),
    }
    for key, (value, supported) in refusals.items():
        if value != supported:
            raise ConversionError(f"config {key}={value!r} is not iGPT's architecture (supported: {supported!r})")
    side = math.isqrt(hf["n_positions"])
    config = base.make_config(image_size=side, num_layers=hf["n_layer"], embed_dim=d, num_heads=hf["n_head"])
    config.model.num_positions = hf["n_positions"]
    config.model.vocab_size = hf["vocab_size"] - 1  # the last row is the SOS
    config.model.norm_eps = float(hf.get("layer_norm_epsilon", 1e-5))
    return config


def read_huggingface_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a save_pretrained folder as fp32 numpy: safetensors (read without torch) or .bin (torch)."""
    path = Path(path)
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if (path / index_name).exists():
            files = sorted(set(json.loads((path / index_name).read_text())["weight_map"].values()))
        elif (path / single).exists():
            files = [single]
        else:
            continue
        out: dict[str, np.ndarray] = {}
        for name in files:
            out.update(_read_file(path / name))
        return out
    raise ConversionError(f"{path}: no model.safetensors or pytorch_model.bin (with or without an index) found")


def _read_file(file: Path) -> dict[str, np.ndarray]:
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="flax") as f:  # jax arrays: bf16/fp16 read fine
            return {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}  # noqa: SIM118
    try:
        import torch
    except ImportError as e:
        raise ConversionError(
            f"{file}: reading .bin checkpoints needs torch (pip install torch), or save with safe_serialization=True"
        ) from e
    state = torch.load(file, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in state.items()}


def _strip_prefix(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ImageGPTForCausalImageModeling prefixes the trunk with 'transformer.'; ImageGPTModel does not."""
    out = {}
    for name, value in weights.items():
        out[name.removeprefix("transformer.")] = value
    return out


def _refuse_biases(w: dict[str, np.ndarray], num_layers: int) -> None:
    nonzero = []
    for i in range(num_layers):
        for suffix in _BIASES:
            b = w.get(f"h.{i}.{suffix}")
            if b is not None and np.any(b != 0):
                nonzero.append(f"h.{i}.{suffix} (max |b| = {np.abs(b).max():.3g})")
    if nonzero:
        shown = ", ".join(nonzero[:4]) + (f" and {len(nonzero) - 4} more" if len(nonzero) > 4 else "")
        raise ConversionError(
            f"nonzero biases in {shown}: OpenAI's iGPT has no biases and this model cannot represent them "
            "(converted OpenAI weights have all-zero biases; a model fine-tuned with biases is a different model)"
        )


def params_from_huggingface(w: dict[str, np.ndarray], config: ml_collections.ConfigDict) -> dict:
    """The pure-dict parameter tree of our model (layers stacked) from HF tensor names."""
    m = config.model
    d, h, n_layers = m.embed_dim, m.num_heads, m.num_layers
    w = _strip_prefix(w)
    missing = [k for k in ("wte.weight", "wpe.weight", "ln_f.weight") if k not in w]
    if "lm_head.weight" not in w:
        missing.append("lm_head.weight (an ImageGPTForCausalImageModeling checkpoint has it)")
    if missing:
        raise ConversionError(f"missing tensors: {missing}")
    _refuse_biases(w, n_layers)

    def layer(name: str) -> np.ndarray:
        return np.stack([w[f"h.{i}.{name}"] for i in range(n_layers)])

    c_attn = layer("attn.c_attn.weight")  # [L, d, 3d], columns q | k | v, heads split as (H, head_dim)
    q, k, v = (c_attn[:, :, j * d : (j + 1) * d].reshape(n_layers, d, h, d // h) for j in range(3))
    return {
        "wte": w["wte.weight"][: m.vocab_size],
        "sos": w["wte.weight"][m.vocab_size],
        "wpe": w["wpe.weight"],
        "blocks": {
            "ln_1": {"scale": layer("ln_1.weight")},
            "attn": {
                "query": q,
                "key": k,
                "value": v,
                "out": layer("attn.c_proj.weight").reshape(n_layers, h, d // h, d),
            },
            "ln_2": {"scale": layer("ln_2.weight")},
            "mlp": {"fc": layer("mlp.c_fc.weight"), "proj": layer("mlp.c_proj.weight")},
        },
        "ln_f": {"scale": w["ln_f.weight"]},
        "head": w["lm_head.weight"].T,
    }


def from_huggingface(path: str | os.PathLike) -> tuple[model_lib.IGPT, ml_collections.ConfigDict]:
    """(model, config) from a Hugging Face ImageGPT save_pretrained folder; nothing is downloaded."""
    hf = json.loads((Path(path) / "config.json").read_text())
    config = config_from_huggingface(hf)
    params = params_from_huggingface(read_huggingface_weights(path), config)
    model = model_lib.abstract(config)
    state = nnx.state(model, nnx.Param)
    _check_shapes(state, params)
    pd = model_lib.DTYPES[config.model.param_dtype]
    nnx.replace_by_pure_dict(state, _map(lambda x: jnp.asarray(x, pd), params))
    nnx.update(model, state)
    return model, config


def _map(fn, tree: dict) -> dict:
    return {k: _map(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def _check_shapes(state: nnx.State, params: dict) -> None:
    expected = nnx.to_pure_dict(state)

    def walk(e, p, prefix):
        for key in e:
            if key not in p:
                raise ConversionError(f"no weights for {prefix}{key}")
            if isinstance(e[key], dict):
                walk(e[key], p[key], f"{prefix}{key}.")
            elif tuple(e[key].shape) != tuple(p[key].shape):
                raise ConversionError(f"{prefix}{key}: checkpoint shape {p[key].shape}, model expects {e[key].shape}")

    walk(expected, params, "")
