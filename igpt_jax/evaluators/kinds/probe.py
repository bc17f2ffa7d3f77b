"""The paper's linear probe, as an evaluator: config.evals.<name> of kind 'probe'.

Features of every layer (or the entry's `layers`) for the first `train_examples` / `test_examples` images of the
entry's data set's train and test splits, from one forward pass per split (features.passes); a multinomial logistic
regression per layer with its L2 strength chosen on the held-out end of train (linear_probe.sweep, or
streamed_probe.sweep when the train features are too large to hold). The same code probes two baselines: raw pixels
and the run's own step-0 model (config.seed's initialisation, same shape).

Files, named after the evaluator (the default one is `probe`): each probe's record and plot at `<name>/step_<N>.json`
and `.png`, the accuracy of every layer against training step at `<name>/curve.png` (the paper's Figure 3, redrawn at
every probe), and the newest record and plot also at `<name>.json` and `<name>.png` (probe.json's top level is read
by other tools). The metrics row carries every layer's accuracy; TensorBoard gets them as scalars and both plots.
"""

from __future__ import annotations

import json
import logging
import math
import time

import jax
import ml_collections
from etils import epath

from igpt_jax import features, linear_probe, plots, runtime, steps, streamed_probe
from igpt_jax.data import get_source
from igpt_jax.data.sources import HELDOUT_PERCENT
from igpt_jax.evaluators import base

log = logging.getLogger(__name__)

# The full-batch L-BFGS probe holds every train feature on the host and the device; above this many bytes of train
# features, solver='auto' streams them through minibatch SGD instead.
FULL_BATCH_LIMIT_BYTES = 2 << 30


def solver(entry: ml_collections.ConfigDict, n_train: int, layers: int, dim: int) -> str:
    """'lbfgs' or 'sgd': the entry's solver, or for 'auto' by the size of the train features."""
    if entry.solver != "auto":
        return entry.solver
    return "lbfgs" if 4 * n_train * layers * dim <= FULL_BATCH_LIMIT_BYTES else "sgd"


def heldout_fraction(entry: ml_collections.ConfigDict) -> float:
    """The part of train the L2 strength is chosen on: the paper's 10%, ImageNet's 4%."""
    return HELDOUT_PERCENT.get(entry.dataset, 10) / 100


def _data_config(config: ml_collections.ConfigDict, entry: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config with the probe's data set in place of the training one (same model, palette and batch size)."""
    probe_config = config.copy_and_resolve_references()
    probe_config.data.dataset = entry.dataset
    return probe_config


def _examples(wanted: int, available: int) -> int:
    return available if wanted == 0 else min(wanted, available)


def _fit_and_score(entry, which: str, batch_size: int, train, test, n: tuple[int, int], shape, classes: int, stop):
    """Per-layer results from `train` and `test` passes (features.passes): gathered for L-BFGS, streamed for SGD.
    `shape`: (layers, feature dimension)."""
    n_train, n_test = n
    if which == "sgd":
        settings = streamed_probe.Settings(entry.sgd_epochs, entry.sgd_learning_rate)
        return streamed_probe.sweep(
            train, n_train, test, classes, layers=shape[0], dim=shape[1], batch_size=batch_size,
            heldout_fraction=heldout_fraction(entry), settings=settings,
        )  # fmt: skip
    train_x, train_y = features.gather(train, n_train)
    test_x, test_y = features.gather(test, n_test)
    return linear_probe.sweep(
        train_x, train_y, test_x, test_y, classes, heldout_fraction=heldout_fraction(entry), stop=stop
    )


class LinearProbe:
    """One probe's data, feature step and baselines, built once for a run: `probe(params, step)` gives probe.json's
    content. The baselines (raw pixels, and config.seed's step-0 model) do not change as training goes on, so they
    are computed at the first probe and reused."""

    def __init__(self, config, entry, setup: steps.Setup, clusters, mesh):
        self.config, self.entry, self.setup, self.clusters, self.mesh = config, entry, setup, clusters, mesh
        self.data_config = _data_config(config, entry)
        self.source = get_source(self.data_config)
        self.n = (
            _examples(entry.train_examples, self.source.num_examples(entry.train_split)),
            _examples(entry.test_examples, self.source.num_examples(entry.test_split)),
        )
        self.layers = tuple(entry.layers) or tuple(range(config.model.num_layers))
        self.feature_step = steps.make_feature_step(setup, self.layers)
        self.solver = solver(entry, self.n[0], len(self.layers), config.model.embed_dim)
        self.baselines: tuple[dict, dict] | None = None  # (accuracies, seconds), from the first probe

    def _fit(self, which: str, train, test, shape: tuple[int, int], stop) -> list[dict]:
        classes = self.source.num_classes()
        return _fit_and_score(self.entry, which, self.config.batch_size, train, test, self.n, shape, classes, stop)

    def _model(self, params, stop) -> list[dict]:
        def passes(split, count):
            return features.passes(
                self.data_config, self.source, split, count, self.feature_step, params, self.clusters, self.mesh, stop
            )

        train, test = passes(self.entry.train_split, self.n[0]), passes(self.entry.test_split, self.n[1])
        return self._fit(self.solver, train, test, (len(self.layers), self.config.model.embed_dim), stop)

    def _baselines(self, stop) -> tuple[dict, dict]:
        accuracies, seconds = {}, {}
        if not self.entry.baselines:
            return accuracies, seconds
        start = time.perf_counter()
        accuracies["random_init"] = max(r["accuracy"] for r in self._model(steps.init_params(self.setup), stop))
        seconds["random_init"] = time.perf_counter() - start
        if self.source.kind == "images":
            start = time.perf_counter()
            dim = 3 * self.config.model.image_size**2
            train = features.pixel_passes(self.data_config, self.source, self.entry.train_split, self.n[0], stop)
            test = features.pixel_passes(self.data_config, self.source, self.entry.test_split, self.n[1], stop)
            pixel = self._fit(solver(self.entry, self.n[0], 1, dim), train, test, (1, dim), stop)
            accuracies["raw_pixels"] = pixel[0]["accuracy"]
            seconds["raw_pixels"] = time.perf_counter() - start
        return accuracies, seconds

    def __call__(self, params, step: int, stop: base.StopCheck = base.never) -> dict:
        start = time.perf_counter()
        per_layer = self._model(params, stop)
        seconds = {"trained": time.perf_counter() - start}
        if self.baselines is None:
            self.baselines = self._baselines(stop)
            seconds |= self.baselines[1]
        best = max(range(len(self.layers)), key=lambda i: per_layer[i]["accuracy"])
        return {
            "dataset": self.entry.dataset,
            "checkpoint_step": step,
            "train_examples": self.n[0],
            "test_examples": self.n[1],
            "layers": {str(layer): per_layer[i] for i, layer in enumerate(self.layers)},
            "best_layer": self.layers[best],
            "best_accuracy": per_layer[best]["accuracy"],
            "baselines": dict(self.baselines[0]),
            "heldout_fraction": heldout_fraction(self.entry),
            "solver": self.solver,
            "seconds": seconds,
        }


def linear_probes(
    config: ml_collections.ConfigDict,
    entry: ml_collections.ConfigDict,
    setup: steps.Setup,
    params,
    clusters,
    mesh,
    step: int,
    stop: base.StopCheck = base.never,
) -> dict:
    """probe.json's content for parameters `params` at `step` (see the module docstring), built from nothing."""
    return LinearProbe(config, entry, setup, clusters, mesh)(params, step, stop)


def history_file(name: str, step: int) -> str:
    return f"{name}/step_{step:08d}.json"


def history(directory: epath.Path, name: str) -> dict[int, dict]:
    """The evaluator's earlier records by checkpoint step: its history folder, and a newest-only `<name>.json` left
    by a version that kept no history."""
    records = {}
    folder = directory / name
    for path in sorted(folder.glob("step_*.json")) if folder.exists() else []:
        record = _read(path)
        if record is not None:
            records[record["checkpoint_step"]] = record
    newest = _read(directory / f"{name}.json")
    if newest is not None and newest["checkpoint_step"] not in records:
        records[newest["checkpoint_step"]] = newest
    return records


def _read(path: epath.Path) -> dict | None:
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        int(record["checkpoint_step"])
        return record
    except (ValueError, KeyError, TypeError):
        log.warning("%s does not hold a probe record: left out of the curve", path)
        return None


def by_layer_png(record: dict) -> bytes:
    layers = [int(layer) for layer in record["layers"]]
    accuracies = [record["layers"][str(layer)]["accuracy"] for layer in layers]
    title = f"linear probe on {record['dataset']}, step {record['checkpoint_step']}: test accuracy by layer"
    return plots.accuracy_by_layer(title, layers, accuracies, record["baselines"])


def curve_png(records: dict[int, dict]) -> bytes:
    """Every layer's test accuracy against training step; baselines as their own lines."""
    steps_ = sorted(records)
    newest = records[steps_[-1]]
    layers = {
        layer: [records[s]["layers"].get(layer, {}).get("accuracy", math.nan) for s in steps_]
        for layer in newest["layers"]
    }
    baselines = {}
    for name in newest["baselines"]:
        points = [(s, records[s]["baselines"][name]) for s in steps_ if name in records[s]["baselines"]]
        baselines[name] = ([p[0] for p in points], [p[1] for p in points])
    title = f"linear probe on {newest['dataset']} along training ({newest['test_examples']} test images)"
    return plots.accuracy_curve(title, steps_, layers, baselines)


def summary(name: str, record: dict) -> str:
    layers = " / ".join(f"{r['accuracy']:.1f}" for r in record["layers"].values())
    baselines = ", ".join(f"{k.replace('_', ' ')} {v:.1f}%" for k, v in record["baselines"].items())
    return (
        f"{name} step {record['checkpoint_step']}: best layer {record['best_layer']} {record['best_accuracy']:.1f}% "
        f"on {record['test_examples']} {record['dataset']} test images (layers {', '.join(record['layers'])}: "
        f"{layers}%" + (f"; {baselines})" if baselines else ")")
    )


def metrics_row(name: str, record: dict) -> dict:
    return {
        "mode": "probe",
        "evaluator": name,
        "step": record["checkpoint_step"],
        "best_layer": record["best_layer"],
        "best_accuracy": record["best_accuracy"],
        **{f"layer_{layer}": r["accuracy"] for layer, r in record["layers"].items()},
        **record["baselines"],
    }


class Evaluator:
    """config.evals.<name> of kind 'probe'."""

    def __init__(self, name: str, entry: ml_collections.ConfigDict, rt: runtime.Runtime):
        self.name, self.entry, self.rt = name, entry, rt
        self._probe: LinearProbe | None = None  # built at the first run: a mode that never probes opens no data

    def run(self, params, step: int, stop: base.StopCheck) -> base.Result:
        rt = self.rt
        if self._probe is None:
            self._probe = LinearProbe(rt.config, self.entry, rt.setup, rt.clusters_device, rt.mesh)
        record = self._probe(params, step, stop)
        record = {"evaluator": self.name, **record}
        result = base.Result(metrics_row(self.name, record), summary(self.name, record))
        if jax.process_index() == 0:  # the one writer: only its files are kept
            earlier = history(rt.directory, self.name)
            # a newest-only record from before histories were kept joins the history
            kept = {s: r for s, r in earlier.items() if not (rt.directory / history_file(self.name, s)).exists()}
            text, by_layer = _encoded(record), by_layer_png(record)
            curve = curve_png(earlier | {step: record})
            result.files = {
                **{history_file(self.name, s): _encoded(r) for s, r in kept.items()},
                history_file(self.name, step): text,
                f"{self.name}/step_{step:08d}.png": by_layer,
                f"{self.name}/curve.png": curve,
                f"{self.name}.json": text,
                f"{self.name}.png": by_layer,
            }
            result.images = {f"{self.name}/by_layer": by_layer, f"{self.name}/curve": curve}
        return result


def _encoded(record: dict) -> bytes:
    return (json.dumps(record, indent=2) + "\n").encode()
