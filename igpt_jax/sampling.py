"""Sampling: whole images from one compiled KV-cached loop, unconditional or completing held-out images.

`make_sampler` jits one program that generates the whole image: `lax.fori_loop`s over the positions (one per block
of the cache, see CACHE_BLOCKS), each iteration running the model on one token (IGPT.decode_step, each layer's keys
and values kept in a cache laid out for the mesh: images over the batch axes, heads over `tensor`), masking the
logits of colours the palette does not have, and drawing the next token (temperature, top-k; temperature 0 is
greedy). Positions before `given` take the prompt's tokens instead, so a completion is the same program as an
unconditional sample. No Python runs per token, and nothing is recompiled per position or per prompt length.

Randomness is per image: image j draws from fold_in(fold_in(key(seed), j), position), so an image depends on the
seed and its index alone, not on the batch it was drawn in, the padding, or the number of devices.

The sample evaluator (evaluators/sample.py) draws its grids with `generate`, `render` and the grid layouts here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from igpt_jax import defaults, palette, plots, sharding, steps
from igpt_jax import model as model_lib
from igpt_jax.data import preprocess, splits
from igpt_jax.data.sources import Source
from igpt_jax.evaluators import base
from igpt_jax.workdir import storage

SAMPLE_KEY = 0x73_61_6D_70  # folded into sample.seed's key: no training or evaluation key is the same


def choose(logits: jax.Array, keys: jax.Array, temperature: jax.Array, *, top_k: int, num_colours: int) -> jax.Array:
    """The next token per row of fp32 logits [B, vocab]: greedy (argmax) when temperature == 0, else a draw from
    softmax(logits / temperature) restricted to the top_k largest (0: all), with one key per row. Tokens the palette
    has no colour for (index >= num_colours) are never chosen."""
    vocab = logits.shape[-1]
    logits = jnp.where(jnp.arange(vocab) < num_colours, logits, -jnp.inf)
    if 0 < top_k < vocab:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)

    def draw() -> jax.Array:
        # Inverse CDF: one uniform per row against the running sum of exp((logits - max) / temperature). As exact
        # as jax.random.categorical's Gumbel-max trick, which draws a number per colour: for 8 rows of 513 colours
        # on a 2-core CPU, 23 us a position against 103 for categorical with the greedy argmax computed alongside.
        weights = jnp.exp((logits - jnp.max(logits, axis=-1, keepdims=True)) / temperature)
        cdf = jnp.cumsum(weights, axis=-1)
        total = cdf[:, -1:]
        u = jnp.minimum(jax.vmap(jax.random.uniform)(keys)[:, None] * total, jnp.nextafter(total, 0.0))
        return jnp.sum(cdf <= u, axis=-1)  # the first token whose cdf exceeds u; zero-weight tokens are skipped

    return jax.lax.cond(temperature > 0, draw, lambda: jnp.argmax(logits, axis=-1)).astype(jnp.int32)


class Sampler:
    """A jitted sampling loop for `batch` images: `sampler(params, prompt, given, image_ids, seed, temperature)` ->
    tokens [batch, N] int32 on the devices; prompt [batch, N] (only positions < given are read) and image_ids [batch]
    are host arrays, the same on every process. The first call compiles (timed as `compile_seconds`)."""

    def __init__(self, fn: Callable, batch: int, rows: NamedSharding):
        self.fn, self.batch, self.rows = fn, batch, rows
        self.compiled = None
        self.compile_seconds = 0.0

    def __call__(self, params, prompt, given: int, image_ids, seed: int, temperature: float) -> jax.Array:
        args = (
            params,
            self._put(np.asarray(prompt, np.int32)),
            jnp.int32(given),
            self._put(np.asarray(image_ids, np.int32)),
            jnp.uint32(seed),
            jnp.float32(temperature),
        )
        if self.compiled is None:
            start = time.perf_counter()
            self.compiled = self.fn.lower(*args).compile()
            self.compile_seconds = time.perf_counter() - start
        return self.compiled(*args)

    def _put(self, host: np.ndarray) -> jax.Array:
        """A host array that is the same on every process -> the global array, each process placing its rows."""
        spec = PartitionSpec(self.rows.spec[0], *(None,) * (host.ndim - 1))
        return jax.make_array_from_callback(host.shape, NamedSharding(self.rows.mesh, spec), lambda i: host[i])


# The cache is cut into blocks of positions and each position reads only the blocks filled so far: on average
# (1 + 1/blocks) / 2 of the cache instead of all of it. Reading the cache is what bounds decoding on a CPU (for
# benchmarks/sample_speed.py's model, 4 layers of width 256 and 16 images of 32x32, the keys and values a position
# reads stream at about 20 GB/s a core; one block was 1.2x slower than 8 when measured, 32 blocks 1.15x faster). The
# attention calls are unrolled, blocks x layers of them, and compile time grows with the square of the blocks (6 s
# for 8 blocks and 4 layers, 72 s for 32), so deep models keep one block: on accelerators their step is bound by the
# matmuls, not by reading the cache.
CACHE_BLOCKS = (8, 4, 2, 1)
MAX_UNROLLED_BLOCKS = 32  # layers x blocks


def cache_blocks(length: int, num_layers: int) -> int:
    """How many blocks a cache of `length` positions is cut into: the most of CACHE_BLOCKS that divides `length`
    and keeps num_layers x blocks <= MAX_UNROLLED_BLOCKS."""
    return next(b for b in CACHE_BLOCKS if length % b == 0 and (b == 1 or num_layers * b <= MAX_UNROLLED_BLOCKS))


def over_positions(model: model_lib.IGPT, batch: int, length: int, step: Callable, carry):
    """Runs `cache, carry = step(i, block, cache, carry)` for positions i = 0 .. length-1 with an empty cache: one
    lax.fori_loop per cache block (`block`, static, holds position i), all inside the caller's one program."""
    blocks = cache_blocks(length, model.num_layers)
    size = length // blocks
    cache = jax.tree.map(
        lambda c: sharding.constrain(c, model_lib.CACHE_NAMES), model.init_cache(batch, length, blocks)
    )
    for block in range(blocks):
        cache, carry = jax.lax.fori_loop(
            block * size, (block + 1) * size, lambda i, c, block=block: step(i, block, *c), (cache, carry)
        )
    return carry


def make_sampler(
    setup: steps.Setup, batch: int, *, top_k: int, num_colours: int, progress: Callable[[int], None] | None = None
) -> Sampler:
    """A jitted sampler for `batch` images under setup's model, mesh and parameter shardings. `progress(position)`,
    if given, is called from the device at the start of every image row (a host callback, not a loop in Python)."""
    config, mesh = setup.config, setup.mesh
    length = defaults.tokens_per_image(config)
    row = config.model.image_size
    batch_sharding = sharding.batch_sharding(config, mesh, 2)
    rows = NamedSharding(mesh, PartitionSpec(batch_sharding.spec[0]))

    def sample(params, prompt, given, image_ids, seed, temperature):
        model = nnx.merge(setup.graphdef, params)
        layers = model.layers()  # sliced once, outside the loops
        base = jax.random.fold_in(jax.random.key(seed), SAMPLE_KEY)
        image_keys = jax.vmap(jax.random.fold_in, (None, 0))(base, image_ids)

        def position(i, block, cache, carry):
            tokens, previous = carry
            if progress is not None:
                jax.lax.cond(i % row == 0, lambda: jax.debug.callback(progress, i), lambda: None)
            logits, cache = model.decode_step(previous, cache, i, block, layers)
            keys = jax.vmap(jax.random.fold_in, (0, None))(image_keys, i)
            drawn = choose(logits, keys, temperature, top_k=top_k, num_colours=num_colours)
            token = jnp.where(i < given, jax.lax.dynamic_index_in_dim(prompt, i, 1, keepdims=False), drawn)
            return cache, (jax.lax.dynamic_update_index_in_dim(tokens, token, i, 1), token)

        start = (jnp.zeros((batch, length), jnp.int32), jnp.zeros((batch,), jnp.int32))
        return over_positions(model, batch, length, position, start)[0]

    scalar = setup.replicated
    fn = jax.jit(
        sample,
        in_shardings=(setup.state_shardings["params"], batch_sharding, scalar, rows, scalar, scalar),
        out_shardings=batch_sharding,
    )
    return Sampler(fn, batch, rows)


def batch_size(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, wanted: int, cap: int = 0) -> int:
    """Images per sampling call: `wanted` (at most `cap`, 0: config.batch_size), rounded up to a multiple of the
    mesh's batch shards."""
    shards = math.prod(mesh.shape[a] for a in sharding.batch_axes(config, mesh))
    return -(-min(wanted, cap or config.batch_size) // shards) * shards


class Progress:
    """One progress bar over every position of every sampling call; fed from the device (`position`) at each image
    row. Several devices report the same position: the bar only moves forward. Its clock starts at the first report,
    after the first call's compilation, so its rate and time left describe drawing alone."""

    def __init__(self, calls: int, length: int, desc: str):
        self.length = length
        self.call = 0
        self.bar = tqdm(total=calls * length, desc=desc, unit=" positions", disable=jax.process_index() != 0)
        self._drawing = False

    def position(self, i) -> None:
        if not self._drawing:  # the first row drawn: compilation is over
            self.bar.reset(total=self.bar.total)
            self._drawing = True
        done = self.call * self.length + int(i)
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)

    def next_call(self) -> None:
        self.call += 1
        self.position(0)

    def close(self) -> None:
        self.bar.update(self.bar.total - self.bar.n)
        self.bar.close()


def generate(
    sampler: Sampler,
    params,
    prompts: np.ndarray,
    given: int,
    image_ids: np.ndarray,
    seed: int,
    temperature: float,
    progress: Progress | None = None,
    stop: base.StopCheck = base.never,
) -> np.ndarray:
    """Tokens [n, N] on the host for n prompts (rows of int32 [n, N], read before `given`), in batches of the
    sampler's size (the last padded); image_ids [n] pick each image's random stream. `stop` is asked before every
    batch (base.Abandoned)."""
    out = []
    for start in range(0, len(prompts), sampler.batch):
        base.check(stop)
        chunk, ids = prompts[start : start + sampler.batch], image_ids[start : start + sampler.batch]
        pad = sampler.batch - len(chunk)
        tokens = sampler(
            params,
            np.concatenate([chunk, np.zeros((pad, chunk.shape[1]), chunk.dtype)]),
            given,
            np.concatenate([ids, np.arange(pad) - pad]),  # padding rows draw from their own (negative) ids
            seed,
            temperature,
        )
        out.append(np.asarray(multihost_utils.process_allgather(tokens, tiled=True))[: len(chunk)])
        if progress is not None:
            progress.next_call()
    return np.concatenate(out)


COMPLETION_IDS = 1 << 30  # completions draw from image ids above this, unconditional samples from 0 up
MASKED_GREY = 128  # the part of a completion's input that is not given, as drawn in the grid


def render(tokens: np.ndarray, clusters: np.ndarray | None, vocab_size: int) -> np.ndarray:
    """uint8 images [n, H, W, 3] from tokens [n, H*W]: through the palette, or (token data sets, no palette) each
    token as a grey level."""
    if clusters is not None:
        return np.asarray(palette.dequantize(tokens, clusters))
    side = math.isqrt(tokens.shape[-1])
    grey = (tokens * (255 // max(vocab_size - 1, 1))).astype(np.uint8).reshape(len(tokens), side, side, 1)
    return np.repeat(grey, 3, axis=-1)


def held_out_tokens(config: ml_collections.ConfigDict, source: Source, clusters: np.ndarray | None, n: int):
    """Tokens [n, N] of the eval split's first n images: the originals that completions start from."""
    split = splits(config)[1]
    n = min(n, source.num_examples(split))
    data = source.get(split, np.arange(n), None)
    if source.kind == "tokens":
        return np.asarray(data, np.int32)
    return np.asarray(palette.quantize(data, clusters), np.int32)


def prompt_files(pattern: str) -> list[storage.Path]:
    """The image files a `prompts` glob names (FOLDER/PATTERN, local or gs://; no `**`, which gs:// cannot list
    cheaply), in sorted order."""
    folder, _, name = pattern.rpartition("/")
    return sorted(storage.path(folder or ".").glob(name))


def prompt_tokens(files: list[storage.Path], side: int, clusters: np.ndarray) -> np.ndarray:
    """Tokens [n, side*side] of the files: each resized to the model's side (the whole image, no crop) and quantized
    with the run's palette."""

    def resized(file: storage.Path) -> np.ndarray:
        return preprocess.resize_only(preprocess.open_image(file.read_bytes(), str(file)), str(file), side, None, False)

    images = [resized(file) for file in files]
    return np.asarray(palette.quantize(np.stack(images), clusters), np.int32)


def _grid_shape(n: int) -> tuple[int, int]:
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def _scale(side: int) -> int:
    return max(1, 96 // side)  # 28x28 drawn at 84x84, 32x32 at 96x96, 64x64 as is


def unconditional_grid(images: np.ndarray) -> bytes:
    rows, cols = _grid_shape(len(images))
    padded = np.concatenate([images, np.full((rows * cols - len(images), *images.shape[1:]), 255, np.uint8)])
    return plots.image_grid(padded.reshape(rows, cols, *images.shape[1:]), scale=_scale(images.shape[1]))


def completion_grid(originals: np.ndarray, completions: np.ndarray, given_rows: int) -> bytes:
    """The paper's layout, one row per held-out image: the given part (the rest grey) | completions | original."""
    shown = originals.copy()
    shown[:, given_rows:] = MASKED_GREY
    per = len(completions) // len(originals)
    grid = np.concatenate(
        [shown[:, None], completions.reshape(len(originals), per, *originals.shape[1:]), originals[:, None]], axis=1
    )
    return plots.image_grid(grid, scale=_scale(originals.shape[1]))
