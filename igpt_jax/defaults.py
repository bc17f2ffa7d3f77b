"""The config's schema: every key the project reads, in one table, with its default (iGPT-S at 32x32), the values it
allows, whether a relaunch may change it, and what it does.

`make_config` builds a config from the table; config_checks.py checks each key's values from it (and the relations
between keys itself); resume.py reads from it which keys a relaunch may change; `igpt --help` lists it. The presets
in igpt_jax/configs/ start from `make_config` (through igpt_jax/configs/base.py) and change only what differs. A
config file's `get_config(arg)` takes an optional argument after the preset's name or the file's path on the command
line: `--config=igpt_l:48` or `--config=igpt_l:image_size=48` sets the image side (and with it the context length
and the position table). Any key can then be overridden: `--config.model.num_layers=2`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import ml_collections

# Keys accepted in the `:ARG` part of --config, with their types. The rest is set with --config.KEY=VALUE.
ARG_KEYS = {"image_size": int}

FLOAT32_MAX = 3.4028234663852886e38


def parse_arg(arg: str | None, **defaults) -> dict:
    """Parses `48` or `image_size=48` into {'image_size': 48}; unknown keys are refused by name."""
    out = dict(defaults)
    if not arg:
        return out
    for part in str(arg).split(","):
        key, sep, value = part.partition("=")
        if not sep:  # a bare value is the image size
            key, value = "image_size", key
        key = key.strip()
        if key not in ARG_KEYS:
            raise ValueError(f"config argument {key!r} is unknown; allowed: {sorted(ARG_KEYS)}")
        try:
            out[key] = ARG_KEYS[key](value)
        except ValueError:
            raise ValueError(f"config argument {key}={value!r} is not of type {ARG_KEYS[key].__name__}") from None
    return out


# --- what a key allows


@dataclasses.dataclass(frozen=True)
class Positive:
    """A positive integer."""

    numeric = True
    described = "a positive integer"

    def problem(self, name: str, value) -> str | None:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return None
        return f"{name}={value!r}: must be a positive integer"


@dataclasses.dataclass(frozen=True)
class Range:
    """A finite number (as float32: what the step computes with) that `test` accepts."""

    test: Callable[[Any], bool]
    described: str
    numeric = True

    def problem(self, name: str, value) -> str | None:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if number and math.isfinite(value) and abs(value) <= FLOAT32_MAX and self.test(value):
            return None
        return f"{name}={value!r}: allowed: {self.described}"


@dataclasses.dataclass(frozen=True)
class Choices:
    """One of the names a registry holds (read when checked: a registry may grow after import)."""

    names: Callable[[], list[str]]
    numeric = False

    @property
    def described(self) -> str:
        return f"one of {self.names()}"

    def problem(self, name: str, value) -> str | None:
        allowed = self.names()
        return None if value in allowed else f"{name}={value!r} is unknown; allowed: {allowed}"


@dataclasses.dataclass(frozen=True)
class Free:
    """Any value of the default's type (ml_collections refuses other types); what it means is checked where it is
    used (a path, a split name, a data set: config_checks' relations, the data layer)."""

    described: str
    numeric = False

    def problem(self, name: str, value) -> str | None:
        return None


def _integer_at_least(low: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _registry(module: str, attribute: str, call: bool = False) -> Callable[[], list[str]]:
    """The names of a registry, imported when first asked (the registries import JAX; this table must not)."""

    def names() -> list[str]:
        import importlib

        found = getattr(importlib.import_module(module), attribute)
        return list(found() if call else found)

    return names


DTYPES = _registry("igpt_jax.model", "DTYPES")
SCHEDULES = _registry("igpt_jax.optim", "SCHEDULES")
AUGMENTATIONS = _registry("igpt_jax.data.preprocess", "AUGMENTATIONS")


@dataclasses.dataclass(frozen=True)
class Derived:
    """A default that follows make_config's arguments (the model's shape, the learning rate)."""

    of: Callable[[dict], Any]


# A relaunch from a checkpoint may change a key that steers the run (how long, how often to log or save, the mesh,
# remat, the attention kernel, where data lives, the optimizer's settings); a recipe key changes what the checkpoint
# means (model shape, objective, seed, batch, data set), and a change stops the run naming it (resume.py).
STEERS, RECIPE = "steers", "recipe"


@dataclasses.dataclass(frozen=True)
class Key:
    default: Any  # a value, or Derived
    allowed: Positive | Range | Choices | Free
    resume: str  # STEERS or RECIPE
    doc: str


_ZERO_OR_MORE = Range(_integer_at_least(0), "an integer >= 0")


SCHEMA: dict[str, Key] = {
    "seed": Key(0, Range(lambda v: isinstance(v, int) and 0 <= v < 2**31, "an integer, 0 <= seed < 2**31"), RECIPE,
                "initialisation, data order and every random draw of the run"),
    "batch_size": Key(128, Positive(), RECIPE, "global, in images (the paper's batch for S/M/L)"),
    "total_steps": Key(1_000_000, Positive(), STEERS, "train steps; raise it and relaunch to train further"),
    "microbatches": Key(1, Positive(), STEERS, "gradient accumulation: each step runs batch_size / microbatches at a "
                        "time"),
    "log_every_steps": Key(100, Positive(), STEERS, "a metrics row and a progress line every this many steps"),
    "checkpoint_every_steps": Key(5_000, Positive(), STEERS, "an Orbax checkpoint every this many steps (and at the "
                                  "end, and on a stop request)"),
    "keep_checkpoints": Key(3, Positive(), STEERS, "the newest checkpoints kept"),
    "watchdog_seconds": Key(1800, Range(lambda v: v >= 0, ">= 0 (0 turns the watchdog off)"), STEERS,
                            "a process with no progress for this long exits (stacks dumped), so a stuck host cannot "
                            "hang the others"),
    "compilation_cache_dir": Key("auto", Free("'auto', a path, or '' (off)"), STEERS,
                                 "JAX's persistent compilation cache: 'auto' is JAX_COMPILATION_CACHE_DIR where the "
                                 "environment sets it, else compilation_cache/ beside the workdir (in the bucket for "
                                 "gs://: it outlives a preempted VM's disk)"),
    "profile.start_step": Key(0, Range(_integer_at_least(0), "an integer >= 0 (0: no profile)"), STEERS,
                              "a jax.profiler trace of steps start_step .. start_step + num_steps - 1 into the "
                              "workdir's tensorboard/plugins/profile/ (train and finetune)"),
    "profile.num_steps": Key(3, Positive(), STEERS, "the steps a profile traces"),
    "wandb.project": Key("", Free("a W&B project name, or '' (off)"), STEERS,
                         "Weights & Biases: the metrics rows and pictures also go to this project's run "
                         "(pip install wandb; WANDB_MODE=offline and the like apply)"),
    "wandb.entity": Key("", Free("a W&B entity, or '' (yours)"), STEERS, "the W&B team or user"),
    "wandb.name": Key("", Free("a name, or '' (the workdir's folder name)"), STEERS, "the run's name in W&B"),
    "restore": Key("all", Choices(_registry("igpt_jax.workdir.resume", "RESTORE_MODES")), STEERS,
                   "what a relaunch restores: 'all' (step, parameters, optimizer state) or 'params' (which also "
                   "accepts changed recipe keys; igpt_jax/workdir/resume.py)"),
    "checkpoint_step": Key(0, Range(_integer_at_least(0), "an integer >= 0 (0: the newest checkpoint)"), STEERS,
                           "the checkpoint eval, probe, sample and finetune read; 0: the newest"),
    "objective": Key("ar", Choices(_registry("igpt_jax.objectives", "OBJECTIVES")), RECIPE,
                     "'ar': the next pixel in raster order; 'bert': masked pixels"),
    "bert_mask_prob": Key(0.15, Range(lambda v: 0.0 < v < 1.0, "0 < p < 1"), RECIPE,
                          "BERT: the chance that a position is masked"),
    "model.num_layers": Key(Derived(lambda a: a["num_layers"]), Positive(), RECIPE, "transformer blocks"),
    "model.embed_dim": Key(Derived(lambda a: a["embed_dim"]), Positive(), RECIPE, "the residual stream's width"),
    "model.num_heads": Key(Derived(lambda a: a["num_heads"]), Positive(), RECIPE, "attention heads a block"),
    "model.mlp_ratio": Key(4, Positive(), RECIPE, "the MLP's width over embed_dim"),
    "model.image_size": Key(Derived(lambda a: a["image_size"]), Positive(), RECIPE, "the image side in pixels"),
    "model.num_positions": Key(Derived(lambda a: a["image_size"] ** 2), Positive(), RECIPE,
                               "rows of the learned position table (image_size**2 must fit): explicit, so a "
                               "checkpoint's table size is (OpenAI's 32x32 models have 1024 rows)"),
    "model.vocab_size": Key(512, Positive(), RECIPE,
                            "palette colours (the SOS is a learned vector of its own, not a vocabulary row)"),
    "model.norm_eps": Key(1e-5, Range(lambda v: v > 0, "> 0"), RECIPE, "the RMS norms' epsilon"),
    "model.dtype": Key("float32", Choices(DTYPES), STEERS,
                       "compute dtype; 'bfloat16' on accelerators (logits and loss are always float32)"),
    "model.param_dtype": Key("float32", Choices(DTYPES), RECIPE, "the parameters' dtype"),
    "model.remat": Key("none", Choices(_registry("igpt_jax.model", "REMAT_POLICIES")), STEERS,
                       "what the backward pass recomputes instead of keeping (memory for compute)"),
    "model.scan_layers": Key(True, Free("True or False"), STEERS, "the blocks as one lax.scan (one compile of a "
                             "block) or unrolled"),
    "model.attention": Key("auto", Choices(_registry("igpt_jax.attention", "allowed_names", call=True)), STEERS,
                           "the attention kernel (igpt_jax.attention.KERNELS); 'auto' reads the measured table "
                           "attention.AUTO"),
    "model.num_classes": Key(0, Range(_integer_at_least(0), "an integer >= 0 (0: no classification head)"), RECIPE,
                             "classes of a zero-initialised linear head on the mean-pooled ln_f output; "
                             "--mode=finetune sets it"),
    "data.dataset": Key("imagenet2012", Free("a data set of the registry, or one prepared in data.data_dir"), RECIPE,
                        "what the run trains on (igpt_jax/data/sources.py)"),
    "data.data_dir": Key("", Free("a folder, local or gs://, or '' (TFDS's default)"), STEERS,
                         "TFDS's data_dir: prepared data sets, and OpenAI's arrays"),
    "data.manual_dir": Key("", Free("a folder, or '' (<data_dir>/downloads/manual)"), STEERS,
                           "where manual downloads (the ILSVRC tars) are"),
    "data.train_split": Key("train", Free("a split name or slice"), RECIPE, "the split the run trains on"),
    "data.eval_split": Key("validation", Free("a split name or slice, or 'heldout'"), STEERS,
                           "the held-out loss's split; 'heldout' is the paper's held-out end of train_split "
                           "(ImageNet 4%, CIFAR and STL-10 10%), kept out of training"),
    "data.preprocess": Key("", Free("'' (the data set's own) or a family of igpt_jax.data.preprocess.FAMILIES"),
                           RECIPE, "how images become squares: 'imagenet', the paper's random (train) and central "
                           "(eval) crops, or 'low_resolution', the whole image resized"),
    "data.flip": Key(False, Free("True or False"), RECIPE, "random horizontal flips in training (the paper mentions "
                     "none for pretraining)"),
    "data.augment": Key("none", Choices(AUGMENTATIONS), RECIPE, "training images' augmentation after the crops: "
                        "'cifar' is the paper's fine-tuning recipe (reflect-pad 4, random crop back, random flip)"),
    "data.prefetch": Key(2, _ZERO_OR_MORE, STEERS, "batches prepared ahead of the device by a background thread"),
    "data.palette": Key("", Free("a path (local or gs://) to a (K, 3) .npy, or '' (fitted)"), STEERS,
                        "the palette (OpenAI's kmeans_centers.npy or ours); empty: k-means on the train split. "
                        "Compared by content on a relaunch"),
    "optimizer.learning_rate": Key(Derived(lambda a: a["learning_rate"]), Range(lambda v: v > 0, "> 0"), STEERS,
                                   "Adam's peak learning rate"),
    "optimizer.b1": Key(0.9, Range(lambda v: 0.0 <= v < 1.0, "0 <= b1 < 1"), STEERS, "Adam's beta1"),
    "optimizer.b2": Key(0.95, Range(lambda v: 0.0 <= v < 1.0, "0 <= b2 < 1"), STEERS,
                        "Adam's beta2 (the paper: 0.999 caused loss spikes)"),
    "optimizer.weight_decay": Key(0.0, Range(lambda v: v >= 0, ">= 0"), STEERS, "decoupled weight decay on matrices"),
    "optimizer.warmup_steps": Key(10_000, _ZERO_OR_MORE, STEERS, "linear warmup (about one ImageNet epoch at 128)"),
    "optimizer.schedule": Key("cosine", Choices(SCHEDULES), STEERS, "the learning rate after warmup"),
    "optimizer.grad_clip_norm": Key(0.0, Range(lambda v: v >= 0, ">= 0 (0 turns clipping off)"), STEERS,
                                    "global gradient norm clipping"),
    "mesh.ici": Key({"data": 1, "fsdp": -1, "sequence": 1, "tensor": 1}, Free("mesh axis sizes, one -1 at most"),
                    STEERS, "the mesh within a slice or host (-1: what is left); `sequence` splits each image's "
                    "tokens (ring attention)"),
    "mesh.dcn": Key({"data": -1, "fsdp": 1, "sequence": 1, "tensor": 1}, Free("mesh axis sizes, one -1 at most"),
                    STEERS, "the mesh across slices or hosts"),
    "logical_axis_rules": Key(
        [
            ("act_batch", ("data", "fsdp")),
            ("act_len", "sequence"),
            ("act_embed", None),
            ("embed", ("fsdp", "sequence")),  # the sequence axis's devices hold weight shards too, as MaxText's do
            ("mlp", "tensor"),
            ("heads", "tensor"),
            ("kv", None),
            ("vocab", "tensor"),
            ("layers", None),
        ],
        Free("(logical axis, mesh axes) pairs"), STEERS,
        "logical axes (parameters: embed, mlp, heads, kv, vocab, layers; activations: act_batch, act_len, "
        "act_embed) onto mesh axes; tuples are tried as a group",
    ),
    "evals": Key(Derived(lambda a: _evaluators()), Free("evaluators (igpt_jax/evaluators)"), STEERS,
                 "what a run measures besides its training loss: name -> {kind, every_steps, at_end, ...the kind's "
                 "settings}; checked by the evaluators' own table"),
    "finetune.dataset": Key("cifar10", Free("a labelled data set"), STEERS, "--mode=finetune's data set"),
    "finetune.train_split": Key("train", Free("a split name or slice"), STEERS,
                                "fine-tuning trains on it less its held-out end"),
    "finetune.test_split": Key("test", Free("a split name or slice"), STEERS, "scored once, with the chosen step"),
    "finetune.heldout_examples": Key(0, Range(_integer_at_least(0), "an integer >= 0 (0: the whole held-out end)"),
                                     STEERS, "held-out images that choose the best step"),
    "finetune.test_examples": Key(0, Range(_integer_at_least(0), "an integer >= 0 (0: the whole split)"), STEERS,
                                  "the first n test images of the one test evaluation"),
    "finetune.augment": Key("none", Choices(AUGMENTATIONS), STEERS, "'cifar' is the paper's CIFAR recipe"),
    "finetune.masks": Key(1, Positive(), STEERS, "BERT: the modal prediction over this many masks (the paper: 5)"),
    "finetune.steps": Key(10_000, Positive(), STEERS, "fine-tuning steps, a resumable run in workdir/finetune/"),
    "finetune.learning_rate": Key(0.0, Range(lambda v: v >= 0, ">= 0 (0: the pretraining learning rate / 10)"),
                                  STEERS, "the paper's recipe: about 10x smaller than pretraining's"),
    "finetune.warmup_steps": Key(100, _ZERO_OR_MORE, STEERS, "linear warmup"),
    "finetune.schedule": Key("constant", Choices(SCHEDULES), STEERS, "after warmup (the paper: no cosine decay)"),
    "finetune.generative_weight": Key(1.0, Range(lambda v: v >= 0, ">= 0 (0: the classification loss alone)"),
                                      STEERS, "loss = generative_weight * generative + classification (the paper: 1)"),
    "finetune.eval_every_steps": Key(1_000, Positive(), STEERS, "the held-out end is scored this often"),
    "finetune.checkpoint_every_steps": Key(1_000, Positive(), STEERS, "fine-tuning's checkpoints"),
    "compile.topology": Key("", Free("'v5p:4x4x4' or 'v5p-128' (v4/v5p count 2 cores a chip; v5e/v6e chips)"),
                            STEERS, "--mode=compile's TPU topology"),
    "compile.num_slices": Key(1, Range(_integer_at_least(1), "an integer >= 1"), STEERS,
                              "multislice: slices joined over DCN (mesh.dcn spans them)"),
    "compile.search": Key(False, Free("True or False"), STEERS,
                          "also compile the settings below, one compile each, and rank those that fit"),
    "compile.search_remat": Key("none,save_dots_no_batch,full", Free("remat policies, comma-separated"), STEERS,
                                "the search's remat policies"),
    "compile.search_microbatches": Key("1,2,4", Free("integers, comma-separated"), STEERS,
                                       "the search's microbatch counts"),
    "compile.search_meshes": Key("fsdp,data=2,tensor=2", Free("'fsdp' or AXIS=N, comma-separated"), STEERS,
                                 "the search's mesh splits ('tensor=N': mesh.ici {tensor: N, fsdp: the rest})"),
}  # fmt: skip


def tokens_per_image(config: ml_collections.ConfigDict) -> int:
    """The sequence length: one palette token per pixel of a config.model.image_size square, in raster order."""
    return config.model.image_size**2


def _evaluators() -> ml_collections.ConfigDict:
    """Every config's evaluators (imported when a config is made: this module sits below the rest of the package)."""
    from igpt_jax import evaluators

    return evaluators.defaults()


def key_of(dotted: str) -> Key | None:
    """The schema's entry for a dotted key, or for the entry above it (mesh.ici.data is mesh.ici's; every evals.*
    key is evals')."""
    parts = dotted.split(".")
    return next((SCHEMA[".".join(parts[:n])] for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in SCHEMA), None)


def get(config, dotted: str):
    """config's value at a dotted key (`model.embed_dim`): the one dotted-key reader."""
    for part in dotted.split("."):
        config = config[part]
    return config


def put(config, dotted: str, value) -> None:
    """Sets config's value at a dotted key, keeping a tuple a tuple (JSON gives lists back)."""
    *parents, leaf = dotted.split(".")
    node = get(config, ".".join(parents)) if parents else config
    node[leaf] = tuple(value) if isinstance(node[leaf], tuple) else value


def make_config(
    *,
    image_size: int = 32,
    num_layers: int = 24,
    embed_dim: int = 512,
    num_heads: int = 8,
    learning_rate: float = 0.003,
) -> ml_collections.ConfigDict:
    """A config with every key of SCHEMA at its default, for a model of this shape and learning rate."""
    arguments = {
        "image_size": image_size,
        "num_layers": num_layers,
        "embed_dim": embed_dim,
        "num_heads": num_heads,
        "learning_rate": learning_rate,
    }
    c = ml_collections.ConfigDict()
    for dotted, key in SCHEMA.items():
        *parents, leaf = dotted.split(".")
        node = c
        for part in parents:
            if part not in node:
                node[part] = ml_collections.ConfigDict()
            node = node[part]
        node[leaf] = key.default.of(arguments) if isinstance(key.default, Derived) else copy.deepcopy(key.default)
    return c


def describe() -> str:
    """The schema as `igpt --help` lists it: key, default, what is allowed, whether a relaunch may change it."""
    lines = []
    for dotted, key in SCHEMA.items():
        default = "(the preset's)" if isinstance(key.default, Derived) else repr(key.default)
        if len(default) > 40:
            default = default[:37] + "..."
        rule = "" if key.resume == STEERS else ", fixed by the checkpoint"
        lines.append(f"  {dotted} = {default}: {key.doc} [{key.allowed.described}{rule}]")
    return "\n".join(lines)
