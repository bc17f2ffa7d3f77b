"""The offline default: a small iGPT on Fashion-MNIST (Debian's `dataset-fashion-mnist`, no network needed).

Sized to learn visibly in minutes on a 2-core CPU: 4 layers of width 128 at the images' native 28x28 (784 tokens).
`--config=fashion_mnist:32` (or 48, 64) resizes the images and sets the context to match. The images are grayscale
with 256 levels, so a 16-colour palette (k-means on gray levels) keeps the softmax small without visible banding.
"""

from __future__ import annotations

from igpt_jax import evaluators
from igpt_jax.configs import base


def get_config(arg: str | None = None):
    config = base.make_config(
        num_layers=4,
        embed_dim=128,
        num_heads=4,
        learning_rate=0.003,
        **base.parse_arg(arg, image_size=28),
    )
    config.model.vocab_size = 16
    # About 12 minutes on a 2-core CPU with the probe and samples (2.5 s a step); raise total_steps for a better model.
    config.batch_size = 32
    config.total_steps = 80
    config.log_every_steps = 5
    config.checkpoint_every_steps = 20
    config.optimizer.warmup_steps = 10
    config.data.dataset = "fashion_mnist"
    config.data.eval_split = "test"
    # The held-out loss at steps 40 and 80 on the first 512 test images (0: all 10,000).
    config.evals.eval.every_steps = 40
    config.evals.eval.examples = 512
    # The probe at the end: every layer, raw pixels and the step-0 model, on 5,000 train images (500 held out to choose
    # the L2 strength) and 2,000 test images (a point's standard error about 1 point); about 7 of the 12 minutes.
    config.evals.probe = evaluators.probe(dataset="fashion_mnist", train_examples=5000, test_examples=2000, at_end=True)
    # And samples at the end: 16 images and 4 test images' bottom halves, 4 ways each (about 15 s here).
    config.evals.samples.at_end = True
    # --mode=finetune: 400 steps on Fashion-MNIST's train split less its held-out end (the last 6,000 images), the
    # best of the steps scored every 100 on 1,000 held-out images, then the first 2,000 test images scored once with
    # it; at a third of the pretraining learning rate, not the paper's tenth, for so few steps.
    config.finetune.dataset = "fashion_mnist"
    config.finetune.steps = 400
    config.finetune.learning_rate = 0.001
    config.finetune.warmup_steps = 20
    config.finetune.heldout_examples = 1000
    config.finetune.test_examples = 2000
    config.finetune.eval_every_steps = 100
    config.finetune.checkpoint_every_steps = 50
    return config
