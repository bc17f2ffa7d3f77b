"""Sampling speed (images/s), ours against Hugging Face's ImageGPTForCausalImageModeling.generate on the same weights.

One random ImageGPT (default: 4 layers, width 256, 4 heads, 32x32 = 1,024 tokens, 512 colours) is written by
transformers and imported through igpt_jax.convert, so both sides run the same network. Both draw whole images by
sampling (temperature 1, no top-k) with a KV cache: ours one compiled loop (igpt_jax.sampling), Hugging Face
`generate(do_sample=True, use_cache=True)` in PyTorch on the CPU. The two alternate, round after round, so both see
the same machine; the first call of each (compilation, warm-up) is timed apart. Records the load average before and
after: a busy machine slows PyTorch more than XLA and so flatters the ratio.

Both sides use every core. PyTorch does so with its intra-op threads (one per core by default). XLA's CPU client
shows one device, and its intra-op threads do not speed up decoding (the ops are small and bound by memory: one core
runs this loop as fast as two). So ours runs one JAX CPU device per core (`jax_num_cpu_devices`, what the
JAX_NUM_CPU_DEVICES variable sets) with the images split over them on the mesh's data axis, as on a multi-chip host.
`--cpu-devices 1` times the single-device configuration.

Usage: python benchmarks/sample_speed.py [--rounds 5] [--batch 16] [--cpu-devices N] [--out results.json]
Prints one JSON object: per-round seconds for both, median images/s and ours / Hugging Face.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import report  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402
from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling  # noqa: E402

from igpt_jax import convert, sampling, sharding, steps  # noqa: E402


def hugging_face_model(layers: int, width: int, heads: int, side: int, vocab: int) -> ImageGPTForCausalImageModeling:
    torch.manual_seed(0)
    config = ImageGPTConfig(vocab_size=vocab + 1, n_positions=side * side, n_embd=width, n_layer=layers, n_head=heads)
    model = ImageGPTForCausalImageModeling(config).eval()
    with torch.no_grad():  # a head that says something: the released models' is not zero
        model.lm_head.weight.copy_(0.05 * torch.randn_like(model.lm_head.weight))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument(
        "--cpu-devices", type=int, default=os.cpu_count(), help="JAX CPU devices (default: a core each)"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)  # before the first use of the backend
    load_before = os.getloadavg()
    n, batch = args.side**2, args.batch

    hf = hugging_face_model(args.layers, args.width, args.heads, args.side, args.vocab)
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        model, config = convert.from_huggingface(folder)
    config.mesh.ici = {"data": -1, "fsdp": 1, "sequence": 1, "tensor": 1}  # images over the devices, weights whole
    mesh = sharding.make_mesh(config, jax.devices())
    setup = steps.make_setup(config, mesh, train=False)
    params = jax.device_put(nnx.to_pure_dict(nnx.state(model, nnx.Param)), setup.state_shardings["params"])
    sampler = sampling.make_sampler(setup, batch, top_k=0, num_colours=args.vocab)
    prompt, ids = np.zeros((batch, n), np.int32), np.arange(batch)
    start_ids = torch.full((batch, 1), args.vocab)  # the SOS

    def ours(seed: int) -> float:
        start = time.perf_counter()
        with jax.set_mesh(mesh):
            jax.block_until_ready(sampler(params, prompt, 0, ids, seed, 1.0))
        return time.perf_counter() - start

    def hugging_face(seed: int) -> float:
        torch.manual_seed(seed)
        start = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(
                start_ids,
                attention_mask=torch.ones_like(start_ids),
                max_new_tokens=n,
                do_sample=True,
                top_k=0,
                use_cache=True,
                pad_token_id=args.vocab,
            )
        assert out.shape == (batch, n + 1)
        return time.perf_counter() - start

    first = {"ours": ours(0), "hugging_face": hugging_face(0)}  # compilation / warm-up
    times: dict[str, list[float]] = {"ours": [], "hugging_face": []}
    for r in range(1, args.rounds + 1):
        times["ours"].append(ours(r))
        times["hugging_face"].append(hugging_face(r))
    medians = {name: batch / statistics.median(t) for name, t in times.items()}
    result = {
        "benchmark": "sample_speed",
        "model": {k: getattr(args, k) for k in ("layers", "width", "heads", "side", "vocab")},
        "batch": batch,
        "tokens_per_image": n,
        "rounds": args.rounds,
        "seconds": times,
        "first_call_seconds": first,
        "compile_seconds_ours": sampler.compile_seconds,
        "images_per_sec_median": medians,
        "ratio_ours_over_hugging_face": medians["ours"] / medians["hugging_face"],
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "jax_devices": len(jax.devices()),
        "mesh": dict(mesh.shape),
        "torch_threads": torch.get_num_threads(),
        "versions": {"jax": jax.__version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    report.emit(result, args.out)


if __name__ == "__main__":
    main()
