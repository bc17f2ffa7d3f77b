"""iGPT-L: 1362.3M parameters at 32x32 (OpenAI's released 'large'); the paper also ran it at 48x48.

Learning rate: the paper searched 0.01, 0.003, 0.001, ... downward per model (Table 5); this is our starting point.

Images beyond the paper's 64x64 (`configs/igpt_l.py:96`, `:128`, `:192`) get the settings that fit a v5p:4x4x4
(64 chips), as `--mode=compile` measured them: global batch 64, bf16 compute, full remat, and for 192x192
(36,864 tokens) the sequence split over 4 chips with ring attention. Other slices: `--config.mesh.ici.sequence=N` (e.g.
4 to spread 96x96 at batch 64 over 256 chips) and `--mode=compile` to check.
"""

from __future__ import annotations

from configs import base

# image side -> devices each image's tokens are split over (config.mesh.ici.sequence) on a v5p:4x4x4
LONG_IMAGES = {96: 1, 128: 1, 192: 4}


def get_config(arg: str | None = None):
    config = base.make_config(num_layers=48, embed_dim=1536, num_heads=16, learning_rate=0.001, **base.parse_arg(arg))
    side = config.model.image_size
    if side in LONG_IMAGES:
        config.batch_size = 64
        config.model.dtype = "bfloat16"
        config.model.remat = "full"
        config.mesh.ici.sequence = LONG_IMAGES[side]
    return config
