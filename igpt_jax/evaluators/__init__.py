"""Evaluators: what a run measures besides its training loss, listed by name in `config.evals`.

`config.evals.<name> = {kind, every_steps, at_end, ...the kind's settings}` (big_vision's `config.evals`): `kind` is
one of KINDS; during training an evaluator runs every `every_steps` steps (0: never) and/or at the last step
(`at_end`), after that step's checkpoint is saved; `--mode=eval|probe|sample` runs the config's evaluators of its
kind on a checkpoint, whatever their schedule. A run can so probe two data sets, or none.

Each kind declares here its settings (default, allowed values, meaning) and what it needs from the run (labels, a
palette, a model that can be sampled), so a config that cannot be evaluated is refused before the first step
(`problems`). This module only describes: each kind's code is kinds/<kind>.py (an `Evaluator` built from the run's
runtime), and runner.py runs them. Config files build entries with loss(), probe() and sample() below.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from igpt_jax import objectives
from igpt_jax.data import sources
from igpt_jax.workdir import layout


@dataclasses.dataclass(frozen=True)
class Setting:
    default: Any
    allowed: Callable[[Any], bool]
    description: str  # what is allowed, as the refusal says it


def _count(zero: str, default: int = 0) -> Setting:
    return Setting(default, _nonnegative_int, f"an integer >= 0 (0: {zero})")


def _nonnegative_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _text(value) -> bool:
    return isinstance(value, str)


def _real(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and abs(value) < 3.4e38  # float32's range


def _layer_list(value) -> bool:
    return isinstance(value, tuple | list) and all(_nonnegative_int(v) for v in value)


def _counts(value) -> bool:
    return isinstance(value, tuple | list) and all(_nonnegative_int(v) and v > 0 for v in value)


def _seed(value) -> bool:
    return _nonnegative_int(value) and value < 2**31


SCHEDULE = {
    "every_steps": _count("never during training"),
    "at_end": Setting(False, lambda v: isinstance(v, bool), "True or False"),
}


@dataclasses.dataclass(frozen=True)
class Kind:
    mode: str  # the --mode that runs this kind on a checkpoint; also the `mode` of its metrics.jsonl rows
    settings: Mapping[str, Setting]
    needs: Callable[[ml_collections.ConfigDict, str, ml_collections.ConfigDict], list[str]]  # (config, name, entry)
    summary: str  # one line, for --help and the README


def _loss_needs(config, name, entry) -> list[str]:
    if not entry.dataset:
        return []
    where = f"config.evals.{name}"
    problem = sources.unknown(f"{where}.dataset", entry.dataset, config.data.data_dir)
    return [problem] if problem else _palette_needs(config, name, entry.dataset, "a held-out loss")


def _palette_needs(config, name: str, dataset: str, what: str) -> list[str]:
    """A run on tokens with no palette cannot turn another data set's images into tokens."""
    where, data_dir = f"config.evals.{name}", config.data.data_dir
    images = sources.kind(dataset, data_dir) == "images"
    if images and sources.kind(config.data.dataset, data_dir) == "tokens" and not config.data.palette:
        return [
            f"{where} ({what}) needs a palette to turn the images of {where}.dataset={dataset!r} into "
            f"tokens, and config.data.dataset={config.data.dataset!r} has none: set --config.data.palette=PATH, "
            f"or turn it off (--config.evals.{name}.every_steps=0 --config.evals.{name}.at_end=False)"
        ]
    return []


def _probe_needs(config, name, entry) -> list[str]:
    where = f"config.evals.{name}"
    data_dir = config.data.data_dir
    problem = sources.unknown(f"{where}.dataset", entry.dataset, data_dir)
    if problem:
        return [problem]
    out = []
    if not sources.labelled(entry.dataset, data_dir):
        out.append(f"{where} (a linear probe) needs labels, and {where}.dataset={entry.dataset!r} has none")
    out += _palette_needs(config, name, entry.dataset, "a linear probe")
    depth = config.model.num_layers
    for key in ("layers", "concat", "attentive_layers"):
        outside = [layer for layer in entry[key] if not 0 <= layer <= depth]
        if outside:
            out.append(f"{where}.{key}={tuple(entry[key])}: {outside} outside 0 .. {depth} (ln_f is {depth})")
    if entry.masks > 1 and config.objective != "bert":
        out.append(f"{where}.masks={entry.masks}: an ensemble of masks needs a BERT model (config.objective='bert')")
    return out


def _sample_needs(config, name, entry) -> list[str]:
    where = f"config.evals.{name}"
    out = []
    if not objectives.OBJECTIVES[config.objective].left_to_right:
        left_to_right = [n for n, o in objectives.OBJECTIVES.items() if o.left_to_right]
        out.append(
            f"{where} (samples) needs a left-to-right model, and config.objective={config.objective!r}: only "
            f"{left_to_right} models can be sampled; turn it off (--config.evals.{name}.every_steps=0 "
            f"--config.evals.{name}.at_end=False) or probe instead"
        )
    if not (entry.num_images or entry.completion_images or entry.prompts):
        out.append(f"{where}.num_images and {where}.completion_images are both 0: nothing to sample")
    return out


KINDS: dict[str, Kind] = {
    "loss": Kind(
        mode="eval",
        settings={
            "examples": _count("the whole split"),  # the first n images of the split, in order
            # another data set than the run's, e.g. OpenAI's arrays (openai_imagenet), to compare with its figures
            "dataset": Setting("", _text, "'' (config.data.dataset) or a data set of the registry or prepared"),
            "split": Setting("", _text, "a split name or slice ('': config.data.eval_split)"),
            # BERT with a classification head: the accuracy of the modal prediction over this many masks
            "masks": Setting(1, lambda v: _nonnegative_int(v) and v > 0, "an integer >= 1"),
            # fine-tuning's model selection: keep the parameters of the best accuracy so far in <name>_best/
            "keep_best": Setting(False, lambda v: isinstance(v, bool), "True or False"),
        },
        needs=_loss_needs,
        summary="held-out loss (nats and bits per token; the head's accuracy when fine-tuning)",
    ),
    "probe": Kind(
        mode="probe",
        settings={
            "dataset": Setting("cifar10", _text, "a data set of the registry"),
            "train_split": Setting("train", _text, "a split name or slice"),
            "test_split": Setting("test", _text, "a split name or slice"),
            "train_examples": _count("the whole split"),  # the first n of each split
            "test_examples": _count("the whole split"),
            # l < num_layers: block l's normed input; l = num_layers: ln_f's output
            "layers": Setting((), _layer_list, "layer indices 0 .. num_layers (empty: every one)"),
            "concat": Setting((), _layer_list, "layer indices probed side by side too (empty: none)"),
            "labels_per_class": Setting((), _counts, "positive integers: low-data probes (empty: none)"),
            "draws": Setting(5, lambda v: _nonnegative_int(v) and v > 0, "an integer >= 1"),
            "masks": Setting(1, lambda v: _nonnegative_int(v) and v > 0, "an integer >= 1 (BERT: the test ensemble)"),
            "baselines": Setting(True, lambda v: isinstance(v, bool), "True or False"),
            "keep_features": Setting(True, lambda v: isinstance(v, bool), "True or False"),
            # AIM's attentive probe (beyond the paper) of these layers' token features, beside the linear one
            "attentive_layers": Setting((), _layer_list, "layer indices (empty: none)"),
            # on the README default's layer 0: 10 epochs at 1e-3 gave 59.7%, at 1e-2 66.9%; 30 at 1e-2 75.1%
            "attentive_epochs": Setting(30, lambda v: _nonnegative_int(v) and v > 0, "an integer >= 1"),
            "attentive_learning_rate": Setting(1e-2, lambda v: _real(v) and v > 0, "> 0"),
            "features_dtype": Setting("float32", lambda v: v in ("float32", "bfloat16"), "'float32' or 'bfloat16'"),
            "solver": Setting("auto", lambda v: v in ("auto", "lbfgs", "sgd"), "'auto', 'lbfgs' or 'sgd'"),
            "sgd_epochs": Setting(10, lambda v: _nonnegative_int(v) and v > 0, "an integer >= 1"),
            "sgd_learning_rate": Setting(0.1, lambda v: _real(v) and v > 0, "> 0"),
        },
        needs=_probe_needs,
        summary="linear probe of every layer's features, with raw-pixel and random-init baselines",
    ),
    "sample": Kind(
        mode="sample",
        settings={
            "num_images": _count("no unconditional samples", 16),
            "completion_images": _count("no completions", 4),  # the eval split's first images
            # FOLDER/PATTERN (local or gs://): complete these files instead of the eval split's images, all of them
            "prompts": Setting("", lambda v: isinstance(v, str), "a glob of image files, e.g. 'photos/*.jpg'"),
            "completions_per_image": Setting(4, lambda v: _nonnegative_int(v) and v > 0, "an integer >= 1"),
            "completion": Setting(0.5, lambda v: _real(v) and 0 <= v < 1, "0 <= fraction of rows given < 1"),
            "temperature": Setting(1.0, lambda v: _real(v) and v >= 0, ">= 0 (0: greedy)"),
            "top_k": _count("no top-k"),
            "seed": Setting(0, _seed, "an integer, 0 <= seed < 2**31"),
            "batch_size": _count("config.batch_size"),  # images per sampling call
        },
        needs=_sample_needs,
        summary="unconditional samples and completions of held-out images, as PNG grids",
    ),
}


def entry(kind: str, *, every_steps: int = 0, at_end: bool = False, **settings) -> ml_collections.ConfigDict:
    """config.evals.<name> for an evaluator of `kind`: its schedule and every setting of the kind, defaults for
    those not given. Config files use loss(), probe() and sample() below."""
    if kind not in KINDS:
        raise ValueError(f"evaluator kind {kind!r} is unknown; allowed: {sorted(KINDS)}")
    table = KINDS[kind].settings
    unknown = sorted(set(settings) - set(table))
    if unknown:
        raise ValueError(f"{kind} evaluators have no setting {unknown}; theirs: {sorted(table)}")
    values = {key: setting.default for key, setting in table.items()} | settings
    return ml_collections.ConfigDict({"kind": kind, "every_steps": every_steps, "at_end": at_end, **values})


def loss(**schedule_and_settings) -> ml_collections.ConfigDict:
    return entry("loss", **schedule_and_settings)


def probe(**schedule_and_settings) -> ml_collections.ConfigDict:
    return entry("probe", **schedule_and_settings)


def sample(**schedule_and_settings) -> ml_collections.ConfigDict:
    return entry("sample", **schedule_and_settings)


def defaults() -> ml_collections.ConfigDict:
    """Every config's evaluators: the held-out loss every 5,000 steps and at the end; a probe and samples that
    training runs only when given a schedule, and that --mode=probe and --mode=sample run."""
    return ml_collections.ConfigDict(
        {"eval": loss(every_steps=5_000, at_end=True), "probe": probe(), "samples": sample()}
    )


def scheduled(entry: ml_collections.ConfigDict) -> bool:
    """Whether training runs this evaluator at all."""
    return bool(entry.every_steps) or bool(entry.at_end)


def due(entry: ml_collections.ConfigDict, step: int, total_steps: int) -> bool:
    """Whether training runs this evaluator after step `step` (>= 1) of `total_steps`."""
    every = entry.every_steps
    return step > 0 and (bool(every and step % every == 0) or bool(entry.at_end and step == total_steps))


def of_kind(config: ml_collections.ConfigDict, kind: str) -> list[str]:
    """Names of the config's evaluators of `kind`, in the config's order."""
    return [name for name, e in config.evals.items() if e.get("kind") == kind]


def mode_kind(mode: str) -> str | None:
    """The kind a --mode runs (eval -> loss), or None for modes that are not an evaluator's."""
    return next((name for name, kind in KINDS.items() if kind.mode == mode), None)


NAME = re.compile(r"[a-z][a-z0-9_]*")


def problems(config: ml_collections.ConfigDict, mode: str = "train") -> list[str]:
    """Every reason the config's evaluators cannot run, one line each: names and settings of every evaluator, and
    what each one that `mode` will run needs (training: those with a schedule; eval/probe/sample: those of its
    kind, and at least one of them)."""
    out = []
    for name, e in config.evals.items():
        where = f"config.evals.{name}"
        if not NAME.fullmatch(name) or name in layout.RESERVED_NAMES:
            out.append(
                f"{where}: an evaluator's name must be lower case letters, digits and _ (its files are named after "
                f"it), and none of the workdir's own names {sorted(layout.RESERVED_NAMES)}"
            )
        if not isinstance(e, ml_collections.ConfigDict) or e.get("kind") not in KINDS:
            kind = e.get("kind") if isinstance(e, ml_collections.ConfigDict) else None
            out.append(f"{where}.kind={kind!r} is unknown; allowed: {sorted(KINDS)}")
            continue
        out += _settings_problems(where, e)
    if out:
        return out
    kind = mode_kind(mode)
    if kind is not None and not of_kind(config, kind):
        return [
            f"--mode={mode} runs the config's evaluators of kind {kind!r}, and config.evals has none "
            f"(it has {sorted(config.evals) or 'none'}); add one, e.g. config.evals.{kind} = evaluators.{kind}(...)"
        ]
    runs = of_kind(config, kind) if kind else [n for n, e in config.evals.items() if mode == "train" and scheduled(e)]
    return [p for name in runs for p in KINDS[config.evals[name].kind].needs(config, name, config.evals[name])]


def _settings_problems(where: str, e: ml_collections.ConfigDict) -> list[str]:
    table = {**SCHEDULE, **KINDS[e.kind].settings}
    out = [
        f"{where} has no setting {key!r}; a {e.kind} evaluator's: {sorted(table)}"
        for key in e
        if key != "kind" and key not in table
    ]
    for key, setting in table.items():
        if key not in e:
            out.append(
                f"{where}.{key} is missing (default {setting.default!r}); build entries with evaluators.{e.kind}()"
            )
        elif not setting.allowed(e[key]):
            out.append(f"{where}.{key}={e[key]!r}: allowed: {setting.description}")
    return out


# metrics.jsonl rows written before rows named their evaluator: the default evaluator of their mode wrote them.
LEGACY_ROWS = {"eval": "eval", "probe": "probe", "sample": "samples"}

# Keys that evaluators replaced: a command line or config file that sets one is told the new key.
RENAMED = {
    "eval_every_steps": "evals.eval.every_steps",
    "eval_examples": "evals.eval.examples",
    "probe": "evals.probe",
    "sample": "evals.samples",
}


def renamed(dotted: str) -> str | None:
    """'probe.dataset' -> 'evals.probe.dataset' for a key that moved under config.evals; None for other keys."""
    head, dot, rest = dotted.partition(".")
    for old in (dotted, head):
        if old in RENAMED:
            return RENAMED[old] + (f".{rest}" if old == head and dot else "")
    return None
