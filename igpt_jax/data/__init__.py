"""Data sources behind one small interface, chosen by `config.data.dataset` from a registry.

A source knows how many examples a split has and returns uint8 images [n, H, W, 3] (or int32 tokens [n, H*W] for
`synthetic`) for any list of example indices. Order lives outside the sources (`order.py`): step s of a run with seed
k reads the same global examples whatever the number of processes, so resuming needs only the step.
"""

from __future__ import annotations

from igpt_jax.data.sources import SOURCES, Source, get_source, splits

__all__ = ["SOURCES", "Source", "get_source", "splits"]
