"""Import released iGPT weights into the NNX model.

Hugging Face's `ImageGPTForCausalImageModeling` (openai/imagegpt-{small,medium,large}, or any `save_pretrained`
folder) holds the same network in GPT-2 layout: Conv1D weights stored (in, out), q|k|v fused in `c_attn`, the SOS as
row 512 of a 513-row `wte`, and zero biases that OpenAI's model never had. Nonzero biases cannot be represented by
this bias-free model, so they are refused by name rather than dropped.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import ml_collections
import numpy as np

from igpt_jax import defaults
from igpt_jax import model as model_lib
from igpt_jax.convert.common import ConversionError, build, read_json

# A save_pretrained folder's files: the model's config, its weights, and the image processor's (with the clusters).
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PREPROCESSOR_FILE = "preprocessor_config.json"

_BIASES = ("attn.c_attn.bias", "attn.c_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias")


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
    config = defaults.make_config(image_size=side, num_layers=hf["n_layer"], embed_dim=d, num_heads=hf["n_head"])
    config.model.num_positions = hf["n_positions"]
    config.model.vocab_size = hf["vocab_size"] - 1  # the last row is the SOS
    config.model.norm_eps = float(hf.get("layer_norm_epsilon", 1e-5))
    if "ImageGPTForImageClassification" in hf.get("architectures", []):
        config.model.num_classes = len(hf.get("id2label") or {}) or int(hf.get("num_labels", 2))
    return config


def read_huggingface_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a save_pretrained folder as fp32 numpy: safetensors (read without torch) or .bin (torch)."""
    path = Path(path)
    for index_name, single in (
        (f"{WEIGHTS_FILE}.index.json", WEIGHTS_FILE),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if (path / index_name).exists():
            files = sorted(set(read_json(path / index_name)["weight_map"].values()))
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
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(file), framework="flax") as f:  # jax arrays: bf16/fp16 read fine
                return {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as e:
            raise ConversionError(f"{file}: not a readable safetensors file ({str(e)[:200]})") from None
    try:
        import torch
    except ImportError as e:
        raise ConversionError(
            f"{file}: reading .bin checkpoints needs torch (pip install torch), or save with safe_serialization=True"
        ) from e
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch reports a damaged pickle or zip in many types
        raise ConversionError(
            f"{file}: not a readable PyTorch checkpoint ({type(e).__name__}: {str(e)[:200]})"
        ) from None
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
    if "lm_head.weight" not in w and "score.weight" not in w:
        missing.append("lm_head.weight or score.weight (ImageGPTForCausalImageModeling / ForImageClassification)")
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
        # A classification checkpoint has no generative head: it starts at zero, as OpenAI's does.
        "head": w["lm_head.weight"].T if "lm_head.weight" in w else np.zeros((d, m.vocab_size), np.float32),
    } | ({"classifier": w["score.weight"].T} if "score.weight" in w else {})


def from_huggingface(path: str | os.PathLike) -> tuple[model_lib.IGPT, ml_collections.ConfigDict]:
    """(model, config) from a Hugging Face ImageGPT save_pretrained folder; nothing is downloaded."""
    hf = read_json(Path(path) / CONFIG_FILE)
    config = config_from_huggingface(hf)
    return build(config, params_from_huggingface(read_huggingface_weights(path), config)), config


def clusters_from_huggingface(path: str | os.PathLike) -> np.ndarray | None:
    """The palette a hub-style folder carries: `clusters` of its preprocessor_config.json ((K, 3) in [-1, 1], as
    OpenAI's kmeans_centers.npy), or None without one."""
    file = Path(path) / PREPROCESSOR_FILE
    if not file.exists():
        return None
    clusters = read_json(file).get("clusters")
    return None if clusters is None else np.asarray(clusters, np.float32)


def to_huggingface_tensors(params: dict, config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """Our parameter tree (numpy, layers stacked) under ImageGPTForCausalImageModeling's names and layouts, with the
    zero biases its Conv1D layers carry; a classification head is not exported (the causal model has none)."""
    m = config.model
    d, n_layers = m.embed_dim, m.num_layers
    blocks, attn = params["blocks"], params["blocks"]["attn"]
    out = {
        "transformer.wte.weight": np.concatenate([params["wte"], params["sos"][None]]),
        "transformer.wpe.weight": params["wpe"],
        "transformer.ln_f.weight": params["ln_f"]["scale"],
        "lm_head.weight": params["head"].T,
    }
    for i in range(n_layers):
        qkv = [attn[name][i].reshape(d, d) for name in ("query", "key", "value")]
        layer = {
            "ln_1.weight": blocks["ln_1"]["scale"][i],
            "attn.c_attn.weight": np.concatenate(qkv, axis=1),
            "attn.c_attn.bias": np.zeros(3 * d, np.float32),
            "attn.c_proj.weight": attn["out"][i].reshape(d, d),
            "attn.c_proj.bias": np.zeros(d, np.float32),
            "ln_2.weight": blocks["ln_2"]["scale"][i],
            "mlp.c_fc.weight": blocks["mlp"]["fc"][i],
            "mlp.c_fc.bias": np.zeros(blocks["mlp"]["fc"].shape[-1], np.float32),
            "mlp.c_proj.weight": blocks["mlp"]["proj"][i],
            "mlp.c_proj.bias": np.zeros(d, np.float32),
        }
        out.update({f"transformer.h.{i}.{name}": value for name, value in layer.items()})
    return {name: np.ascontiguousarray(value, np.float32) for name, value in out.items()}


def huggingface_config(config: ml_collections.ConfigDict) -> dict:
    """ImageGPTConfig's fields for our model (no dropout: OpenAI trained without it)."""
    m = config.model
    return {
        "architectures": ["ImageGPTForCausalImageModeling"],
        "model_type": "imagegpt",
        "vocab_size": m.vocab_size + 1,
        "n_positions": m.num_positions,
        "n_embd": m.embed_dim,
        "n_layer": m.num_layers,
        "n_head": m.num_heads,
        "n_inner": None,
        "activation_function": "quick_gelu",
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": m.norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "use_cache": True,
        "tie_word_embeddings": False,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
    }


def preprocessor_config(config: ml_collections.ConfigDict, clusters: np.ndarray | None) -> dict:
    """ImageGPTImageProcessor's settings: the palette and the model's image size."""
    size = config.model.image_size
    return {
        "image_processor_type": "ImageGPTImageProcessor",
        "clusters": None if clusters is None else np.asarray(clusters, np.float32).tolist(),
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": 2,
        "do_normalize": True,
        "do_color_quantize": True,
    }
