"""The training loop, top to bottom: the runtime (lock, mesh, state resumed or fresh, palette), steps, loop.

Resume is exact: data order is a pure function of (seed, step) and the step's randomness is folded from the step,
so a run killed at any point and relaunched with the same command continues the same curve. A relaunch is checked
against the checkpoint it resumes (`resume.plan`): a config that no longer fits stops the run before anything in the
workdir changes. SIGTERM or Ctrl-C: every process agrees on a step, saves it, and exits (0, or 130 after Ctrl-C). A
save that fails stops the run at once (`checkpoint.CheckpointSaveError`). A loss that is not finite or far above a
uniform prediction's, or a gradient norm that is not finite, stops the run before a checkpoint of that state can be
written.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import jax
import jax.numpy as jnp
import ml_collections

from igpt_jax import attention, defaults, distributed, interrupts, metrics, profiling, runtime, sharding, steps
from igpt_jax.data import pipeline, splits
from igpt_jax.evaluators import base, runner
from igpt_jax.workdir import checkpoint, config_file, layout, run_lock

log = logging.getLogger(__name__)


_REMEDY = (
    "Lower config.optimizer.learning_rate or set config.optimizer.grad_clip_norm (turning clipping on changes the "
    "optimizer state's shape: relaunch with --config.restore=params too)."
)


# A loss this many times a uniform prediction's (log vocab_size nats a token, + log num_classes with a head) is no
# longer training: a run at initialisation sits near 1x, and a diverged one can stay finite (1e30) for ever.
DIVERGED_FACTOR = 5.0


def loss_ceiling(config: ml_collections.ConfigDict) -> float:
    """The loss above which a run has diverged: DIVERGED_FACTOR x the loss of a uniform prediction."""
    uniform = math.log(config.model.vocab_size)
    if config.model.num_classes:
        uniform = max(config.finetune.generative_weight, 1.0) * uniform + math.log(config.model.num_classes)
    return DIVERGED_FACTOR * uniform


def _check_healthy(loss: float, grad_norm: float | None, step: int, ceiling: float) -> None:
    """Stops a run whose loss is NaN or infinite, whose gradient norm is not finite, or whose loss is above
    `ceiling`: before any checkpoint of its state can be written (with keep_checkpoints, such saves would push the
    good ones out)."""
    if not math.isfinite(loss):
        problem = f"loss is {loss}"
    elif grad_norm is not None and not math.isfinite(grad_norm):
        problem = f"the gradient norm is {grad_norm} (loss {loss:.4g})"
    elif loss > ceiling:
        problem = f"loss is {loss:.4g}, above {ceiling:.4g} ({DIVERGED_FACTOR:g}x a uniform prediction's): diverged"
    else:
        return
    raise FloatingPointError(
        f"{problem} at step {step}: stopping. No checkpoint of this state was written (those already in the "
        f"workdir are untouched). {_REMEDY}"
    )


def _check_saveable(step_metrics: dict, state: steps.State, step: int, ceiling: float) -> None:
    """Refuses to checkpoint a state whose loss, gradient norm or parameters are not finite, or whose loss says the
    run diverged."""
    values = jax.device_get({k: v for k, v in step_metrics.items() if k in ("loss", "grad_norm")})
    grad_norm = float(values["grad_norm"]) if "grad_norm" in values else None
    _check_healthy(float(values["loss"]), grad_norm, step, ceiling)
    if not bool(jax.device_get(all_finite(state["params"]))):
        raise FloatingPointError(
            f"parameters became non-finite at step {step}: stopping without saving them. {_REMEDY}"
        )


@jax.jit
def all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir_path: str, *, devices: list[jax.Device] | None = None
) -> dict:
    """Trains to config.total_steps (resuming from the workdir), returns the last logged train metrics.

    `devices` (default: all) lets a caller run on part of the machine, as a smaller topology would.
    """
    with runtime.for_training(config, workdir_path, devices) as rt:
        return loop(rt)


run = train_and_evaluate  # the mode's entry point (main.MODES)


def loop(rt: runtime.Runtime) -> dict:
    """Trains rt's state to rt.config.total_steps: the loop every training mode runs (train, finetune).

    Each step: train, log, save when due (or asked to stop), then the evaluators due at that step, on a step that is
    already on disk. A stop request during an evaluator abandons it at its next batch boundary and saves the step
    if it was not saved yet; the relaunch runs it again (runner.pending)."""
    config, directory, mesh, setup, ckpt, state = rt.config, rt.directory, rt.mesh, rt.setup, rt.checkpointer, rt.state
    first_step = rt.step
    chosen = runner.for_training(rt)  # what they need is checked before anything is written
    if first_step >= config.total_steps and not runner.pending(chosen, directory, first_step, config.total_steps):
        if jax.process_index() == 0:
            print(
                f"igpt: {ckpt.directory} holds step {first_step} >= config.total_steps={config.total_steps}: "
                "nothing to do (raise --config.total_steps to train further)",
                flush=True,
            )
        ckpt.close()
        return {}

    # --- data (every split the run and its evaluators will read, checked now), palette and config.json
    runner.check_data(rt, chosen, {"config.data.train_split": splits(config)[0]})
    source, clusters, clusters_device = rt.source, rt.clusters, rt.clusters_device
    config_file.write_config(directory, config, first_step)

    # --- steps, and the same program on every process (checked before the first collective can hang on it)
    train_step = steps.make_train_step(setup)
    lowered = train_step.lower(setup.abstract_state, pipeline.abstract_batch(source.kind, config, mesh), clusters)
    distributed.check_same_program(distributed.fingerprint(lowered))

    # --- metrics: rows after the resumed step belong to the interrupted run's lost steps
    if jax.process_index() == 0:
        superseded, broken = metrics.set_aside_superseded(directory, first_step)
        if superseded or broken:
            log.warning(
                "metrics.jsonl: %d rows after step %d and %d unreadable lines moved to %s",
                superseded,
                first_step,
                broken,
                layout.METRICS_SUPERSEDED,
            )
    writer = metrics.MetricsWriter(directory, resumed_step=first_step, config=config)
    writer.text(first_step, "config", f"```json\n{config_file.config_text(config)}```")  # TensorBoard's Text tab
    tokens_per_step = config.batch_size * defaults.tokens_per_image(config)
    flops_per_step = metrics.flops_per_token(config) * tokens_per_step
    ceiling = loss_ceiling(config)
    peak, peak_source = metrics.peak_flops_per_device()
    log.info(
        "MFU: 6N + 6LSd FLOPs/token (causal-halved attention), peak = %.3g FLOP/s per device (%s)", peak, peak_source
    )
    platform, sequence = mesh.devices.flat[0].platform, sharding.sequence_shards(mesh)
    kernel = attention.resolve(
        config.model.attention, platform, sequence, defaults.tokens_per_image(config), config.model.dtype
    )
    profiler = profiling.StepProfiler(config, directory)

    # --- loop
    stop_request = interrupts.StopRequest()
    watchdog = distributed.Watchdog(config.watchdog_seconds)
    step = first_step
    last = {}
    shown: list[str] = []  # the newest sample grids, printed last: the run's picture
    run_start = time.perf_counter()
    step_clock = metrics.StepClock(step)
    data_wait = 0.0
    train_split = splits(config)[0]
    prefetch = pipeline.Prefetcher(
        lambda s: pipeline.global_batch(source, train_split, config, s, mesh), step, config.data.prefetch
    )
    close_checkpoints = True  # false once closed, or when Orbax's threads hold a failure or an abandoned save
    try:
        # evaluators due at the resumed step that never finished (a stop or a crash during them) run first
        left = runner.pending(chosen, directory, first_step, config.total_steps)
        with contextlib.suppress(base.Abandoned):  # the resumed step is on disk already
            shown = _evaluate(left, state, first_step, directory, writer, stop_request) or shown
        if stop_request.stopping:
            _stop(ckpt, stop_request, step)
        run_start = time.perf_counter()  # the first step's timing, without those evaluators
        step_clock.restart(step)
        while step < config.total_steps and not stop_request.stopping:
            wait_start = time.perf_counter()
            batch = prefetch.get(step)
            data_wait += time.perf_counter() - wait_start
            profiler.before(step + 1)
            with profiler.annotation(step + 1):
                state, step_metrics = train_step(state, batch, clusters_device)  # under the runtime's mesh
            step += 1
            profiler.after(step, state)
            watchdog.kick(f"step {step}")
            ckpt.check_saves()  # a background save that failed stops the run now, not one interval later
            if rt.lock.lost:
                raise run_lock.WorkdirLockedError(f"another run took over {rt.lock.path}: stopping at step {step}")

            if step % config.log_every_steps == 0 or step == config.total_steps:
                values = jax.device_get(step_metrics)
                interval, sec_per_step = step_clock.lap(step)
                last = {
                    "step": step,
                    **{k: float(v) for k, v in values.items()},
                    "tokens_per_sec": tokens_per_step / sec_per_step,
                    "mfu": flops_per_step / sec_per_step / (peak * mesh.size),
                    "seconds": time.perf_counter() - run_start,
                    "eta_seconds": (config.total_steps - step) * sec_per_step,
                    # time the loop waited for the input pipeline, as a share of the interval's wall time
                    "data_wait_fraction": data_wait / max(interval, 1e-9),
                }
                data_wait = 0.0
                writer.write(last)
                _check_healthy(last["loss"], last.get("grad_norm"), step, ceiling)
                if jax.process_index() == 0:
                    print(metrics.progress_line(last, config.total_steps, attention.running(kernel)), flush=True)

            if step == first_step + 1:  # the first step compiled: time the rest without it
                jax.block_until_ready(state)
                log.info("first step (with compilation) took %.1fs", time.perf_counter() - run_start)
                step_clock.restart(step)
                data_wait = 0.0

            stop = stop_request.agreed()
            saved = step % config.checkpoint_every_steps == 0 or stop or step == config.total_steps
            if saved:
                _save(ckpt, writer, step_metrics, state, step, clusters, ceiling)
            due = runner.due(chosen, step, config.total_steps)
            if due and not stop:
                jax.block_until_ready(state)  # steps dispatched so far are training time, not the evaluators'
                with step_clock.paused():
                    if saved:
                        ckpt.check_saves(block=True)  # the step is on disk before any evaluator can be interrupted
                    try:
                        shown = _evaluate(due, state, step, directory, writer, stop_request) or shown
                    except base.Abandoned:
                        if not saved:
                            _save(ckpt, writer, step_metrics, state, step, clusters, ceiling)
            if stop_request.stopping:
                _stop(ckpt, stop_request, step)
        close_checkpoints = False
        ckpt.close()
    except (checkpoint.CheckpointSaveError, KeyboardInterrupt):
        close_checkpoints = False
        raise
    finally:
        prefetch.close()
        profiler.close()  # a run that ended inside the profiled steps keeps the trace of those it ran
        writer.close()
        if close_checkpoints:
            _close_quietly(ckpt)
        watchdog.close()  # after the final save: a save that hangs is still caught
        stop_request.restore()
    if jax.process_index() == 0:
        print(config_file.summary(directory), flush=True)
        if shown:
            print(f"igpt: samples: {', '.join(shown)}", flush=True)
    return last


def _save(ckpt: checkpoint.Checkpointer, writer: metrics.MetricsWriter, step_metrics, state, step: int, clusters,
          ceiling: float):  # fmt: skip
    """Starts saving `step` (Orbax, async) once the state is known to be healthy and every row up to it is durable."""
    _check_saveable(step_metrics, state, step, ceiling)
    writer.flush(force=True)
    ckpt.save(step, state, clusters)


def _evaluate(chosen, state, step: int, directory, writer, stop_request: interrupts.StopRequest) -> list[str]:
    """Runs evaluators on the state's parameters; returns the files they name as the run's picture. A stop request
    at one of their batch boundaries raises base.Abandoned (the evaluator wrote nothing)."""
    results = runner.run(chosen, state["params"], step, directory, writer, stop_request.agreed)
    return [path for result in results for path in result.shown]


def _stop(ckpt: checkpoint.Checkpointer, stop_request: interrupts.StopRequest, step: int) -> None:
    """After a stop request: waits for the step's save, then raises interrupts.Stopped (Ctrl-C: 130) or returns
    (SIGTERM: exit 0)."""
    ckpt.check_saves(block=True)
    message = f"stopped on request: saved step {step}; relaunch the same command to continue"
    code = stop_request.exit_code()
    if code:
        raise interrupts.Stopped(message, code)
    log.warning(message)


def _close_quietly(ckpt: checkpoint.Checkpointer) -> None:
    """Waits for an in-flight save when the loop ended early for another reason; its failure is logged, so the
    error that ended the loop stays the one reported."""
    try:
        ckpt.close()
    except checkpoint.CheckpointSaveError as e:
        log.error("%s", e)
