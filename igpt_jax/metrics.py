"""Metrics: `metrics.jsonl` + TensorBoard events from process 0, a progress line per log step, and MFU.

FLOPs per token for training (forward + backward = 3x forward, matmuls only, MaxText's convention):
  6 * (12 * L * d^2 + d * V)       weights: q, k, v, out (4 d^2), MLP (8 d^2) per layer, and the head
+ 6 * L * S * d                    attention scores and values, causal: half of the 12 * L * S * d a full mask costs
Embedding lookups, norms and softmax are not counted. MFU = achieved FLOP/s per device / peak FLOP/s per device.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from igpt_jax import hardware, wandb_run
from igpt_jax.defaults import tokens_per_image
from igpt_jax.workdir import layout, storage


def attention_flops_per_token(config: ml_collections.ConfigDict) -> float:
    """The attention scores' and values' share of flops_per_token: causal-halved (bert, bidirectional, uses the same
    figure)."""
    return 6 * config.model.num_layers * tokens_per_image(config) * config.model.embed_dim


def flops_per_token(config: ml_collections.ConfigDict) -> float:
    m = config.model
    matmul = 12 * m.num_layers * m.embed_dim**2 + m.embed_dim * m.vocab_size
    return 6 * matmul + attention_flops_per_token(config)


CPU_PEAK_SIDE, CPU_PEAK_SECONDS = 2048, 1.0  # the matmul timed for a CPU's peak, and for how long at least


def _measured_cpu_peak(
    n: int = CPU_PEAK_SIDE,
    min_seconds: float = CPU_PEAK_SECONDS,
    min_repeats: int = 5,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[float, int]:
    """(FLOP/s of the fastest jitted fp32 n x n matmul, how many were timed). Timed for at least `min_seconds` after
    a warm-up call, best not mean: a single short timing swung 3x between runs here (1.1e11 against 3.4e11), and the
    peak that CPU MFU is quoted against should not move with a busy neighbour or a cold cache."""
    x = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best, repeats, start = float("inf"), 0, clock()
    while repeats < min_repeats or clock() - start < min_seconds:
        t = clock()
        f(x).block_until_ready()
        best = min(best, clock() - t)
        repeats += 1
    return 2 * n**3 / best, repeats


def peak_flops_per_device() -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    device = jax.devices()[0]
    chip = hardware.chip_of(device.device_kind)
    if chip is not None:
        return chip.peak_flops, f"{chip.name} bf16 dense peak (igpt_jax/hardware.py)"
    if device.platform == "cpu":
        peak, repeats = _measured_cpu_peak()
        return peak / jax.local_device_count(), (
            f"this CPU's fp32 matmul throughput, the best of {repeats} timed {CPU_PEAK_SIDE}x{CPU_PEAK_SIDE} matmuls "
            f"over {CPU_PEAK_SECONDS:g} s, "
            "split over its JAX devices"
        )
    return float("nan"), f"unknown peak for {device.device_kind}"


class MetricsWriter:
    """One JSON object per record into workdir/metrics.jsonl, and scalars to TensorBoard (process 0 only).

    Both reach a gs:// workdir through `storage.AppendOnlyFile` (igpt_jax/tensorboard.py). `flush(force=True)`
    before each checkpoint save makes every record up to the saved step durable."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        resumed_step: int = 0,
        enabled: bool | None = None,
        config: ml_collections.ConfigDict | None = None,
    ):
        """`config`: the run's, for its W&B settings (config.wandb; igpt_jax/wandb_run.py)."""
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        if self.enabled:
            workdir = storage.path(workdir)
            self._jsonl = storage.AppendOnlyFile(workdir / layout.METRICS)
            from igpt_jax import tensorboard  # tensorboardX, imported by runs that write events only

            self._tb = tensorboard.EventWriter(workdir / layout.TENSORBOARD, resumed_step=resumed_step)
            self._wandb = wandb_run.open_run(config, workdir)

    def write(self, record: Mapping) -> None:
        if not self.enabled:
            return
        record = {k: (float(v) if hasattr(v, "dtype") else v) for k, v in record.items()}
        self._jsonl.append((json.dumps(record) + "\n").encode())
        prefix = record.get("evaluator") or record.get("mode", "train")
        scalars = {f"{prefix}/{k}": v for k, v in record.items() if k != "step" and isinstance(v, int | float)}
        self._tb.scalars(record["step"], scalars)
        if self._wandb is not None:
            self._wandb.log(record["step"], scalars)
        self.flush()

    def images(self, step: int, pngs: Mapping[str, bytes]) -> None:
        """PNGs to TensorBoard under their tags (process 0)."""
        if self.enabled:
            self._tb.images(step, dict(pngs))
            if self._wandb is not None:
                self._wandb.images(step, dict(pngs))

    def text(self, step: int, tag: str, text: str) -> None:
        """Markdown to TensorBoard under `tag` (process 0): the run's config at its first step."""
        if self.enabled:
            self._tb.text(step, tag, text)

    def flush(self, *, force: bool = False) -> None:
        if self.enabled:
            self._jsonl.flush(force=force)
            self._tb.flush(force=force)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
            if self._wandb is not None:
                self._wandb.close()


def append_row(workdir: str | os.PathLike, record: Mapping, config: ml_collections.ConfigDict | None = None) -> None:
    """One record appended to metrics.jsonl and TensorBoard (and W&B, where `config` asks), for modes that write a
    single row."""
    writer = MetricsWriter(workdir, config=config)
    try:
        writer.write(record)
    finally:
        writer.close()


def read_rows(workdir: str | os.PathLike) -> list[dict]:
    """The rows of workdir/metrics.jsonl that parse (none if it does not exist)."""
    location = storage.path(workdir) / layout.METRICS
    if not location.exists():
        return []
    rows = []
    for line in location.read_bytes().decode(errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def set_aside_superseded(workdir: str | os.PathLike, resumed_step: int) -> tuple[int, int]:
    """Makes metrics.jsonl tell one story before a run continues from `resumed_step`.

    Rows for steps after `resumed_step` were written by a run that stopped before saving them: the resumed run
    computes those steps again. Lines that do not parse (a row cut short by kill -9) cannot be trusted. Both are
    moved, verbatim, to metrics.superseded.jsonl (appended, nothing is lost) and metrics.jsonl is rewritten with the
    rest. Returns (rows after the step, broken lines); (0, 0) leaves both files untouched.
    """
    workdir = storage.path(workdir)
    location = workdir / layout.METRICS
    if not location.exists():
        return 0, 0
    kept, superseded, broken = [], [], []
    for line in location.read_bytes().decode(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (ValueError, KeyError, TypeError):
            broken.append(line)
            continue
        (superseded if step > resumed_step else kept).append(line)
    if superseded or broken:
        aside = workdir / layout.METRICS_SUPERSEDED
        previous = aside.read_bytes() if aside.exists() else b""
        storage.write_bytes(aside, previous + "".join(f"{line}\n" for line in superseded + broken).encode())
        storage.write_text(location, "".join(f"{line}\n" for line in kept))
    return len(superseded), len(broken)


class StepClock:
    """Training seconds per step between two progress lines. Time inside `paused()` (evaluators, probes, samples,
    the first step's compilation) is left out, so tokens/s, MFU and the ETA describe training alone: an 8,000-step
    GPU run otherwise reported 95k tokens/s and a 30-minute ETA after each probe, against 2.06M and 1.6 minutes."""

    def __init__(self, step: int, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.restart(step)

    def restart(self, step: int) -> None:
        self.start, self.step, self.excluded = self.clock(), step, 0.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        start = self.clock()
        try:
            yield
        finally:
            self.excluded += self.clock() - start

    def lap(self, step: int) -> tuple[float, float]:
        """(training seconds since the last lap, seconds per step over them); starts the next lap."""
        seconds = max(self.clock() - self.start - self.excluded, 1e-9)
        per_step = seconds / max(step - self.step, 1)
        self.restart(step)
        return seconds, per_step


def progress_line(record: Mapping, total_steps: int, attention: str | None = None) -> str:
    eta = record.get("eta_seconds")
    eta_text = f"{eta / 60:.1f} min" if eta is not None else "?"
    loss = f"loss {record['loss']:.4f} nats ({record['bits_per_token']:.3f} bits)"
    if "accuracy" in record:  # fine-tuning: the loss is generative + classification
        loss = (
            f"loss {record['loss']:.4f} = generative {record['generative_loss']:.4f} ({record['bits_per_token']:.3f}"
            f" bits) + classification {record['classification_loss']:.4f}, accuracy {100 * record['accuracy']:.0f}%"
        )
    return (
        f"step {record['step']}/{total_steps}  {loss}  {record['tokens_per_sec']:.0f} tokens/s  "
        f"MFU {100 * record['mfu']:.1f}%  ETA {eta_text}" + (f"  attention {attention}" if attention else "")
    )
