"""Import OpenAI's released iGPT checkpoints (TF1, github.com/openai/image-gpt) and their colour clusters.

The checkpoint's variables, under `model/` (src/model.py's names and layouts):

    wte [V, d], wpe [n_ctx, d], wtet [V, d] (the untied output head), sos [d] (AR models only),
    h{i}/ln_1/g, h{i}/ln_2/g [d], h{i}/attn/{q,k,v}_proj [heads, head_dim, d] (einsum "bsf,hef->bhse"),
    h{i}/attn/c_proj [heads, head_dim, d], h{i}/mlp/c_fc/w [d, 4d], h{i}/mlp/c_proj/w [4d, d], ln_f/g [d],
    clf/wclf [classes, d] (fine-tuned models only).

Adam's slots, global_step and the beta powers are skipped. The size, heads, image side (sqrt of n_ctx) and the
objective (AR when `sos` is there, BERT when it is not; a BERT model's unused SOS is zero) come from the shapes.
Anything else is named with its shape and refused, a missing variable is named with the shape it should have, and a
variable whose shape does not fit its name is named with both shapes: nothing is dropped or guessed silently.
"""

from __future__ import annotations

import math
import os
import re

import ml_collections
import numpy as np

from igpt_jax import defaults
from igpt_jax import model as model_lib
from igpt_jax.convert.common import ConversionError, build, load_clusters

_SKIPPED = re.compile(r"(^|/)(Adam(_\d+)?|adam_[mv]|global_step|beta[12]_power)$")
_LAYER = re.compile(r"^model/h(\d+)/(.+)$")


def read_checkpoint(prefix: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every variable of a TF1 checkpoint (its prefix, e.g. .../model.ckpt-1000000) as fp32 numpy, skipped ones
    (optimizer slots, counters) left out."""
    import tensorflow as tf  # a dependency already; imported here so the rest of the package does not load it

    try:
        reader = tf.train.load_checkpoint(str(prefix))
        names = [n for n in reader.get_variable_to_shape_map() if not _SKIPPED.search(n)]
    except (tf.errors.OpError, ValueError) as e:  # OpError: not found, not an sstable, data loss
        raise ConversionError(f"{prefix}: not a readable TensorFlow checkpoint ({_first_line(e)})") from None
    out = {}
    for name in sorted(names):
        try:
            out[name] = np.asarray(reader.get_tensor(name), np.float32)
        except (tf.errors.OpError, IndexError, ValueError) as e:  # IndexError: a data file cut short
            raise ConversionError(
                f"{prefix}: variable {name} cannot be read ({_first_line(e)}): the checkpoint's .data file is "
                "damaged or truncated"
            ) from None
    return out


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def _expected_shapes(num_layers: int, d: int, heads: int, vocab: int, n_ctx: int, classes: int) -> dict:
    shapes = {
        "model/wte": (vocab, d),
        "model/wpe": (n_ctx, d),
        "model/wtet": (vocab, d),
        "model/sos": (d,),
        "model/ln_f/g": (d,),
    }
    per_layer = {
        "ln_1/g": (d,),
        "ln_2/g": (d,),
        "attn/q_proj": (heads, d // heads, d),
        "attn/k_proj": (heads, d // heads, d),
        "attn/v_proj": (heads, d // heads, d),
        "attn/c_proj": (heads, d // heads, d),
        "mlp/c_fc/w": (d, 4 * d),
        "mlp/c_proj/w": (4 * d, d),
    }
    for i in range(num_layers):
        shapes.update({f"model/h{i}/{name}": shape for name, shape in per_layer.items()})
    if classes:
        shapes["model/clf/wclf"] = (classes, d)
    return shapes


def config_from_openai(variables: dict[str, np.ndarray], objective: str | None = None) -> ml_collections.ConfigDict:
    """Our config for the model OpenAI's variables describe; every variable is checked against it first."""
    for name in ("model/wte", "model/wpe", "model/h0/attn/q_proj"):
        if name not in variables:
            raise ConversionError(f"{name} is missing: not an iGPT checkpoint (variables: {_listing(variables)})")
    vocab, d = variables["model/wte"].shape
    n_ctx = variables["model/wpe"].shape[0]
    heads = variables["model/h0/attn/q_proj"].shape[0]
    layers = 1 + max(int(m.group(1)) for m in map(_LAYER.match, variables) if m)
    classes = variables["model/clf/wclf"].shape[0] if "model/clf/wclf" in variables else 0
    objective = objective or ("ar" if "model/sos" in variables else "bert")
    if objective == "ar" and "model/sos" not in variables:
        raise ConversionError("model/sos [d] is missing: an AR checkpoint has it (import a BERT one as 'bert')")
    expected = _expected_shapes(layers, d, heads, vocab, n_ctx, classes)
    if objective == "bert":
        expected.pop("model/sos")  # BERT never uses it; zero when absent
    unknown = {n: v.shape for n, v in variables.items() if n not in expected and n != "model/sos"}
    if unknown:
        raise ConversionError(f"variables this model has no place for: {_listing(unknown)}")
    missing = {n: shape for n, shape in expected.items() if n not in variables}
    if missing:
        raise ConversionError(f"missing variables (with the shapes they should have): {_listing(missing)}")
    for name, shape in expected.items():
        if variables[name].shape != shape:
            raise ConversionError(
                f"{name} has shape {variables[name].shape} but the checkpoint's other variables (width {d}, {heads} "
                f"heads, {layers} layers, {vocab} colours, {n_ctx} positions) make it {shape}"
            )
    side = math.isqrt(n_ctx)
    if side * side != n_ctx:
        raise ConversionError(f"model/wpe has {n_ctx} positions, not a square image's")
    config = defaults.make_config(image_size=side, num_layers=layers, embed_dim=d, num_heads=heads)
    config.model.vocab_size = vocab
    config.model.num_positions = n_ctx
    config.model.num_classes = classes
    config.objective = objective
    return config


def _listing(shapes: dict) -> str:
    items = [
        f"{name} {tuple(np.shape(value)) if not isinstance(value, tuple) else value}" for name, value in shapes.items()
    ]
    return ", ".join(items[:8]) + (f" and {len(items) - 8} more" if len(items) > 8 else "")


def params_from_openai(variables: dict[str, np.ndarray], config: ml_collections.ConfigDict) -> dict:
    """Our parameter tree (layers stacked) from OpenAI's variables."""
    n_layers = config.model.num_layers

    def layer(name: str) -> np.ndarray:
        return np.stack([variables[f"model/h{i}/{name}"] for i in range(n_layers)])

    d = config.model.embed_dim
    params = {
        "wte": variables["model/wte"],
        "wpe": variables["model/wpe"],
        "sos": variables.get("model/sos", np.zeros(d, np.float32)),
        "blocks": {
            "ln_1": {"scale": layer("ln_1/g")},
            "attn": {
                # [heads, head_dim, d] -> ours [d, heads, head_dim]; c_proj is already [heads, head_dim, d]
                **{ours: layer(f"attn/{theirs}").transpose(0, 3, 1, 2) for ours, theirs in _QKV},
                "out": layer("attn/c_proj"),
            },
            "ln_2": {"scale": layer("ln_2/g")},
            "mlp": {"fc": layer("mlp/c_fc/w"), "proj": layer("mlp/c_proj/w")},
        },
        "ln_f": {"scale": variables["model/ln_f/g"]},
        "head": variables["model/wtet"].T,
    }
    if config.model.num_classes:
        params["classifier"] = variables["model/clf/wclf"].T
    return params


_QKV = (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"))


def from_openai(
    ckpt_prefix: str | os.PathLike, clusters: str | os.PathLike | None = None, *, objective: str | None = None
) -> tuple[model_lib.IGPT, ml_collections.ConfigDict, np.ndarray | None]:
    """(model, config, palette) from an OpenAI checkpoint prefix (model.ckpt-<step>) and, optionally, its
    kmeans_centers.npy; objective None infers AR or BERT from the variables."""
    variables = read_checkpoint(ckpt_prefix)
    config = config_from_openai(variables, objective)
    colours = None if clusters is None else load_clusters(clusters)
    if colours is not None and len(colours) != config.model.vocab_size:
        raise ConversionError(
            f"{clusters} has {len(colours)} colours but the checkpoint's model/wte has {config.model.vocab_size} rows"
        )
    return build(config, params_from_openai(variables, config)), config, colours
