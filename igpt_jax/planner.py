"""--mode=compile: does the configured training step fit a TPU topology, and how fast should it run? From any host.

The real train step (steps.make_train_step, the one training compiles) is lowered for the abstract devices of
`config.compile.topology` (hardware.topology_devices; libtpu compiles for TPU on a CPU host), on the configured mesh,
with the state's and the batch's shapes from the config: no data set is opened, no array is allocated, nothing is
written outside the workdir. XLA's memory analysis is what an out-of-memory error would see; its cost analysis gives
FLOPs and bytes per device, which a roofline turns into a step time, tokens/s and MFU.

XLA counts a scanned layer stack's body once (and the microbatch loop's), so the costs come from two small unscanned
compiles of the same step, 1 and 2 layers on one microbatch: cost = c1 + (L - 1) (c2 - c1), times the microbatches.

`config.compile.search=True` also compiles remat policies x microbatches x mesh splits (plan_search.py) and ranks
those that fit. Writes workdir/compile.json and a {"mode": "compile", ...} row in metrics.jsonl, prints a table; a
step that does not fit (nor any searched setting) ends with the verdict and exit status 3.
"""

from __future__ import annotations

import json
import math
import re
import time

import jax
import jax.numpy as jnp
import ml_collections

from igpt_jax import attention, errors, hardware, layout, metrics, model, run_lock, sharding, steps, storage
from igpt_jax.data import pipeline, sources

# Training FLOPs with recomputation over those without: full remat runs the forward pass twice (8/6); the policies
# that keep the matmuls recompute only elementwise work.
RECOMPUTE = {"full": 4 / 3}
GIB = 1 << 30


class DoesNotFit(errors.IgptError):  # noqa: N818 - a verdict, not a failure
    """The step needs more memory per device than the chip has; the message is the verdict with the numbers."""

    exit_code = 3


def _target_config(
    config: ml_collections.ConfigDict, devices: list, num_slices: int, **changes
) -> ml_collections.ConfigDict:
    """The config as compiled for the target, `changes` applied: `auto` attention resolved for the target's platform
    (not the host's) and its mesh (ring where the mesh splits the sequence)."""
    c = config.copy_and_resolve_references()
    for dotted, value in changes.items():
        node = c
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    mesh = sharding.make_mesh(c, devices, granules=num_slices)
    c.model.attention = attention.resolve(
        c.model.attention, devices[0].platform, sharding.sequence_shards(mesh), model.tokens_per_image(c), c.model.dtype
    )
    return c


def _compile(config: ml_collections.ConfigDict, devices: list, num_slices: int):
    mesh = sharding.make_mesh(config, devices, granules=num_slices)
    setup = steps.make_setup(config, mesh)
    kind = sources.kind(config.data.dataset, config.data.data_dir)
    batch = pipeline.abstract_batch(kind, config, mesh)
    clusters = None
    if kind == "images":
        clusters = jax.ShapeDtypeStruct((config.model.vocab_size, 3), jnp.float32, sharding=setup.replicated)
    with jax.set_mesh(mesh):
        return steps.make_train_step(setup).lower(setup.abstract_state, batch, clusters).compile(), mesh


def _cost(compiled) -> tuple[float, float]:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def compile_memory(config: ml_collections.ConfigDict, devices: list, num_slices: int):
    """(compiled or None, mesh, per-device bytes {argument, output, temp, alias, generated_code, total}, the
    compiler's out-of-memory line or None): when libtpu refuses a program that cannot fit, the temporaries it asked
    for are the total."""
    try:
        compiled, mesh = _compile(config, devices, num_slices)
    except jax.errors.JaxRuntimeError as e:
        needed = _OUT_OF_MEMORY.search(str(e))
        if needed is None:
            raise
        mesh = sharding.make_mesh(config, devices, granules=num_slices)  # for the report: the compile built it too
        temp = float(needed.group(1)) * _UNITS[needed.group(2)]
        return None, mesh, {"temp": temp, "total": temp}, str(e).splitlines()[0][:300]
    memory = compiled.memory_analysis()
    parts = {
        "argument": memory.argument_size_in_bytes,
        "output": memory.output_size_in_bytes,
        "temp": memory.temp_size_in_bytes,
        "alias": memory.alias_size_in_bytes,
        "generated_code": memory.generated_code_size_in_bytes,
    }
    parts["total"] = parts["argument"] + parts["output"] - parts["alias"] + parts["temp"] + parts["generated_code"]
    return compiled, mesh, parts, None


def per_device_cost(config: ml_collections.ConfigDict, devices: list, num_slices: int) -> tuple[float, float]:
    """(FLOPs, bytes accessed) of one device's step, every layer and microbatch counted (module docstring)."""
    micro = config.microbatches
    one_micro = {"batch_size": config.batch_size // micro, "microbatches": 1, "model.scan_layers": False}
    c1, c2 = (
        _cost(
            _compile(
                _target_config(config, devices, num_slices, **one_micro, **{"model.num_layers": n}), devices, num_slices
            )[0]
        )
        for n in (1, 2)
    )
    layers = config.model.num_layers
    return tuple(micro * (a + (layers - 1) * (b - a)) for a, b in zip(c1, c2, strict=True))


def xla_counts_attention(target: ml_collections.ConfigDict) -> bool:
    """Whether XLA's cost analysis sees the attention FLOPs of a target config (its kernel resolved)."""
    return attention.KERNELS[target.model.attention].costed_by_xla


def plan(config: ml_collections.ConfigDict) -> dict:
    """The report for config.compile.topology: memory per device, fit, XLA and analytic FLOPs, roofline."""
    c = config.compile
    chip, shape = hardware.topology_shape(c.topology)
    devices = hardware.topology_devices(c.topology, c.num_slices)
    target = _target_config(config, devices, c.num_slices)
    chips = math.prod(shape) * c.num_slices
    per_chip = len(devices) // chips  # devices a chip shows (v4: 2 TensorCores)
    hbm = chip.hbm_bytes / per_chip
    tokens = config.batch_size * model.tokens_per_image(config)
    analytic = metrics.flops_per_token(config) * tokens
    start = time.perf_counter()
    compiled, mesh, parts, error = compile_memory(target, devices, c.num_slices)
    compile_seconds = time.perf_counter() - start
    total = parts["total"]
    if compiled is None:  # libtpu refused a program that cannot fit, at compile time
        report = _header(config, chip, shape, devices, mesh, target, tokens)
        return report | {
            "bytes_per_device": parts | {"hbm": hbm},
            "fits": False,
            "analytic_flops_per_step": analytic,
            "compiler": error,
            "compile_seconds": compile_seconds,
        }
    flops, bytes_accessed = per_device_cost(target, devices, c.num_slices)
    # A Pallas or cuDNN attention kernel is a custom call whose FLOPs XLA's cost analysis does not see: compare XLA's
    # count with the analytic FLOPs outside attention then.
    counted = analytic
    if not xla_counts_attention(target):
        counted -= metrics.attention_flops_per_token(config) * tokens
    peak, bandwidth = chip.peak_flops / per_chip, chip.hbm_bandwidth / per_chip
    # XLA counts less than the step runs for some shardings (iGPT-L, one layer, full remat: 1.30x the analytic FLOPs
    # on 4 v5p chips, but 0.93x on 8 and 0.75x on 16), so the compute time never goes below the analytic FLOPs with
    # the remat policy's recomputed forward pass.
    floor = analytic * RECOMPUTE.get(config.model.remat, 1.0) / len(devices)
    compute_flops = max(flops, floor)
    step_seconds = max(compute_flops / peak, bytes_accessed / bandwidth)
    return _header(config, chip, shape, devices, mesh, target, tokens) | {
        "bytes_per_device": parts | {"hbm": hbm},
        "fits": total <= hbm,
        "xla_flops_per_device": flops,
        "xla_bytes_accessed_per_device": bytes_accessed,
        "analytic_flops_per_step": analytic,
        "xla_over_analytic_flops": flops * len(devices) / counted,
        "xla_counts_attention": xla_counts_attention(target),
        "roofline": {
            "step_seconds": step_seconds,
            "bound": "compute" if compute_flops / peak >= bytes_accessed / bandwidth else "memory",
            "compute_flops_per_device": compute_flops,
            "tokens_per_sec": tokens / step_seconds,
            "mfu": analytic / (step_seconds * peak * len(devices)),
        },
        "compile_seconds": compile_seconds,
    }


# "... HLO temporaries (502.18G) exceeds available HBM (15.75G)": libtpu's sizes are binary (G = GiB)
_OUT_OF_MEMORY = re.compile(r"required for [^(]*\(([\d.]+)([KMGT])\) exceeds available HBM")
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _header(config, chip, shape, devices, mesh, target, tokens) -> dict:
    return {
        "topology": config.compile.topology,
        "chip": chip.name,
        "slice_shape": "x".join(map(str, shape)),
        "num_slices": config.compile.num_slices,
        "devices": len(devices),
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "attention": target.model.attention,
        "remat": config.model.remat,
        "microbatches": config.microbatches,
        "batch_size": config.batch_size,
        "tokens_per_step": tokens,
    }


def table(report: dict) -> str:
    b = report["bytes_per_device"]
    rows = [
        ("topology", f"{report['topology']} ({report['devices']} devices, mesh {report['mesh']})"),
        (
            "step",
            f"batch {report['batch_size']}, {report['microbatches']} microbatches, remat {report['remat']}, "
            f"attention {report['attention']}",
        ),
        *(
            (f"{name} GiB/device", f"{b[name] / GIB:.2f}")
            for name in ("argument", "output", "temp", "alias")
            if name in b
        ),
        ("total GiB/device", f"{b['total'] / GIB:.2f} of {b['hbm'] / GIB:.1f} HBM: {_fits(report)}"),
    ]
    if "roofline" in report:
        r = report["roofline"]
        rows += [
            ("generated code GiB", f"{b['generated_code'] / GIB:.3f}"),
            (
                "FLOPs/step (XLA, analytic)",
                f"{report['xla_flops_per_device'] * report['devices']:.3g}, {report['analytic_flops_per_step']:.3g} "
                f"(x{report['xla_over_analytic_flops']:.2f}"
                + ("" if report["xla_counts_attention"] else ", attention not costed by XLA, left out of both")
                + ")",
            ),
            (
                "roofline step",
                f"{r['step_seconds'] * 1e3:.1f} ms ({r['bound']}-bound), {r['tokens_per_sec']:.3g} tokens/s, "
                f"MFU {100 * r['mfu']:.1f}%",
            ),
        ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _fits(report: dict) -> str:
    return "fits" if report["fits"] else "DOES NOT FIT"


def verdict(report: dict) -> str:
    b = report["bytes_per_device"]
    return (
        f"does not fit: {b['total'] / GIB:.2f} GiB per device needed (temporaries {b['temp'] / GIB:.2f}) against "
        f"{b['hbm'] / GIB:.1f} GiB of HBM per device on {report['topology']}; try more microbatches "
        "(--config.microbatches), --config.model.remat=full, another mesh split or a larger topology"
    )


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """--mode=compile: the report, printed, in workdir/compile.json and metrics.jsonl; DoesNotFit when it does not.
    The workdir's lock is held throughout, as every mode that writes there holds it: two runs never append to
    metrics.jsonl at once, and a workdir another run holds is refused before minutes of compiling."""
    directory = storage.path(workdir)
    lock = run_lock.acquire_everywhere(directory)
    try:
        report = plan(config)
        if config.compile.search:
            from igpt_jax import plan_search

            devices = hardware.topology_devices(config.compile.topology, config.compile.num_slices)
            report["search"] = plan_search.search(config, devices)
        if jax.process_index() == 0:
            storage.write_text(directory / layout.COMPILE_REPORT, json.dumps(report, indent=2) + "\n")
            row = {k: v for k, v in _flat(report).items() if k != "search"}
            metrics.append_row(directory, {"mode": "compile", "step": 0, **row}, config)
            print(table(report), flush=True)
            if "search" in report:
                print(plan_search.table(report["search"], report["bytes_per_device"]["hbm"] / GIB), flush=True)
    finally:
        lock.release()
    if not report["fits"] and not any(r["fits"] for r in report.get("search", ())):
        raise DoesNotFit(verdict(report))
    return report


def _flat(report: dict) -> dict:
    out = {}
    for key, value in report.items():
        if isinstance(value, dict) and key != "mesh":
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out
