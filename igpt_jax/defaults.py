"""The complete config: every key the project reads, with iGPT-S defaults at 32x32.

Library code builds configs from here (the converter describes an imported model with `make_config`); the presets
in igpt_jax/configs/ start from `make_config` too, through igpt_jax/configs/base.py, and change only what differs, so
a key exists in one place. A config file's `get_config(arg)` takes an optional argument after the preset's name or
the file's path on the command line: `--config=igpt_l:48` or `--config=igpt_l:image_size=48` sets the image side (and
with it the context length and the position table). Any key can then be overridden: `--config.model.num_layers=2`.
"""

from __future__ import annotations

import ml_collections

from igpt_jax import evaluators

# Keys accepted in the `:ARG` part of --config, with their types. The rest is set with --config.KEY=VALUE.
ARG_KEYS = {"image_size": int}


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


def make_config(
    *,
    image_size: int = 32,
    num_layers: int = 24,
    embed_dim: int = 512,
    num_heads: int = 8,
    learning_rate: float = 0.003,
) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 128  # global, in images (the paper's batch for S/M/L)
    c.total_steps = 1_000_000
    c.microbatches = 1  # gradient accumulation: each step runs batch_size / microbatches at a time
    c.log_every_steps = 100
    c.checkpoint_every_steps = 5_000
    c.keep_checkpoints = 3
    # A process with no progress for this long exits (stacks dumped), so a stuck host cannot hang the others. 0: off.
    c.watchdog_seconds = 1800
    # JAX's persistent compilation cache: a relaunch (after a preemption, or a mode on the same checkpoint) loads the
    # compiled steps instead of compiling them again. 'auto': JAX_COMPILATION_CACHE_DIR where the environment sets
    # it, else compilation_cache/ beside the workdir (for a gs:// workdir, in the bucket: it outlives a preempted
    # TPU VM's disk); a path; '': off.
    c.compilation_cache_dir = "auto"
    # A jax.profiler trace of steps start_step .. start_step + num_steps - 1 (0: none), in the workdir's
    # tensorboard/plugins/profile/ (TensorBoard's profile plugin, XProf); train and finetune run steps.
    c.profile = ml_collections.ConfigDict()
    c.profile.start_step = 0
    c.profile.num_steps = 3
    # Weights & Biases (optional, `pip install wandb`): the metrics rows and pictures also go to the workdir's W&B run
    # when a project is named; wandb's own environment (WANDB_MODE=offline, WANDB_DIR, WANDB_API_KEY) applies.
    c.wandb = ml_collections.ConfigDict()
    c.wandb.project = ""
    c.wandb.entity = ""
    c.wandb.name = ""  # the run's name in W&B; empty: the workdir's folder name
    # What a relaunch restores from the workdir's newest checkpoint: 'all' (step, parameters, optimizer state) or
    # 'params' (step and parameters; the optimizer state too where it still fits, else a new one), which also
    # accepts config changes that 'all' refuses (see igpt_jax/resume.py).
    c.restore = "all"
    c.checkpoint_step = 0  # the checkpoint that eval, probe and sample read; 0: the newest
    c.objective = "ar"  # 'ar': next pixel in raster order; 'bert': masked pixels
    c.bert_mask_prob = 0.15

    c.model = ml_collections.ConfigDict()
    c.model.num_layers = num_layers
    c.model.embed_dim = embed_dim
    c.model.num_heads = num_heads
    c.model.mlp_ratio = 4
    c.model.image_size = image_size
    # Rows of the learned position table; image_size**2 must fit. Kept separate from image_size so a checkpoint's
    # table size is explicit (OpenAI's 32x32 models have 1024 rows).
    c.model.num_positions = image_size * image_size
    c.model.vocab_size = 512  # palette colours (the SOS is a separate learned vector, not a vocabulary row)
    c.model.norm_eps = 1e-5
    c.model.dtype = "float32"  # compute dtype; 'bfloat16' on accelerators. Logits and loss are always fp32.
    c.model.param_dtype = "float32"
    c.model.remat = "none"  # see igpt_jax.model.REMAT_POLICIES
    c.model.scan_layers = True
    c.model.attention = "auto"  # see igpt_jax.attention.KERNELS
    # Classes of a linear head on the mean-pooled ln_f output (zero-initialised); 0: none. --mode=finetune sets it.
    c.model.num_classes = 0

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "imagenet2012"
    c.data.data_dir = ""  # TFDS data_dir; empty: TFDS's default
    c.data.manual_dir = ""  # where manual downloads (ILSVRC tars) live; empty: <data_dir>/downloads/manual
    c.data.train_split = "train"
    # 'heldout': the paper's held-out end of train_split (ImageNet 4%, CIFAR and STL-10 10%), kept out of training
    c.data.eval_split = "validation"
    # how images become squares of model.image_size (igpt_jax.data.preprocess.FAMILIES): 'imagenet', the paper's random
    # (train) and central (eval) crops of the short side, or 'low_resolution', resizing the whole image; empty: the
    # data set's own (the registry's family; 'imagenet' for a folder prepared by igpt_jax.data.prepare)
    c.data.preprocess = ""
    c.data.flip = False  # random horizontal flips in training (the paper mentions none for pretraining)
    # training images' augmentation after the crops (igpt_jax.data.preprocess.AUGMENTATIONS): 'none', or 'cifar' (the
    # paper's fine-tuning recipe: reflect-pad 4, random crop back, random flip)
    c.data.augment = "none"
    c.data.prefetch = 2  # batches prepared ahead of the device by a background thread
    c.data.palette = ""  # path to a (K, 3) kmeans_centers.npy; empty: fit k-means on the train split

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = learning_rate
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95  # the paper: 0.999 caused loss spikes
    c.optimizer.weight_decay = 0.0
    c.optimizer.warmup_steps = 10_000  # about one ImageNet epoch at batch 128
    c.optimizer.schedule = "cosine"
    c.optimizer.grad_clip_norm = 0.0  # 0 turns clipping off

    # Mesh axis sizes; one -1 per dict takes what is left. ici: within a slice/host, dcn: across them.
    c.mesh = ml_collections.ConfigDict()
    # `sequence` splits each image's tokens (context parallelism): ring attention passes keys and values around it,
    # for images too long for one chip (192x192) or more chips than images.
    c.mesh.ici = {"data": 1, "fsdp": -1, "sequence": 1, "tensor": 1}
    c.mesh.dcn = {"data": -1, "fsdp": 1, "sequence": 1, "tensor": 1}
    # Logical axis -> mesh axes (tuples are tried as a group). Parameters: embed/mlp/heads/kv/vocab/layers;
    # activations: act_batch/act_len/act_embed.
    c.logical_axis_rules = [
        ("act_batch", ("data", "fsdp")),
        ("act_len", "sequence"),
        ("act_embed", None),
        ("embed", ("fsdp", "sequence")),  # the sequence axis's devices hold weight shards too, as MaxText's do
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv", None),
        ("vocab", "tensor"),
        ("layers", None),
    ]

    # What a run measures besides its training loss: name -> {kind, every_steps, at_end, ...the kind's settings}
    # (igpt_jax/evaluators). Training runs those with a schedule after saving the step; --mode=eval, probe and sample
    # run the ones of their kind on a checkpoint. `eval` is the held-out loss (the first `examples` images of
    # data.eval_split, 0: all); `probe` the linear probe of every layer with its baselines; `samples` the sample grids.
    c.evals = evaluators.defaults()

    # Fine-tuning (--mode=finetune): the workdir's checkpoint (or config.checkpoint_step) plus a classification head,
    # trained on generative + classification loss (the paper's 1:1) as its own resumable run in workdir/finetune/.
    # The paper's recipe: the pretraining batch and Adam, no cosine decay, a learning rate about 10x smaller.
    c.finetune = ml_collections.ConfigDict()
    c.finetune.dataset = "cifar10"
    c.finetune.train_split = "train"
    c.finetune.test_split = "test"
    # The paper's protocol: the model trains on the train split less its held-out end (the dataset's preset, else
    # 10%), the held-out end chooses the best step by accuracy (its first `heldout_examples`, 0: all, every
    # eval_every_steps and at the end), and the test split is scored once, with that step's parameters.
    c.finetune.heldout_examples = 0
    c.finetune.test_examples = 0  # the first n test images of the one test evaluation; 0: all of them
    c.finetune.augment = "none"  # training images' augmentation: 'cifar' is the paper's CIFAR recipe
    c.finetune.masks = 1  # BERT: each evaluation's prediction is the modal one over this many masks (the paper: 5)
    c.finetune.steps = 10_000
    c.finetune.learning_rate = 0.0  # 0: the pretraining learning rate / 10
    c.finetune.warmup_steps = 100
    c.finetune.schedule = "constant"  # after warmup; see igpt_jax.optim.SCHEDULES
    c.finetune.generative_weight = 1.0  # loss = generative_weight * generative + classification; 0: the head alone
    c.finetune.eval_every_steps = 1_000
    c.finetune.checkpoint_every_steps = 1_000

    # --mode=compile: compile the train step for a TPU topology from any host (igpt_jax/planning/).
    c.compile = ml_collections.ConfigDict()
    c.compile.topology = ""  # 'v5p:4x4x4' or 'v5p-128' (v4/v5p count 2 cores a chip; v5e/v6e count chips)
    c.compile.num_slices = 1  # multislice: slices joined over DCN (config.mesh.dcn spans them)
    c.compile.search = False  # also try the settings below, one compile each, and rank those that fit
    c.compile.search_remat = "none,save_dots_no_batch,full"
    c.compile.search_microbatches = "1,2,4"
    c.compile.search_meshes = "fsdp,data=2,tensor=2"  # 'tensor=N': mesh.ici {tensor: N, fsdp: the rest}
    return c
