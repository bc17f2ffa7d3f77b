"""Kernels that cannot take a shape, dtype or platform hand the call to another implementation and say why, once
per reason (a jitted step traces its attention once per layer stack, so the log stays short)."""

from __future__ import annotations

import functools
import logging

log = logging.getLogger("igpt_jax.attention")

# kernel -> the implementation that ran in its place, for the progress line (see running()).
SUBSTITUTED: dict[str, str] = {}


@functools.cache
def note(kernel: str, reason: str, instead: str) -> None:
    SUBSTITUTED[kernel] = instead
    log.warning("attention %r cannot run here (%s); using %r instead", kernel, reason, instead)


def running(kernel: str) -> str:
    """What the progress line calls the attention: `kernel`, or e.g. "xla (in place of cudnn)" once it fell back,
    so the line never names a kernel that did not run."""
    instead = SUBSTITUTED.get(kernel)
    return kernel if instead is None else f"{instead} (in place of {kernel})"
