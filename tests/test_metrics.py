"""The MFU formula's FLOP count, checked against hand arithmetic for iGPT-L (facts sheet: 6N + 12LSd ~ 9.1e9
with full attention; we count causal attention at half)."""

from __future__ import annotations

import pytest

from configs import igpt_l
from igpt_jax import metrics


def test_flops_per_token_igpt_l():
    L, d, S, V = 48, 1536, 1024, 512
    dense = 6 * (12 * L * d * d + d * V)
    assert metrics.flops_per_token(igpt_l.get_config()) == dense + 6 * L * S * d
    assert dense + 12 * L * S * d == pytest.approx(9.1e9, rel=0.01)  # the facts sheet's non-causal figure


def test_metrics_jsonl_records(tmp_path):
    writer = metrics.MetricsWriter(str(tmp_path), enabled=True)
    writer.write({"step": 1, "loss": 2.5, "tokens_per_sec": 10.0, "mfu": 0.1, "seconds": 1.0})
    writer.write({"mode": "eval", "step": 1, "loss": 2.4})
    writer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"mode": "eval"' in lines[1]
