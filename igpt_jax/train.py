"""The training loop, top to bottom: workdir, mesh, data and palette, state (resumed or fresh), steps, loop.

Resume is exact: data order is a pure function of (seed, step) and the step's randomness is folded from the step,
so a run killed at any point and relaunched with the same command continues the same curve. SIGTERM (preemption):
every process agrees on a step, saves it, and exits 0. A NaN or infinite loss stops the run before a checkpoint of
the bad state can be written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from igpt_jax import checkpoint, distributed, metrics, palette, sharding, steps
from igpt_jax.data import get_source, order, pipeline

log = logging.getLogger(__name__)

PALETTE_FILE = "palette.npy"
PALETTE_SAMPLE_IMAGES = 2048


def load_or_fit_palette(config, source, workdir: str) -> np.ndarray | None:
    """The run's palette: the workdir's (a resumed run), config.data.palette, or k-means on the train split."""
    if source.kind == "tokens":
        return None
    path = os.path.join(workdir, PALETTE_FILE)
    if os.path.exists(path):
        clusters = palette.load(path)
    elif config.data.palette:
        clusters = palette.load(config.data.palette)
    else:
        total = source.num_examples(config.data.train_split)
        n = min(PALETTE_SAMPLE_IMAGES, total)  # a random sample: the first n positions of epoch 0's permutation
        sample = source.get(config.data.train_split, order.global_indices(config.seed, 0, n, total), None)
        start = time.perf_counter()
        clusters = palette.fit(sample, k=config.model.vocab_size, seed=config.seed)
        log.info("palette: %d colours fitted on %d images in %.1fs", len(clusters), n, time.perf_counter() - start)
    if len(clusters) > config.model.vocab_size:
        raise ValueError(
            f"the palette has {len(clusters)} colours but config.model.vocab_size={config.model.vocab_size}"
        )
    if jax.process_index() == 0 and not os.path.exists(path):
        palette.save(path, clusters)
    return clusters


def _check_finite(loss: float, step: int) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"loss is {loss} at step {step}: stopping. No checkpoint of this state was written; the last one in the "
            "workdir is intact. Lower config.optimizer.learning_rate or set config.optimizer.grad_clip_norm."
        )


def _check_saveable(step_metrics: dict, state: steps.State, step: int) -> None:
    """Refuses to checkpoint a state whose loss or parameters are not finite."""
    _check_finite(float(jax.device_get(step_metrics["loss"])), step)
    if not bool(jax.device_get(all_finite(state["params"]))):
        raise FloatingPointError(
            f"parameters became non-finite at step {step}: stopping without saving them. "
            "Lower config.optimizer.learning_rate or set config.optimizer.grad_clip_norm."
        )


@jax.jit
def all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _write_config(config, workdir: str) -> None:
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(json.loads(config.to_json_best_effort()), f, indent=2)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, devices: list[jax.Device] | None = None
) -> dict:
    """Trains to config.total_steps (resuming from the workdir), returns the last logged train metrics.

    `devices` (default: all) lets a caller run on part of the machine, as a smaller topology would.
    """
    # --- workdir and mesh
    os.makedirs(workdir, exist_ok=True)
    _write_config(config, workdir)
    mesh = sharding.make_mesh(config, devices)
    setup = steps.make_setup(config, mesh)
    log.info("mesh %s on %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())

    # --- data and palette
    source = get_source(config)
    clusters = load_or_fit_palette(config, source, workdir)

    # --- steps, and the same program on every process (checked before the first collective can hang on it)
    train_step = steps.make_train_step(setup)
    eval_step = steps.make_eval_step(setup)
    lowered = train_step.lower(setup.abstract_state, pipeline.abstract_batch(source, config, mesh), clusters)
    distributed.check_same_program(distributed.fingerprint(lowered))

    # --- state: the newest checkpoint that restores, else fresh
    ckpt = checkpoint.Checkpointer(workdir, config)
    restored = ckpt.restore_latest(setup.abstract_state)
    if restored is None:
        state = steps.init_state(setup)
        log.info("fresh start: %s parameters", f"{sum(x.size for x in jax.tree.leaves(state['params'])):,}")
    else:
        start_step, state, saved_palette = restored
        clusters = saved_palette if saved_palette is not None else clusters
        log.info("resumed from %s/%d", ckpt.directory, start_step)
    clusters_device = None if clusters is None else jax.device_put(clusters, setup.replicated)

    writer = metrics.MetricsWriter(workdir)
    flops_per_step = metrics.flops_per_token(config) * config.batch_size * config.model.image_size**2
    peak, peak_source = metrics.peak_flops_per_device()
    log.info(
        "MFU: 6N + 6LSd FLOPs/token (causal-halved attention), peak = %.3g FLOP/s per device (%s)", peak, peak_source
    )

    # --- loop
    preemption = checkpoint.Preemption()
    watchdog = distributed.Watchdog(config.watchdog_seconds)
    step = first_step = int(jax.device_get(state["step"]))
    last = {}
    run_start = last_time = time.perf_counter()
    data_wait = 0.0
    last_step = step
    prefetch = pipeline.Prefetcher(
        lambda s: pipeline.global_batch(source, config.data.train_split, config, s, mesh), step, config.data.prefetch
    )
    try:
        while step < config.total_steps:
            wait_start = time.perf_counter()
            batch = prefetch.get(step)
            data_wait += time.perf_counter() - wait_start
            with jax.set_mesh(mesh):
                state, step_metrics = train_step(state, batch, clusters_device)
            step += 1
            watchdog.kick(f"step {step}")

            if step % config.log_every_steps == 0 or step == config.total_steps:
                values = jax.device_get(step_metrics)
                now = time.perf_counter()
                interval = now - last_time
                sec_per_step = interval / max(step - last_step, 1)
                last_time, last_step = now, step
                last = {
                    "step": step,
                    **{k: float(v) for k, v in values.items()},
                    "tokens_per_sec": config.batch_size * config.model.image_size**2 / sec_per_step,
                    "mfu": flops_per_step / sec_per_step / (peak * mesh.size),
                    "seconds": now - run_start,
                    "eta_seconds": (config.total_steps - step) * sec_per_step,
                    # time the loop waited for the input pipeline, as a share of the interval's wall time
                    "data_wait_fraction": data_wait / max(interval, 1e-9),
                }
                data_wait = 0.0
                writer.write(last)
                _check_finite(last["loss"], step)
                if jax.process_index() == 0:
                    print(metrics.progress_line(last, config.total_steps), flush=True)

            if step % config.eval_every_steps == 0 or step == config.total_steps:
                held_out = evaluate(config, source, eval_step, state, clusters_device, mesh)
                writer.write({"mode": "eval", "step": step, **held_out})
                if jax.process_index() == 0:
                    print(
                        f"eval step {step}: {held_out['loss']:.4f} nats ({held_out['bits_per_token']:.3f} bits) "
                        f"on {config.data.eval_split}",
                        flush=True,
                    )

            if step == first_step + 1:  # the first step compiled: time the rest without it
                jax.block_until_ready(state)
                log.info("first step (with compilation) took %.1fs", time.perf_counter() - last_time)
                last_time, last_step, data_wait = time.perf_counter(), step, 0.0

            stop = preemption.agreed()
            if step % config.checkpoint_every_steps == 0 or stop or step == config.total_steps:
                _check_saveable(step_metrics, state, step)
                ckpt.save(step, state, clusters, force=True)
            if stop:
                log.warning("preempted: saved step %d, exiting", step)
                break
    finally:
        watchdog.close()
        prefetch.close()
        ckpt.wait()
        ckpt.close()
        writer.close()
        preemption.restore()
    if jax.process_index() == 0:
        print(
            f"igpt: workdir {os.path.abspath(workdir)}: checkpoints/, metrics.jsonl, config.json, palette.npy",
            flush=True,
        )
    return last


EVAL_BATCHES = 4


def evaluate(config, source, eval_step, state, clusters, mesh) -> dict:
    """Mean loss over the first EVAL_BATCHES batches of the held-out split (fixed order, same every time)."""
    totals: dict[str, float] = {}
    split = config.data.eval_split
    n_batches = min(EVAL_BATCHES, max(source.num_examples(split) // config.batch_size, 1))
    for i in range(n_batches):
        batch = pipeline.global_batch(source, split, config, i, mesh, train=False)
        with jax.set_mesh(mesh):
            values = jax.device_get(eval_step(state["params"], batch, clusters, state["step"]))
        for k, v in values.items():
            totals[k] = totals.get(k, 0.0) + float(v) / n_batches
    return totals
