"""`--config.compile.search=True`: which remat policy, microbatch count and mesh split make the step fit, best first.

Every combination of config.compile.search_remat x search_microbatches x search_meshes (comma-separated lists) is
compiled for the topology like --mode=compile's step (memory only: one compile each). Candidates that fit are ranked
by their compute-bound step time, analytic FLOPs with the policy's recomputation over the topology's peak (the
microbatch loop and the mesh split change little of the FLOPs; memory is what they buy), then by memory. A mesh
split `tensor=4` means mesh.ici {tensor: 4, fsdp: the rest} (`data=N` and `sequence=N` likewise); `fsdp` is FSDP over
every device.
"""

from __future__ import annotations

import itertools
import logging
import math
import time

import ml_collections

from igpt_jax import defaults, hardware, metrics, sharding
from igpt_jax.planning import compiled

log = logging.getLogger(__name__)


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _mesh(split: str) -> dict[str, int]:
    """'fsdp' -> {fsdp: -1, the other axes 1}; 'data=2' -> {data: 2, fsdp: -1, the others 1}."""
    fsdp = {axis: 1 for axis in sharding.MESH_AXES} | {"fsdp": -1}
    if split == "fsdp":
        return fsdp
    axis, _, size = split.partition("=")
    others = [a for a in sharding.MESH_AXES if a != "fsdp"]
    if axis not in others or not size.isdigit():
        allowed = ", ".join(f"'{a}=N'" for a in others)
        raise ValueError(f"config.compile.search_meshes: {split!r} is not 'fsdp' or one of {allowed}")
    return fsdp | {axis: int(size)}


def search(config: ml_collections.ConfigDict, devices: list, configured: dict | None = None) -> list[dict]:
    """One row per combination: its settings, per-device GiB, fits, and (fitting ones) the estimated step time;
    fitting rows first, fastest first. `configured`, the report of the config as it is: the setting that is the
    configuration itself takes its memory instead of compiling again (minutes for a large model)."""
    c = config.compile
    chip, shape = hardware.topology_shape(c.topology)
    share = hardware.per_device(chip, len(devices), math.prod(shape) * c.num_slices)
    analytic = metrics.flops_per_token(config) * config.batch_size * defaults.tokens_per_image(config)
    as_configured = compiled.target(config, devices, c.num_slices) if configured else None
    rows = []
    settings = list(
        itertools.product(
            _items(c.search_remat), [int(m) for m in _items(c.search_microbatches)], _items(c.search_meshes)
        )
    )
    for number, (remat, micro, split) in enumerate(settings, 1):
        changes = {"model.remat": remat, "microbatches": micro, "mesh.ici": _mesh(split)}
        row = {"remat": remat, "microbatches": micro, "mesh": split}
        if config.batch_size % micro:
            continue
        started = time.perf_counter()
        try:
            target = compiled.target(config, devices, c.num_slices, **changes)
            reused = as_configured is not None and compiled.same_program(target, as_configured)
            parts = configured["bytes_per_device"] if reused else compiled.memory(target)[1]
        except sharding.MeshError as e:  # the split or the microbatch does not divide: not a candidate
            rows.append(row | {"fits": False, "why": str(e)})
            continue
        mesh_shape = {k: int(v) for k, v in target.mesh.shape.items()}
        row |= {"mesh_shape": mesh_shape, "gib_per_device": parts["total"] / hardware.GIB}
        row["fits"] = parts["total"] <= share.hbm_bytes
        verdict = "fits" if row["fits"] else "does not fit"
        how = "as configured: the report's compile" if reused else f"compiled in {time.perf_counter() - started:.0f} s"
        log.info(  # each compile takes minutes for a large model: say which has ended
            "search %d/%d: remat=%s microbatches=%d mesh=%s: %.2f GiB per device, %s (%s)",
            number, len(settings), remat, micro, split, row["gib_per_device"], verdict, how,
        )  # fmt: skip
        if row["fits"]:
            row["step_seconds"] = analytic * compiled.RECOMPUTE.get(remat, 1.0) / len(devices) / share.peak_flops
        rows.append(row)
    return sorted(rows, key=lambda r: (not r["fits"], r.get("step_seconds", 0), r.get("gib_per_device", 0)))


def table(rows: list[dict], hbm_gib: float) -> str:
    lines = [f"search: {sum(r['fits'] for r in rows)} of {len(rows)} settings fit in {hbm_gib:.1f} GiB, best first"]
    for r in rows:
        memory = f"{r['gib_per_device']:.2f} GiB" if "gib_per_device" in r else r.get("why", "")[:60]
        step = f"{r['step_seconds'] * 1e3:.1f} ms" if "step_seconds" in r else "-"
        settings = f"remat={r['remat']} microbatches={r['microbatches']} mesh={r['mesh']}"
        lines.append(f"  {'fits' if r['fits'] else 'no  '}  {settings:<55} {memory:>12}  {step}")
    return "\n".join(lines)
