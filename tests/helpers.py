"""Small configs shared by tests (a module of its own, not a grab bag: only test configs live here)."""

from __future__ import annotations

import ml_collections

from configs import base


def tiny_config(*, image_size: int = 4, objective: str = "ar", **model) -> ml_collections.ConfigDict:
    """A 2-layer, width-32 model over image_size**2 tokens: compiles in a second, exercises every code path."""
    config = base.make_config(image_size=image_size, num_layers=2, embed_dim=32, num_heads=4)
    config.model.vocab_size = 16
    config.objective = objective
    for key, value in model.items():
        config.model[key] = value
    return config
