"""The paper's linear probe, as an evaluator: config.evals.<name> of kind 'probe' (the protocol: igpt_jax/probe/).

Files, named after the evaluator (the default one is `probe`): each probe's record and plot at `<name>/step_<N>.json`
and `.png`, the accuracy of every layer against training step at `<name>/curve.png` (the paper's Figure 3, redrawn at
every probe), and the newest record and plot also at `<name>.json` and `<name>.png` (probe.json's top level is read
by other tools); the features it computed stay under `probe_features/<name>/` (igpt_jax/probe/cache.py) unless the
entry says not to keep them. The metrics row carries every layer's accuracy; TensorBoard gets them as scalars and
both plots.
"""

from __future__ import annotations

import json
import logging
import math

import jax
import ml_collections
from etils import epath

from igpt_jax import plots, runtime
from igpt_jax.data import sources
from igpt_jax.evaluators import base
from igpt_jax.probe import protocol

log = logging.getLogger(__name__)


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
        self._probe: protocol.LinearProbe | None = None  # built at the first run: until then no data is opened

    def data_problems(self) -> list[str]:
        _, source = protocol.source_of(self.rt.config, self.entry)
        keys = {f"config.evals.{self.name}.{key}": self.entry[key] for key in ("train_split", "test_split")}
        return [problem for key, split in keys.items() if (problem := sources.split_problem(source, key, split))]

    def probe(self) -> protocol.LinearProbe:
        if self._probe is None:
            rt = self.rt
            self._probe = protocol.LinearProbe(
                rt.config, self.entry, rt.setup, rt.clusters_device, rt.mesh, rt.directory, self.name
            )
        return self._probe

    def run(self, params, step: int, stop: base.StopCheck) -> base.Result:
        rt = self.rt
        record = self.probe()(params, step, stop)
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
