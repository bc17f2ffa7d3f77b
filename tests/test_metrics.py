"""The MFU formula's FLOP count against XLA's own count of a compiled training step, and the facts sheet."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_config

from configs import igpt_l
from igpt_jax import metrics, objectives
from igpt_jax import model as model_lib


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
