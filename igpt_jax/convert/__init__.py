"""Pretrained weights in and out: OpenAI's TF1 checkpoints and colour clusters, Hugging Face ImageGPT both ways.

    model, config, clusters = convert.from_openai("igpt-s/1000000/model.ckpt-1000000", "kmeans_centers.npy")
    model, config = convert.from_huggingface("path/to/imagegpt-small")  # causal or image-classification folder
    clusters = convert.clusters_from_huggingface("path/to/imagegpt-small")  # its preprocessor_config.json's
    convert.write_workdir(model, config, clusters, "workdir/igpt_s")  # then any mode: eval, probe, sample, ...
    convert.to_huggingface("workdir/igpt_s", "exported/")  # loads in transformers' ImageGPT classes

The command line does the same (`python -m igpt_jax.convert --help`). Nothing is ever downloaded here.
"""

from __future__ import annotations

import json
import os

from igpt_jax import objectives
from igpt_jax.convert import huggingface as hf
from igpt_jax.convert.common import ConversionError
from igpt_jax.convert.huggingface import (
    clusters_from_huggingface,
    config_from_huggingface,
    from_huggingface,
    huggingface_config,
    params_from_huggingface,
    preprocessor_config,
    read_huggingface_weights,
    to_huggingface_tensors,
)
from igpt_jax.convert.openai import from_openai
from igpt_jax.convert.workdirs import read as read_workdir
from igpt_jax.convert.workdirs import write as write_workdir

__all__ = [
    "ConversionError",
    "clusters_from_huggingface",
    "config_from_huggingface",
    "from_huggingface",
    "from_openai",
    "params_from_huggingface",
    "read_huggingface_weights",
    "read_workdir",
    "to_huggingface",
    "write_workdir",
]


def to_huggingface(workdir: str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """Writes the workdir's newest checkpoint as a folder that ImageGPTForCausalImageModeling.from_pretrained and
    ImageGPTImageProcessor.from_pretrained load: config.json, model.safetensors, preprocessor_config.json (with the
    palette). AR checkpoints only: Hugging Face has no BERT ImageGPT."""
    from safetensors.numpy import save as safetensors_bytes

    from igpt_jax.workdir import storage

    params, config, clusters = read_workdir(str(workdir))
    if not objectives.get(config.objective).left_to_right:
        raise ConversionError(
            f"{workdir} holds a {config.objective!r} model: Hugging Face's ImageGPT is left-to-right only"
        )
    out = storage.path(out_dir)
    taken = [name for name in (hf.CONFIG_FILE, hf.WEIGHTS_FILE, hf.PREPROCESSOR_FILE) if (out / name).exists()]
    if taken:
        raise ConversionError(f"{out} already holds {', '.join(taken)}: nothing was written; export to a new --out")
    out.mkdir(parents=True, exist_ok=True)
    tensors = to_huggingface_tensors(params, config)
    storage.write_bytes(out / hf.WEIGHTS_FILE, safetensors_bytes(tensors, metadata={"format": "pt"}))
    storage.write_text(out / hf.CONFIG_FILE, json.dumps(huggingface_config(config), indent=2) + "\n")
    storage.write_text(out / hf.PREPROCESSOR_FILE, json.dumps(preprocessor_config(config, clusters), indent=2) + "\n")
    return str(out)
