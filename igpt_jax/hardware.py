"""Accelerator facts in one table: per chip, HBM (TPUs in GiB as Google states it, GPUs in GB as NVIDIA does), dense
bf16 peak FLOP/s and HBM bandwidth (vendor figures), the
device kinds JAX reports for it, and how its slices are named.

Training's MFU (metrics.peak_flops_per_device) and the compile-only planner's fit and roofline (planning/) read
this table, and the planner turns topology names into `jax.experimental.topologies` devices here: MaxText-style
`v5p-128` (v4 and v5p count TensorCores, two a chip: 64 chips, 4x4x4; v5e and v6e count chips) or an explicit
shape, `v5p:4x4x4`, `v5e:4x4`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from igpt_jax import errors

GB, GIB = 1e9, float(1 << 30)


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    device_kinds: tuple[str, ...]  # jax's Device.device_kind prefixes for this chip
    hbm_bytes: float
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    cores_per_chip: int = 1  # TensorCores a chip counts for in slice names like v5p-128
    topology_dims: int = 2  # 3 for the 3-D torus chips (v4, v5p)
    # libtpu's chip_config_name: v4 must be asked for "megacore" (one JAX device per chip, as v4 pods run), else it
    # describes one device per TensorCore, which mesh building refuses; v5p is megacore by default.
    chip_config: str = "default"
    max_chips: int = 0  # the largest slice (TPUs), 0 for GPUs


CHIPS: dict[str, Chip] = {
    chip.name: chip
    for chip in (
        Chip("v4", ("TPU v4",), 32 * GIB, 275e12, 1228 * GB, 2, 3, "megacore", max_chips=4096),
        Chip("v5e", ("TPU v5 lite", "TPU v5e"), 16 * GIB, 197e12, 819 * GB, max_chips=256),
        Chip("v5p", ("TPU v5p", "TPU v5"), 95 * GIB, 459e12, 2765 * GB, 2, 3, max_chips=8960),
        Chip("v6e", ("TPU v6 lite", "TPU v6e"), 32 * GIB, 918e12, 1640 * GB, max_chips=256),
        Chip("a100", ("NVIDIA A100",), 80 * GB, 312e12, 2039 * GB),
        Chip("h100", ("NVIDIA H100",), 80 * GB, 989e12, 3350 * GB),
        Chip("h200", ("NVIDIA H200",), 141 * GB, 989e12, 4800 * GB),
    )
}


@dataclasses.dataclass(frozen=True)
class DeviceShare:
    """One JAX device's share of its chip: a chip may show more than one device."""

    hbm_bytes: float
    peak_flops: float
    hbm_bandwidth: float


def per_device(chip: Chip, devices: int, chips: int) -> DeviceShare:
    """What each of `devices` JAX devices has of `chips` chips (devices a chip shows: devices // chips)."""
    share = devices // chips
    return DeviceShare(chip.hbm_bytes / share, chip.peak_flops / share, chip.hbm_bandwidth / share)


def chip_of(device_kind: str) -> Chip | None:
    """The table's chip for a jax device kind ('TPU v5 lite' is a v5e, 'TPU v5' a v5p), or None."""
    matches = [(p, chip) for chip in CHIPS.values() for p in chip.device_kinds if device_kind.startswith(p)]
    return max(matches, key=lambda m: len(m[0]))[1] if matches else None


class TopologyError(errors.UsageError, ValueError):
    """A topology name the planner cannot read; the message says what is allowed."""


def topology_shape(name: str) -> tuple[Chip, tuple[int, ...]]:
    """(chip, slice shape in chips) of 'v5p:4x4x4' or 'v5p-128'."""
    match = re.fullmatch(r"(v\d+[a-z]*)(?::(\d+(?:x\d+)*)|-(\d+))", name.strip())
    if not match or match.group(1) not in CHIPS:
        raise TopologyError(
            f"config.compile.topology={name!r}: expected CHIP:SHAPE (v5p:4x4x4, v5e:4x4) or CHIP-CORES (v5p-128, "
            f"v5e-16), CHIP one of {[c for c in CHIPS if c.startswith('v')]}"
        )
    chip = CHIPS[match.group(1)]
    if match.group(2):
        shape = tuple(int(x) for x in match.group(2).split("x"))
        if len(shape) != chip.topology_dims:
            raise TopologyError(f"{name}: a {chip.name} slice has {chip.topology_dims} dimensions")
        return chip, shape
    cores = int(match.group(3))
    if cores % chip.cores_per_chip:
        raise TopologyError(f"{name}: {chip.name} slices count {chip.cores_per_chip} cores a chip")
    chips = cores // chip.cores_per_chip
    if not 1 <= chips <= chip.max_chips:
        raise TopologyError(f"{name}: {chips} chips; a {chip.name} slice holds 1 to {chip.max_chips}")
    return chip, _slice_shape(chips, chip.topology_dims, name)


def _slice_shape(chips: int, dims: int, name: str) -> tuple[int, ...]:
    """The usual slice shape for a chip count. Powers of two as even as they go, the last dimension largest (4 chips:
    2x2x1, 64: 4x4x4, 128: 4x4x8; 8 on a 2-D chip: 2x4, 16: 4x4). The 3-D tori (v4, v5p) also come in any multiple
    of 64 chips, every side a multiple of 4 (192 chips, v5p-384: 4x4x12; 384: 4x8x12)."""
    if chips & (chips - 1) == 0:
        return _power_of_two_shape(chips, dims)
    if dims == 3 and chips % 64 == 0:
        return tuple(4 * side for side in _even_factors(chips // 64))
    cubes = "a power of two or, on 3-D tori, a multiple of 64"
    raise TopologyError(f"{name}: {chips} chips is not a slice; slices hold {cubes} chips")


def _even_factors(n: int) -> tuple[int, int, int]:
    """a <= b <= c with a * b * c = n, as even as they go (3: 1x1x3, 6: 1x2x3, 12: 2x2x3)."""
    best = (1, 1, n)
    for a in range(1, round(n ** (1 / 3)) + 2):
        for b in range(a, math.isqrt(n // a) + 1):
            if n % (a * b) == 0 and (c := n // (a * b)) >= b and c - a < best[2] - best[0]:
                best = (a, b, c)
    return best


def _power_of_two_shape(chips: int, dims: int) -> tuple[int, ...]:
    shape = [1] * dims
    while math.prod(shape) < chips:
        smallest = [i for i, s in enumerate(shape) if s == min(shape)]
        shape[smallest[0] if min(shape) == 1 else smallest[-1]] *= 2  # 2x2x1 first, then 2x2x2, 2x2x4, 2x4x4 ...
    return tuple(shape)


def topology_devices(name: str, num_slices: int = 1) -> list:
    """Abstract devices of `num_slices` slices of topology `name`, for compiling on a host without them (libtpu:
    `pip install igpt_jax[plan]`)."""
    from jax.experimental import topologies

    chip, shape = topology_shape(name)
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server to ask on a CPU host
    # Compiling holds no TPU, so another JAX process's libtpu lock (a training run, a test) must not stop it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        topology = topologies.get_topology_desc(
            f"{chip.name}:{'x'.join(map(str, shape))}",
            "tpu",
            chip_config_name=chip.chip_config,
            **({"num_slices": num_slices} if num_slices > 1 else {}),
        )
    except Exception as e:  # noqa: BLE001 - libtpu's errors are plain RuntimeErrors
        raise TopologyError(f"cannot describe {name} ({str(e).splitlines()[0][:200]}); is libtpu installed?") from None
    return list(topology.devices)
