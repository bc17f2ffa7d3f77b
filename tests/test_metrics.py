"""The MFU formula's FLOP count against XLA's own count of a compiled training step and the facts sheet, the peak it
is divided by, metrics.jsonl and TensorBoard as written, the step clock and the progress line."""

from __future__ import annotations

import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_config
from PIL import Image

from igpt_jax import defaults, metrics, objectives, plots
from igpt_jax import model as model_lib
from igpt_jax.configs import igpt_l


def test_flops_per_token_match_xla_for_a_training_step():
    """XLA counts every multiply-add of the compiled forward + backward pass (unscanned, so no layer is counted
    once for all). Our formula counts the matmuls only and causal attention at half; the XLA kernel computes the
    full S x S scores, so the other half, 6 L S d per token, is added back before comparing. Norms, softmax and
    the activation make up the rest (about 2% here). The sizes give attention 13% of the count and the head 7%, so
    getting either wrong shows."""
    config = tiny_config(image_size=16, scan_layers=False, attention="xla")
    config.model.num_layers, config.model.embed_dim, config.model.vocab_size = 2, 128, 256
    batch, seq = 4, 256
    graphdef, params = nnx.split(model_lib.build(config), nnx.Param)
    tokens = jnp.zeros((batch, seq), jnp.int32)

    def loss(p):
        return objectives.batch_loss(nnx.merge(graphdef, p), tokens, jax.random.key(0), config)[0]

    cost = jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    m = config.model
    ours = (metrics.flops_per_token(config) + 6 * m.num_layers * seq * m.embed_dim) * batch * seq
    assert xla == pytest.approx(ours, rel=0.04), (xla, ours)


def _xla_flops_per_token(config, batch: int = 2) -> float:
    graphdef, params = nnx.split(model_lib.build(config), nnx.Param)
    tokens = jnp.zeros((batch, defaults.tokens_per_image(config)), jnp.int32)

    def loss(p):
        return objectives.batch_loss(nnx.merge(graphdef, p), tokens, jax.random.key(0), config)[0]

    cost = jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"] / tokens.size


def test_the_attention_share_is_what_xla_adds_per_token_as_images_grow():
    """From 8x8 to 16x16 images the weights' FLOPs per token stay put and attention's grow: XLA's count (full S x S
    scores, forward + backward) grows by twice our causal-halved attention_flops_per_token's growth, plus the
    softmax's and mask's elementwise work on each score: under 16 FLOPs a score and head, against 12 d = 3,072 for
    the two matmuls at width 256 with 2 heads, so within 1.05% (1.6e-3 measured). A wrong constant in the formula
    (7 instead of 6: 17% off) or a dropped factor shows."""
    small, large = (tiny_config(image_size=side, scan_layers=False, attention="xla") for side in (8, 16))
    for config in (small, large):
        config.model.embed_dim, config.model.num_heads = 256, 2
    grown = _xla_flops_per_token(large) - _xla_flops_per_token(small)
    ours = 2 * (metrics.attention_flops_per_token(large) - metrics.attention_flops_per_token(small))
    elementwise = 16 * 2 / (12 * 256)
    assert ours <= grown <= ours * (1 + elementwise), (grown, ours)


def test_igpt_l_matches_the_facts_sheet():
    """9.1e9 FLOPs per token for iGPT-L at 32x32 with full attention (6N + 12LSd); ours halves the attention."""
    L, S, d = 48, 1024, 1536
    assert metrics.flops_per_token(igpt_l.get_config()) + 6 * L * S * d == pytest.approx(9.1e9, rel=0.01)


def test_metrics_jsonl_records(tmp_path):
    """Each row back from metrics.jsonl as written (NumPy scalars as floats), and its numbers in TensorBoard at its
    step under the evaluator's (or the mode's, or 'train') name, read by tensorboard's own reader."""
    from tensorboard.backend.event_processing import event_accumulator

    rows = [
        {"step": 1, "loss": np.float32(2.5), "tokens_per_sec": 10.0, "mfu": 0.1, "seconds": 1.0},
        {"mode": "eval", "step": 1, "loss": 2.4},
        {"mode": "probe", "evaluator": "cifar", "step": 3, "layer_0": 61.5, "files": ["cifar/step_00000003.json"]},
        {"step": 3, "loss": 2.25, "tokens_per_sec": 12.0, "mfu": 0.125, "seconds": 3.0},
    ]
    writer = metrics.MetricsWriter(str(tmp_path), enabled=True)
    for row in rows:
        writer.write(row)
    writer.close()
    read = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert read == [{k: float(v) if isinstance(v, np.floating) else v for k, v in row.items()} for row in rows]
    board = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    board.Reload()
    assert [(e.step, e.value) for e in board.Scalars("train/loss")] == [(1, 2.5), (3, 2.25)]
    assert [(e.step, e.value) for e in board.Scalars("eval/loss")] == [(1, pytest.approx(2.4))]
    assert [(e.step, e.value) for e in board.Scalars("cifar/layer_0")] == [(3, 61.5)]
    train = {f"train/{k}" for k in ("loss", "tokens_per_sec", "mfu", "seconds")}
    assert set(board.Tags()["scalars"]) == train | {"eval/loss", "cifar/layer_0"}  # no step, no file list


def test_step_clock_leaves_evaluator_time_out_of_the_step_rate():
    """100 steps of 0.1 s with a 30 s probe in between: 0.1 s a step, not 0.4 (the ETA and tokens/s follow)."""
    now = [0.0]
    clock = metrics.StepClock(step=0, clock=lambda: now[0])
    now[0] += 5.0  # steps 1..50
    with clock.paused():
        now[0] += 30.0  # a probe at step 50
    now[0] += 5.0  # steps 51..100
    seconds, per_step = clock.lap(100)
    assert seconds == pytest.approx(10.0) and per_step == pytest.approx(0.1)
    now[0] += 2.0  # the next lap starts clean: nothing paused carries over
    assert clock.lap(110) == (pytest.approx(2.0), pytest.approx(0.2))


class _Device:
    def __init__(self, device_kind: str, platform: str):
        self.device_kind, self.platform = device_kind, platform


@pytest.mark.parametrize(
    ("kind", "peak"),
    [("TPU v5 lite", 197e12), ("TPU v5p", 459e12), ("TPU v4", 275e12), ("NVIDIA H100 80GB HBM3", 989e12)],
)
def test_a_known_chips_peak_is_its_vendors_dense_bf16_figure(monkeypatch, kind, peak):
    """The figures Google and NVIDIA publish (v5e 197, v5p 459, v4 275, H100 SXM 989 TFLOP/s), not a measurement."""
    monkeypatch.setattr(jax, "devices", lambda: [_Device(kind, "tpu" if kind.startswith("TPU") else "gpu")])
    monkeypatch.setattr(metrics, "_measured_cpu_peak", lambda: pytest.fail("a known chip is never measured"))
    value, source = metrics.peak_flops_per_device()
    assert value == peak and source.endswith("bf16 dense peak (igpt_jax/hardware.py)")


def test_a_cpus_peak_is_its_measured_matmul_rate_shared_by_its_devices(monkeypatch):
    monkeypatch.setattr(jax, "devices", lambda: [_Device("cpu", "cpu")])
    monkeypatch.setattr(jax, "local_device_count", lambda: 8)
    monkeypatch.setattr(metrics, "_measured_cpu_peak", lambda: (8e11, 6))
    value, source = metrics.peak_flops_per_device()
    assert value == 1e11 and source == (
        "this CPU's fp32 matmul throughput, the best of 6 timed 2048x2048 matmuls over 1 s, split over its JAX devices"
    )


def test_an_unknown_accelerators_peak_is_nan_and_named(monkeypatch):
    monkeypatch.setattr(jax, "devices", lambda: [_Device("Mystery X1", "gpu")])
    value, source = metrics.peak_flops_per_device()
    assert np.isnan(value) and source == "unknown peak for Mystery X1"


def test_the_cpu_peak_is_xlas_matmul_flops_over_the_fastest_timing(monkeypatch):
    """Matmuls that take 5 s (the warm-up, untimed), then 0.375, 0.125 and 0.25 s each, by a clock under the test's
    control: the rate is XLA's own FLOP count of the n x n matmul over the fastest, 0.125 s, and timing goes on until
    both min_repeats and min_seconds are reached."""
    n = 64
    x = jnp.ones((n, n), jnp.float32)
    cost = jax.jit(lambda a: a @ a).lower(x).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    for min_repeats, min_seconds, repeats in [(3, 0.0, 3), (2, 1.0, 4), (6, 1.0, 6)]:
        now, durations = [0.0], iter([5.0, 0.375, 0.125] + [0.25] * 10)

        class Result:
            def block_until_ready(self, now=now, durations=durations):
                now[0] += next(durations)

        monkeypatch.setattr(jax, "jit", lambda f: lambda a: (f(a), Result())[1])  # the matmul runs, untimed
        rate, timed = metrics._measured_cpu_peak(n, min_seconds, min_repeats, clock=lambda now=now: now[0])
        assert (rate, timed) == (xla / 0.125, repeats)


def test_the_progress_line_reads_the_records_numbers():
    train = {"step": 40, "loss": 2.08951, "bits_per_token": 3.01453, "tokens_per_sec": 131072.4, "mfu": 0.4567}
    line = metrics.progress_line(train | {"eta_seconds": 600.0}, 1000, "splash")
    assert line == (
        "step 40/1000  loss 2.0895 nats (3.015 bits)  131072 tokens/s  MFU 45.7%  ETA 10.0 min  attention splash"
    )
    assert metrics.progress_line(train, 1000).endswith("MFU 45.7%  ETA ?")  # no ETA yet, no kernel named
    tuned = train | {"accuracy": 0.625, "generative_loss": 1.5, "classification_loss": 0.58951}
    assert metrics.progress_line(tuned, 50) == (
        "step 40/50  loss 2.0895 = generative 1.5000 (3.015 bits) + classification 0.5895, accuracy 62%  "
        "131072 tokens/s  MFU 45.7%  ETA ?"
    )


def test_the_step_clock_never_divides_by_zero():
    """A lap at the step it started from counts as one step; a lap of no time still gives a positive rate."""
    now = [0.0]
    clock = metrics.StepClock(step=7, clock=lambda: now[0])
    now[0] += 3.0
    assert clock.lap(7) == (3.0, 3.0)
    seconds, per_step = clock.lap(9)
    assert 0 < seconds < 1e-6 and 0 < per_step < 1e-6


def _scalars(directory) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing import event_accumulator

    board = event_accumulator.EventAccumulator(str(directory))
    board.Reload()
    return {tag: [(e.step, e.value) for e in board.Scalars(tag)] for tag in board.Tags()["scalars"]}


def test_a_resumed_writers_tensorboard_drops_the_steps_it_redoes(tmp_path):
    """The first run logged steps 1..4 and saved step 2; the relaunch (resumed_step=2) logs 3 and 4 again. TensorBoard
    shows each step once, the relaunch's values for 3 and 4."""
    first = metrics.MetricsWriter(tmp_path, enabled=True)
    for step in range(1, 5):
        first.write({"step": step, "loss": float(step)})
    first.close()
    again = metrics.MetricsWriter(tmp_path, resumed_step=2, enabled=True)
    for step in (3, 4):
        again.write({"step": step, "loss": 10.0 * step})
    again.close()
    assert _scalars(tmp_path / "tensorboard") == {"train/loss": [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]}


def test_one_process_writes_by_default_and_append_row_adds_one_row(tmp_path):
    """Process 0 writes (the test is process 0 of 1); a disabled writer leaves the workdir empty."""
    metrics.MetricsWriter(tmp_path / "off", enabled=False).write({"step": 1, "loss": 1.0})
    assert not (tmp_path / "off").exists()
    writer = metrics.MetricsWriter(tmp_path)
    writer.write({"step": 1, "loss": 2.0})
    writer.images(1, {"samples": plots.image_grid(np.zeros((1, 1, 4, 4, 3), np.uint8), scale=1)})
    writer.close()
    metrics.append_row(tmp_path, {"mode": "eval", "step": 1, "loss": 1.5})
    assert metrics.read_rows(tmp_path) == [{"step": 1, "loss": 2.0}, {"mode": "eval", "step": 1, "loss": 1.5}]
    assert _scalars(tmp_path / "tensorboard") == {"train/loss": [(1, 2.0)], "eval/loss": [(1, 1.5)]}
    from tensorboard.backend.event_processing import event_accumulator

    board = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    board.Reload()
    (image,) = board.Images("samples")
    assert (image.step, image.width, image.height) == (1, 4 + 2 * plots.GRID_GAP, 4 + 2 * plots.GRID_GAP)


def test_a_modes_row_leaves_the_training_curve_in_tensorboard_whole(tmp_path):
    """--mode=eval or probe appends a row with a writer of its own: it resumes nothing, so TensorBoard drops none
    of the steps the training run logged."""
    writer = metrics.MetricsWriter(tmp_path)
    for step in range(1, 5):
        writer.write({"step": step, "loss": float(step)})
    writer.close()
    metrics.append_row(tmp_path, {"mode": "probe", "step": 4, "accuracy": 70.0})
    assert _scalars(tmp_path / "tensorboard") == {
        "train/loss": [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)],
        "probe/accuracy": [(4, 70.0)],
    }


def test_on_gcs_tensorboard_reads_back_scalars_images_text_and_the_purge_on_resume(gcs_here, tmp_path):
    """Event files written into a gs:// workdir (a first run's steps 1..4, its picture at 2 and config text at 1, then
    a relaunch from step 2 redoing 3 and 4) are what tensorboard's own reader makes of a local copy of the bucket."""
    from tensorboard.backend.event_processing import event_accumulator

    from igpt_jax.workdir import storage

    workdir = storage.path(gcs_here)
    first = metrics.MetricsWriter(workdir, enabled=True)
    first.text(1, "config", "```json\n{}\n```")
    for step in range(1, 5):
        first.write({"step": step, "loss": float(step)})
    grid = np.zeros((1, 1, 4, 4, 3), np.uint8)
    grid[..., 0] = 255  # red
    first.images(2, {"samples": plots.image_grid(grid, scale=1)})
    first.close()
    again = metrics.MetricsWriter(workdir, resumed_step=2, enabled=True)
    for step in (3, 4):
        again.write({"step": step, "loss": 10.0 * step})
    again.close()
    local = tmp_path / "tensorboard"
    local.mkdir()
    for events in (workdir / "tensorboard").iterdir():
        (local / events.name).write_bytes(events.read_bytes())
    assert len(list(local.iterdir())) == 2  # a file per run
    assert _scalars(local) == {"train/loss": [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]}
    board = event_accumulator.EventAccumulator(str(local), size_guidance={event_accumulator.TENSORS: 0})
    board.Reload()
    (image,) = board.Images("samples")
    with Image.open(io.BytesIO(image.encoded_image_string)) as png:
        assert image.step == 2 and png.getpixel((plots.GRID_GAP, plots.GRID_GAP))[:3] == (255, 0, 0)
    (text,) = board.Tensors("config/text_summary")
    assert text.step == 1 and text.tensor_proto.string_val == [b"```json\n{}\n```"]


def test_on_gcs_a_forced_flush_makes_every_row_durable(gcs_here):
    """An object store is rewritten whole at a flush, so unforced flushes wait min_flush_seconds; the forced one
    before each checkpoint save uploads every row written so far, metrics.jsonl and TensorBoard alike."""
    from igpt_jax.workdir import storage

    workdir = storage.path(gcs_here)
    writer = metrics.MetricsWriter(workdir, enabled=True)
    writer.write({"step": 1, "loss": 2.0})
    assert metrics.read_rows(workdir) == []  # written at the next forced flush, not at every row
    writer.flush(force=True)
    assert metrics.read_rows(workdir) == [{"step": 1, "loss": 2.0}]
    (events,) = (workdir / "tensorboard").iterdir()
    assert b"train/loss" in events.read_bytes()
    writer.write({"step": 2, "loss": 1.0})
    writer.close()
    assert [r["step"] for r in metrics.read_rows(workdir)] == [1, 2]
