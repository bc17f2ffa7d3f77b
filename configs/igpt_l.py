"""iGPT-L: 1362.3M parameters at 32x32 (OpenAI's released 'large'); the paper also ran it at 48x48.

Learning rate: the paper searched 0.01, 0.003, 0.001, ... downward per model (Table 5); this is our starting point.
"""

from __future__ import annotations

from configs import base


def get_config(arg: str | None = None):
    return base.make_config(num_layers=48, embed_dim=1536, num_heads=16, learning_rate=0.001, **base.parse_arg(arg))
