"""Sampling: cached decoding reproduces the full forward pass, greedy is the full model's argmax, the palette's
missing colours are never drawn, images depend on the seed alone (not on devices or sharding), completions keep what
was given, and --mode=sample's grids hold Hugging Face's greedy tokens."""

from __future__ import annotations

import io
import json
import time

import hf_reference
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import TFDS_TEST_DIR, cli_flags, fashion_config, override, read_metrics, run_main, tiny_config
from PIL import Image
from tolerances import float32_chain, float32_pair, transformer_terms

from igpt_jax import defaults, plots, sampling, sharding, steps
from igpt_jax import model as model_lib
from igpt_jax.data import get_source, sources
from igpt_jax.evaluators import base


def _with_random_head(model: model_lib.IGPT, scale: float = 0.3) -> model_lib.IGPT:
    """OpenAI's head starts at zero (every logit equal): give it weights so the logits say something."""
    model.head[...] = scale * jax.random.normal(jax.random.key(7), model.head.shape)
    return model


@pytest.mark.parametrize("side", [5, 28])
def test_cached_logits_equal_the_full_forward_pass_at_every_position(side):
    config = tiny_config(image_size=side)
    model = _with_random_head(model_lib.build(config))
    tokens = jax.random.randint(jax.random.key(1), (3, side * side), 0, config.model.vocab_size)
    full, _ = model(tokens)

    @nnx.jit
    def teacher_forced(model, tokens):
        def position(i, block, cache, logits):
            previous = jnp.where(i > 0, tokens[:, i - 1], 0)
            step_logits, cache = model.decode_step(previous, cache, i, block)
            return cache, jax.lax.dynamic_update_index_in_dim(logits, step_logits, i, 1)

        return sampling.over_positions(model, 3, side * side, position, jnp.zeros_like(full))

    cached = teacher_forced(model, tokens)
    assert np.abs(full).max() > 1.0  # logits of a size where rounding is a real bound
    # one position at a time against all at once: the same sums, blocked differently (the head sums embed_dim terms)
    m = config.model
    terms = transformer_terms(layers=m.num_layers, width=m.embed_dim, head_dim=m.embed_dim // m.num_heads,
                              positions=side * side) + m.embed_dim  # fmt: skip
    np.testing.assert_allclose(cached, full, atol=float32_pair(terms, np.abs(full).max()), rtol=0)


def _setup(config, devices):
    mesh = sharding.make_mesh(config, devices)
    return steps.make_setup(config, mesh, train=False), mesh


def _params(setup, head_scale: float = 0.3, favour_missing: bool = False):
    """config.seed's model with a random head, laid out in setup's shards. `favour_missing`: the last half of the
    vocabulary (colours a small palette lacks) gets head columns +-20 e_i, so one of them has the largest logit
    wherever one of ln_f's first components is not tiny."""
    model = _with_random_head(model_lib.build(setup.config), head_scale)
    if favour_missing:
        vocab, d = setup.config.model.vocab_size, setup.config.model.embed_dim
        half = vocab // 2
        signs = 20.0 * np.where(np.arange(half) % 2, -1.0, 1.0)
        columns = np.zeros((d, half), np.float32)
        columns[np.arange(half) // 2, np.arange(half)] = signs
        model.head[...] = model.head[...].at[:, half:].set(columns)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return jax.device_put(params, setup.state_shardings["params"])


def _sample(config, devices=None, *, batch=8, given=0, prompt=None, seed=0, temperature=1.0, top_k=0, colours=16):
    setup, mesh = _setup(config, devices or jax.devices()[:1])
    params = _params(setup)
    sampler = sampling.make_sampler(setup, batch, top_k=top_k, num_colours=colours)
    length = defaults.tokens_per_image(config)
    prompt = np.zeros((batch, length), np.int32) if prompt is None else prompt
    with jax.set_mesh(mesh):
        tokens = sampler(params, prompt, given, np.arange(batch), seed, temperature)
    return np.asarray(tokens), setup, params


def test_greedy_is_the_full_models_argmax_at_every_position():
    config = tiny_config(image_size=6)
    tokens, setup, params = _sample(config, temperature=0.0, colours=10)
    logits, _ = nnx.merge(setup.graphdef, params)(jnp.asarray(tokens))
    masked = np.where(np.arange(16) < 10, np.asarray(logits), -np.inf)
    np.testing.assert_array_equal(tokens, masked.argmax(-1))
    assert len(np.unique(tokens)) > 1  # a model that says something, not a constant image


def test_colours_the_palette_lacks_are_never_drawn():
    """Half the vocabulary has no colour; the head favours exactly those tokens, so only the mask keeps them out."""
    config = tiny_config(image_size=6)
    setup, mesh = _setup(config, jax.devices()[:1])
    params = _params(setup, favour_missing=True)
    logits, _ = nnx.merge(setup.graphdef, params)(jnp.zeros((1, 36), jnp.int32))
    assert (np.asarray(logits).argmax(-1) >= 8).all()  # unmasked, the missing colours would win everywhere
    sampler = sampling.make_sampler(setup, 8, top_k=0, num_colours=8)
    with jax.set_mesh(mesh):
        tokens = np.asarray(sampler(params, np.zeros((8, 36), np.int32), 0, np.arange(8), 0, 1.0))
    assert tokens.max() < 8


@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, 0), (0.5, 0), (2.0, 3)])
def test_draws_follow_softmax_of_logits_over_temperature_within_the_top_k(temperature, top_k):
    """40,000 draws from one row of logits: each colour's frequency is its probability under softmax(logits / T),
    renormalised over the top_k and over the palette's colours (the last one is missing), within 5 standard errors;
    colours outside either get none."""
    logits = jnp.array([2.0, 0.5, -1.0, 1.5, 0.0, -3.0, 3.0], jnp.float32)
    n, colours = 40_000, 6
    keys = jax.random.split(jax.random.key(3), n)
    tokens = sampling.choose(
        jnp.broadcast_to(logits, (n, 7)), keys, jnp.float32(temperature), top_k=top_k, num_colours=colours
    )
    kept = np.asarray(logits[:colours])
    if top_k:
        kept = np.where(kept >= np.sort(kept)[-top_k], kept, -np.inf)
    p = np.exp((kept - kept.max()) / temperature)
    p = np.concatenate([p / p.sum(), [0.0]])
    freq = np.bincount(np.asarray(tokens), minlength=7) / n
    assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n)), (freq, p)


def test_the_same_seed_gives_the_same_images_on_1_and_8_devices_with_params_sharded():
    config = tiny_config(image_size=6)
    one, *_ = _sample(config, jax.devices()[:1], seed=3)
    fsdp = override(tiny_config(image_size=6), mesh__ici={"data": 1, "fsdp": 8, "tensor": 1})
    eight, setup, params = _sample(fsdp, jax.devices(), seed=3)
    assert "fsdp" in str(params["wte"].sharding.spec)  # the embedding really is split 8 ways
    np.testing.assert_array_equal(one, eight)
    other, *_ = _sample(config, jax.devices()[:1], seed=4)
    assert (other != one).mean() > 0.3  # a different seed draws different images


def test_draws_from_rows_of_very_different_scale_follow_each_rows_softmax():
    """softmax is shift-invariant, and so must the draw be: rows of logits near +1000 and near -1000 (exp of either
    overflows or underflows float32) in one batch each follow softmax, 3 to 1, within 5 standard errors."""
    n = 20_000
    row = jnp.array([0.0, np.log(3.0), -np.inf], jnp.float32)  # the third has no colour
    logits = jnp.concatenate([jnp.broadcast_to(row + 1000, (n, 3)), jnp.broadcast_to(row - 1000, (n, 3))])
    keys = jax.random.split(jax.random.key(4), 2 * n)
    tokens = np.asarray(sampling.choose(logits, keys, jnp.float32(1.0), top_k=0, num_colours=2))
    for half in (tokens[:n], tokens[n:]):
        assert set(np.unique(half)) <= {0, 1}
        assert abs(np.mean(half == 1) - 0.75) <= 5 * np.sqrt(0.75 * 0.25 / n), np.mean(half == 1)


@pytest.mark.parametrize(("uniform", "expected"), [(0.0, 1), (np.nextafter(np.float32(1), np.float32(0)), 3)])
def test_a_uniform_at_either_end_of_its_range_draws_a_kept_token(monkeypatch, uniform, expected):
    """Tokens 0 and 4 are outside the top 3 (weight 0): a draw of exactly 0 takes the first token kept (1), one just
    below 1 the last (3); never a token the filter removed."""
    monkeypatch.setattr(jax.random, "uniform", lambda key: jnp.float32(uniform))
    logits = jnp.array([[-3.0, 1.0, 0.5, 2.0, -4.0]], jnp.float32)
    token = sampling.choose(logits, jax.random.split(jax.random.key(0), 1), jnp.float32(1.0), top_k=3, num_colours=5)
    assert int(token[0]) == expected


def test_an_image_depends_on_its_index_not_on_the_batch_it_was_drawn_in():
    """16 images drawn 8 at a time (generate's two calls) are the 16 drawn at once: each image's randomness comes from
    its index, so the second call does not repeat the first's draws."""
    config = tiny_config(image_size=5)
    setup, mesh = _setup(config, jax.devices()[:1])
    params = _params(setup)
    prompts, ids = np.zeros((16, 25), np.int32), np.arange(16)
    with jax.set_mesh(mesh):
        by_eight = sampling.generate(
            sampling.make_sampler(setup, 8, top_k=0, num_colours=16), params, prompts, 0, ids, 0, 1.0
        )
        at_once = sampling.generate(
            sampling.make_sampler(setup, 16, top_k=0, num_colours=16), params, prompts, 0, ids, 0, 1.0
        )
    np.testing.assert_array_equal(by_eight, at_once)
    assert (at_once[8:] != at_once[:8]).mean() > 0.3


def test_top_1_is_greedy_and_completions_keep_what_was_given():
    config = tiny_config(image_size=6)
    prompt = np.asarray(jax.random.randint(jax.random.key(5), (8, 36), 0, 16), np.int32)
    greedy, *_ = _sample(config, prompt=prompt, given=18, temperature=0.0)
    top1, *_ = _sample(config, prompt=prompt, given=18, temperature=1.0, top_k=1)
    np.testing.assert_array_equal(top1, greedy)
    np.testing.assert_array_equal(greedy[:, :18], prompt[:, :18])
    drawn, *_ = _sample(config, prompt=prompt, given=18)
    np.testing.assert_array_equal(drawn[:, :18], prompt[:, :18])
    assert (drawn[:, 18:] != greedy[:, 18:]).any()


def test_completion_grid_layout():
    originals = np.zeros((2, 4, 4, 3), np.uint8) + np.arange(2, dtype=np.uint8)[:, None, None, None] * 100
    completions = np.full((6, 4, 4, 3), 200, np.uint8)
    png = sampling.completion_grid(originals, completions, given_rows=1)
    grid = np.asarray(Image.open(io.BytesIO(png)))
    scale, gap = sampling._scale(4), 2
    cell = 4 * scale + gap
    assert grid.shape[:2] == (2 * cell + gap, 5 * cell + gap)  # given | 3 completions | original

    def pixel(row, col, y):
        return grid[gap + row * cell + y * scale, gap + col * cell, 0]

    assert pixel(1, 0, 0) == 100 and pixel(1, 0, 1) == sampling.MASKED_GREY  # the given top row, the rest grey
    assert pixel(1, 2, 3) == 200 and pixel(1, 4, 3) == 100  # a completion, then the whole original


def _grid_tokens(png: bytes, clusters: np.ndarray, side: int) -> np.ndarray:
    """Tokens [rows, cols, side * side] read back from a grid's pixels: each cell's palette colour, by exact match;
    -1 where a pixel is no palette colour (a blank cell, the grey of what a completion was not given)."""
    colours = sampling.render(np.arange(len(clusters))[None], clusters, len(clusters)).reshape(-1, 3)
    assert len(np.unique(colours, axis=0)) == len(clusters)  # every colour names one token
    grid = np.asarray(Image.open(io.BytesIO(png)))[..., :3]
    scale, cell = sampling._scale(side), side * sampling._scale(side) + plots.GRID_GAP
    rows, cols = (grid.shape[0] - plots.GRID_GAP) // cell, (grid.shape[1] - plots.GRID_GAP) // cell
    corners = plots.GRID_GAP + np.arange(side) * scale
    out = np.zeros((rows, cols, side * side), np.int64)
    for r in range(rows):
        for c in range(cols):
            pixels = grid[r * cell + corners[:, None], c * cell + corners[None, :]].reshape(-1, 1, 3)
            match = (pixels == colours[None]).all(-1)
            out[r, c] = np.where(match.any(-1), match.argmax(-1), -1)
    return out


def _assert_argmax_of_hugging_face(hf, tokens: np.ndarray, start: int, model: dict) -> None:
    """Each of tokens [n, N] from position `start` on is Hugging Face's float64 argmax given the tokens before it,
    to within the float32 error of both logits compared."""
    logits = hf_reference.next_token_logits(hf, tokens)[:, start:]
    chosen = np.take_along_axis(logits, tokens[:, start:, None], axis=-1)[..., 0]
    width, positions = model["embed_dim"], tokens.shape[1]
    terms = transformer_terms(layers=model["num_layers"], width=width, head_dim=width // model["num_heads"],
                              positions=positions)  # fmt: skip
    slack = 2 * float32_chain(terms, np.abs(logits).max())
    assert (chosen >= logits.max(-1) - slack).all(), np.argwhere(chosen < logits.max(-1) - slack)[:5]


@pytest.mark.slow  # 45 s: 40 steps (a model whose greedy choice depends on the context), then the mode
def test_mode_sample_draws_hugging_faces_argmax_and_completes_the_given_rows_of_held_out_images(tmp_path):
    """Greedy --mode=sample on a trained checkpoint, read back from its PNG grids: every drawn token is Hugging
    Face's argmax (float64, the exported checkpoint) given the tokens before it, and each completion starts from
    the top half of the eval split's image it stands beside."""
    workdir = tmp_path / "run"
    flags = cli_flags(image_size=8, embed_dim=32, total_steps=40, eval_every=40, checkpoint_every=40, warmup=5)
    trained = run_main(f"--workdir={workdir}", *flags)
    assert trained.returncode == 0, trained.stderr[-3000:]
    sample = ["--config.evals.samples.num_images=3", "--config.evals.samples.completion_images=2"]
    sample += ["--config.evals.samples.completions_per_image=2", "--config.evals.samples.temperature=0"]
    sampled = run_main(
        f"--workdir={workdir}",
        "--mode=sample",
        "--config=configs/fashion_mnist.py:8",
        *sample,
        f"--config.data.data_dir={TFDS_TEST_DIR}",
    )
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    grids = [workdir / "samples" / name for name in ("step_00000040.png", "step_00000040_completions.png")]
    last = sampled.stdout.splitlines()[-1]
    assert last.startswith("samples step 40: 7 images at ") and last.endswith(f" -> {', '.join(map(str, grids))}")
    rows = [r for r in read_metrics(workdir) if r.get("mode") == "sample"]
    assert [r["step"] for r in rows] == [40] and rows[0]["images"] == 3 + 2 * 2 and rows[0]["images_per_sec"] > 0

    clusters = np.load(workdir / "palette.npy")
    free = _grid_tokens(grids[0].read_bytes(), clusters, 8).reshape(-1, 64)  # 3 images: 2 rows of 2, one blank
    assert (free[:3] >= 0).all() and (free[3] == -1).all()
    free = free[:3]
    completed = _grid_tokens(grids[1].read_bytes(), clusters, 8)  # per image: given | 2 completions | original
    assert completed.shape[:2] == (2, 1 + 2 + 1)
    recipe = fashion_config(image_size=8)
    originals = sampling.held_out_tokens(recipe, get_source(recipe), clusters, 2)
    np.testing.assert_array_equal(completed[:, -1], originals)
    np.testing.assert_array_equal(completed[:, 0, :32], originals[:, :32])  # the given half, the rest grey
    assert (completed[:, 0, 32:] == -1).all()
    completions = completed[:, 1:3].reshape(4, 64)
    np.testing.assert_array_equal(completions[:, :32], np.repeat(originals[:, :32], 2, axis=0))

    hf = hf_reference.export(workdir, tmp_path / "hf")
    model = json.loads((workdir / "config.json").read_text())["model"]
    _assert_argmax_of_hugging_face(hf, free, 0, model)
    _assert_argmax_of_hugging_face(hf, completions, 32, model)


def test_a_bert_checkpoint_is_refused_in_one_line(tmp_path):
    from igpt_jax import convert

    config = override(tiny_config(image_size=8, objective="bert"), data__dataset="fashion_mnist")
    workdir = tmp_path / "bert"
    convert.write_workdir(model_lib.build(config), config, np.linspace(-1, 1, 48).reshape(16, 3), str(workdir))
    result = run_main(f"--workdir={workdir}", "--mode=sample", "--config=configs/fashion_mnist.py:8")
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("igpt: bad config: config.evals.samples (samples) needs a left-to-right model, and "), last
    assert "config.objective='bert': only ['ar'] models can be sampled" in last  # the checkpoint's, not the file's


def test_a_completion_is_given_the_top_rows_of_its_image_and_draws_the_rest(monkeypatch):
    """The sample evaluator hands the sampler `completion` of the image's rows (given_rows x side tokens), not as
    many tokens as rows: every completion's top rows are its original's, its other rows drawn."""
    from types import SimpleNamespace

    from igpt_jax import evaluators
    from igpt_jax.data import sources
    from igpt_jax.evaluators.kinds import sample

    config = override(tiny_config(image_size=6), data__dataset="synthetic", data__eval_split="test")
    setup, mesh = _setup(config, jax.devices()[:1])
    entry = evaluators.sample(num_images=0, completion_images=2, completions_per_image=3, completion=0.5)
    rt = SimpleNamespace(config=config, mesh=mesh, setup=setup, clusters=None, source=sources.Synthetic(config))
    drawn = {}
    monkeypatch.setattr(sampling, "completion_grid", lambda o, c, rows: drawn.update(o=o, c=c, rows=rows) or b"")
    with jax.set_mesh(mesh):
        sample.Evaluator("samples", entry, rt).draw(_params(setup), 1, lambda: False)
    originals, completions = np.repeat(drawn["o"], 3, axis=0), drawn["c"]
    assert drawn["rows"] == 3 and completions.shape == originals.shape == (6, 6, 6, 3)
    np.testing.assert_array_equal(completions[:, :3], originals[:, :3])
    assert (completions[:, 3:] != originals[:, 3:]).any(axis=(1, 2, 3)).all()  # 18 drawn tokens of 16 colours each


@pytest.mark.parametrize(
    ("length", "layers", "blocks"),
    [(1024, 4, 8), (1024, 8, 4), (1024, 16, 2), (1024, 24, 1), (36, 2, 4), (30, 2, 2), (25, 2, 1), (64, 32, 1)],
)
def test_the_cache_is_cut_into_the_most_blocks_that_divide_it_within_the_unrolling_budget(length, layers, blocks):
    """Blocks of 8, 4, 2 or 1 positions' share; layers x blocks unrolled attention calls stay at most 32."""
    assert sampling.cache_blocks(length, layers) == blocks


def test_a_sampling_batch_is_the_images_wanted_within_the_cap_rounded_up_to_the_batch_shards():
    config = tiny_config()
    config.batch_size = 64
    eight = sharding.make_mesh(config)  # fsdp over the 8 devices: 8 batch shards
    assert sampling.batch_size(config, eight, 3) == 8
    assert sampling.batch_size(config, eight, 20) == 24
    assert sampling.batch_size(config, eight, 100) == 64  # config.batch_size caps it
    assert sampling.batch_size(config, eight, 100, cap=12) == 16
    assert sampling.batch_size(config, sharding.make_mesh(config, jax.devices()[:1]), 5) == 5


def test_progress_is_reported_at_every_image_row_and_the_bar_ends_full(monkeypatch):
    config = tiny_config(image_size=5)
    setup, mesh = _setup(config, jax.devices()[:1])
    reported = []
    sampler = sampling.make_sampler(setup, 8, top_k=0, num_colours=16, progress=reported.append)
    params = _params(setup)
    assert sampler.compile_seconds == 0.0  # nothing compiled yet
    with jax.set_mesh(mesh):
        started = time.perf_counter()
        jax.block_until_ready(sampler(params, np.zeros((8, 25), np.int32), 0, np.arange(8), 0, 1.0))
        first_call = time.perf_counter() - started
        compile_seconds = sampler.compile_seconds
        jax.block_until_ready(sampler(params, np.zeros((8, 25), np.int32), 0, np.arange(8), 0, 1.0))
    jax.effects_barrier()
    assert 0 < compile_seconds < first_call and sampler.compile_seconds == compile_seconds  # the first call's part
    assert sorted(int(i) for i in reported) == [0, 0, 5, 5, 10, 10, 15, 15, 20, 20]  # each of the 5 rows, per call
    bar = sampling.Progress(calls=3, length=25, desc="test")
    assert bar.bar.desc == "test" and bar.bar.total == 75 and bar.bar.unit == " positions" and not bar.bar.disable
    bar.position(10)
    bar.position(5)  # another device reporting an earlier row: the bar never goes back
    assert bar.bar.n == 10
    bar.next_call()
    assert bar.bar.n == 25
    bar.next_call()
    bar.position(5)  # the third call's row 5
    assert bar.bar.n == 55
    bar.close()
    assert bar.bar.n == bar.bar.total == 75
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert sampling.Progress(calls=1, length=25, desc="test").bar.disable  # one bar for a run: process 0's


def test_the_bars_clock_starts_at_the_first_row_drawn_not_at_compilation(monkeypatch):
    """A minute compiling, then 10 positions a second: the bar's rate and time left are the drawing's (its old clock
    counted the compilation: 32 minutes left shown for a 42-second draw)."""
    now = [1000.0]
    import tqdm.std

    monkeypatch.setattr(tqdm.std, "time", lambda: now[0])  # the clock a bar takes when it is made
    bar = sampling.Progress(calls=1, length=100, desc="test")
    now[0] += 60.0  # compiling
    bar.position(10)
    now[0] += 1.0
    bar.position(20)
    assert bar.bar.format_dict["elapsed"] == pytest.approx(1.0)
    assert bar.bar.format_dict["n"] == 20
    bar.close()


def test_generate_pads_the_last_batch_asks_to_stop_before_each_and_reports_each_call():
    """7 prompts in batches of 4: two calls, the second padded with one row that is dropped; a completion keeps
    its prompt's given tokens; a stop asked for before the second batch abandons the rest."""
    config = tiny_config(image_size=4)
    setup, mesh = _setup(config, jax.devices()[:1])
    params = _params(setup)
    sampler = sampling.make_sampler(setup, 4, top_k=0, num_colours=16)
    prompts = np.asarray(jax.random.randint(jax.random.key(2), (7, 16), 0, 16), np.int32)
    calls = []

    class Calls:
        def next_call(self):
            calls.append(len(calls))

    with jax.set_mesh(mesh):
        tokens = sampling.generate(sampler, params, prompts, 8, np.arange(7), 0, 1.0, progress=Calls())
        alone = sampling.generate(sampler, params, prompts[4:5], 8, np.arange(4, 5), 0, 1.0)
        asked = []
        with pytest.raises(base.Abandoned):
            sampling.generate(sampler, params, prompts, 8, np.arange(7), 0, 1.0,
                              stop=lambda: asked.append(1) or len(asked) > 1)  # fmt: skip
    assert tokens.shape == (7, 16) and calls == [0, 1] and len(asked) == 2
    np.testing.assert_array_equal(tokens[:, :8], prompts[:, :8])
    np.testing.assert_array_equal(tokens[4], alone[0])  # image 4 drawn alone or in a padded batch: the same


def test_tokens_render_through_the_palette_or_as_grey_levels():
    clusters = np.array([[-1.0, -1.0, -1.0], [1.0, 0.0, -1.0]], np.float32)
    coloured = sampling.render(np.array([[0, 1, 1, 0]]), clusters, 2)
    np.testing.assert_array_equal(coloured.reshape(4, 3), [[0, 0, 0], [255, 128, 0], [255, 128, 0], [0, 0, 0]])
    grey = sampling.render(np.array([[0, 1, 2, 3]]), None, 4)  # 4 levels: 0, 85, 170, 255
    assert grey.shape == (1, 2, 2, 3)
    np.testing.assert_array_equal(grey[0, ..., 0], [[0, 85], [170, 255]])
    assert (grey[..., 0] == grey[..., 2]).all() and grey.dtype == np.uint8
    np.testing.assert_array_equal(sampling.render(np.array([[0, 1, 1, 0]]), None, 2)[0, ..., 0], [[0, 255], [255, 0]])
    # 8 levels: whole steps of 255 // 7 = 36, so every level is exactly a uint8 and evenly spaced
    np.testing.assert_array_equal(sampling.render(np.array([[0, 1, 6, 7]]), None, 8)[0, ..., 0], [[0, 36], [216, 252]])


def test_the_originals_are_the_eval_splits_first_images_as_tokens():
    config = override(tiny_config(image_size=4), data__dataset="synthetic", data__eval_split="test")
    source = sources.Synthetic(config)
    tokens = sampling.held_out_tokens(config, source, None, 3)
    np.testing.assert_array_equal(tokens, source.get("test", np.arange(3)))
    assert tokens.dtype == np.int32
    available = source.num_examples("test")
    assert len(sampling.held_out_tokens(config, source, None, available + 5)) == available  # no more than there are


def test_the_originals_of_an_image_data_set_are_its_pixels_through_the_palette():
    class Images:  # black and white images: their tokens are the black and the white colour's
        kind = "images"

        def num_examples(self, split):
            return 3

        def get(self, split, indices, rngs):
            assert split == "test" and rngs is None
            return np.stack([np.full((4, 4, 3), 255 * (i % 2), np.uint8) for i in indices])

    config = override(tiny_config(image_size=4), data__eval_split="test")
    clusters = np.array([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]], np.float32)  # white, black (pixels scaled to [-1, 1])
    tokens = sampling.held_out_tokens(config, Images(), clusters, 5)
    assert tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens, [[1] * 16, [0] * 16, [1] * 16])


def test_an_unconditional_grid_is_as_square_as_it_goes_with_blank_cells_white():
    images = np.zeros((5, 4, 4, 3), np.uint8)
    grid = np.asarray(Image.open(io.BytesIO(sampling.unconditional_grid(images))))
    scale = sampling._scale(4)
    assert scale == 24  # a 4x4 image drawn at 96 pixels a side
    cell = 4 * scale + plots.GRID_GAP
    assert grid.shape[:2] == (2 * cell + plots.GRID_GAP, 3 * cell + plots.GRID_GAP)  # 2 rows of 3 for 5 images
    corner = plots.GRID_GAP
    assert (grid[corner, corner + 2 * cell] == 0).all()  # the fifth image: black
    assert (grid[corner + cell, corner + 2 * cell] == 255).all()  # the sixth cell: blank
    assert sampling._scale(28) == 3 and sampling._scale(64) == 1 and sampling._scale(200) == 1
    for side in range(1, 97):  # the largest whole enlargement that stays within 96 pixels a side
        assert side * sampling._scale(side) <= 96 < side * (sampling._scale(side) + 1), side
