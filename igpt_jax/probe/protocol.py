"""The paper's linear probe of one model, end to end: features once, then every solver pass from them.

For the first `train_examples` / `test_examples` images of the entry's data set: features of the chosen layers (l in
0 .. L, L being ln_f's output) from one forward pass per split, kept in the workdir's feature cache (cache.py); a
multinomial logistic regression per layer, its L2 strength chosen on the held-out end of train (linear.sweep, or
streamed.sweep when the train features are too large to hold); the same for the `concat` layers side by side and, with
`labels_per_class`, class-balanced low-data subsets (several draws, mean and standard deviation). Two baselines go
the same way: raw pixels, and the run's own step-0 model (config.seed's initialisation). A BERT model's test images
are seen under `masks` independent masks and the modal prediction is scored (the paper's ensemble).
"""

from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from igpt_jax import defaults, palette, steps
from igpt_jax.data import get_source, sources
from igpt_jax.data.sources import HELDOUT_PERCENT
from igpt_jax.evaluators import base
from igpt_jax.probe import attentive, cache, features, linear, streamed

log = logging.getLogger(__name__)

# The full-batch L-BFGS probe holds every train feature on the host and the device; above this many bytes of train
# features, solver='auto' streams them through minibatch SGD instead.
FULL_BATCH_LIMIT_BYTES = 2 << 30
CACHE_VERSION = 1  # the cache's layout and meaning; a change recomputes every cached feature


def solver(entry: ml_collections.ConfigDict, n_train: int, layers: int, dim: int) -> str:
    """'lbfgs' or 'sgd': the entry's solver, or for 'auto' by the size of the train features."""
    if entry.solver != "auto":
        return entry.solver
    return "lbfgs" if 4 * n_train * layers * dim <= FULL_BATCH_LIMIT_BYTES else "sgd"


def heldout_fraction(entry: ml_collections.ConfigDict) -> float:
    """The part of train the L2 strength is chosen on: the paper's 10%, ImageNet's 4%."""
    return HELDOUT_PERCENT.get(entry.dataset, 10) / 100


@jax.jit
def _moments(params) -> jax.Array:
    """Three sums per parameter array, on the devices: a fingerprint that tells two parameter sets apart without
    bringing them to one host."""
    leaves = jax.tree.leaves(params)
    return jnp.stack(
        [jnp.stack([jnp.sum(x), jnp.sum(x * x), jnp.sum(x * jnp.arange(x.size).reshape(x.shape) % 7)]) for x in leaves]
    ).astype(jnp.float32)


def params_digest(params) -> str:
    return np.asarray(jax.device_get(_moments(params))).tobytes().hex()[:32]


def source_of(config: ml_collections.ConfigDict, entry: ml_collections.ConfigDict):
    """(the config the probe's data is read under, its source): the run's config with the entry's data set."""
    data_config = sources.with_dataset(config, entry.dataset)
    return data_config, get_source(data_config)


class LinearProbe:
    """One probe entry on one run: its data, feature step and cache, built once; `probe(params, step)` gives
    probe.json's content. `workdir` holds the cache; `name` (the evaluator's) separates two probes' caches."""

    def __init__(self, config, entry, setup: steps.Setup, clusters, mesh, workdir: epath.Path, name: str):
        self.config, self.entry, self.setup, self.clusters, self.mesh = config, entry, setup, clusters, mesh
        self.workdir, self.name = workdir, name
        self.data_config, self.source = source_of(config, entry)
        self.n = {
            "train": _examples(entry.train_examples, self.source.num_examples(entry.train_split)),
            "test": _examples(entry.test_examples, self.source.num_examples(entry.test_split)),
        }
        self.splits = {"train": entry.train_split, "test": entry.test_split}
        depth = config.model.num_layers
        self.layers = tuple(entry.layers) or tuple(range(depth + 1))
        self.extracted = tuple(sorted(set(self.layers) | set(entry.concat)))  # what one pass computes
        self._feature_step = None
        self.solver = solver(entry, self.n["train"], len(self.extracted), config.model.embed_dim)
        self.baselines: dict | None = None  # from the first probe: the step-0 model and raw pixels do not train
        self.forward_passes = 0  # feature passes the current probe ran (the cache spares the rest)
        self.used: list[cache.Cache] = []  # the caches the current probe read

    @property
    def feature_step(self):
        if self._feature_step is None:
            self._feature_step = steps.make_feature_step(self.setup, self.extracted)
        return self._feature_step

    # --- features, once

    def _spec(self, model: str, split: str, masks: int, dim: int, dtype: str, digest: str | None) -> dict:
        fingerprint = None if self.clusters is None else palette.fingerprint(np.asarray(jax.device_get(self.clusters)))
        layers = list(self.extracted) if model != "pixels" else [0]
        return {
            "version": CACHE_VERSION,
            "model": model,
            "params": digest,
            "dataset": self.entry.dataset,
            "split": self.splits[split],
            "image_size": self.config.model.image_size,
            "palette": fingerprint if model != "pixels" else None,
            "objective": self.config.objective if model != "pixels" else None,
            "seed": self.config.seed,
            "layers": layers,
            "shape": [masks, len(layers), self.n[split], dim],
            "dtype": dtype,
        }

    def tokens(self, model: str, params_fn, split: str, layer: int, stop: base.StopCheck) -> cache.Cache:
        """The cache of `model`'s features of `layer` at every position on `split` (the attentive probe's)."""
        dim = defaults.tokens_per_image(self.config) * self.config.model.embed_dim
        params = params_fn()
        spec = self._spec(model, split, 1, dim, self.entry.features_dtype, params_digest(params))
        spec |= {"layers": [layer], "shape": [1, 1, self.n[split], dim], "tokens": True}
        found = cache.Cache(cache.folder(self.workdir, self.name, model, spec), spec)
        self.used.append(found)
        if not found.complete():
            step = steps.make_token_step(self.setup, layer)
            batches = features.token_batches(
                self.data_config, self.source, self.splits[split], self.n[split], step, params, self.clusters,
                self.mesh, stop=stop,
            )  # fmt: skip
            self.forward_passes += 1
            found.fill(batches, self.config.batch_size)
        return found

    def _attentive(self, model: str, params, stop) -> dict:
        """The attentive probe of each `attentive_layers` layer."""
        settings = attentive.Settings(
            self.entry.attentive_epochs, self.entry.attentive_learning_rate, self.config.model.num_heads
        )
        out = {}
        for layer in self.entry.attentive_layers:
            train, test = (self.tokens(model, lambda: params, s, layer, stop) for s in self.n)
            batch = self.config.batch_size
            out[str(layer)] = attentive.probe(
                train.passes(batch), train.n, test.passes(batch), self.source.num_classes(),
                dim=self.config.model.embed_dim, batch_size=batch, heldout_fraction=heldout_fraction(self.entry),
                settings=settings, stop=stop,
            )  # fmt: skip
        return out

    def features(self, model: str, params_fn, split: str, stop: base.StopCheck) -> cache.Cache:
        """The cache of `model`'s ('step_<N>', 'init' or 'pixels') features on `split`, computed by one pass when it
        is not there yet. `params_fn()` gives the parameters (only called when a pass is needed)."""
        masks = self.entry.masks if split == "test" and model != "pixels" else 1
        pixels = model == "pixels"
        dim = 3 * self.config.model.image_size**2 if pixels else self.config.model.embed_dim
        dtype = "uint8" if pixels else self.entry.features_dtype
        trained = model.startswith("step_")  # the others are fixed by the seed, or have no parameters
        params = params_fn() if trained else None
        spec = self._spec(model, split, masks, dim, dtype, params_digest(params) if trained else None)
        found = cache.Cache(cache.folder(self.workdir, self.name, model, spec), spec)
        self.used.append(found)
        if found.complete():
            return found
        n, name = self.n[split], self.splits[split]
        if pixels:
            batches = features.pixel_batches(self.data_config, self.source, name, n, stop=stop)
        else:
            batches = features.model_batches(
                self.data_config, self.source, name, n, self.feature_step, params or params_fn(), self.clusters,
                self.mesh, masks=masks, stop=stop,
            )  # fmt: skip
            self.forward_passes += 1
        found.fill(batches, self.config.batch_size)
        return found

    # --- solvers

    def _probe(self, train: cache.Cache, test: cache.Cache, positions, stop, what: str) -> list[dict]:
        """Per-layer results for the layers at `positions` of the cached features (None: every cached layer); `what`
        names the features on the progress bars (the trained step, the random init, raw pixels)."""
        transform = features.scale_pixels if train.dtype == np.uint8 else (lambda x: x)
        pick = (lambda x: x) if positions is None else (lambda x: x[:, positions])
        if self.solver == "sgd":
            d = train.shape[-1]
            layers = train.shape[1] if positions is None else len(positions)
            settings = streamed.Settings(self.entry.sgd_epochs, self.entry.sgd_learning_rate)
            batch = self.config.batch_size

            def stream(c):
                one = c.passes(batch, transform)
                return lambda: ((pick(x), y, i) for x, y, i in _checked(one(), stop))

            return streamed.sweep(
                stream(train), train.n, stream(test), self.source.num_classes(), layers=layers, dim=d,
                batch_size=batch, heldout_fraction=heldout_fraction(self.entry), settings=settings,
                name=f"probe of {what}",
            )  # fmt: skip
        train_x, train_y = train.gather(transform)
        test_x, test_y = test.gather(transform)
        return linear.sweep(
            pick(train_x)[0], train_y, pick(test_x), test_y, self.source.num_classes(),
            heldout_fraction=heldout_fraction(self.entry), stop=stop, name=f"probe of {what}",
        )  # fmt: skip

    def _concat(self, train: cache.Cache, test: cache.Cache, stop) -> dict:
        """The `concat` layers' features side by side, probed as one."""
        positions = [self.extracted.index(layer) for layer in self.entry.concat]
        train_x, train_y = train.gather()
        test_x, test_y = test.gather()

        def side_by_side(x):  # [M, L, n, d] -> [M, 1, n, k*d]
            chosen = x[:, positions]
            return chosen.transpose(0, 2, 1, 3).reshape(x.shape[0], 1, x.shape[2], -1)

        (result,) = linear.sweep(
            side_by_side(train_x)[0], train_y, side_by_side(test_x), test_y, self.source.num_classes(),
            heldout_fraction=heldout_fraction(self.entry), stop=stop,
        )  # fmt: skip
        return {"layers": list(self.entry.concat), **result}

    def _low_data(self, train: cache.Cache, test: cache.Cache, stop) -> dict:
        positions = [self.extracted.index(layer) for layer in self.layers]
        train_x, train_y = train.gather()
        test_x, test_y = test.gather()
        out = {}
        for per_class in self.entry.labels_per_class:
            results = linear.low_data(
                train_x[0][positions], train_y, test_x[:, positions], test_y, self.source.num_classes(),
                per_class=per_class, draws=self.entry.draws, seed=self.config.seed,
                heldout_fraction=heldout_fraction(self.entry), stop=stop,
            )  # fmt: skip
            best = max(range(len(results)), key=lambda i: results[i]["mean"])
            out[str(per_class)] = {
                "draws": self.entry.draws,
                "layers": {str(layer): results[i] for i, layer in enumerate(self.layers)},
                "best_layer": self.layers[best],
                "best_mean": results[best]["mean"],
                "best_std": results[best]["std"],
            }
        return out

    def _baselines(self, stop) -> tuple[dict, dict]:
        accuracies, seconds = {}, {}
        if not self.entry.baselines:
            return accuracies, seconds
        start = time.perf_counter()
        train, test = (self.features("init", lambda: steps.init_params(self.setup), s, stop) for s in self.n)
        accuracies["random_init"] = max(
            r["accuracy"] for r in self._probe(train, test, self._positions(), stop, "the random init")
        )
        seconds["random_init"] = time.perf_counter() - start
        if self.source.kind == "images":
            start = time.perf_counter()
            train, test = (self.features("pixels", None, s, stop) for s in self.n)
            accuracies["raw_pixels"] = self._probe(train, test, None, stop, "raw pixels")[0]["accuracy"]
            seconds["raw_pixels"] = time.perf_counter() - start
        return accuracies, seconds

    def _positions(self):
        positions = [self.extracted.index(layer) for layer in self.layers]
        return None if positions == list(range(len(self.extracted))) else positions

    def __call__(self, params, step: int, stop: base.StopCheck = base.never) -> dict:
        start = time.perf_counter()
        self.forward_passes, self.used = 0, []
        model = f"step_{step:08d}"
        train, test = (self.features(model, lambda: params, s, stop) for s in self.n)
        per_layer = self._probe(train, test, self._positions(), stop, f"step {step}")
        seconds = {"trained": time.perf_counter() - start}
        extra = {}
        if self.entry.concat:
            extra["concat"] = self._concat(train, test, stop)
        if self.entry.labels_per_class:
            extra["low_data"] = self._low_data(train, test, stop)
        if self.entry.attentive_layers:
            extra["attentive"] = self._attentive(model, params, stop)
        if self.baselines is None:
            self.baselines = self._baselines(stop)
            seconds |= self.baselines[1]
        if not self.entry.keep_features:
            for used in self.used:
                used.remove()
        best = max(range(len(self.layers)), key=lambda i: per_layer[i]["accuracy"])
        record = {
            "dataset": self.entry.dataset,
            "checkpoint_step": step,
            "train_examples": self.n["train"],
            "test_examples": self.n["test"],
            "layers": {str(layer): per_layer[i] for i, layer in enumerate(self.layers)},
            "best_layer": self.layers[best],
            "best_accuracy": per_layer[best]["accuracy"],
            "baselines": dict(self.baselines[0]),
            "heldout_fraction": heldout_fraction(self.entry),
            "solver": self.solver,
            **extra,
            "seconds": seconds,
            "forward_passes": self.forward_passes,
        }
        if self.entry.masks > 1:
            record["masks"] = self.entry.masks
        return record


def _examples(wanted: int, available: int) -> int:
    return available if wanted == 0 else min(wanted, available)


def _checked(batches, stop):
    for batch in batches:
        base.check(stop)
        yield batch
