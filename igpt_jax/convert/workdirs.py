"""Imported weights as a workdir every mode uses as is, and a workdir's weights for export.

`write` makes an ordinary workdir from an imported model: checkpoint 0 (the imported parameters, a new Adam state,
so `--mode=train` continues from them), config.json (the recipe: model shape, objective, data set) and palette.npy,
all through the same runtime, checkpointer and file layer as training. A workdir that already holds checkpoints is
never written into. `read` is the other way: the newest checkpoint's parameters, recipe and palette.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from igpt_jax import defaults, runtime, steps
from igpt_jax import model as model_lib
from igpt_jax.convert.common import ConversionError
from igpt_jax.workdir import config_file, layout, storage


def write(
    model: model_lib.IGPT,
    config: ml_collections.ConfigDict,
    clusters: np.ndarray | None,
    directory: str,
    devices: list[jax.Device] | None = None,
) -> str:
    """Writes `model` as checkpoint 0 of a new workdir `directory` with its recipe and palette; returns the path of
    the checkpoint. Refuses a workdir that holds checkpoints, and image data sets without a palette."""
    path = storage.path(directory)
    if (path / layout.CHECKPOINTS).exists() and any((path / layout.CHECKPOINTS).iterdir()):
        raise ConversionError(
            f"{path} already holds checkpoints: nothing was written. Convert into a new --workdir (a run's "
            "checkpoints are never mixed with imported weights)."
        )
    if clusters is None and not (path / layout.PALETTE).exists():
        raise ConversionError(
            "no palette: pass the colour clusters the model was trained with (--clusters=kmeans_centers.npy, or a "
            "Hugging Face folder whose preprocessor_config.json has them)"
        )
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def imported(setup: steps.Setup):
        placed = jax.device_put(params, setup.state_shardings["params"])
        return steps.with_fresh_optimizer(setup, jnp.zeros((), jnp.int32), placed), clusters

    with runtime.for_training(config, path, devices, start=imported) as rt:
        if rt.step != 0:
            raise ConversionError(f"{path} already holds checkpoint {rt.step}: nothing was written")
        config_file.write_config(path, config, 0)
        rt.checkpointer.save(0, rt.state, rt.clusters)
        rt.checkpointer.close()
    return str(path / layout.CHECKPOINTS / "0")


def read(directory: str, devices: list[jax.Device] | None = None) -> tuple[dict, ml_collections.ConfigDict, np.ndarray]:
    """(parameters as numpy, the checkpoint's recipe, the palette) of a workdir's newest checkpoint."""
    devices = devices or jax.devices()[:1]
    with runtime.for_checkpoint(defaults.make_config(), directory, devices) as rt:
        params = jax.tree.map(np.asarray, jax.device_get(rt.params))
        return params, rt.config, rt.clusters
