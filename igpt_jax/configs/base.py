"""The base config file: every key with its default (igpt_jax/defaults.py), iGPT-S at 32x32.

Other config files call `base.make_config(...)` with what differs and `base.parse_arg(arg)` for the command line's
`:ARG` (`--config=igpt_l:48`).
"""

from __future__ import annotations

import ml_collections

from igpt_jax.defaults import ARG_KEYS, make_config, parse_arg

__all__ = ["ARG_KEYS", "get_config", "make_config", "parse_arg"]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return make_config(**parse_arg(arg))
