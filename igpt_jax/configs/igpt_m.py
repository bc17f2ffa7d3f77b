"""iGPT-M: 455.2M parameters at 32x32 (OpenAI's released 'medium').

Learning rate: the paper searched 0.01, 0.003, 0.001, ... downward per model (Table 5); this is our starting point.
"""

from __future__ import annotations

from igpt_jax.configs import base


def get_config(arg: str | None = None):
    return base.make_config(num_layers=36, embed_dim=1024, num_heads=8, learning_rate=0.001, **base.parse_arg(arg))
