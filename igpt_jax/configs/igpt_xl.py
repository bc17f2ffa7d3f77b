"""iGPT-XL: 60 layers, width 3072, trained by OpenAI at 64x64 (the default here); never released.

The paper never published XL's head count. We use 24 heads of 128: head_dim 128 is what TPU MXUs (128x128), Pallas
splash attention and cuDNN flash attention tile best (iGPT-L's 96 pads to 128 on TPU), and 24 heads divide by the
tensor-parallel sizes people use (2, 4, 8). Parameter count: 6.81B with the 4096-row position table of 64x64.
Batch 64 for 2M steps in the paper.
"""

from __future__ import annotations

from igpt_jax.configs import base


def get_config(arg: str | None = None):
    config = base.make_config(
        num_layers=60,
        embed_dim=3072,
        num_heads=24,
        learning_rate=0.0003,
        **base.parse_arg(arg, image_size=64),
    )
    config.batch_size = 64
    config.total_steps = 2_000_000
    return config
