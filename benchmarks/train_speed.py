"""Training speed (tokens/s), our jitted train step against Hugging Face's ImageGPTForCausalImageModeling in PyTorch.

Both sides train the same shape (default: 4 layers, width 256, 4 heads, 32x32 = 1,024 tokens, 512 colours, batch 8)
on the same random tokens with Adam/AdamW, no dropout, fp32, on this CPU: ours is `steps.make_train_step` (what
--mode=train runs) on one device, theirs a forward with labels, backward and optimizer step. The two alternate,
round after round, so both see the same machine; the first call of each (compilation, warm-up) is timed apart.
Our MFU is against a fp32 matmul peak measured in the same run. Records the load average before and after: a busy
machine slows PyTorch (about 2.8x) more than XLA (about 1.9x) and so flatters the ratio.

Usage: python benchmarks/train_speed.py [--rounds 5] [--steps 2] [--attention auto] [--out results.json]
Prints one JSON object: per-round seconds per step for both, median tokens/s, ours / Hugging Face, MFU.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import report  # noqa: E402
import torch  # noqa: E402
from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling  # noqa: E402

from igpt_jax import attention, defaults, metrics, sharding, steps  # noqa: E402


def our_config(args: argparse.Namespace):
    config = defaults.make_config(
        image_size=args.side, num_layers=args.layers, embed_dim=args.width, num_heads=args.heads
    )
    config.model.vocab_size = args.vocab
    config.model.dtype = config.model.param_dtype = "float32"
    config.model.attention = args.attention
    config.model.scan_layers = not args.unscanned
    config.batch_size = args.batch
    config.microbatches = 1
    return config


def hugging_face_trainer(args: argparse.Namespace, tokens: np.ndarray):
    torch.manual_seed(0)
    config = ImageGPTConfig(
        vocab_size=args.vocab + 1,
        n_positions=args.side**2,
        n_embd=args.width,
        n_layer=args.layers,
        n_head=args.heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = ImageGPTForCausalImageModeling(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    # Hugging Face's input starts with the SOS id (the last vocabulary row) and predicts the next token, as ours.
    ids = torch.from_numpy(np.concatenate([np.full((tokens.shape[0], 1), args.vocab), tokens[:, :-1]], axis=1))

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="train steps per timed round, each side")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--attention", default="auto", choices=attention.allowed_names())
    parser.add_argument("--unscanned", action="store_true", help="unroll the layers instead of lax.scan")
    parser.add_argument("--skip-hugging-face", action="store_true", help="time ours alone (no ratio)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    load_before = os.getloadavg()
    n, batch = args.side**2, args.batch
    tokens = np.random.default_rng(0).integers(0, args.vocab, (batch, n)).astype(np.int32)

    config = our_config(args)
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    setup = steps.make_setup(config, mesh)
    state = steps.init_state(setup)
    train_step = steps.make_train_step(setup)
    our_batch = {"tokens": jax.device_put(tokens)}

    def ours() -> float:
        nonlocal state
        start = time.perf_counter()
        with jax.set_mesh(mesh):
            for _ in range(args.steps):
                state, out = train_step(state, our_batch, None)
            jax.block_until_ready(out["loss"])
        return (time.perf_counter() - start) / args.steps

    sides = {"ours": ours}
    if not args.skip_hugging_face:
        hf_step = hugging_face_trainer(args, tokens)

        def hugging_face() -> float:
            start = time.perf_counter()
            for _ in range(args.steps):
                hf_step()
            return (time.perf_counter() - start) / args.steps

        sides["hugging_face"] = hugging_face

    first = {name: fn() for name, fn in sides.items()}  # compilation / warm-up
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, fn in sides.items():
            seconds[name].append(fn())
    tokens_per_sec = {name: batch * n / statistics.median(t) for name, t in seconds.items()}
    peak, peak_source = metrics.peak_flops_per_device()
    result = {
        "benchmark": "train_speed",
        "model": {k: getattr(args, k) for k in ("layers", "width", "heads", "side", "vocab")},
        "batch": batch,
        "dtype": "float32",
        "attention": attention.resolve(args.attention),
        "scan_layers": not args.unscanned,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "seconds_per_step": seconds,
        "first_round_seconds_per_step": first,
        "tokens_per_sec_median": tokens_per_sec,
        "mfu_ours": tokens_per_sec["ours"] * metrics.flops_per_token(config) / peak,
        "peak_flops": peak,
        "peak_source": peak_source,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": {"jax": jax.__version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    if "hugging_face" in tokens_per_sec:
        result["ratio_ours_over_hugging_face"] = tokens_per_sec["ours"] / tokens_per_sec["hugging_face"]
    report.emit(result, args.out)


if __name__ == "__main__":
    main()
