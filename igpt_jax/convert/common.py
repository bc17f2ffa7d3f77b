"""What every importer shares: the error, and turning a parameter tree into a model with every shape checked."""

from __future__ import annotations

import json

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from igpt_jax import errors, palette
from igpt_jax import model as model_lib


class ConversionError(errors.UsageError, ValueError):
    """The weights cannot be represented exactly by this model; the message names the tensor and why."""


def load_clusters(path) -> np.ndarray:
    """A clusters file (OpenAI's kmeans_centers.npy): one that is not a (K, 3) .npy in [-1, 1] is named."""
    try:
        return palette.load(path)
    except ValueError as e:
        raise ConversionError(f"--clusters: {e}") from None


def read_json(path) -> dict:
    """A JSON file of a weights folder; one that is not JSON is named with where parsing failed."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError and json.JSONDecodeError
        raise ConversionError(f"{path}: not a JSON file ({type(e).__name__}: {str(e)[:120]})") from None


def build(config: ml_collections.ConfigDict, params: dict) -> model_lib.IGPT:
    """The model `config` describes holding `params` (a pure-dict tree of numpy arrays, layers stacked); a tensor
    that is missing or has another shape than the model's is named with both shapes."""
    model = model_lib.abstract(config)
    state = nnx.state(model, nnx.Param)
    check_shapes(nnx.to_pure_dict(state), params)
    dtype = model_lib.DTYPES[config.model.param_dtype]
    nnx.replace_by_pure_dict(state, map_tree(lambda x: jnp.asarray(x, dtype), params))
    nnx.update(model, state)
    return model


def map_tree(fn, tree: dict) -> dict:
    return {k: map_tree(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def check_shapes(expected: dict, params: dict, prefix: str = "") -> None:
    for key in expected:
        if key not in params:
            raise ConversionError(f"no weights for {prefix}{key}")
        if isinstance(expected[key], dict):
            check_shapes(expected[key], params[key], f"{prefix}{key}.")
        elif tuple(expected[key].shape) != tuple(np.shape(params[key])):
            raise ConversionError(
                f"{prefix}{key}: checkpoint shape {tuple(np.shape(params[key]))}, model expects {expected[key].shape}"
            )
