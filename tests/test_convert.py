"""Pretrained weights: OpenAI's TF1 checkpoints import with logits equal to an independent reference of OpenAI's
forward pass, Hugging Face -> ours -> Hugging Face keeps logits, config and clusters, an imported workdir runs the
modes with no training, and a checkpoint whose shapes do not fit its names stops in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from docs_commands import activated_env, checkout_like, command, commands, run_doc
from helpers import ROOT, TFDS_TEST_DIR, read_metrics
from tolerances import float32_chain, float32_pair, transformer_terms
from transformers import (
    ImageGPTConfig,
    ImageGPTForCausalImageModeling,
    ImageGPTForImageClassification,
    ImageGPTImageProcessor,
)

from igpt_jax import convert

SIDE, D, HEADS, LAYERS, VOCAB = 4, 32, 4, 2, 16

# --- OpenAI's checkpoints


def _openai_variables(rng: np.random.Generator, *, bert: bool, classes: int = 0) -> dict[str, np.ndarray]:
    """A random model in OpenAI's names and layouts (src/model.py), gains away from 1 so a dropped one shows."""

    def normal(*shape, scale=0.3):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    v = {"model/wte": normal(VOCAB, D), "model/wpe": normal(SIDE * SIDE, D), "model/wtet": normal(VOCAB, D)}
    v["model/ln_f/g"] = 1 + normal(D)
    if not bert:
        v["model/sos"] = normal(D)
    for i in range(LAYERS):
        for name in ("ln_1/g", "ln_2/g"):
            v[f"model/h{i}/{name}"] = 1 + normal(D)
        for name in ("q_proj", "k_proj", "v_proj", "c_proj"):
            v[f"model/h{i}/attn/{name}"] = normal(HEADS, D // HEADS, D)
        v[f"model/h{i}/mlp/c_fc/w"] = normal(D, 4 * D)
        v[f"model/h{i}/mlp/c_proj/w"] = normal(4 * D, D, scale=0.1)
    if classes:
        v["model/clf/wclf"] = normal(classes, D)
    return v


def _save_tf1(prefix, variables: dict[str, np.ndarray]) -> None:
    """A TF1 (V2 format) checkpoint with these names, plus the optimizer slots and counters OpenAI's files carry."""
    import tensorflow as tf

    extra = {f"{name}/Adam": np.zeros_like(value) for name, value in list(variables.items())[:3]}
    extra["global_step"] = np.array(1000, np.int64)
    everything = variables | extra
    names = sorted(everything)
    tf.raw_ops.SaveV2(
        prefix=str(prefix),
        tensor_names=names,
        shape_and_slices=[""] * len(names),
        tensors=[tf.constant(everything[n]) for n in names],
    )


def _openai_forward(v: dict[str, np.ndarray], tokens: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """OpenAI's model() in numpy, written from src/model.py: gen_logits [B, N, V]. `keep` (BERT): 1 where the input
    embedding is kept, 0 where masked."""

    def norm(x, g):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5) * g

    h = v["model/wte"][tokens]
    b, n = tokens.shape
    if keep is None:
        h = np.concatenate([np.broadcast_to(v["model/sos"], (b, 1, D)), h[:, :-1]], axis=1)
    else:
        h = h * keep[..., None]
    h = h + v["model/wpe"][:n]
    for i in range(LAYERS):
        p = f"model/h{i}/"
        x = norm(h, v[p + "ln_1/g"])
        q, k, val = (np.einsum("bsf,hef->bhse", x, v[p + f"attn/{w}_proj"]) for w in ("q", "k", "v"))
        w = q @ k.transpose(0, 1, 3, 2) / np.sqrt(D // HEADS)
        if keep is None:
            mask = np.tril(np.ones((n, n)))
            w = w * mask - 1e10 * (1 - mask)
        w = np.exp(w - w.max(-1, keepdims=True))
        a = (w / w.sum(-1, keepdims=True)) @ val
        h = h + np.einsum("bhse,hef->bsf", a, v[p + "attn/c_proj"])
        x = norm(h, v[p + "ln_2/g"])
        f = x @ v[p + "mlp/c_fc/w"]
        h = h + (f / (1 + np.exp(-1.702 * f))) @ v[p + "mlp/c_proj/w"]
    return norm(h, v["model/ln_f/g"]) @ v["model/wtet"].T


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_openai_checkpoint_logits_equal_openais_forward_pass(tmp_path, objective):
    rng = np.random.default_rng(0)
    variables = _openai_variables(rng, bert=objective == "bert", classes=3)
    _save_tf1(tmp_path / "model.ckpt-1000", variables)
    clusters = rng.uniform(-1, 1, (VOCAB, 3)).astype(np.float32)
    np.save(tmp_path / "kmeans_centers.npy", clusters)

    model, config, palette = convert.from_openai(tmp_path / "model.ckpt-1000", tmp_path / "kmeans_centers.npy")
    assert config.objective == objective  # inferred: an AR checkpoint has `sos`, a BERT one does not
    assert (config.model.num_layers, config.model.embed_dim, config.model.num_heads) == (LAYERS, D, HEADS)
    assert (config.model.image_size, config.model.vocab_size, config.model.num_classes) == (SIDE, VOCAB, 3)
    np.testing.assert_array_equal(palette, clusters)

    tokens = rng.integers(0, VOCAB, (3, SIDE * SIDE))
    keep = (rng.random(tokens.shape) > 0.15) if objective == "bert" else None
    exact = {name: value.astype(np.float64) for name, value in variables.items()}  # the reference, without rounding
    expected = _openai_forward(exact, tokens, keep)
    mask = None if keep is None else jnp.asarray(~keep)
    logits, out = model(jnp.asarray(tokens), mask=mask)
    assert np.abs(expected).max() > 1.0
    # Ours rounds in float32 along the whole network, then the head's sum of D terms.
    terms = transformer_terms(layers=LAYERS, width=D, head_dim=D // HEADS, positions=SIDE * SIDE)
    atol = float32_chain(terms + D, np.abs(expected).max())  # 4.4e-5 here; a machine gave 1.24e-5, this one 8.7e-6
    np.testing.assert_allclose(np.asarray(logits), expected, atol=atol, rtol=0)
    pooled = _openai_pooled(exact, tokens, keep)  # the head on the pooled ln_f output: OpenAI's clf_logits
    class_logits = pooled @ exact["model/clf/wclf"].T
    atol = float32_chain(terms + SIDE * SIDE + D, np.abs(class_logits).max())  # + the mean over positions
    np.testing.assert_allclose(np.asarray(out["class_logits"]), class_logits, atol=atol, rtol=0)


def _openai_pooled(v, tokens, keep):
    """mean over positions of ln_f's output, from the logits' pre-image: rerun the reference and stop before wtet."""
    wtet = v["model/wtet"]
    v = dict(v, **{"model/wtet": np.eye(D, dtype=v["model/wtet"].dtype)})  # identity head: logits = ln_f output
    out = _openai_forward(v, tokens, keep).mean(axis=1)
    v["model/wtet"] = wtet
    return out


def test_unknown_variables_are_named_with_their_shapes(tmp_path):
    variables = _openai_variables(np.random.default_rng(1), bert=False)
    variables["model/h1/attn/bias"] = np.zeros((D,), np.float32)
    _save_tf1(tmp_path / "model.ckpt-1", variables)
    with pytest.raises(convert.ConversionError, match=r"no place for: model/h1/attn/bias \(32,\)"):
        convert.from_openai(tmp_path / "model.ckpt-1")


def test_a_shape_that_does_not_fit_its_name_stops_in_one_line(tmp_path):
    variables = _openai_variables(np.random.default_rng(2), bert=False)
    variables["model/h1/mlp/c_fc/w"] = np.zeros((D, 3 * D), np.float32)
    _save_tf1(tmp_path / "model.ckpt-1", variables)
    result = subprocess.run(
        [sys.executable, "-m", "igpt_jax.convert", "--from=openai", f"--src={tmp_path / 'model.ckpt-1'}"]
        + [f"--workdir={tmp_path / 'w'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]  # after TensorFlow's start-up chatter, no traceback: one line
    assert "Traceback" not in result.stderr
    assert line.startswith("igpt: model/h1/mlp/c_fc/w has shape (32, 96) but ") and line.endswith("make it (32, 128)")
    assert not (tmp_path / "w").exists()


def _good_openai(folder) -> str:
    _save_tf1(folder / "model.ckpt-1", _openai_variables(np.random.default_rng(3), bert=False))
    np.save(folder / "kmeans_centers.npy", np.linspace(-1, 1, VOCAB * 3, dtype=np.float32).reshape(VOCAB, 3))
    return str(folder / "model.ckpt-1")


def _cut_in_half(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path) -> None:
    path.write_bytes(b"\xff\xfe" + np.random.default_rng(0).bytes(max(path.stat().st_size, 64)))  # not UTF-8


OPENAI_DAMAGES = {
    "data file truncated": (
        lambda d: _cut_in_half(next(d.glob("model.ckpt-1.data-*"))),
        r"variable \S+ cannot be read",
    ),
    "index file garbage": (lambda d: _garbage(d / "model.ckpt-1.index"), r"not a readable TensorFlow checkpoint"),
    "clusters not an npy": (lambda d: (d / "kmeans_centers.npy").write_text("{}"), r"--clusters: palette .*\.npy"),
}


@pytest.mark.parametrize("damage", sorted(OPENAI_DAMAGES))
def test_a_damaged_openai_input_is_named_and_nothing_is_written(tmp_path, damage):
    from igpt_jax.convert import __main__ as command

    src = _good_openai(tmp_path)
    breaks, message = OPENAI_DAMAGES[damage]
    breaks(tmp_path)
    args = command.parse(["--from=openai", f"--src={src}", f"--clusters={tmp_path / 'kmeans_centers.npy'}",
                          f"--workdir={tmp_path / 'w'}"])  # fmt: skip
    with pytest.raises(convert.ConversionError, match=message):
        command.run(args)
    assert not (tmp_path / "w").exists()


def test_a_truncated_openai_checkpoint_is_one_line_and_exit_2(tmp_path):
    src = _good_openai(tmp_path)
    _cut_in_half(next(tmp_path.glob("model.ckpt-1.data-*")))
    result = subprocess.run(
        [sys.executable, "-m", "igpt_jax.convert", "--from=openai", f"--src={src}", f"--workdir={tmp_path / 'w'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"igpt: {src}: variable ") and line.endswith(
        "the checkpoint's .data file is damaged or truncated"
    )
    assert not (tmp_path / "w").exists()


# --- Hugging Face


def _random_hf(cls=ImageGPTForCausalImageModeling, side: int = SIDE, **extra):
    torch.manual_seed(0)
    hf_config = ImageGPTConfig(
        vocab_size=VOCAB + 1, n_positions=side * side, n_embd=D, n_layer=LAYERS, n_head=HEADS, **extra
    )
    hf = cls(hf_config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
            elif name.endswith(("lm_head.weight", "score.weight")):
                p.copy_(0.3 * torch.randn_like(p))
            elif name.endswith("bias") and "attn.bias" not in name:
                p.zero_()  # OpenAI's weights carry none; HF initialises them to zero too
    return hf


def _hf_logits(hf, tokens: np.ndarray) -> np.ndarray:
    sos = np.full((len(tokens), 1), VOCAB)
    with torch.no_grad():
        return hf(torch.tensor(np.concatenate([sos, tokens[:, :-1]], axis=1))).logits.numpy()


def test_huggingface_round_trip_keeps_logits_config_and_clusters(tmp_path):
    hf = _random_hf()
    hf.save_pretrained(tmp_path / "hf")
    clusters = np.random.default_rng(3).uniform(-1, 1, (VOCAB, 3)).astype(np.float32)
    ImageGPTImageProcessor(clusters=clusters, size={"height": SIDE, "width": SIDE}).save_pretrained(tmp_path / "hf")

    from igpt_jax.convert import __main__ as cli

    cli.run(cli.parse(["--from=huggingface", f"--src={tmp_path / 'hf'}", f"--workdir={tmp_path / 'w'}"]))
    assert np.array_equal(np.load(tmp_path / "w" / "palette.npy"), clusters)
    cli.run(cli.parse(["--to=huggingface", f"--workdir={tmp_path / 'w'}", f"--out={tmp_path / 'back'}"]))

    back = ImageGPTForCausalImageModeling.from_pretrained(tmp_path / "back").eval()
    tokens = np.random.default_rng(4).integers(0, VOCAB, (3, SIDE * SIDE))
    expected = _hf_logits(hf, tokens)
    assert np.abs(expected).max() > 0.5
    np.testing.assert_array_equal(_hf_logits(back, tokens), expected)  # the same weights through the same PyTorch
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "layer_norm_epsilon"):
        assert getattr(back.config, key) == getattr(hf.config, key), key
    processor = ImageGPTImageProcessor.from_pretrained(tmp_path / "back")
    np.testing.assert_array_equal(np.asarray(processor.clusters), clusters)
    assert processor.size == {"height": SIDE, "width": SIDE}
    exported = (tmp_path / "back" / "model.safetensors").read_bytes()
    with pytest.raises(convert.ConversionError, match="already holds config.json, model.safetensors"):
        convert.to_huggingface(tmp_path / "w", tmp_path / "back")  # an existing export is never overwritten
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == exported


def test_huggingface_classification_head_becomes_the_finetune_head(tmp_path):
    hf = _random_hf(ImageGPTForImageClassification, num_labels=5)
    hf.save_pretrained(tmp_path)
    model, config = convert.from_huggingface(tmp_path)
    assert config.model.num_classes == 5
    tokens = np.random.default_rng(5).integers(0, VOCAB, (3, SIDE * SIDE))
    with torch.no_grad():
        expected = hf(torch.tensor(np.concatenate([np.full((3, 1), VOCAB), tokens[:, :-1]], axis=1))).logits.numpy()
    _, out = model(jnp.asarray(tokens))
    # ours (XLA) and PyTorch's float32: the blocks' sums, the mean over positions and the head's D terms
    terms = transformer_terms(layers=LAYERS, width=D, head_dim=D // HEADS, positions=SIDE * SIDE) + SIDE * SIDE + D
    atol = float32_pair(terms, np.abs(expected).max())
    np.testing.assert_allclose(np.asarray(out["class_logits"]), expected, atol=atol, rtol=0)


def test_an_import_never_writes_into_a_workdir_that_holds_checkpoints(tmp_path):
    hf = _random_hf()
    hf.save_pretrained(tmp_path / "hf")
    model, config = convert.from_huggingface(tmp_path / "hf")
    clusters = np.random.default_rng(6).uniform(-1, 1, (VOCAB, 3)).astype(np.float32)
    convert.write_workdir(model, config, clusters, str(tmp_path / "w"))
    before = {p: p.read_bytes() for p in (tmp_path / "w").rglob("*") if p.is_file() and "lock" not in p.name}
    with pytest.raises(convert.ConversionError, match="already holds checkpoints: nothing was written"):
        convert.write_workdir(model, config, clusters[::-1].copy(), str(tmp_path / "w"))
    after = {p: p.read_bytes() for p in (tmp_path / "w").rglob("*") if p.is_file() and "lock" not in p.name}
    assert after == before


HF_DAMAGES = {
    "config.json not JSON": (
        lambda d: (d / "config.json").write_text('{"n_embd": 32,'),
        r"config.json: not a JSON file",
    ),
    "config.json binary": (lambda d: _garbage(d / "config.json"), r"config.json: not a JSON file \(UnicodeDecodeError"),
    "safetensors garbage": (lambda d: _garbage(d / "model.safetensors"), r"not a readable safetensors file"),
    "safetensors truncated": (lambda d: _cut_in_half(d / "model.safetensors"), r"not a readable safetensors file"),
    "preprocessor not JSON": (
        lambda d: _cut_in_half(d / "preprocessor_config.json"),
        r"preprocessor_config.json: not a JSON file",
    ),
}


@pytest.mark.parametrize("damage", sorted(HF_DAMAGES))
def test_a_damaged_huggingface_folder_is_named_and_nothing_is_written(tmp_path, damage):
    from igpt_jax.convert import __main__ as command

    hf = _random_hf()
    hf.save_pretrained(tmp_path / "hf")
    clusters = np.linspace(-1, 1, VOCAB * 3, dtype=np.float32).reshape(VOCAB, 3)
    ImageGPTImageProcessor(clusters=clusters, size={"height": SIDE, "width": SIDE}).save_pretrained(tmp_path / "hf")
    breaks, message = HF_DAMAGES[damage]
    breaks(tmp_path / "hf")
    args = command.parse(["--from=huggingface", f"--src={tmp_path / 'hf'}", f"--workdir={tmp_path / 'w'}"])
    with pytest.raises(convert.ConversionError, match=message):
        command.run(args)
    assert not (tmp_path / "w").exists()


def test_a_hub_id_for_src_is_one_line_saying_to_download_it_first(tmp_path, monkeypatch):
    result = subprocess.run(
        [sys.executable, "-m", "igpt_jax.convert", "--from=huggingface", "--src=openai/imagegpt-small",
         f"--workdir={tmp_path / 'w'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "igpt: --src=openai/imagegpt-small is not a folder here but looks like a Hugging Face Hub id: download it "
        "first (huggingface-cli download openai/imagegpt-small --local-dir DIR) and pass --src=DIR"
    ]
    assert not (tmp_path / "w").exists()
    from igpt_jax.convert.__main__ import looks_like_a_hub_id

    (tmp_path / "openai" / "imagegpt-small").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not looks_like_a_hub_id("openai/imagegpt-small")  # a folder of that name here is the folder
    assert not looks_like_a_hub_id("/abs/path") and not looks_like_a_hub_id("./a") and not looks_like_a_hub_id("a")


# --- The docs' commands (docs/weights.md), run as written with a test's sizes after them


@pytest.mark.slow  # about a minute: an import and four modes, each its own process
def test_openais_weights_walk_through(tmp_path):
    """OpenAI's files where the docs put them, imported by the docs' command, then eval, probe, sample and finetune by
    theirs, with no training: the held-out loss is OpenAI's own forward pass's (float64) on the same test images
    quantized with OpenAI's clusters. The docs' data set (cifar10) would be downloaded: the test names Fashion-MNIST's,
    read from the test data folder, and sizes the evaluators to a few images; the model's shape comes from the
    checkpoint, as the docs say."""
    here = checkout_like(tmp_path / "checkout")
    (here / "downloads").mkdir()
    variables = _openai_variables(np.random.default_rng(3), bert=False)
    _save_tf1(here / "downloads" / "model.ckpt-1000000", variables)
    clusters = np.random.default_rng(4).uniform(-1, 1, (VOCAB, 3)).astype(np.float32)
    np.save(here / "downloads" / "kmeans_centers.npy", clusters)
    env = activated_env()
    imported = run_doc(command("igpt_jax.convert --from=openai"), here, "--dataset=fashion_mnist", env=env)
    assert imported.returncode == 0, imported.stderr[-3000:]
    workdir = here / "workdir" / "igpt_s"
    assert imported.stdout.strip().endswith(str(Path("workdir") / "igpt_s" / "checkpoints" / "0"))

    data = [f"--config.data.data_dir={TFDS_TEST_DIR}", "--config.data.eval_split=test"]
    sizes = {
        "eval": ["--config.evals.eval.examples=32"],
        "probe": [
            "--config.evals.probe.dataset=fashion_mnist",
            "--config.evals.probe.train_examples=100",
            "--config.evals.probe.test_examples=50",
            "--config.evals.probe.baselines=False",
        ],
        "sample": ["--config.evals.samples.num_images=2", "--config.evals.samples.completion_images=1"],
        "finetune": [
            "--config.finetune.dataset=fashion_mnist",
            "--config.finetune.steps=2",
            "--config.finetune.warmup_steps=1",
            "--config.finetune.eval_every_steps=1",
            "--config.finetune.checkpoint_every_steps=1",
            "--config.finetune.heldout_examples=32",
            "--config.finetune.test_examples=32",
        ],
    }
    modes = commands("--config=configs/igpt_s.py --workdir=workdir/igpt_s")
    assert [doc.argv()[3].split("=")[1] for doc in modes] == list(sizes)
    for doc, (mode, flags) in zip(modes, sizes.items(), strict=True):
        result = run_doc(doc, here, *data, *flags, env=env)
        assert result.returncode == 0, (mode, result.stderr[-3000:])
    rows = read_metrics(workdir)
    assert [r["mode"] for r in rows] == ["eval", "probe", "sample"] and all(r["step"] == 0 for r in rows)
    assert json.loads((workdir / "probe.json").read_text())["checkpoint_step"] == 0
    assert (workdir / "samples" / "step_00000000.png").exists()
    assert "finetune: test accuracy " in result.stdout

    reference, scale = _openai_loss(variables, _openai_tokens(clusters, examples=32))
    terms = transformer_terms(layers=LAYERS, width=D, head_dim=D // HEADS, positions=SIDE * SIDE) + VOCAB + 32 * 16
    assert abs(rows[0]["loss"] - reference) <= float32_chain(terms, scale), (rows[0]["loss"], reference)


@pytest.mark.slow  # about 30 s: an import and an evaluation, each its own process
def test_openais_published_loss_walk_through(tmp_path):
    """The README's check of OpenAI's figures: OpenAI's checkpoint, clusters and pre-quantized test array where
    download.py puts them, imported and evaluated on that array by the README's commands. The loss is OpenAI's own
    forward pass's (float64) on those tokens (here Fashion-MNIST test images quantized with the clusters: OpenAI's
    ImageNet array would be downloaded)."""
    here = checkout_like(tmp_path / "checkout")
    downloads = here / "downloads"
    downloads.mkdir()
    variables = _openai_variables(np.random.default_rng(3), bert=False)
    _save_tf1(downloads / "model.ckpt-1000000", variables)
    clusters = np.random.default_rng(4).uniform(-1, 1, (VOCAB, 3)).astype(np.float32)
    np.save(downloads / "kmeans_centers.npy", clusters)
    tokens = _openai_tokens(clusters, examples=40)
    np.save(downloads / "imagenet_teX.npy", tokens.astype(np.uint16))  # download.py's layout, narrow integers
    np.save(downloads / "imagenet_teY.npy", np.eye(1000, dtype=np.float32)[np.arange(40)])
    env = activated_env()
    imported, evaluated = commands("--workdir=workdir/openai_s")
    assert imported.text.startswith(".venv/bin/igpt-convert --from=openai")
    result = run_doc(imported, here, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_doc(evaluated, here, "--config.evals.eval.examples=32", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = read_metrics(here / "workdir" / "openai_s")
    assert f"eval step 0: {row['loss']:.4f} nats" in result.stdout
    assert "on 32 images of openai_imagenet test" in result.stdout

    reference, scale = _openai_loss(variables, tokens[:32])
    terms = transformer_terms(layers=LAYERS, width=D, head_dim=D // HEADS, positions=SIDE * SIDE) + VOCAB + 32 * 16
    assert abs(row["loss"] - reference) <= float32_chain(terms, scale), (row["loss"], reference)


def _openai_tokens(clusters: np.ndarray, examples: int) -> np.ndarray:
    """The first Fashion-MNIST test images at SIDE x SIDE, quantized with `clusters`: [examples, SIDE * SIDE]."""
    from igpt_jax import sampling
    from igpt_jax.configs import fashion_mnist
    from igpt_jax.data import get_source

    config = fashion_mnist.get_config(str(SIDE))
    config.data.data_dir = TFDS_TEST_DIR
    return np.asarray(sampling.held_out_tokens(config, get_source(config), clusters, examples))


def _openai_loss(variables: dict[str, np.ndarray], tokens: np.ndarray) -> tuple[float, float]:
    """OpenAI's forward pass's float64 mean next-token loss on `tokens`, and the scale of the sums behind it (the
    largest |logit| or the loss)."""
    logits = _openai_forward({k: v.astype(np.float64) for k, v in variables.items()}, tokens)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    loss = float(-np.take_along_axis(log_probs, tokens[..., None], axis=-1).mean())
    return loss, max(float(np.abs(logits).max()), loss)


def test_a_hugging_face_folder_imports_as_the_docs_say(tmp_path):
    """`--src=imagegpt-small`: a folder as `huggingface_hub.snapshot_download` leaves it (weights, config and the
    image processor's clusters), here a small random one."""
    here = checkout_like(tmp_path / "checkout")
    _random_hf().save_pretrained(here / "imagegpt-small")
    clusters = np.random.default_rng(3).uniform(-1, 1, (VOCAB, 3)).astype(np.float32)
    ImageGPTImageProcessor(clusters=clusters, size={"height": SIDE, "width": SIDE}).save_pretrained(
        here / "imagegpt-small"
    )
    result = run_doc(command("--src=imagegpt-small"), here, env=activated_env())
    assert result.returncode == 0, result.stderr[-3000:]
    workdir = here / "workdir" / "hf_small"
    assert (workdir / "checkpoints" / "0").is_dir()
    assert np.array_equal(np.load(workdir / "palette.npy"), clusters)  # "clusters included"
