"""Speed on the accelerator at hand: iGPT-S and iGPT-M train steps per attention kernel (tokens/s, MFU), attention
forward + backward by sequence length per kernel (the rows `auto` should use), and iGPT-S sampling against Hugging
Face's `generate` on the same weights and device.

One command for one GPU, one TPU host or this CPU, with the JAX the host already has: the data are synthetic tokens,
so neither TensorFlow nor TFDS is imported, and neither is tensorboardX. It needs JAX, Flax, Optax, orbax,
ml_collections (a small pure-Python wheel; carry it where it is missing) and this checkout; PyTorch with transformers
adds Hugging Face's side of the sampling comparison when it sees the same kind of device.

- Train: the presets' shapes at 32x32 (1,024 tokens), bf16 compute with fp32 parameters and Adam, the batch stated
  per model (a power of two that fills an 80 GB GPU without rematerialising more than the preset does), each kernel the
  platform offers; the first step (compilation) is timed apart, then `--steps` steps. MFU is against hardware.py's
  bf16 dense peak for the device found (on a CPU, its measured fp32 matmul peak).
- Attention: causal, 8 heads of 64 (iGPT-S's), one jitted forward + backward, the same number of tokens per call at
  every length (the batch shrinks as the length grows); the median of `--repeats` calls after a warm-up. `auto_rows`
  are the rows for igpt_jax.attention.AUTO: each kernel with the longest length up to which it was fastest.
- Sampling: whole images (temperature 1, no top-k) with a KV cache, ours one compiled loop, Hugging Face
  `generate(do_sample=True, use_cache=True)`, alternating, in bf16 on accelerators and fp32 on a CPU.

`--quick` cuts every shape (2 layers, 8x8 images, lengths 64 and 128) so the whole run takes under 3 minutes on a
2-core CPU, with every field present. Records the load average before and after: a busy host slows PyTorch more than
XLA and so flatters the ratio.

Usage: python benchmarks/accelerator.py [--quick] [--parts train,attention,sampling] [--steps 10] [--repeats 10]
[--out results.json] [--markdown t.md]. Prints one JSON object; --out is also written after each case (`complete`
false until the end), so a run stopped by a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import report  # noqa: E402

from igpt_jax import attention, defaults, metrics, sampling, sharding, steps  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    width: int
    heads: int
    side: int
    batch_per_device: int


FULL = {
    "train": (Shape("igpt_s", 24, 512, 8, 32, 64), Shape("igpt_m", 36, 1024, 8, 32, 32)),
    "lengths": (256, 512, 1024, 1536, 2048, 2304, 3072, 4096),
    "attention_tokens": 32_768,  # per call, at every length
    "sampling": Shape("igpt_s", 24, 512, 8, 32, 32),
}
QUICK = {
    "train": (
        Shape("igpt_s (quick: 2 x 64, 8x8)", 2, 64, 2, 8, 8),
        Shape("igpt_m (quick: 2 x 128, 8x8)", 2, 128, 2, 8, 4),
    ),
    "lengths": (64, 128),
    "attention_tokens": 512,
    "sampling": Shape("igpt_s (quick: 2 x 64, 8x8)", 2, 64, 2, 8, 4),
}
VOCAB = 512


def kernels(platform_name: str) -> list[str]:
    """The kernels worth timing here: xla and blockwise run anywhere; the platform's own ones are those its `auto` row
    names (cuDNN on GPUs, splash on TPUs)."""
    rule = attention.AUTO.get(platform_name)
    named = ({name for _, name in rule.by_length} | {rule.float32}) if rule else set()
    wanted = {"xla", "blockwise"} | named
    # kernels that split the sequence need a mesh that does: not a one-device comparison
    return [k for k, kernel in attention.KERNELS.items() if k in wanted and not kernel.splits_sequence]


def _config(shape: Shape, kernel: str, dtype: str, devices: int):
    config = defaults.make_config(
        image_size=shape.side, num_layers=shape.layers, embed_dim=shape.width, num_heads=shape.heads
    )
    config.model.vocab_size = VOCAB
    config.model.dtype = dtype
    config.model.attention = kernel
    config.data.dataset = "synthetic"
    config.batch_size = shape.batch_per_device * devices
    return config


def train_case(shape: Shape, kernel: str, n_steps: int, peak: float) -> dict:
    devices = jax.devices()
    config = _config(shape, kernel, "bfloat16", len(devices))
    mesh = sharding.make_mesh(config, devices)
    row = {"model": shape.name, "kernel": kernel, "batch": config.batch_size, "tokens_per_image": shape.side**2}
    try:
        setup = steps.make_setup(config, mesh)
        state = steps.init_state(setup)
        train_step = steps.make_train_step(setup)
        tokens = np.random.default_rng(0).integers(0, VOCAB, (config.batch_size, shape.side**2), np.int32)
        batch = {"tokens": jax.device_put(tokens, sharding.batch_sharding(config, mesh, 2))}
        with jax.set_mesh(mesh):
            start = time.perf_counter()
            state, out = train_step(state, batch, None)
            jax.block_until_ready(out["loss"])
            first = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(n_steps):
                state, out = train_step(state, batch, None)
            jax.block_until_ready(out["loss"])
            seconds = (time.perf_counter() - start) / n_steps
    except Exception as e:  # noqa: BLE001 - a kernel or batch the device cannot take is a result, not a crash
        return row | {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    tokens_per_sec = config.batch_size * shape.side**2 / seconds
    return row | {
        "ran": attention.running(kernel),
        "first_step_seconds": first,
        "seconds_per_step": seconds,
        "tokens_per_sec": tokens_per_sec,
        "mfu": tokens_per_sec * metrics.flops_per_token(config) / (peak * len(devices)),
    }


def attention_ms(kernel: str, length: int, tokens: int, repeats: int, mesh) -> float | str:
    """Milliseconds of one jitted causal forward + backward, or why the kernel could not run."""
    fn = attention.KERNELS[kernel].fn
    batch = max(1, tokens // length)
    key = jax.random.key(length)
    q, k, v = (jax.random.normal(jax.random.fold_in(key, i), (batch, length, 8, 64), jnp.bfloat16) for i in range(3))

    def loss(q, k, v):
        return fn(q, k, v, causal=True).astype(jnp.float32).sum()

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    try:
        with jax.set_mesh(mesh):
            jax.block_until_ready(step(q, k, v))
            if attention.running(kernel) != kernel:
                return attention.running(kernel)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                jax.block_until_ready(step(q, k, v))
                times.append(time.perf_counter() - start)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return 1e3 * statistics.median(times)


def auto_rows(fastest: dict[int, str]) -> list[list]:
    """[[longest length, kernel], ...] with the last length None: consecutive lengths won by one kernel merged."""
    rows: list[list] = []
    for length, kernel in sorted(fastest.items()):
        if rows and rows[-1][1] == kernel:
            rows[-1][0] = length
        else:
            rows.append([length, kernel])
    if rows:
        rows[-1][0] = None
    return rows


def attention_case(names: list[str], lengths, tokens: int, repeats: int) -> dict:
    config = _config(QUICK["sampling"], "xla", "bfloat16", 1)
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    ms = {name: {length: attention_ms(name, length, tokens, repeats, mesh) for length in lengths} for name in names}
    fastest = {}
    for length in lengths:
        timed = {name: ms[name][length] for name in names if isinstance(ms[name][length], float)}
        if timed:
            fastest[length] = min(timed, key=timed.get)
    return {
        "dtype": "bfloat16",
        "heads": 8,
        "head_dim": 64,
        "tokens_per_call": tokens,
        "lengths": list(lengths),
        "ms": ms,
        "fastest": fastest,
        "auto_rows": auto_rows(fastest),
    }


def _torch_device(platform_name: str):
    """The PyTorch device of the same kind as JAX's, or (None, why not)."""
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
        return None, "PyTorch or transformers is not importable here"
    import torch

    if platform_name == "cpu":
        return torch.device("cpu"), None
    if platform_name == "gpu" and torch.cuda.is_available():
        return torch.device("cuda"), None
    return None, f"PyTorch sees no {platform_name.upper()} here"


def sampling_case(shape: Shape, rounds: int, platform_name: str) -> dict:
    """Images/s of whole images with a KV cache, ours and (when PyTorch sees the same kind of device) Hugging Face's
    generate on the same weights."""
    dtype = "float32" if platform_name == "cpu" else "bfloat16"
    batch = shape.batch_per_device
    n = shape.side**2
    device, why_not = _torch_device(platform_name)
    row = {"model": shape.name, "batch": batch, "tokens_per_image": n, "dtype": dtype}
    hf = None
    if device is not None:
        import torch
        from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

        from igpt_jax import convert

        torch.manual_seed(0)
        hf_config = ImageGPTConfig(
            vocab_size=VOCAB + 1, n_positions=n, n_embd=shape.width, n_layer=shape.layers, n_head=shape.heads
        )
        hf = ImageGPTForCausalImageModeling(hf_config).eval()
        with tempfile.TemporaryDirectory() as folder:
            hf.save_pretrained(folder)
            model, config = convert.from_huggingface(folder)
        hf = hf.to(device=device, dtype=getattr(torch, dtype))
        from flax import nnx

        params_source = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    else:
        config = _config(shape, "auto", dtype, 1)
        params_source = None
    config.model.dtype = dtype
    config.mesh.ici = {"data": -1, "fsdp": 1, "sequence": 1, "tensor": 1}  # images over the devices
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    setup = steps.make_setup(config, mesh, train=False)
    if params_source is None:
        params = steps.init_state(setup)["params"]
    else:
        params = jax.device_put(params_source, setup.state_shardings["params"])
    sampler = sampling.make_sampler(setup, batch, top_k=0, num_colours=VOCAB)
    prompt, ids = np.zeros((batch, n), np.int32), np.arange(batch)

    def ours(seed: int) -> float:
        start = time.perf_counter()
        with jax.set_mesh(mesh):
            jax.block_until_ready(sampler(params, prompt, 0, ids, seed, 1.0))
        return time.perf_counter() - start

    sides = {"ours": ours}
    if hf is not None:
        import torch

        start_ids = torch.full((batch, 1), VOCAB, device=device)  # the SOS

        def hugging_face(seed: int) -> float:
            torch.manual_seed(seed)
            start = time.perf_counter()
            with torch.inference_mode():
                out = hf.generate(
                    start_ids, attention_mask=torch.ones_like(start_ids), max_new_tokens=n, do_sample=True, top_k=0,
                    use_cache=True, pad_token_id=VOCAB,
                )  # fmt: skip
            if device.type == "cuda":
                torch.cuda.synchronize()
            assert out.shape == (batch, n + 1)
            return time.perf_counter() - start

        sides["hugging_face"] = hugging_face
    first = {name: fn(0) for name, fn in sides.items()}  # compilation / warm-up
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(1, rounds + 1):
        for name, fn in sides.items():
            seconds[name].append(fn(r))
    images_per_sec = {name: batch / statistics.median(t) for name, t in seconds.items()}
    row |= {"first_call_seconds": first, "seconds": seconds, "images_per_sec": images_per_sec}
    if hf is None:
        return row | {"hugging_face": why_not}
    return row | {"ratio_ours_over_hugging_face": images_per_sec["ours"] / images_per_sec["hugging_face"]}


def _train_table(rows: list[dict]) -> list[str]:
    lines = ["| model | kernel | batch | step | tokens/s | MFU |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['kernel']} | {r['batch']} | {r['error'][:60]} | | |")
        else:
            lines.append(
                f"| {r['model']} | {r['ran']} | {r['batch']} | {1e3 * r['seconds_per_step']:.1f} ms | "
                f"{r['tokens_per_sec']:,.0f} | {100 * r['mfu']:.1f}% |"
            )
    return lines


def _attention_table(a: dict) -> list[str]:
    names = list(a["ms"])
    lines = ["| tokens | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for length in a["lengths"]:
        cells = [a["ms"][n][length] for n in names]
        lines.append(
            f"| {length:,} | " + " | ".join(f"{c:.2f} ms" if isinstance(c, float) else "-" for c in cells) + " |"
        )
    return lines


def _sampling_line(s: dict) -> list[str]:
    ratio = s.get("ratio_ours_over_hugging_face")
    return [
        f"Sampling {s['model']}, {s['batch']} images of {s['tokens_per_image']} tokens ({s['dtype']}): "
        + ", ".join(f"{k} {v:.2f} images/s" for k, v in s["images_per_sec"].items())
        + (f" ({ratio:.1f}x)" if ratio else f" (Hugging Face: {s['hugging_face']})")
    ]


SECTIONS = {"train": _train_table, "attention": _attention_table, "sampling": _sampling_line}


def markdown(result: dict) -> str:
    """The README's table: the device, then each part measured (train rows, the attention crossover, sampling)."""
    d = result["device"]
    lines = [f"{d['device_kind']} x {d['count']} ({d['platform']}), {result['date']}, jax {result['versions']['jax']}"]
    for part, section in SECTIONS.items():
        if part in result:
            lines += ["", *section(result[part])]
    return "\n".join(lines) + "\n"


PARTS = tuple(SECTIONS)  # measured in this order


def write_progress(result: dict, out: str | None) -> None:
    """The result so far to --out (`complete` false): a run cut short by a time limit keeps what it measured."""
    report.write(result | {"complete": False}, out)


def run(args: argparse.Namespace) -> dict:
    """The parts asked for, in order, each case written to --out as it ends."""
    plan = QUICK if args.quick else FULL
    load_before = os.getloadavg()
    start = time.perf_counter()
    device = jax.devices()[0]
    platform_name = device.platform
    peak, peak_source = metrics.peak_flops_per_device()
    names = kernels(platform_name)
    result = {
        "benchmark": "accelerator",
        "quick": args.quick,
        "parts": list(args.parts),
        "date": datetime.date.today().isoformat(),
        "device": {"platform": platform_name, "device_kind": device.device_kind, "count": jax.device_count()},
        "peak_flops": peak,
        "peak_source": peak_source,
        "kernels": names,
        "auto_now": {
            str(length): attention.resolve("auto", platform_name, 1, length, jnp.bfloat16) for length in plan["lengths"]
        },
        "versions": _versions(),
    }
    if "train" in args.parts:
        result["train"] = []
        for shape in plan["train"]:
            for kernel in names:
                result["train"].append(train_case(shape, kernel, args.steps, peak))
                write_progress(result, args.out)
    if "attention" in args.parts:
        result["attention"] = attention_case(names, plan["lengths"], plan["attention_tokens"], args.repeats)
        write_progress(result, args.out)
    if "sampling" in args.parts:
        result["sampling"] = sampling_case(plan["sampling"], args.rounds, platform_name)
    return result | {
        "complete": True,
        "seconds": time.perf_counter() - start,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpu_count": os.cpu_count(),
    }


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, every field: a check of the script")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"which to measure, in this order: {', '.join(PARTS)}")
    parser.add_argument("--steps", type=int, default=10, help="timed train steps per model and kernel")
    parser.add_argument("--repeats", type=int, default=10, help="timed attention calls per kernel and length")
    parser.add_argument("--rounds", type=int, default=2, help="timed sampling rounds per side")
    parser.add_argument("--out", default=None, help="the JSON, written after each case as well as at the end")
    parser.add_argument("--markdown", default=None, help="also write the README's table here")
    args = parser.parse_args(argv)
    args.parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)}; allowed: {', '.join(PARTS)}")
    if args.quick:
        args.steps, args.repeats, args.rounds = min(args.steps, 2), min(args.repeats, 3), 1
    return args


def main() -> None:
    args = arguments()
    result = run(args)
    if args.markdown:
        Path(args.markdown).write_text(markdown(result))
    report.emit(result, args.out)


def _versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ml-collections", "torch", "transformers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


if __name__ == "__main__":
    main()
