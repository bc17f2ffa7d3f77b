"""Tolerances for comparing float32 results with an exact (float64) reference, derived from the arithmetic.

A float32 sum of n terms is off by at most n * u * sum|terms| (u = 2**-24, the unit roundoff), but rounding errors are
independent enough that, with probability at least 1 - 2 exp(-lam**2 / 2), the error stays within
lam * sqrt(n) * u * sum|terms| (Higham and Mary, "A new approach to probabilistic rounding error analysis", 2019).
A network's output passes through a chain of sums (projections, softmax, norms), each kept at the output's scale by
the norms; the chain's term counts add up to `n`.
"""

from __future__ import annotations

import math

UNIT_ROUNDOFF_F32 = 2.0**-24
LAMBDA = 6.0  # 2 exp(-18) = 3e-8: a false alarm per sum once in 30 million


def float32_chain(terms: int, scale: float, lam: float = LAMBDA) -> float:
    """Absolute tolerance for a float32 value of magnitude up to `scale` computed through sums of `terms` terms in
    all, against an exact reference."""
    return lam * math.sqrt(terms) * UNIT_ROUNDOFF_F32 * scale


def transformer_terms(*, layers: int, width: int, head_dim: int, positions: int, mlp_ratio: int = 4) -> int:
    """Terms summed along the deepest path from embeddings to the final norm's output in a pre-norm transformer:
    per layer, ln_1's mean square (width), q/k/v (width), scores (head_dim), softmax's denominator and the weighted
    values (positions each), the output projection (width), ln_2 (width), the MLP's two matmuls (width,
    mlp_ratio * width); then ln_f (width)."""
    per_layer = 5 * width + head_dim + 2 * positions + mlp_ratio * width
    return layers * per_layer + width


def float32_pair(terms: int, scale: float, lam: float = LAMBDA) -> float:
    """Absolute tolerance between two float32 computations of one exact value that sum in different orders or
    blockings (another library, another sharding, a cache): each is within `float32_chain` of the exact value, so
    they are within twice that of each other."""
    return 2 * float32_chain(terms, scale, lam)
