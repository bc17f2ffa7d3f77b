"""iGPT-L: 1362.3M parameters at 32x32 (OpenAI's released 'large'); the paper also ran it at 48x48.

Learning rate: the paper searched 0.01, 0.003, 0.001, ... downward per model (Table 5); this is our starting point.

Images beyond the paper's 64x64 (`--config=igpt_l:96`, `:128`, `:192`) get what `--mode=compile` found to fit a
v5p:4x4x4 (64 chips), one image per chip: global batch 64, bf16 compute, full remat (192x192 with splash: 10.3 GiB a
chip). More chips than images need the sequence split: `--config.mesh.ici.sequence=4` spreads 96x96 at batch 64 over
256 chips with ring attention (10.3 GiB a chip on v5p:8x8x4). The README's "Long images" section has the table.
"""

from __future__ import annotations

from igpt_jax.configs import base

LONG_IMAGE = 64  # sides above the paper's largest get the long-image settings


def get_config(arg: str | None = None):
    config = base.make_config(num_layers=48, embed_dim=1536, num_heads=16, learning_rate=0.001, **base.parse_arg(arg))
    if config.model.image_size > LONG_IMAGE:
        config.batch_size = 64
        config.model.dtype = "bfloat16"
        config.model.remat = "full"
    return config
