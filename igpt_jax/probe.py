"""The paper's linear probe: --mode=probe, and the probe the train loop runs when configured.

Features of every layer (or config.probe.layers) for the first probe.train_examples / probe.test_examples images of
the probe data set's train and test splits, from one forward pass per split (features.extract); a multinomial logistic
regression per layer with its L2 strength chosen on the held-out end of train (linear_probe.sweep). The same code
probes two baselines: raw pixels and the run's own step-0 model (config.seed's initialisation, same shape).

Writes workdir/probe.json (top level fixed, read by other tools; accuracies in percent), workdir/probe.png (accuracy
against layer, the baselines as lines) and a {"mode": "probe", ...} row in metrics.jsonl.
"""

from __future__ import annotations

import json
import logging
import time

import jax
import ml_collections
from etils import epath

from igpt_jax import features, linear_probe, plots, steps, storage, streamed_probe
from igpt_jax.data import get_source
from igpt_jax.data.sources import HELDOUT_PERCENT

log = logging.getLogger(__name__)

PROBE_JSON = "probe.json"
PROBE_PNG = "probe.png"


def _data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config with the probe's data set in place of the training one (same model, palette and batch size)."""
    probe_config = config.copy_and_resolve_references()
    probe_config.data.dataset = config.probe.dataset
    return probe_config


def _examples(wanted: int, available: int) -> int:
    return available if wanted == 0 else min(wanted, available)


# The full-batch L-BFGS probe holds every train feature on the host and the device; above this many bytes of train
# features, probe.solver='auto' streams them through minibatch SGD instead.
FULL_BATCH_LIMIT_BYTES = 2 << 30


def solver(config: ml_collections.ConfigDict, n_train: int, layers: int, dim: int) -> str:
    """'lbfgs' or 'sgd': config.probe.solver, or for 'auto' by the size of the train features."""
    if config.probe.solver != "auto":
        return config.probe.solver
    return "lbfgs" if 4 * n_train * layers * dim <= FULL_BATCH_LIMIT_BYTES else "sgd"


def _heldout_fraction(config: ml_collections.ConfigDict) -> float:
    """The part of train the L2 strength is chosen on: the paper's 10%, ImageNet's 4%."""
    return HELDOUT_PERCENT.get(config.probe.dataset, 10) / 100


def _fit_and_score(config, which: str, train, test, n_train: int, n_test: int, layers: int, dim: int, classes: int):
    """Per-layer results from `train` and `test` passes (features.passes): gathered for L-BFGS, streamed for SGD."""
    heldout = _heldout_fraction(config)
    if which == "sgd":
        settings = streamed_probe.Settings(config.probe.sgd_epochs, config.probe.sgd_learning_rate)
        return streamed_probe.sweep(
            train,
            n_train,
            test,
            classes,
            layers=layers,
            dim=dim,
            batch_size=config.batch_size,
            heldout_fraction=heldout,
            settings=settings,
        )
    train_x, train_y = features.gather(train, n_train)
    test_x, test_y = features.gather(test, n_test)
    return linear_probe.sweep(train_x, train_y, test_x, test_y, classes, heldout_fraction=heldout)


def linear_probes(config: ml_collections.ConfigDict, setup: steps.Setup, params, clusters, mesh, step: int) -> dict:
    """probe.json's content for parameters `params` at `step` (see the module docstring)."""
    probe = config.probe
    data_config = _data_config(config)
    source = get_source(data_config)
    n_train = _examples(probe.train_examples, source.num_examples(probe.train_split))
    n_test = _examples(probe.test_examples, source.num_examples(probe.test_split))
    layers = tuple(probe.layers) or tuple(range(config.model.num_layers))
    feature_step = steps.make_feature_step(setup, layers)
    which = solver(config, n_train, len(layers), config.model.embed_dim)
    seconds = {}

    def probe_model(model_params) -> list[dict]:
        def passes(split, n):
            return features.passes(data_config, source, split, n, feature_step, model_params, clusters, mesh)

        train, test = passes(probe.train_split, n_train), passes(probe.test_split, n_test)
        dim = config.model.embed_dim
        return _fit_and_score(config, which, train, test, n_train, n_test, len(layers), dim, source.num_classes())

    start = time.perf_counter()
    per_layer = probe_model(params)
    seconds["trained"] = time.perf_counter() - start
    best = max(range(len(layers)), key=lambda i: per_layer[i]["accuracy"])
    baselines = {}
    if probe.baselines:
        start = time.perf_counter()
        baselines["random_init"] = max(r["accuracy"] for r in probe_model(steps.init_params(setup)))
        seconds["random_init"] = time.perf_counter() - start
        if source.kind == "images":
            start = time.perf_counter()
            dim = 3 * config.model.image_size**2
            train = features.pixel_passes(data_config, source, probe.train_split, n_train)
            test = features.pixel_passes(data_config, source, probe.test_split, n_test)
            pixel_solver = solver(config, n_train, 1, dim)
            pixel = _fit_and_score(config, pixel_solver, train, test, n_train, n_test, 1, dim, source.num_classes())
            baselines["raw_pixels"] = pixel[0]["accuracy"]
            seconds["raw_pixels"] = time.perf_counter() - start
    return {
        "dataset": probe.dataset,
        "checkpoint_step": step,
        "train_examples": n_train,
        "test_examples": n_test,
        "layers": {str(layer): per_layer[i] for i, layer in enumerate(layers)},
        "best_layer": layers[best],
        "best_accuracy": per_layer[best]["accuracy"],
        "baselines": baselines,
        "heldout_fraction": _heldout_fraction(config),
        "solver": which,
        "seconds": seconds,
    }


def write(directory: epath.Path, result: dict) -> None:
    """probe.json and probe.png (process 0)."""
    if jax.process_index() != 0:
        return
    storage.write_text(directory / PROBE_JSON, json.dumps(result, indent=2) + "\n")
    layers = [int(layer) for layer in result["layers"]]
    accuracies = [result["layers"][str(layer)]["accuracy"] for layer in layers]
    title = f"linear probe on {result['dataset']}, checkpoint {result['checkpoint_step']}: test accuracy by layer"
    storage.write_bytes(directory / PROBE_PNG, plots.accuracy_by_layer(title, layers, accuracies, result["baselines"]))


def summary(result: dict) -> str:
    baselines = ", ".join(f"{name.replace('_', ' ')} {value:.1f}%" for name, value in result["baselines"].items())
    return (
        f"probe step {result['checkpoint_step']}: best layer {result['best_layer']} {result['best_accuracy']:.1f}% "
        f"on {result['test_examples']} {result['dataset']} test images" + (f" ({baselines})" if baselines else "")
    )


def metrics_row(result: dict) -> dict:
    return {
        "mode": "probe",
        "step": result["checkpoint_step"],
        "best_layer": result["best_layer"],
        "best_accuracy": result["best_accuracy"],
        **result["baselines"],
    }


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """--mode=probe on the newest checkpoint (or config.checkpoint_step)."""
    from igpt_jax import metrics, runtime

    with runtime.for_checkpoint(config, workdir) as rt:
        result = linear_probes(rt.config, rt.setup, rt.params, rt.clusters_device, rt.mesh, rt.step)
        write(rt.directory, result)
        metrics.append_row(rt.directory, metrics_row(result))
        if jax.process_index() == 0:
            print(summary(result), flush=True)
        return result
