"""iGPT-S: 76.6M parameters at 32x32 (OpenAI's released 'small').

Learning rate: the paper searched 0.01, 0.003, 0.001, ... downward per model (Table 5); this is our starting point.
"""

from __future__ import annotations

from igpt_jax.configs import base


def get_config(arg: str | None = None):
    return base.make_config(num_layers=24, embed_dim=512, num_heads=8, learning_rate=0.003, **base.parse_arg(arg))
