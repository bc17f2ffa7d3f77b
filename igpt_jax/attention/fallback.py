"""Kernels that cannot take a shape, dtype or platform hand the call to another implementation and say why, once
per reason (a jitted step traces its attention once per layer stack, so the log stays short)."""

from __future__ import annotations

import functools
import logging

log = logging.getLogger("igpt_jax.attention")


@functools.cache
def note(kernel: str, reason: str, instead: str) -> None:
    log.warning("attention %r cannot run here (%s); using %r instead", kernel, reason, instead)
