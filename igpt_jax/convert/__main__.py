"""`igpt-convert` (or `python -m igpt_jax.convert`): pretrained weights into a workdir, or a workdir to Hugging Face.

    igpt-convert --from=openai --src=DIR/model.ckpt-1000000 --clusters=kmeans_centers.npy --workdir=W
    igpt-convert --from=huggingface --src=HF_FOLDER [--clusters=...] --workdir=W
    igpt-convert --to=huggingface --workdir=W --out=HF_FOLDER

An imported workdir holds checkpoint 0, config.json and palette.npy: --mode=eval, probe, sample and finetune use it
as is, and --mode=train continues from it. Problems end in one line naming the variable, file or key (exit 2).
"""

from __future__ import annotations

import argparse
import os
import sys

IMPORTERS = ("openai", "huggingface")
EXPORTERS = ("huggingface",)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="igpt-convert", description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", choices=IMPORTERS, help="import weights of this kind into --workdir")
    parser.add_argument("--to", dest="target", choices=EXPORTERS, help="export --workdir's newest checkpoint")
    parser.add_argument("--src", help="OpenAI: the checkpoint prefix (model.ckpt-N); Hugging Face: the folder")
    parser.add_argument("--clusters", help="kmeans_centers.npy (OpenAI; a Hugging Face folder may carry its own)")
    parser.add_argument("--objective", choices=("ar", "bert"), help="OpenAI: override the inferred objective")
    parser.add_argument("--dataset", help="the recipe's data set (config.data.dataset), e.g. cifar10")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", help="--to: the folder to write")
    args = parser.parse_args(argv)
    if (args.source is None) == (args.target is None):
        parser.error("give exactly one of --from=openai|huggingface (import) and --to=huggingface (export)")
    if args.source and not args.src:
        parser.error(f"--from={args.source} needs --src")
    if args.target and not args.out:
        parser.error("--to=huggingface needs --out")
    if args.source == "huggingface" and looks_like_a_hub_id(args.src):
        parser.exit(2, f"igpt: --src={args.src} is not a folder here but looks like a Hugging Face Hub id: download it "
                       f"first (huggingface-cli download {args.src} --local-dir DIR) and pass --src=DIR\n")  # fmt: skip
    return args


def looks_like_a_hub_id(src: str) -> bool:
    """'openai/imagegpt-small': owner/name, not a path that exists here."""
    parts = src.split("/")
    return len(parts) == 2 and all(parts) and not src.startswith(".") and not os.path.exists(src)


def run(args: argparse.Namespace) -> str:
    """Does what the flags say; returns the line to print."""
    from igpt_jax import config_checks, convert
    from igpt_jax.convert.common import load_clusters

    if args.target:
        return f"igpt: wrote {convert.to_huggingface(args.workdir, args.out)}"
    if args.source == "openai":
        model, config, clusters = convert.from_openai(args.src, args.clusters, objective=args.objective)
    else:
        model, config = convert.from_huggingface(args.src)
        clusters = load_clusters(args.clusters) if args.clusters else convert.clusters_from_huggingface(args.src)
    if args.dataset:
        config.data.dataset = args.dataset
    config_checks.check(config)
    checkpoint = convert.write_workdir(model, config, clusters, args.workdir)
    m = config.model
    return (
        f"igpt: {args.source} {config.objective} model ({m.num_layers} layers, width {m.embed_dim}, {m.num_heads} "
        f"heads, {m.image_size}x{m.image_size}, {m.vocab_size} colours) -> {checkpoint}"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    from igpt_jax import errors

    try:
        line = run(args)
    except (errors.IgptError, *errors.BUILTIN) as e:
        print(f"igpt: {errors.line(e)}", file=sys.stderr, flush=True)
        os._exit(errors.exit_code(e))
    print(line, flush=True)


if __name__ == "__main__":
    main()
