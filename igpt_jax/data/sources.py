"""Data sources behind one interface, chosen by `config.data.dataset` from a registry.

A source says how many examples a split has and returns, for any list of example indices, uint8 images [n, size, size,
3] (or int32 tokens [n, size*size] for `synthetic` and OpenAI's pre-quantized arrays). Random access by index is what
makes the data order a pure function of (seed, step): TFDS datasets are prepared as ArrayRecord files and read through
`builder.as_data_source`, which reads any example without reading the ones before it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Protocol

import ml_collections
import numpy as np

from igpt_jax import errors
from igpt_jax.data import openai_arrays, preprocess
from igpt_jax.defaults import tokens_per_image
from igpt_jax.workdir import storage

log = logging.getLogger(__name__)


class Source(Protocol):
    kind: str  # 'images' (uint8 [n, H, W, 3]) or 'tokens' (int32 [n, H*W])

    def num_examples(self, split: str) -> int: ...

    def get(self, split: str, indices: np.ndarray, rngs: Sequence[np.random.Generator] | None) -> np.ndarray:
        """Examples `indices` of `split`; `rngs` (one per example) for training augmentation, None for eval."""
        ...

    def labels(self, split: str, indices: np.ndarray) -> np.ndarray:
        """Class labels (int32 [n]) of examples `indices` of `split`, for probes and fine-tuning."""
        ...

    def num_classes(self) -> int: ...


class Synthetic:
    """Random tokens, a pure function of (seed, split, example index): for speed runs and tests, no palette."""

    kind = "tokens"
    labelled = True  # ten classes the tokens do not predict: a probe on them scores chance

    def num_classes(self) -> int:
        return 10

    def __init__(self, config: ml_collections.ConfigDict):
        self.seed = config.seed
        self.shape = (tokens_per_image(config),)
        self.vocab = config.model.vocab_size

    def num_examples(self, split: str) -> int:
        return 1 << 20  # an "epoch" of a million random images; the order permutes this many indices

    def get(self, split: str, indices: np.ndarray, rngs=None) -> np.ndarray:
        salt = 0 if split.startswith("train") else 1
        rows = [np.random.default_rng([self.seed, salt, int(i)]).integers(0, self.vocab, self.shape) for i in indices]
        return np.stack(rows).astype(np.int32)

    def labels(self, split: str, indices: np.ndarray) -> np.ndarray:
        """Ten classes that the tokens do not predict: a probe on them scores chance."""
        return (np.asarray(indices) * 7 % 10).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
    name: str  # TFDS name, with its config: 'imagenet_resized/32x32'
    family: str  # key of preprocess.FAMILIES
    labelled: bool = True  # has class labels (probes and fine-tuning need them)
    manual_files: tuple[str, ...] = ()  # at least one must be in manual_dir (manual-download datasets)
    offline_prepare: Callable[[str, dict], None] | None = None  # (manual_dir, url_infos) -> files TFDS will accept


def _debian_fashion_mnist(manual_dir: str, url_infos: dict) -> None:
    from igpt_jax.data import debian_fashion_mnist

    debian_fashion_mnist.ensure_manual_files(manual_dir, url_infos)


class NeedsTensorFlowError(errors.UsageError, RuntimeError):
    """A TFDS data set that is not prepared yet, where TensorFlow is not installed: TFDS's preparation reads and
    writes through TensorFlow (reading a prepared ArrayRecord data set does not)."""


def _tensorflow_installed() -> bool:
    """Whether TensorFlow can be imported, without importing it (seconds): an environment may also hide an
    installed one (a None in sys.modules, an import hook that refuses it)."""
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):
        return False


class TfdsSource:
    """A TFDS image dataset, prepared once (ArrayRecord) under config.data.data_dir and read by index."""

    kind = "images"

    def __init__(self, config: ml_collections.ConfigDict, spec: TfdsSpec):
        self.spec = spec
        self.size = config.model.image_size
        self.flip = config.data.flip
        self.data_dir = config.data.data_dir or None
        self.builder = self.make_builder()
        root = str(self.builder.data_dir).removesuffix(self.builder.info.full_name).rstrip("/")
        self.manual_dir = config.data.manual_dir or os.path.join(root, "downloads", "manual")
        _prepare_once(self)
        self.train_fn, self.eval_fn = preprocess.FAMILIES[config.data.preprocess or spec.family]
        self.augment = preprocess.AUGMENTATIONS[config.data.augment]
        self._sources: dict[str, object] = {}
        self._pool = ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1), thread_name_prefix="decode")

    def make_builder(self):
        import tensorflow_datasets as tfds

        return tfds.builder(self.spec.name, data_dir=self.data_dir, file_format="array_record")

    def prepare(self) -> None:
        """download_and_prepare, with the manual files checked first. TFDS writes into a temporary folder and
        renames it when done, so a failure leaves nothing half-written in data_dir."""
        import tensorflow_datasets as tfds

        manual_dir = storage.path(self.manual_dir)  # local or gs://, like data_dir
        if self.spec.manual_files and not any((manual_dir / f).exists() for f in self.spec.manual_files):
            raise FileNotFoundError(
                f"{self.spec.name} needs its downloaded files in config.data.manual_dir={self.manual_dir}: "
                f"expected {' and/or '.join(self.spec.manual_files)}, found none"
            )
        if not _tensorflow_installed():
            raise NeedsTensorFlowError(
                f"{self.spec.name} is not prepared in {self.builder.data_dir} and preparing it needs TensorFlow: "
                "pip install 'igpt_jax[data]' here, or prepare it where TensorFlow is (`tfds build "
                f"{self.spec.name} --file_format=array_record --data_dir=DIR`) and set config.data.data_dir=DIR"
            )
        if self.spec.offline_prepare is not None:
            self.spec.offline_prepare(self.manual_dir, type(self.builder).url_infos)
        log.info("preparing %s in %s (once)", self.spec.name, self.builder.data_dir)
        try:
            self.builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=self.manual_dir))
        except Exception as e:
            cause = storage.storage_failure(e)  # a full disk or a read-only folder, often wrapped in TFDS's errors
            if cause is None:
                raise
            where = cause.filename or str(self.builder.data_dir)
            raise OSError(cause.errno, cause.strerror or str(cause), where) from e

    def _source(self, split: str):
        if split not in self._sources:
            import tensorflow_datasets as tfds

            self._sources[split] = self.builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
        return self._sources[split]

    def num_examples(self, split: str) -> int:
        return len(self._source(split))

    def get(self, split: str, indices: np.ndarray, rngs: Sequence[np.random.Generator] | None) -> np.ndarray:
        records = self._source(split).__getitems__([int(i) for i in indices])
        jobs = [
            (record, f"{self.spec.name} {split}[{int(i)}]{_file_name(record)}", None if rngs is None else rngs[k])
            for k, (i, record) in enumerate(zip(indices, records, strict=True))
        ]
        return np.stack(list(self._pool.map(self._one, jobs)))

    def labels(self, split: str, indices: np.ndarray) -> np.ndarray:
        if "label" not in self.builder.info.features:
            raise ValueError(f"{self.spec.name} has no labels: a probe or fine-tuning needs a labelled data set")
        records = self._source(split).__getitems__([int(i) for i in indices])
        return np.asarray([int(r["label"]) for r in records], np.int32)

    def num_classes(self) -> int:
        return self.builder.info.features["label"].num_classes

    def check_split(self, split: str) -> str | None:
        """What is wrong with `split` (a name or a TFDS slice such as 'train[:90%]'), from the prepared data set's
        info alone (no record is read); None when it names at least one image."""
        try:
            n = self.builder.info.splits[split].num_examples
        except (ValueError, KeyError) as e:
            why = str(e).strip().splitlines()[-1]
            return f"{self.spec.name} has no such split ({why}); its splits: {list(self.builder.info.splits)}"
        return None if n else f"{self.spec.name} split {split!r} holds no images"

    def _one(self, job) -> np.ndarray:
        record, name, rng = job
        image = preprocess.open_image(record["image"], name)
        fn = self.eval_fn if rng is None else self.train_fn
        array = fn(image, name, self.size, rng, self.flip and rng is not None)
        if rng is not None:
            array = self.augment(array, rng)
        if array.shape != (self.size, self.size, 3) or array.dtype != np.uint8:
            raise ValueError(
                f"{name}: preprocessing gave {array.dtype} {array.shape}, expected uint8 ({self.size}, {self.size}, 3)"
            )
        return array


def _file_name(record: dict) -> str:
    name = record.get("file_name")
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    return f" ({name})" if name else ""


def _prepare_once(source: TfdsSource) -> None:
    """Process 0 prepares while the others wait; a process that still sees nothing (local disks) prepares too."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_index() == 0 and not source.builder.is_prepared():
        source.prepare()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"igpt_prepare_{source.spec.name}")
        if jax.process_index() != 0:  # a builder made before process 0 prepared holds an info with no splits
            source.builder = source.make_builder()
    if not source.builder.is_prepared():
        source.prepare()


TFDS_DATASETS = [
    TfdsSpec("imagenet2012", "imagenet", manual_files=("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")),
    TfdsSpec("imagenet_resized/32x32", "low_resolution"),
    TfdsSpec("imagenet_resized/64x64", "low_resolution"),
    TfdsSpec("downsampled_imagenet/32x32", "low_resolution", labelled=False),
    TfdsSpec("downsampled_imagenet/64x64", "low_resolution", labelled=False),
    TfdsSpec("cifar10", "low_resolution"),
    TfdsSpec("cifar100", "low_resolution"),
    TfdsSpec("stl10", "low_resolution"),
    TfdsSpec("fashion_mnist", "low_resolution", offline_prepare=_debian_fashion_mnist),
]

# The paper's held-out sets (section 3.1): the end of the train split, kept out of training and used for evaluation.
HELDOUT = "heldout"
HELDOUT_PERCENT = {
    "imagenet2012": 4,
    "imagenet_resized/32x32": 4,
    "imagenet_resized/64x64": 4,
    "downsampled_imagenet/32x32": 4,
    "downsampled_imagenet/64x64": 4,
    "cifar10": 10,
    "cifar100": 10,
    "stl10": 10,
}


def splits(config: ml_collections.ConfigDict) -> tuple[str, str]:
    """(train split, eval split) as TFDS reads them. config.data.eval_split='heldout' evaluates on the paper's
    held-out end of config.data.train_split and trains on the rest: e.g. ('train[:96%]', 'train[96%:]'); a data set
    prepared from a folder with --heldout_fraction has a split of that name."""
    train, held_out = config.data.train_split, config.data.eval_split
    if held_out != HELDOUT or prepared_spec(config.data.dataset, config.data.data_dir):
        return train, held_out
    percent = HELDOUT_PERCENT.get(config.data.dataset)
    if percent is None:
        raise ValueError(
            f"config.data.eval_split='heldout' has no preset for config.data.dataset={config.data.dataset!r}; "
            f"presets: {sorted(HELDOUT_PERCENT)} (or name a split, e.g. 'train[90%:]')"
        )
    return f"{train}[:{100 - percent}%]", f"{train}[{100 - percent}%:]"


SOURCES: dict[str, Callable[[ml_collections.ConfigDict], Source]] = {
    "synthetic": Synthetic,
    **{spec.name: partial(TfdsSource, spec=spec) for spec in TFDS_DATASETS},
    **{name: partial(openai_arrays.OpenAIArrays, spec=spec) for name, spec in openai_arrays.SPECS.items()},
}


def prepared_spec(dataset: str, data_dir: str) -> TfdsSpec | None:
    """A data set that `python -m igpt_jax.data.prepare` wrote into `data_dir` under the name `dataset` (not a
    registry name), described from its features.json alone: TFDS reads it back by name like a registered one. Its
    preprocessing is the paper's ImageNet crops unless config.data.preprocess says otherwise."""
    if dataset in SOURCES or not data_dir:
        return None
    from igpt_jax.data import prepare

    features = storage.path(data_dir) / dataset / prepare.VERSION / "features.json"
    if not features.exists():
        return None
    labelled = "label" in json.loads(features.read_text())["featuresDict"]["features"]
    return TfdsSpec(dataset, "imagenet", labelled=labelled)


def _factory(dataset: str, data_dir: str) -> Callable[[ml_collections.ConfigDict], Source] | None:
    spec = prepared_spec(dataset, data_dir)
    return partial(TfdsSource, spec=spec) if spec else SOURCES.get(dataset)


def unknown(key: str, dataset: str, data_dir: str) -> str | None:
    """A line naming `key` when `dataset` is neither a registry name nor a data set prepared in `data_dir`."""
    if _factory(dataset, data_dir) is not None:
        return None
    where = f"config.data.data_dir={data_dir!r}" if data_dir else "config.data.data_dir (unset)"
    return (
        f"{key}={dataset!r} is unknown; allowed: {sorted(SOURCES)}, or a data set prepared in {where} by "
        f"`python -m igpt_jax.data.prepare --images=DIR --name={dataset} --data_dir=DD`"
    )


def kind(dataset: str, data_dir: str = "") -> str:
    """What a data set's batches hold, 'images' or 'tokens', without opening it (the compile-only planner)."""
    factory = _factory(dataset, data_dir)
    return getattr(factory, "kind", None) or factory.func.kind


def labelled(dataset: str, data_dir: str = "") -> bool:
    """Whether a data set has class labels, without opening it (the evaluators' checks before training)."""
    factory = _factory(dataset, data_dir)
    return factory.keywords["spec"].labelled if isinstance(factory, partial) else factory.labelled


def split_problem(source: Source, key: str, split: str) -> str | None:
    """A line naming the config key when `source` cannot read `split`, before anything trains on it (sources with
    no named splits, such as synthetic data, accept any)."""
    check = getattr(source, "check_split", None)
    problem = check(split) if check is not None else None
    return None if problem is None else f"{key}={split!r}: {problem}"


def with_dataset(config: ml_collections.ConfigDict, dataset: str) -> ml_collections.ConfigDict:
    """A copy of `config` reading `dataset` (an evaluator's own data set, under the run's other settings)."""
    config = config.copy_and_resolve_references()
    config.data.dataset = dataset
    return config


def get_source(config: ml_collections.ConfigDict) -> Source:
    problem = unknown("config.data.dataset", config.data.dataset, config.data.data_dir)
    if problem:
        raise ValueError(problem)
    return _factory(config.data.dataset, config.data.data_dir)(config)


__all__ = [
    "HELDOUT",
    "HELDOUT_PERCENT",
    "SOURCES",
    "Source",
    "TfdsSpec",
    "get_source",
    "kind",
    "labelled",
    "prepared_spec",
    "split_problem",
    "splits",
    "unknown",
    "with_dataset",
]
